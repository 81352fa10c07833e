"""deploy/k8s: every overlay renders (kustomize), validates (Kubernetes schemas) and agrees with
the image and the server; a disagreement is reported with the file, the field and both values.

No cluster and no torch: kubectl only renders, the server is read, never started.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools import k8s
from tools.k8s_agreement import prestop_s

ROOT = k8s.ROOT

# What tools/k8s.py reads: a copy of these is a project whose manifests can be broken.
CHECKED_FILES = ["deploy", "configs", "Dockerfile", "pyproject.toml"]


def server_of(manifests: k8s.Manifests) -> dict:
    (deployment,) = manifests.of_kind("Deployment")
    (server,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server"
    ]
    return server


@pytest.mark.parametrize("variant", k8s.variants(), ids=lambda v: v.name)
def test_variant_renders_validates_and_agrees_with_image_and_server(variant: k8s.Variant):
    manifests, problems = k8s.check(variant)
    assert [str(p) for p in problems] == []
    kinds = sorted(doc["kind"] for doc in manifests.documents)
    autoscaler = "ScaledObject" if "keda" in variant.components else "HorizontalPodAutoscaler"
    prepull = ["DaemonSet"] if "prepull" in variant.components else []
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "Job", "PersistentVolumeClaim", "PodDisruptionBudget",
         "PrometheusRule", "Service", "ServiceMonitor", autoscaler, *prepull]
    )  # fmt: skip


def test_the_prepull_daemonset_pulls_the_servers_image_on_every_node():
    """Its init container is the server's image, tag included, so a release pre-pulls itself."""
    manifests = k8s.render(k8s.Variant("gpu", ("prepull",)))
    (daemonset,) = manifests.of_kind("DaemonSet")
    (pull,) = daemonset["spec"]["template"]["spec"]["initContainers"]
    assert pull["image"] == server_of(manifests)["image"]
    assert ":" in pull["image"].rpartition("/")[2]  # the overlay's tag, not latest
    tolerations = daemonset["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def test_the_config_map_holds_configs_serve_yaml():
    manifests = k8s.render(k8s.Variant("cpu"))
    (config_map,) = manifests.of_kind("ConfigMap")
    serve_yaml = (ROOT / "configs" / "serve.yaml").read_text(encoding="utf-8")
    assert config_map["data"]["serve.yaml"] == serve_yaml
    assert set(config_map["data"]) == {"serve.yaml", "weights.py"}
    origin = manifests.origins[("Deployment", "{{ cookiecutter.project_slug }}")]
    assert origin == "deploy/k8s/base/deployment.yaml"


@pytest.mark.parametrize("overlay", sorted(v.overlay for v in k8s.variants() if not v.components))
def test_kubectl_apply_k_takes_every_overlay_as_it_is(overlay: str):
    """What `kubectl apply -k deploy/k8s/overlays/NAME` renders, with kustomize's defaults (no
    load-restrictor option, as Argo CD and Flux too), is what the checks above see."""
    command = [k8s.kubectl(), "kustomize", f"deploy/k8s/overlays/{overlay}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert documents == k8s.render(k8s.Variant(overlay)).documents


def test_a_file_outside_the_kustomization_folder_is_refused(tmp_path: Path):
    """The reason configs/ holds a kustomization of its own: kustomize's default refuses a
    file from above the folder, and so does render()."""
    root = broken_copy(
        tmp_path,
        "deploy/k8s/base/kustomization.yaml",
        "      - weights.py",
        "      - serve.yaml=../../../configs/serve.yaml",
    )
    with pytest.raises(k8s.K8sError, match=r"(?s)does not render:\n.*not in or below"):
        k8s.render(k8s.Variant("cpu"), root)


def test_gpu_overlay_asks_for_one_gpu_on_a_gpu_node_and_cpu_overlay_for_none():
    gpu = k8s.render(k8s.Variant("gpu"))
    (deployment,) = gpu.of_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert server_of(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert "runtimeClassName" not in pod
    with_runtime = k8s.render(k8s.Variant("gpu", ("nvidia-runtime",)))
    (deployment,) = with_runtime.of_kind("Deployment")
    assert deployment["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"

    cpu = k8s.render(k8s.Variant("cpu"))
    assert "nvidia.com/gpu" not in server_of(cpu)["resources"].get("limits", {})
    (deployment,) = cpu.of_kind("Deployment")
    assert "tolerations" not in deployment["spec"]["template"]["spec"]


def test_the_grace_period_outlasts_the_drain_the_config_asks_for():
    """Read from the files, so a change of either side is caught."""
    manifests = k8s.render(k8s.Variant("gpu"))
    (deployment,) = manifests.of_kind("Deployment")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    serve = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text(encoding="utf-8"))
    drain = serve["server"]["shutdown_grace_s"]
    assert grace > prestop_s(server_of(manifests)) + drain


# Each case breaks one file of a copy of the project: (file, old text, new text, words that
# the error must contain: the field and both values).
BROKEN = {
    "drain longer than the grace period": (
        "configs/serve.yaml", "shutdown_grace_s: 30", "shutdown_grace_s: 60",
        ["terminationGracePeriodSeconds", "50", "60"],
    ),
    "server on another port": (
        "configs/serve.yaml", "port: 8000", "port: 9000",
        ["ports", "8000", "9000"],
    ),
    "server on loopback only": (
        "deploy/k8s/base/deployment.yaml", "- server.host=0.0.0.0", "- server.log_level=info",
        ["args", "server.host is 127.0.0.1", "0.0.0.0"],
    ),
    "image user changed": (
        "Dockerfile", "USER 10001:10001", "USER 10002:10002",
        ["securityContext.runAsUser", "10001", "10002"],
    ),
    "liveness on /ready": (
        "deploy/k8s/base/deployment.yaml", "path: /health", "path: /ready",
        ["livenessProbe.httpGet.path", "/ready", "/health"],
    ),
    "probe on a route the server lacks": (
        "deploy/k8s/base/deployment.yaml", "path: /health", "path: /healthz",
        ["livenessProbe.httpGet.path", "/healthz", "/health"],
    ),
    "startup budget under the image's start period": (
        "deploy/k8s/base/deployment.yaml", "failureThreshold: 60", "failureThreshold: 6",
        ["startupProbe", "60 s", "180 s"],
    ),
    "no preStop": (
        "deploy/k8s/base/deployment.yaml", "preStop:\n              sleep:",
        "postStart:\n              sleep:",
        ["lifecycle.preStop", "missing"],
    ),
    "root file system writable": (
        "deploy/k8s/base/deployment.yaml",
        "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false",
        ["readOnlyRootFilesystem", "False", "true"],
    ),
    "no writable /tmp": (
        "deploy/k8s/base/deployment.yaml", "- name: tmp\n              mountPath: /tmp",
        "- name: tmp\n              mountPath: /scratch",
        ["volumeMounts", "/tmp is not mounted"],
    ),
    "weights volume away from HF_HOME": (
        "Dockerfile", "HF_HOME=/models \\", "HF_HOME=/weights \\",
        ["volumeMounts", "['/models']", "HF_HOME=/weights"],
    ),
    "image of another owner": (
        "pyproject.toml", "github.com/{{ cookiecutter.github_owner }}/", "github.com/other-org/",
        ["containers[server].image", "ghcr.io/other-org/", "ghcr.io/{{ cookiecutter.github_owner | lower }}/"],
    ),
    "autoscaling on a metric the server does not export": (
        "deploy/k8s/base/hpa.yaml", "name: llm_requests_in_flight", "name: llm_queue_length",
        ["spec.metrics[].pods.metric.name", "llm_queue_length", "llm_requests_in_flight"],
    ),
    "recording rule on a metric the server does not export": (
        "deploy/k8s/base/prometheusrule.yaml", "rate(llm_cost_usd_total[5m])",
        "rate(llm_dollars_total[5m])",
        ["spec.groups[].rules[2].expr", "llm_dollars_total", "neither the server exports"],
    ),
    "API key not from a Secret": (
        "configs/serve.yaml", "api_key_env: {{ cookiecutter.package_name | upper }}_API_KEY",
        "api_key_env: OTHER_KEY",
        ["env", "OTHER_KEY"],
    ),
    "misspelt field (strict schema)": (
        "deploy/k8s/base/pdb.yaml", "maxUnavailable: 1", "maxUnavailabel: 1",
        ["deploy/k8s/base/pdb.yaml", "spec", "maxUnavailabel", "Kubernetes 1.37 schema"],
    ),
    "wrong type (schema)": (
        "deploy/k8s/base/deployment.yaml", "revisionHistoryLimit: 3", "revisionHistoryLimit: three",
        ["deploy/k8s/base/deployment.yaml", "spec.revisionHistoryLimit", "'three'"],
    ),
}  # fmt: skip


def broken_copy(tmp_path: Path, relative: str, old: str, new: str) -> Path:
    for name in CHECKED_FILES:
        source = ROOT / name
        copy = shutil.copytree if source.is_dir() else shutil.copy2
        copy(source, tmp_path / name)
    target = tmp_path / relative
    text = target.read_text(encoding="utf-8")
    assert old in text, f"{relative} no longer holds {old!r}: update this test"
    target.write_text(text.replace(old, new, 1), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_a_disagreement_names_the_file_the_field_and_both_values(tmp_path: Path, case: str):
    relative, old, new, words = BROKEN[case]
    root = broken_copy(tmp_path, relative, old, new)
    _, problems = k8s.check(k8s.Variant("gpu"), root)
    messages = [str(p) for p in problems]
    matching = [m for m in messages if all(word in m for word in words)]
    assert matching, f"no error with {words} among {messages}"
    assert all(m.startswith(("deploy/k8s/", "Dockerfile")) for m in messages), messages


def test_an_overlay_that_does_not_render_is_an_error_naming_it(tmp_path: Path):
    root = broken_copy(
        tmp_path,
        "deploy/k8s/overlays/cpu/kustomization.yaml",
        "- path: server.yaml",
        "- path: missing.yaml",
    )
    with pytest.raises(k8s.K8sError, match=r"(?s)overlays/cpu does not render:\n.*missing\.yaml"):
        k8s.render(k8s.Variant("cpu"), root)


def run_tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tools.k8s", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_cli_writes_the_rendered_overlay(tmp_path: Path):
    output = tmp_path / "cpu.yaml"
    result = run_tool("cpu", "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert "overlays/cpu: 9 resources; 7 valid against the Kubernetes 1.37 schemas" in result.stdout
    assert "kind: Deployment" in output.read_text()


def test_cli_names_the_overlays_when_one_does_not_exist():
    result = run_tool("tpu")
    assert result.returncode == 1
    assert "no overlay 'tpu'; the overlays are: cpu, gpu" in result.stderr
    assert "Traceback" not in result.stderr


def test_apply_refuses_without_a_current_context(tmp_path: Path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    result = run_tool("cpu", "--apply", "--output", str(tmp_path / "cpu.yaml"), env=env)
    assert result.returncode == 1
    assert "no current kubectl context" in result.stderr
    assert "nothing was applied" in result.stderr
    assert "Traceback" not in result.stderr


def load_weights_script():
    path = ROOT / "deploy" / "k8s" / "base" / "weights.py"
    spec = importlib.util.spec_from_file_location("weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_weights_wait_holds_until_the_model_is_fetched_and_the_adapters_exist(
    tmp_path, monkeypatch, capsys
):
    weights = load_weights_script()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "models"))
    adapter = tmp_path / "models" / "adapters" / "support"
    config = tmp_path / "serve.yaml"
    config.write_text(f"model:\n  name_or_path: org/model\nadapters:\n  support: {adapter}\n")

    assert weights.main(["wait", "--config", str(config), "--timeout", "0"]) == 1
    err = capsys.readouterr().err
    assert "org/model (not fetched yet" in err
    assert f"{adapter} (no such folder)" in err

    weights.marker("org/model").parent.mkdir(parents=True)
    weights.marker("org/model").write_text("snapshot\n")
    adapter.mkdir(parents=True)
    assert weights.main(["wait", "--config", str(config), "--timeout", "0"]) == 0


def test_weights_fetch_leaves_a_model_folder_alone_and_names_a_bad_config(tmp_path, capsys):
    weights = load_weights_script()
    config = tmp_path / "serve.yaml"
    config.write_text("model:\n  name_or_path: /models/merged\n")
    assert weights.main(["fetch", "--config", str(config)]) == 0
    assert "is a folder, not a hub id" in capsys.readouterr().out

    config.write_text("model:\n  name_or_pth: org/model\n")
    assert weights.main(["fetch", "--config", str(config)]) == 2
    assert "name_or_pth" in capsys.readouterr().err
