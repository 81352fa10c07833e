"""The package's layers (pyproject.toml's [tool.importlinter]): imports run downhill only,
the meter and the server keep out of the training stack, and the launcher stays light."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "{{ cookiecutter.package_name }}"


def test_imports_keep_the_layers(monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    assert code == 0, capsys.readouterr().out[-4000:]


def test_an_upward_import_breaks_the_layers(tmp_path: Path):
    """The check can fail: a copy of the package whose run folder imports the server."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src" / PACKAGE, copy / PACKAGE)
    runs = copy / PACKAGE / "runs.py"
    runs.write_text(runs.read_text() + f"\nfrom {PACKAGE}.serving import config as _\n")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    check = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
             "sys.exit(lint_imports(no_cache=True))"]  # fmt: skip
    done = subprocess.run(check, cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(copy), "PATH": ""})  # fmt: skip
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"{PACKAGE}.runs is not allowed to import {PACKAGE}.serving" in done.stdout


def test_importing_the_launcher_imports_no_torch():
    code = f"import sys, {PACKAGE}.training.launch; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
