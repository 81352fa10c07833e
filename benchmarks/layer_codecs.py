"""A baked project's serving image, layer by layer in gzip and in zstd, and the container's
phases beside their floors: added to the report of the project's cold start.

    P=build/bench/lora-chat
    python $P/tools/image_report.py measure --tag lora-chat:local --cold-start   # first
    python benchmarks/layer_codecs.py --project $P --tag lora-chat:local

Pushes the image (--tag) to a registry on 127.0.0.1 (--registry HOST:PORT, else Debian's
docker-registry started for the run), fetches each layer back as pushed (gzip) and times
its decompression on this machine, one core: gzip -d, unpigz -d where installed (what
dockerd runs when it finds it) and, recompressed at zstd level 3, zstd -d. Measured
decompression of the real layers, not a measured pull: Docker 20.10 cannot pull zstd
layers. Then the floors of the container's phases: create + start beside an empty
container's (`sleep`), the pull beside the zstd decompression of the layers the measured
pulls fetched (loopback: no transfer to count). Writes `layer_codecs`, `floors` and
`dockerd_uses_unpigz` into the report's cold_start (--report, default
$P/reports/image.json); bench_report.py renders them. Standard library, the docker CLI,
gzip and zstd, and the project's tools/image_report.py (its docker and registry helpers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import baked

# zstd at level 3: buildx's default for compression=zstd.
ZSTD_LEVEL = 3


def blob(registry: Any, repository: str, digest: str, into: Path) -> None:
    """One layer of `repository` as the registry holds it, written to `into`."""
    url = f"http://{registry.address}/v2/{repository}/blobs/{digest}"
    with urllib.request.urlopen(url, timeout=300) as answer, into.open("wb") as out:
        shutil.copyfileobj(answer, out, 16 << 20)


def _timed(command: list[str], source: Path, sink: Path | None = None) -> float:
    """Seconds `command` takes reading `source` on stdin (its output to `sink` or dropped)."""
    start = time.perf_counter()
    with source.open("rb") as stdin, (sink or Path(os.devnull)).open("wb") as out:
        subprocess.run(command, stdin=stdin, stdout=out, check=True)
    return time.perf_counter() - start


def layer_codecs(registry: Any, repository: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Each layer as pushed (gzip) and as zstd would carry it: its bytes, and the seconds to
    decompress it here on one core with gzip -d, unpigz -d (where installed) and zstd -d."""
    if shutil.which("zstd") is None or shutil.which("gzip") is None:
        print("layer codecs: zstd or gzip is not installed; skipped", flush=True)
        return {"skipped": "zstd or gzip is not installed (Debian: apt-get install zstd)"}
    unpigz = shutil.which("unpigz")
    if unpigz is None:
        print("layer codecs: no unpigz on this host; timing gzip -d only", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="layers-") as scratch:
        folder = Path(scratch)
        for layer in manifest["layers"]:
            packed, tar, zst = folder / "layer.gz", folder / "layer.tar", folder / "layer.zst"
            blob(registry, repository, layer["digest"], packed)
            gunzip_s = _timed(["gzip", "-dc"], packed, tar)
            _timed(["zstd", f"-{ZSTD_LEVEL}", "-T1", "-q", "-c"], tar, zst)
            rows.append(
                {
                    "digest": layer["digest"],
                    "bytes": tar.stat().st_size,
                    "gzip_bytes": packed.stat().st_size,
                    "zstd_bytes": zst.stat().st_size,
                    "gzip_decompress_s": gunzip_s,
                    "unpigz_decompress_s": _timed([unpigz, "-dc"], packed) if unpigz else None,
                    "zstd_decompress_s": _timed(["zstd", "-dc", "-T1", "-q"], zst),
                }
            )
            for path in (packed, tar, zst):
                path.unlink()
    totals = {
        key: sum(row[key] or 0 for row in rows)
        for key in ("bytes", "gzip_bytes", "zstd_bytes", "gzip_decompress_s", "zstd_decompress_s")
    }
    if unpigz:
        totals["unpigz_decompress_s"] = sum(row["unpigz_decompress_s"] for row in rows)
    return {
        "what": "measured decompression of each pushed layer, one core; not a measured pull",
        "zstd_level": ZSTD_LEVEL,
        "unpigz": unpigz,
        "layers": rows,
        "total": totals,
    }


