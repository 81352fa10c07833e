"""A one-line code change to a baked project's serving image: what a redeploy pulls.

    P=build/bench/lora-chat
    python $P/tools/image_report.py build --tag lora-chat:local --network host   # first
    python benchmarks/code_change.py --project $P --tag lora-chat:local --network host

Pushes the built image (--tag) to a registry on 127.0.0.1 (--registry HOST:PORT, else
Debian's docker-registry started for the run), rebuilds it from a copy of the project whose
package `__init__.py` gained one comment line, pushes that, and counts the compressed bytes
of the layers the registry did not already have. The claim it checks: the project is the
image's last layer, so a code change re-pulls megabytes, not the environment's gigabyte.
Arguments it does not know go to `docker build`, as the image was built with them.

Run it after the build and before anything removes the image: the rebuild must find the
first build's cache (a cold start that pulls the image removes it, and with it the legacy
builder's cache of the final stage, so a rebuild after it remakes every layer of that stage).
bench.py runs it so, in the registry that the cold start then uses. Standard library, the
docker CLI and the project's tools/image_report.py (its docker and registry helpers).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import baked

# What the copy of the build context leaves out: environments and outputs, never in the
# image (the project's .dockerignore is an allow-list), and large.
NOT_COPIED = (".venv*", ".nox", "reports", "runs", ".git")
CHANGE = "# a one-line code change\n"


def new_layers(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """The layers of the manifest `after` that the manifest `before` does not have."""
    known = {layer["digest"] for layer in before["layers"]}
    return [layer for layer in after["layers"] if layer["digest"] not in known]


def changed_copy(project: Path, into: Path) -> Path:
    """A copy of the project's build context with one comment line appended to its
    package's __init__.py; the changed file, relative to the copy."""
    shutil.copytree(project, into, ignore=shutil.ignore_patterns(*NOT_COPIED))
    changed = into / "src" / baked.package_name(project) / "__init__.py"
    changed.write_text(changed.read_text() + CHANGE)
    return changed.relative_to(into)


def code_change(
    project: Path, tag: str, build_args: list[str], registry: Any, tools: ModuleType
) -> dict[str, Any]:
    """Push `tag` to `registry`, rebuild it after a one-line change and push that too;
    the layers the change added and their compressed bytes. `tools` is the project's
    tools/image_report.py, `registry` one of its Registry objects, entered."""
    repository = tools.split(tag)[0]
    before = baked.pushed_manifest(tools, registry, tag)
    target = f"{registry.address}/{repository}:code-change"
    with tempfile.TemporaryDirectory() as scratch:
        context = Path(scratch) / "context"
        changed = changed_copy(project, context)
        tools.docker("build", "-q", "-t", target, *build_args, str(context))
        tools.docker("push", "-q", target)
    after = registry.manifest(repository, "code-change")
    tools.docker("rmi", target, check=False)
    added = new_layers(before, after)
    return {
        "changed_file": str(changed),
        "new_layers": len(added),
        "new_compressed_bytes": sum(layer["size"] for layer in added),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    baked.add_project_argument(parser, own_python=False)
    parser.add_argument("--tag", required=True, help="the image, already built")
    parser.add_argument("--registry", help="HOST:PORT of a registry (default: start one here)")
    parser.add_argument("--out", type=Path, help="write the result here too (JSON)")
    args, build_args = parser.parse_known_args(argv)
    tools = baked.image_tools(args.project)
    try:
        tools.require_engine()
        with tools.Registry(args.registry) as registry:
            result = code_change(args.project, args.tag, build_args, registry, tools)
    except tools.ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
