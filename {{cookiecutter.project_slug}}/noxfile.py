"""Developer tasks: `nox -l` lists them, `nox -s NAME` runs one."""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]

PYTHON = "{{ cookiecutter.python_version }}"
# torch wheels for the backend this project was generated for. Set
# TORCH_INDEX_URL to another index, or to "" to take torch from PyPI's default.
TORCH_BACKEND_INDEX = "https://download.pytorch.org/whl/{{ cookiecutter.torch_backend }}"
TORCH_INDEX_URL = os.environ.get("TORCH_INDEX_URL", TORCH_BACKEND_INDEX)


def install_project(session: nox.Session, extras: str) -> None:
    index = ["--extra-index-url", TORCH_INDEX_URL] if TORCH_INDEX_URL else []
    session.install("-e", f".[{extras}]", *index)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """CPU test suite on tiny models built in code (pytest args after --)."""
    install_project(session, "dev")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff>=0.9")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