def dockerd_uses_unpigz() -> bool | None:
    """Whether the engine decompresses gzip layers with unpigz: it does when unpigz is on its
    PATH and MOBY_DISABLE_PIGZ is not set. None where its process cannot be read."""
    found = subprocess.run(["pgrep", "-o", "dockerd"], capture_output=True, text=True)
    if found.returncode or not found.stdout.strip():
        return None
    try:
        raw = Path(f"/proc/{found.stdout.split()[0]}/environ").read_bytes()
    except OSError:
        return None
    items = raw.decode(errors="replace").split("\0")
    env = dict(item.partition("=")[::2] for item in items if item)
    if env.get("MOBY_DISABLE_PIGZ", "").lower() in {"1", "true"}:
        return False
    return shutil.which("unpigz", path=env.get("PATH", os.defpath)) is not None


def empty_start_s(tools: ModuleType, image: str, runs: int = 3) -> float:
    """The quickest `docker run -d` of the image with nothing to run (`sleep`): the floor of
    create + start."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        container = tools.docker("run", "-d", "--entrypoint", "sleep", image, "60").strip()
        best = min(best, time.perf_counter() - start)
        tools.docker("rm", "-f", container, check=False)
    return round(best, 3)


def container_floors(
    codecs: dict[str, Any], runs: list[dict[str, Any]], create_start_floor_s: float
) -> dict[str, Any]:
    """The container's own phases beside their floors. Pull: the layers the cold start's
    pulls fetched (`pulled_layers` of its runs: short ids), decompressed by zstd on one core.
    Create + start: an empty container's."""
    fetched = {layer for run in runs for layer in run["pulled_layers"]}
    rows = [r for r in codecs.get("layers", []) if r["digest"].split(":")[-1][:12] in fetched]
    floors: dict[str, Any] = {"create_start_s": create_start_floor_s, "pulled_layers": len(rows)}
    if rows:
        floors["pull_s"] = {
            "zstd": round(sum(r["zstd_decompress_s"] for r in rows), 3),
            "gzip": round(sum(r["gzip_decompress_s"] for r in rows), 3),
            "pulled_bytes": sum(r["bytes"] for r in rows),
            "gzip_bytes": sum(r["gzip_bytes"] for r in rows),
            "zstd_bytes": sum(r["zstd_bytes"] for r in rows),
        }
    return floors


def add_to(cold: dict[str, Any], tools: ModuleType, registry: Any, tag: str) -> None:
    """The codecs, floors and dockerd's unpigz, into a cold start report of image_report.py,
    `tools` being that module and `registry` one of its Registry objects, entered."""
    manifest = baked.pushed_manifest(tools, registry, tag)
    codecs = layer_codecs(registry, tools.split(tag)[0], manifest)
    cold["layer_codecs"] = codecs
    cold["floors"] = container_floors(codecs, cold["runs"], empty_start_s(tools, tag))
    cold["dockerd_uses_unpigz"] = dockerd_uses_unpigz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    baked.add_project_argument(parser, own_python=False)
    parser.add_argument("--tag", required=True, help="the image, measured with --cold-start")
    parser.add_argument("--registry", help="HOST:PORT of a registry (default: start one here)")
    parser.add_argument("--report", type=Path, help="default: PROJECT/reports/image.json")
    args = parser.parse_args(argv)
    path = args.report or args.project / "reports" / "image.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    if not report.get("cold_start"):
        parser.error(f"{path} holds no cold start: run image_report.py measure --cold-start")
    tools = baked.image_tools(args.project)
    try:
        tools.require_engine()
        with tools.Registry(args.registry) as registry:
            add_to(report["cold_start"], tools, registry, args.tag)
    except tools.ImageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    path.write_text(json.dumps(report, indent=2) + "\n")
    cold = report["cold_start"]
    added = {key: cold[key] for key in ("floors", "dockerd_uses_unpigz")}
    print(json.dumps({**added, "layer_codecs": cold["layer_codecs"].get("total")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
