"""Build the wheels an offline GPU machine needs to run a baked project's GPU suite.

    python benchmarks/gpu_carry.py --project DIR      # cp312, for a machine with torch
    python benchmarks/gpu_carry.py --project DIR --python 3.11 --limit-mib 0

The machine this is for has Python, a CUDA build of torch and an older transformers
preinstalled, no network, and a cap on the files that travel with a call. Everything else
the suite imports is taken from requirements/dev.txt at its locked version, downloaded for
that Python and manylinux x86_64 (`pip download --no-deps`, so it needs PyPI), stripped of
what nothing imports (PRUNE), and packed as one solid xz archive of uncompressed wheels,
which compresses far better than the wheels one by one. That archive,
DIR/build/gpu_carry/carry_wheels.tar.xz, is what benchmarks/gpu_run.sh installs there (`pip
install --no-deps --no-index`: torch and its CUDA stack stay the machine's). xz at level 9
takes about 8 minutes of one core. The template's own GPU check, for the borrowed machine
its sessions get; the lock is read with the project's tools/locking.py.
"""

from __future__ import annotations

import argparse
import fnmatch
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from baked import add_project_argument, load_file
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

MIB = 2**20
# What the GPU suite needs beyond torch and what comes with torch and transformers (numpy,
# tokenizers, safetensors, pyyaml, jinja2), and transformers itself, newer than such a machine
# has. Not hf-xet: the hub imports it only to download, and the machine is offline.
CARRY = (
    "transformers", "huggingface-hub", "click", "trl", "peft", "accelerate",
    "bitsandbytes", "datasets", "pyarrow", "pandas", "python-dateutil", "dill", "multiprocess",
    "xxhash", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
    "typing-extensions", "fastapi", "starlette", "uvicorn", "h11", "anyio", "sniffio",
    "annotated-doc", "opentelemetry-api", "prometheus-client", "openai", "jiter", "httpx",
    "httpcore", "httpx2", "httpcore2", "truststore", "idna", "pytest", "pluggy", "iniconfig",
    "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "pillow",
    "psutil", "tzdata",
)  # fmt: skip
# Members no code path of the project imports or loads, per distribution.
PRUNE = {
    # Keep the CPU library and CUDA 12.8+ / 13.x ones (bitsandbytes falls back to the
    # nearest older library of the same CUDA major version).
    "bitsandbytes": (
        "bitsandbytes/libbitsandbytes_rocm*", "bitsandbytes/libbitsandbytes_xpu*",
        "bitsandbytes/libbitsandbytes_cuda11*", "bitsandbytes/libbitsandbytes_cuda12[0-7].so",
    ),
    # No Flight, cloud file systems, ORC, headers or tests (substrait stays: lib.so links it).
    "pyarrow": (
        "pyarrow/libarrow_flight*", "pyarrow/_flight*", "pyarrow/libarrow_s3*", "pyarrow/_s3fs*",
        "pyarrow/_gcsfs*", "pyarrow/_azurefs*", "pyarrow/_hdfs*", "pyarrow/_orc*",
        "pyarrow/include/*", "pyarrow/tests/*", "pyarrow/src/*", "pyarrow/*.pxd",
        "pyarrow/*.pyx", "pyarrow/*.pxi", "pyarrow/libarrow_python_flight*",
        "pyarrow/libarrow_python_parquet_encryption*",
        # The wheel has three copies of libarrow_python; the modules link libarrow_python.so.N.
        "pyarrow/libarrow_python.so", "pyarrow/libarrow_python.so.*.*",
    ),
    "pandas": ("pandas/tests/*",),
    # The loss plot: Agg, PNG, DejaVu Sans. No Tk, web backend, serif, mono, math or PDF
    # core fonts, tests or sample data.
    "matplotlib": (
        "matplotlib/tests/*", "matplotlib/mpl-data/sample_data/*", "matplotlib/backends/_tkagg*",
        "matplotlib/backends/web_backend/*", "matplotlib/mpl-data/fonts/afm/*",
        "matplotlib/mpl-data/fonts/pdfcorefonts/*", "matplotlib/mpl-data/fonts/ttf/STIX*",
        "matplotlib/mpl-data/fonts/ttf/cm*", "matplotlib/mpl-data/fonts/ttf/DejaVuSerif*",
        "matplotlib/mpl-data/fonts/ttf/DejaVuSansMono*",
    ),
    # PNG needs none of the AVIF and WebP codecs (Pillow registers them only if they load).
    "pillow": ("PIL/_avif*", "pillow.libs/libavif*", "PIL/_webp*", "pillow.libs/libwebp*"),
}  # fmt: skip
PLATFORMS = [
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any",
]  # fmt: skip


