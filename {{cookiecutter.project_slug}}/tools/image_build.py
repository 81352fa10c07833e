"""The image's build steps that must fail fast and clearly (the Dockerfile runs them).

    python tools/image_build.py deps    --torch-index URL [--index URL] [--extra-index URL]
                                        [--ca-bundle FILE] [--requirements FILE] [--no-deps]
                                        /opt/venv
    python tools/image_build.py verify  --backend cu128 /opt/venv
    python tools/image_build.py project /opt/venv /opt/project [--no-check]

Why a script and not shell in the Dockerfile: pip, given an index it cannot reach, retries
it for every package and then quietly takes PyPI's default torch (a CUDA 13 build), and
`pip check` passes. So the indexes are probed first with a short timeout, and the installed
torch build is checked against the backend this project was generated for.
Standard library only: it runs on the base image's Python before anything is installed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PROBE_TIMEOUT_S = 15
# pip's own defaults are 5 retries of 15 s per package; an index that answers needs few.
PIP_NETWORK = ["--retries", "2", "--timeout", "20"]
INSTALL = ["install", "--no-cache-dir", "--no-compile"]  # bytecode: compiled after, selectively
FIX = "pass a reachable mirror with --build-arg {arg}=URL (README: 'The serving image')"


class BuildError(Exception):
    """One line for the build log: what failed and how to fix it."""


def probe(index: str, project: str, arg: str, ca_bundle: str | None = None) -> None:
    """GET <index>/<project>/ (PEP 503) within PROBE_TIMEOUT_S, or a BuildError naming it."""
    url = index.rstrip("/") + f"/{project}/"
    context = None
    if ca_bundle:
        import ssl

        if not Path(ca_bundle).is_file():
            raise BuildError(
                f"CA_BUNDLE={ca_bundle} is not a file in the build context; put the PEM file "
                "under certs/ and pass its path, e.g. --build-arg CA_BUNDLE=certs/proxy-ca.pem"
            )
        context = ssl.create_default_context(cafile=ca_bundle)
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S, context=context) as answer:
            answer.read(1)
        return
    except urllib.error.HTTPError as error:
        failed = f"answered {error.code} for {url}"
        if error.code == 404:
            failed = f"has no {project!r} project ({url}: 404)"
    except (OSError, ValueError) as error:  # DNS, refused, timeout, TLS, malformed URL
        reason = getattr(error, "reason", error)
        failed = f"cannot be reached ({reason})"
        if "CERT" in str(reason):
            failed += " (a TLS-intercepting proxy? see --build-arg CA_BUNDLE)"
    raise BuildError(f"the index {index} {failed}; " + FIX.format(arg=arg))


def pip(venv: Path, *args: str, ca_bundle: str | None = None, **run: Any) -> str:
    """The base image's pip, working on the venv (which has no pip of its own); its output,
    when `run` asks subprocess.run to capture it."""
    cert = ["--cert", ca_bundle] if ca_bundle else []
    python = str(venv / "bin" / "python")
    command = [sys.executable, "-m", "pip", "--python", python, *cert, *args]
    done = subprocess.run(command, text=True, **run)
    if done.returncode:
        raise BuildError(f"pip {args[0]} failed (exit {done.returncode}); see the lines above")
    return done.stdout


def deps(args: argparse.Namespace) -> None:
    """Each given index probed (for pip, or for torch), then the lock installed from them."""
    venv, ca, indexes = Path(args.venv), args.ca_bundle or None, []
    for url, project, arg, option in (
        (args.index, "pip", "PIP_INDEX_URL", "--index-url"),
        (args.extra_index, "pip", "PIP_EXTRA_INDEX_URL", "--extra-index-url"),
        (args.torch_index, "torch", "TORCH_INDEX_URL", "--extra-index-url"),
    ):
        if url:
            probe(url, project, arg, ca)
            indexes += [option, url]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    install = [*INSTALL, *PIP_NETWORK, *indexes, *(["--no-deps"] if args.no_deps else [])]
    pip(venv, *install, "--requirement", args.requirements, ca_bundle=ca)
    (venv / "installed.txt").write_text(pip(venv, "freeze", capture_output=True))


def torch_build(venv: Path) -> tuple[str, str | None]:
    """torch's version and the CUDA version it was built for (None: a CPU build), from torch
    itself: PyPI's default build carries no local tag (+cu130) in its version."""
    code = "import torch; print(torch.__version__, torch.version.cuda)"
    python = str(venv / "bin" / "python")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise BuildError(f"torch does not import: {done.stderr.strip().splitlines()[-1:]}")
    version, cuda = done.stdout.split()
    return version, None if cuda == "None" else cuda


def check_build(version: str, cuda: str | None, backend: str) -> str:
    """The build must be the backend's: cpu has no CUDA, cu128 is CUDA 12.8, and so on.
    Returns the build found, as "CPU" or "CUDA 12.8"."""
    found = f"CUDA {cuda}" if cuda else "CPU"
    digits = backend.removeprefix("cu")
    if cuda == (None if backend == "cpu" else f"{digits[:-1]}.{digits[-1]}"):
        return found
    raise BuildError(
        f"torch {version} ({found} build) is installed, but this image is for {backend}: the "
        f"torch index did not serve a {backend} build; pass --build-arg TORCH_INDEX_URL=<an "
        f"index with {backend} wheels> (default https://download.pytorch.org/whl/{backend})"
    )


def verify(args: argparse.Namespace) -> None:
    version, cuda = torch_build(Path(args.venv))
    build = check_build(version, cuda, args.backend)
    print(f"image_build: torch {version} ({build} build) matches {args.backend}")


def project(args: argparse.Namespace) -> None:
    """The project alone under a prefix of its own: its image layer is kilobytes, so a code
    change re-pulls that layer and not the gigabytes of dependencies below it."""
    venv, prefix = Path(args.venv), Path(args.prefix)
    pip(venv, *INSTALL, "--no-deps", "--prefix", str(prefix), ".")
    if not args.no_check:  # installed beside another lock (vLLM's), its pins are not ours
        site = next(prefix.glob("lib/python*/site-packages"))
        try:
            pip(venv, "check", env={**os.environ, "PYTHONPATH": str(site)})
        except BuildError:
            raise BuildError("pip check found broken requirements; see the lines above") from None
    compileall = ["-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash", str(prefix)]
    subprocess.run([str(venv / "bin" / "python"), *compileall], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    step = steps.add_parser("deps", help="probe the indexes, install the lock into VENV")
    step.add_argument("venv")
    step.add_argument("--requirements", default="requirements/serve.txt")
    step.add_argument("--torch-index", default="")
    step.add_argument("--index", default="", help="replaces PyPI (a mirror)")
    step.add_argument("--extra-index", default="")
    step.add_argument("--ca-bundle", default="", help="PEM file that pip and the probe trust")
    step.add_argument("--no-deps", action="store_true", help="the lock is complete: no resolving")
    step.set_defaults(run=deps)
    step = steps.add_parser("verify", help="torch's build tag must match BACKEND")
    step.add_argument("venv")
    step.add_argument("--backend", required=True)
    step.set_defaults(run=verify)
    step = steps.add_parser("project", help="install the project alone under PREFIX")
    step.add_argument("venv")
    step.add_argument("prefix")
    step.add_argument("--no-check", action="store_true", help="no pip check (beside vLLM's lock)")
    step.set_defaults(run=project)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except BuildError as error:
        print(f"image build failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
