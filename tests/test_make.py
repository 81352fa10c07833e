"""The Makefiles (template root and a baked project): one target per nox session, each running
that session with ARGS after --; `help`, the default, lists them all."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEMPLATE

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
# Targets that are not nox sessions: the session list, and `make test` for `make tests`.
EXTRA_TARGETS = {"help", "test"}
TARGET = re.compile(r"^([A-Za-z0-9_-]+):(?!=)", re.MULTILINE)


@pytest.fixture(params=["template", "project"])
def folder(request: pytest.FixtureRequest) -> Path:
    """A folder with a noxfile.py and its Makefile."""
    return TEMPLATE if request.param == "template" else request.getfixturevalue("default_project")


def nox_sessions(folder: Path) -> dict[str, str]:
    """Every session the noxfile defines, name -> first line of its docstring, from nox."""
    # `--list --json` lists the default sessions only; a keyword every name matches: all.
    list_all = ["--list", "--json", "-k", "not __no_such_session__"]
    command = [sys.executable, "-m", "nox", "-f", str(folder / "noxfile.py"), *list_all]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return {session["name"]: session["description"] for session in json.loads(result.stdout)}


def make(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = ["make", "--no-print-directory", "-C", str(folder), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_every_nox_session_has_a_target_that_runs_it_with_args(folder: Path):
    sessions = nox_sessions(folder)
    assert {"tests", "lint"} <= set(sessions)
    for name in sessions:
        result = make(folder, "-n", name, 'ARGS=key=value --flag "two words"')
        assert result.returncode == 0, (
            f"{folder / 'noxfile.py'} has a session `{name}` but {folder / 'Makefile'} has no "
            f"target for it: add `{name}:` with the recipe `nox -s {name} -- $(ARGS)`\n"
            + result.stderr
        )
        assert result.stdout == f'nox -s {name} -- key=value --flag "two words"\n'
    assert make(folder, "-n", "test").stdout.split() == ["nox", "-s", "tests", "--"]


def test_targets_are_the_sessions_and_all_phony(folder: Path):
    text = (folder / "Makefile").read_text()
    targets = set(TARGET.findall(text)) - {".PHONY", ".DEFAULT_GOAL"}
    assert targets == set(nox_sessions(folder)) | EXTRA_TARGETS
    (phony,) = re.findall(r"^\.PHONY:(.*)$", text, re.MULTILINE)
    assert set(phony.split()) == targets
    assert "{{" not in text and "{%" not in text  # nothing for cookiecutter to render


@pytest.mark.skipif(shutil.which("nox") is None, reason="`make help` runs nox, not on PATH")
def test_help_is_the_default_and_lists_each_session_with_its_description(folder: Path):
    default = make(folder)
    assert default.returncode == 0, default.stderr
    assert default.stdout == make(folder, "help").stdout
    assert 'make TARGET [ARGS="..."] runs nox -s TARGET -- ARGS' in default.stdout
    for name, description in nox_sessions(folder).items():
        assert f"{name} -> {description}" in default.stdout
