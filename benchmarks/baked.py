"""The baked project that the template's benchmark scripts measure.

The scripts (train_throughput.py, meter_accuracy.py, env_size.py, code_change.py,
layer_codecs.py) live in the template, not in a baked project: they check the template's
claims. Each takes the project's folder as `--project DIR` and runs with that project's own
interpreter (`DIR/.venv/bin/python`, which has the project installed), so it measures the
project as its user runs it. Its package is the one folder under `DIR/src` with an
`__init__.py`; the project's own helpers (the tiny model builder of `tests/conftest.py`, the
docker and registry code of `tools/image_report.py`) are loaded from their files, leaving
the project's import path alone.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

TEMPLATE = Path(__file__).resolve().parents[1]
TINY_MODEL = "tiny random Llama (hidden 256, 4 layers)"


def package_name(project: Path) -> str:
    """The project's package: the one folder under src/ with an __init__.py."""
    src = project / "src"
    found = sorted(init.parent.name for init in src.glob("*/__init__.py"))
    if len(found) != 1:
        raise SystemExit(f"{src} should hold one package, found {found or 'none'}")
    return found[0]


def project_folder(value: str) -> Path:
    """argparse type of --project: an existing baked project's folder, absolute."""
    folder = Path(value).resolve()
    if not (folder / "pyproject.toml").is_file():
        raise argparse.ArgumentTypeError(f"{folder} is not a baked project (no pyproject.toml)")
    package_name(folder)
    return folder


def add_project_argument(parser: argparse.ArgumentParser, own_python: bool = True) -> None:
    """--project DIR; own_python: the script imports the project's package, so it runs with
    the project's interpreter."""
    where = "; run this script with its interpreter (DIR/.venv/bin/python)" if own_python else ""
    parser.add_argument(
        "--project", type=project_folder, required=True, help=f"the baked project's folder{where}"
    )


def module(project: Path, name: str = "") -> ModuleType:
    """`<package>.<name>` of the project, as this interpreter imports it."""
    package = package_name(project)
    try:
        found = importlib.import_module(f"{package}.{name}" if name else package)
    except ModuleNotFoundError as error:
        if error.name != package:  # the package is there; something it imports is not
            raise
        raise SystemExit(
            f"{sys.executable} cannot import {package}: run this with the project's own "
            f"interpreter, {project / '.venv' / 'bin' / 'python'}"
        ) from None
    return found


def check_installed(project: Path) -> None:
    """Warn when the interpreter imports the package from somewhere other than DIR/src (a
    non-editable install, or another project's): the figures would be that code's."""
    where = Path(module(project).__file__ or "").resolve()
    if not where.is_relative_to(project / "src"):
        package = package_name(project)
        print(
            f"warning: {package} is imported from {where}, not from {project / 'src'}",
            file=sys.stderr,
        )


def load_file(path: Path, name: str) -> ModuleType:
    """A module from its file, under `name`, without adding its folder to sys.path."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded  # dataclasses look their module up by name
    spec.loader.exec_module(loaded)
    return loaded


def project_conftest(project: Path) -> ModuleType:
    """The project's tests/conftest.py: it builds the tiny model and tokenizer in code."""
    return load_file(project / "tests" / "conftest.py", f"{package_name(project)}_test_helpers")


def image_tools(project: Path) -> ModuleType:
    """The project's tools/image_report.py: its docker and registry helpers."""
    return load_file(project / "tools" / "image_report.py", f"{package_name(project)}_image_report")


def pushed_manifest(tools: ModuleType, registry: Any, tag: str) -> dict[str, Any]:
    """Push the image `tag` to `registry` (one of tools.Registry, entered) and return its
    manifest there; the image keeps only its own tag. `tools` is image_tools(project)."""
    repository, version = tools.split(tag)
    remote = f"{registry.address}/{repository}:{version}"
    tools.docker("tag", tag, remote)
    tools.docker("push", "-q", remote)
    tools.docker("rmi", remote, check=False)  # the tag only: `tag` keeps the image
    return registry.manifest(repository, version)


def tiny_model(project: Path, folder: Path) -> Path:
    """The tiny random Llama of the benchmarks, saved to folder: about 3M parameters, wide
    enough that compute, not Python overhead, dominates."""
    helpers = project_conftest(project)
    tokenizer = helpers.build_tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    helpers.build_tiny_model(tokenizer, hidden_size=256, layers=4).save_pretrained(folder)
    return folder
