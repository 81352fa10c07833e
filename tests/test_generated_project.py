"""The guarantee that generated projects work: install one and run its own suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The CPU build of torch for Python 3.11 that this machine (and CI) installs
# without a download; any torch the project's range accepts would do.
TORCH = os.environ.get("COOKIECUTTER_LORA_TORCH", "torch==2.13.0")


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed ({result.returncode}):\n"
        f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    )
    return result


@pytest.mark.slow
def test_baked_project_installs_and_passes_its_own_tests(default_project: Path):
    venv = default_project / ".venv"
    run([sys.executable, "-m", "venv", str(venv)], default_project)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run([*pip, TORCH], default_project)
    run([*pip, "-e", ".[dev]"], default_project)

    help_text = run([str(venv / "bin" / "lora_chat"), "--help"], default_project).stdout
    assert "info" in help_text

    result = run([python, "-m", "pytest", "-p", "no:cacheprovider"], default_project)
    print(result.stdout[-3000:])
    assert " passed" in result.stdout
    assert " failed" not in result.stdout
