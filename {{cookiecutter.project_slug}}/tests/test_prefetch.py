"""serving/prefetch.py: the files a cold start needs end up in the page cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.serving import prefetch


def resident_bytes(path: Path) -> int:
    done = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(done.stdout.strip())


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(shutil.which("fincore") is None, reason="no fincore (util-linux)")
def test_evicted_files_are_read_back_into_the_page_cache(tmp_path):
    files = []
    for index in range(2):
        path = tmp_path / f"model-{index}.safetensors"
        path.write_bytes(os.urandom(12 << 20))
        evict(path)
        files.append(path)
    if any(resident_bytes(path) for path in files):
        pytest.skip("this file system keeps the pages (tmpfs?): nothing to read back")
    prefetch.prefetch(files, budget=1 << 30).join(60)
    assert [resident_bytes(path) for path in files] == [12 << 20, 12 << 20]


def test_the_budget_stops_the_list_and_missing_files_are_skipped(tmp_path, monkeypatch):
    read: list[list[Path]] = []
    monkeypatch.setattr(prefetch, "_read", read.append)
    paths = []
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"\0" * 1000)
        paths.append(tmp_path / name)
    paths.insert(1, tmp_path / "missing")
    prefetch.prefetch(paths, budget=2500).join(10)
    assert read == [[tmp_path / "a", tmp_path / "b"]]


def test_torch_libraries_are_found_without_importing_torch(tmp_path):
    script = (
        "import sys; from {{ cookiecutter.package_name }}.serving.prefetch import torch_libraries; "
        "libs = torch_libraries(); print(len(libs), 'torch' in sys.modules, "
        "any(p.name.startswith('libtorch_cpu') for p in libs))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    count, imported, has_cpu = done.stdout.split()
    assert int(count) > 0 and imported == "False" and has_cpu == "True"