def carry_pins(lock: Path, locking: Path) -> list[str]:
    """name==version for every CARRY name, versions from the lock (read by the project's
    tools/locking.py, at `locking`)."""
    pins = load_file(locking, "project_locking").pins(lock)
    missing = [name for name in CARRY if canonicalize_name(name) not in pins]
    if missing:
        sys.exit(f"error: {lock} does not pin {', '.join(missing)}; re-lock with `nox -s lock`")
    return [f"{name}=={pins[canonicalize_name(name)]}" for name in CARRY]


def download(requirements: list[str], python: str, dest: Path) -> None:
    abi = "cp" + python.replace(".", "")
    target = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    target += [f"--abi={tag}" for tag in (abi, "abi3", "none")]
    target += [f"--platform={platform}" for platform in PLATFORMS]
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    subprocess.run([*pip, *target, "--dest", str(dest), *requirements], check=True)


def repack(wheel: Path, dest: Path, drop: tuple[str, ...]) -> int:
    """Copy a wheel without the members matching `drop`, its RECORD to match, every member
    stored uncompressed; returns how many members were dropped."""
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as out:
        names = source.namelist()
        dropped = {n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in drop)}
        for info in source.infolist():
            if info.filename in dropped:
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD") and dropped:
                rows = data.decode().splitlines()
                data = "".join(f"{r}\n" for r in rows if r.split(",")[0] not in dropped).encode()
            out.writestr(info, data, compress_type=zipfile.ZIP_STORED)
    return len(dropped)


def build(project: Path, lock: Path, python: str, out: Path) -> Path:
    raw, wheels = out / "downloads", out / "wheels"
    raw.mkdir(parents=True, exist_ok=True)
    pins = carry_pins(lock, project / "tools" / "locking.py")
    download(pins, python, raw)
    wanted = {(canonicalize_name(n), Version(v)) for n, v in (p.split("==") for p in pins)}
    wheels.mkdir(exist_ok=True)
    for old in wheels.glob("*.whl"):
        old.unlink()
    for wheel in sorted(raw.glob("*.whl")):
        name, version, *_ = parse_wheel_filename(wheel.name)
        if (name, version) not in wanted:  # left over from an earlier lock
            continue
        dropped = repack(wheel, wheels / wheel.name, PRUNE.get(name, ()))
        if dropped:
            print(f"{wheel.name}: {dropped} members dropped")
    archive = out / "carry_wheels.tar.xz"
    print(f"packing {archive}")
    with tarfile.open(archive, "w:xz", preset=9) as tar:
        tar.add(wheels, arcname="wheels")
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_project_argument(parser, own_python=False)
    parser.add_argument("--lock", type=Path, help="default: DIR/requirements/dev.txt")
    parser.add_argument("--python", default="3.12", help="the machine's Python (default 3.12)")
    parser.add_argument("--out", type=Path, help="default: DIR/build/gpu_carry")
    parser.add_argument(
        "--limit-mib", type=float, default=64, help="fail above this size (0: no limit)"
    )
    args = parser.parse_args(argv)
    out = args.out or args.project / "build" / "gpu_carry"
    lock = args.lock or args.project / "requirements" / "dev.txt"
    archive = build(args.project, lock, args.python, out)
    size = archive.stat().st_size / MIB
    count = len(list((out / "wheels").glob("*.whl")))
    print(f"{archive}: {count} wheels, {size:.1f} MiB")
    if args.limit_mib and size > args.limit_mib:
        print(f"error: {size:.1f} MiB is over the {args.limit_mib:g} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
