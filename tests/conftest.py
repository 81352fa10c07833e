from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cookiecutter.main import cookiecutter

TEMPLATE = Path(__file__).resolve().parents[1]
DEFAULTS = json.loads((TEMPLATE / "cookiecutter.json").read_text())


def bake(output_dir: Path, **context: str) -> Path:
    """Bake the template with --no-input and return the project folder."""
    project = cookiecutter(
        str(TEMPLATE), no_input=True, output_dir=str(output_dir), extra_context=context
    )
    return Path(project)


def run_nox(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run nox on a project's noxfile, from the project folder, and capture what it says."""
    command = [sys.executable, "-m", "nox", "-f", str(project / "noxfile.py"), *args]
    return subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def default_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bake(tmp_path_factory.mktemp("default"))
