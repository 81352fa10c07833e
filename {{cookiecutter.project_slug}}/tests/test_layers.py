"""The package's layers (pyproject.toml's [tool.importlinter]): imports run downhill only,
the meter and the server keep out of the training stack, and the launcher stays light."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "{{ cookiecutter.package_name }}"


def lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """import-linter's check, in a process of its own (it reconfigures logging)."""
    check = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
             "sys.exit(lint_imports(no_cache=True))"]  # fmt: skip
    return subprocess.run(check, cwd=cwd, capture_output=True, text=True, env=env)


def test_imports_keep_the_layers():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_an_upward_import_breaks_the_layers(tmp_path: Path):
    """The check can fail: a copy of the package whose run folder imports the server."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src" / PACKAGE, copy / PACKAGE)
    runs = copy / PACKAGE / "runs.py"
    runs.write_text(runs.read_text() + f"\nfrom {PACKAGE}.serving import config as _\n")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    done = lint_imports(tmp_path, env={"PYTHONPATH": str(copy), "PATH": ""})
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"{PACKAGE}.runs is not allowed to import {PACKAGE}.serving" in done.stdout


def test_importing_the_launcher_imports_no_torch():
    code = f"import sys, {PACKAGE}.training.launch; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_readme_layout_names_every_module():
    """The README's package map ("in the order data flows") has a line for every module:
    its path, or its name on a line of the same folder."""
    text = (ROOT / "README.md").read_text()
    block = text.split("The package in the order data flows", 1)[1].split("```")[1]
    lines = [line.split() for line in block.splitlines() if line.strip()]
    package = ROOT / "src" / PACKAGE
    unnamed = []
    for module in sorted(package.rglob("*.py")):
        relative = module.relative_to(package)
        if relative.name in ("__init__.py", "__main__.py"):
            continue
        folder = "" if len(relative.parts) == 1 else f"{relative.parent.as_posix()}/"
        named = any(
            words[0] == relative.as_posix()
            or (words[0].startswith(folder) and ("/" in words[0]) == bool(folder)
                and any(word.strip(",;:()") == relative.name for word in words))
            for words in lines
        )  # fmt: skip
        if not named:
            unnamed.append(relative.as_posix())
    assert not unnamed, f"README.md's layout lacks a line for {unnamed}"
