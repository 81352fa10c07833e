"""Serving environment vs full dev environment: size on disk, measured in one run.

    P=build/bench/lora-chat; PY=$P/.venv/bin/python
    $PY benchmarks/env_size.py --project $P     # CPU torch wheels (the default index)
    $PY benchmarks/env_size.py --project $P --torch-index https://download.pytorch.org/whl/cu128

Builds two fresh venvs from the baked project's locks with the running interpreter (any
Python of the locks' version; the project's own is one), the way each is built
for real: the serving one as the image's builder stage does (requirements/serve.txt, no pip
in the venv, torch's test executables removed by tools/slim_env.py), the dev one as
`nox -s env` does (requirements/dev.txt, a plain venv). Installs the project into each
with --no-deps and writes the project's reports/env_size.json (or --out): bytes on disk
(also before slimming), distribution counts, the ratio, and whether the serving environment
holds anything that serving never needs. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import baked

TARGET_RATIO = 0.7  # serving env / dev env, on CPU wheels
NEVER_IN_SERVING = ("trl", "datasets", "pytest", "nox", "ruff", "matplotlib")

# Run inside a venv: the distributions that the project's `serve` extra reaches, and the
# ones installed that nothing reaches (which a lean serving environment must not have).
REACH = r"""
import json, re, sys
from importlib import metadata
def norm(name): return re.sub(r"[-_.]+", "-", name).lower()
dists = {norm(d.metadata["Name"]): d for d in metadata.distributions()}
env = {"extra": ""}
todo, seen = [(norm(sys.argv[1]), ("serve",))], set()
while todo:
    name, extras = todo.pop()
    if name in seen or name not in dists:
        continue
    seen.add(name)
    for text in dists[name].requires or []:
        req, _, marker = text.partition(";")
        wanted = [e for e in extras if marker and f"extra == \"{e}\"" in marker.replace("'", '"')]
        if "extra ==" in marker and not wanted:
            continue
        m = re.match(r"\s*([A-Za-z0-9._-]+)\s*(\[([^\]]*)\])?", req)
        sub = tuple(x.strip() for x in (m.group(3) or "").split(",") if x.strip())
        todo.append((norm(m.group(1)), sub))
print(json.dumps({"installed": sorted(dists), "reached": sorted(seen)}))
"""


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk under path (hard links counted once)."""
    seen, total = set(), 0
    for folder, dirs, files in os.walk(path):
        for entry in (*dirs, *files):
            stat = os.lstat(os.path.join(folder, entry))
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


def lock_python(lock: Path) -> str:
    found = re.search(r"^# python: (\d+\.\d+)", lock.read_text(), re.MULTILINE)
    if found is None:
        sys.exit(f"{lock} has no `# python:` header line; run `nox -s lock`")
    return found.group(1)


def build(project: Path, name: str, workdir: Path, torch_index: str) -> dict:
    """A fresh venv from requirements/<name>.txt plus the project; its size and contents."""
    venv = workdir / name
    shutil.rmtree(venv, ignore_errors=True)
    serving = name == "serve"
    without_pip = ["--without-pip"] if serving else []
    subprocess.run([sys.executable, "-m", "venv", *without_pip, str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # The serving venv has no pip: this interpreter's pip installs into it (pip >= 22.3).
    installer = (
        [sys.executable, "-m", "pip", "--python", python] if serving else [python, "-m", "pip"]
    )
    pip = [*installer, "install", "--quiet", "--disable-pip-version-check"]
    index = ["--extra-index-url", torch_index] if torch_index else []
    started = time.perf_counter()
    lock = project / "requirements" / f"{name}.txt"
    subprocess.run([*pip, *index, "-r", str(lock)], check=True)
    subprocess.run([*pip, "--no-deps", str(project)], check=True)
    seconds = time.perf_counter() - started
    named = re.search(r'^name = "([^"]+)"', (project / "pyproject.toml").read_text(), re.M)
    reach = subprocess.run(
        [python, "-c", REACH, named.group(1)], check=True, capture_output=True, text=True
    )
    contents = json.loads(reach.stdout)
    bootstrap = {"pip", "setuptools", "wheel"}  # what `python -m venv` puts in every venv
    unslimmed = disk_usage(venv)
    if serving:  # as the image's build runs it
        slim_env = project / "tools" / "slim_env.py"
        subprocess.run([sys.executable, str(slim_env), str(venv)], check=True)
    return {
        "recipe": "image builder: no pip, slim_env" if serving else "nox -s env: plain venv",
        "bytes": disk_usage(venv),
        "bytes_before_slim_env": unslimmed,
        "distributions": len(contents["installed"]),
        "install_seconds": round(seconds, 1),
        "never_in_serving_found": sorted(set(NEVER_IN_SERVING) & set(contents["installed"])),
        "unreached_by_serve_extra": sorted(
            set(contents["installed"]) - set(contents["reached"]) - bootstrap
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    baked.add_project_argument(parser, own_python=False)
    parser.add_argument(
        "--torch-index",
        default=os.environ.get("TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu"),
        help="wheel index for torch (default: $TORCH_INDEX_URL or the CPU index; '' for none)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="where the two venvs are built (default: the project's "
        "build/env-size)"
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, help="the JSON report (default: reports/env_size.json of the project)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the two venvs")
    args = parser.parse_args()
    project = args.project
    args.workdir = args.workdir or project / "build" / "env-size"
    args.out = args.out or project / "reports" / "env_size.json"

    wanted = lock_python(project / "requirements" / "dev.txt")
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if running != wanted:
        sys.exit(f"the locks are for Python {wanted}; run this with python{wanted}, not {running}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    serve = build(project, "serve", args.workdir, args.torch_index)
    dev = build(project, "dev", args.workdir, args.torch_index)
    ratio = serve["bytes"] / dev["bytes"]
    same_recipe = serve["bytes_before_slim_env"] / dev["bytes"]
    result = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch_index": args.torch_index,
        "serve": serve,
        "dev": dev,
        "ratio_serve_to_dev": round(ratio, 3),
        "ratio_before_slim_env": round(same_recipe, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(args.workdir)
    mib = 2**20
    print(f"serve: {serve['bytes'] / mib:8.0f} MiB  {serve['distributions']:3d} distributions")
    print(f"dev:   {dev['bytes'] / mib:8.0f} MiB  {dev['distributions']:3d} distributions")
    print(f"ratio: {ratio:.3f} (target <= {TARGET_RATIO}; {same_recipe:.3f} before slim_env)")
    print(f"written to {args.out}")
    if serve["never_in_serving_found"] or serve["unreached_by_serve_extra"]:
        print(f"serving env holds what serving never needs: {serve}", file=sys.stderr)
        return 1
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
