"""Slim the serving environment: remove what serving never runs, compile what it imports.

    python tools/slim_env.py /opt/venv            # what the image's build runs
    python tools/slim_env.py --dry-run /opt/venv  # measure only

What each removal saves with torch 2.13.0 on Python 3.11, CPU build / CUDA 13.0 build
(`python tools/slim_env.py --dry-run` measures yours):
- Tests: torch's native test executables (`torch/test`, `torch/bin/*test*`, none in the CUDA
  wheel) and the test suites other wheels ship (numpy/_core/tests, sympy/*/tests, ...) from
  which serving imports nothing: 140 MiB / 19 MiB.
- Type stubs (`*.pyi`): read by type checkers, never imported: 4 MiB / 4 MiB.
- torch's C++ headers (`torch/include`): only compiling an extension or a torch.compile
  kernel reads them, and serving on a CPU does neither: 37 MiB / kept. Whether serving on a
  GPU compiles anything waits for a GPU run (README "The serving image").
- Bytecode: compiling every module would write 216 MiB of .pyc; only what a served request
  imports is compiled (77 MiB): the modules that importing SERVING_IMPORTS pulls in, found
  by importing them in the environment being slimmed, so they follow its locked versions
  and torch build. tests/test_slim_env.py serves a request and checks that it imports
  nothing beyond them. A module outside them is compiled in memory on the rare import (the
  image runs with PYTHONDONTWRITEBYTECODE).
Standard library only.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Relative to site-packages. Nothing here is imported or executed by serving.
PRUNE = ("torch/test", "torch/bin/*Test", "torch/bin/test_*")  # native test executables
PRUNE_CPU_BUILD = ("torch/include",)
# The library modules serving imports, by name or on a request's first use: importing
# these imports every library module a served request does (tests/test_slim_env.py checks).
SERVING_IMPORTS = (
    # the model: torch, continuous batching, the tokenizer, the default base's architecture
    "torch",
    "transformers.generation.continuous_batching",
    "transformers.models.auto.tokenization_auto",
    "transformers.models.llama.modeling_llama",
    # the HTTP server and its metrics
    "fastapi",
    "uvicorn.loops.auto",
    "uvicorn.loops.asyncio",
    "uvicorn.protocols.http.auto",
    "uvicorn.protocols.websockets.auto",
    "uvicorn.lifespan.on",
    "prometheus_client",
    # first used by a request: starlette's worker threads, fastapi's telemetry, and its
    # check of a response for pydantic.v1 models
    "anyio._backends._asyncio",
    "fastapi.telemetry._runtime",
    "pydantic.v1",
    "pydantic.functional_serializers",
    # adapters, also on 4-bit bases
    "peft",
    "peft.tuners.lora.bnb",
    "peft.utils.transformers_weight_conversion",
    # structured output
    "llguidance.hf",
    "llguidance.numpy",
)
# Imports SERVING_IMPORTS in a fresh interpreter and writes the names of every module it
# then holds to the file named first. A name whose optional dependency this environment
# lacks is passed over (peft's 4-bit layers without bitsandbytes: serving never imports
# them there either); a name that does not exist is an error.
_RECORD = """
import importlib, json, sys
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is None or name == error.name or name.startswith(error.name + "."):
            raise
open(sys.argv[1], "w").write(json.dumps(sorted(sys.modules)))
"""


def serving_modules(python: Path) -> list[str]:
    """Every module that importing SERVING_IMPORTS imports, with `python`'s environment."""
    with tempfile.TemporaryDirectory() as scratch:
        record = Path(scratch) / "modules.json"
        done = subprocess.run(
            [str(python), "-c", _RECORD, str(record), *SERVING_IMPORTS],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        if done.returncode:
            raise SystemExit(
                f"slim_env: {python} cannot import what serving imports "
                f"(exit {done.returncode}):\n{done.stderr[-3000:]}"
            )
        return list(json.loads(record.read_text()))


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())


def matching(site_packages: Path, *patterns: str) -> list[Path]:
    return [path for pattern in patterns for path in site_packages.glob(pattern)]


def unimported_test_suites(site_packages: Path, modules: list[str]) -> list[Path]:
    """Test-suite folders shipped inside wheels (numpy/_core/tests, sympy/*/tests, ...)
    from which serving imports nothing."""
    found = []
    for folder in site_packages.glob("*/**/tests"):
        dotted = ".".join(folder.relative_to(site_packages).parts)
        if folder.is_dir() and not any(m == dotted or m.startswith(dotted + ".") for m in modules):
            found.append(folder)
    return found


def prune(paths: list[Path], dry_run: bool) -> float:
    """Delete the paths; return the MiB freed."""
    freed = sum(_size(path) for path in paths) / 2**20
    if not dry_run:
        for path in paths:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return freed


def module_files(site_packages: Path, modules: list[str]) -> list[Path]:
    """The source file of each listed module that this environment has."""
    files = []
    for name in modules:
        base = site_packages.joinpath(*name.split("."))
        for candidate in (base / "__init__.py", base.with_suffix(".py")):
            if candidate.is_file():
                files.append(candidate)
                break
    return files


def compile_imported(site_packages: Path, modules: list[str], dry_run: bool) -> tuple[int, int]:
    """Bytecode for the modules serving imports (unchecked-hash: valid whatever the file
    times). Returns (files compiled, bytes written)."""
    files = module_files(site_packages, modules)
    if dry_run:
        return len(files), 0
    written = 0
    mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
    for source in files:
        target = py_compile.compile(str(source), doraise=True, invalidation_mode=mode)
        written += Path(target).stat().st_size
    return len(files), written


def torch_is_cpu_build(site_packages: Path) -> bool:
    found = importlib.metadata.distributions(path=[str(site_packages)])
    version = next((d.version for d in found if d.metadata["Name"] == "torch"), "")
    return version.endswith("+cpu")


def slim(prefix: Path, dry_run: bool = False, modules: list[str] | None = None) -> dict[str, float]:
    """Slim every site-packages under prefix, compiling `modules` (by default what serving
    imports there); return what was done, in MiB and files."""
    report = {"tests_mib": 0.0, "headers_mib": 0.0, "stubs_mib": 0.0, "compiled_files": 0,
              "bytecode_mib": 0.0}  # fmt: skip
    if modules is None:
        modules = serving_modules(prefix / "bin" / "python")
    for site_packages in prefix.glob("lib/python*/site-packages"):
        tests = matching(site_packages, *PRUNE) + unimported_test_suites(site_packages, modules)
        report["tests_mib"] += prune(tests, dry_run)
        report["stubs_mib"] += prune(matching(site_packages, "**/*.pyi"), dry_run)
        if torch_is_cpu_build(site_packages):
            report["headers_mib"] += prune(matching(site_packages, *PRUNE_CPU_BUILD), dry_run)
        files, written = compile_imported(site_packages, modules, dry_run)
        report["compiled_files"] += files
        report["bytecode_mib"] += written / 2**20
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix", type=Path, help="the environment, e.g. /opt/venv")
    parser.add_argument("--dry-run", action="store_true", help="measure, change nothing")
    args = parser.parse_args(argv)
    if not args.prefix.is_dir():
        parser.error(f"{args.prefix} is not a folder")
    report = slim(args.prefix, args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"slim_env: {verb} {report['tests_mib']:.0f} MiB of tests, "
        f"{report['headers_mib']:.0f} MiB of C++ headers and {report['stubs_mib']:.0f} MiB of "
        f"type stubs; bytecode for "
        f"{report['compiled_files']} imported modules ({report['bytecode_mib']:.0f} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
