"""Read the big files a cold start needs in a background thread, before the server needs them.

On a node whose page cache does not hold them (a new node, a pulled image, a restart after
memory pressure), torch's shared libraries and the weights are otherwise read page fault by
page fault, in the order the dynamic loader and the first forward pass touch them, while the
interpreter waits. Read ahead, sequentially and in another thread (a read releases the GIL),
they arrive while the interpreter imports. Where they are cached already, reading them
again costs the other core about 0.1 s per GB. `posix_fadvise(WILLNEED)` would be the
kernel's own way, but Linux caps it at the device's readahead window (8 MB on the template's
machine), and no library does this for a server's start.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def torch_libraries() -> list[Path]:
    """The shared libraries importing torch loads, largest first, without importing torch:
    torch's own (libtorch_cpu, libtorch_cuda, ...) and, in a CUDA build, those of the
    nvidia-* wheels beside it, which libtorch_cuda links, and triton's, which torch._dynamo
    loads. cuDNN's sub-libraries are left out: they are opened per operation, if ever."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return []
    site_packages = Path(next(iter(spec.submodule_search_locations))).parent
    found = [*(site_packages / "torch" / "lib").glob("*.so*")]
    found += [
        path
        for path in (site_packages / "nvidia").glob("*/lib/lib*.so*")
        if not path.name.startswith("libcudnn_")
    ]
    found += (site_packages / "triton" / "_C").glob("*.so")
    return sorted(found, key=lambda path: -path.stat().st_size)


def weight_files(model: str) -> list[Path]:
    """A local model folder's safetensors (a hub id is left alone)."""
    folder = Path(model).expanduser()
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def prefetch(paths: list[Path], budget: int | None = None) -> threading.Thread:
    """Read the files in order, in a daemon thread, while their total stays within `budget`
    bytes (default: half the available memory, so that a model larger than the page cache
    can hold does not evict what it needs). Never raises."""
    if budget is None:
        budget = (available_memory() or 0) // 2
    chosen, total = [], 0
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if total + size > budget:
            break
        chosen.append(path)
        total += size
    thread = threading.Thread(target=_read, args=(chosen,), name="prefetch", daemon=True)
    thread.start()
    log.debug("prefetch: reading %d files, %.0f MB", len(chosen), total / 1e6)
    return thread


def _read(paths: list[Path]) -> None:
    buffer = bytearray(8 << 20)
    for path in paths:
        try:
            with path.open("rb", buffering=0) as file:
                while file.readinto(buffer):
                    pass
        except OSError:
            continue
