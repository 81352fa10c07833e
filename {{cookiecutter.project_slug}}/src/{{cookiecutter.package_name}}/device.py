"""Pick the device and the compute precision from the hardware, never from a default.

bf16 is only fast where the hardware has it: on a CPU without native bf16 a
bf16 matmul falls back to a reference kernel tens of times slower than fp32.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass(frozen=True)
class Precision:
    device: str
    dtype: torch.dtype

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    @property
    def fp16(self) -> bool:
        return self.dtype == torch.float16

    @property
    def dtype_name(self) -> str:
        """The dtype as configs and reports write it: "bfloat16", not "torch.bfloat16"."""
        return dtype_name(self.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pick_device(requested: str = "auto") -> str:
    """Return 'cuda' when a GPU is visible (or asked for), else 'cpu'.

    Under `accelerate launch` (LOCAL_RANK set) 'auto' is this process's own GPU,
    'cuda:<LOCAL_RANK>': a model loaded before the Trainer exists (a 4-bit one cannot be
    moved afterwards) must not land on GPU 0 in every process.
    """
    if requested == "auto":
        if not torch.cuda.is_available():
            check_driver(torch.version.cuda, driver_cuda_version())
            return "cpu"
        local_rank = os.environ.get("LOCAL_RANK", "")
        if local_rank.isdigit() and int(local_rank) < torch.cuda.device_count():
            return f"cuda:{local_rank}"
        return "cuda"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was requested but no CUDA device is visible")
    return requested


def driver_cuda_version() -> tuple[int, int] | None:
    """The CUDA version the installed NVIDIA driver supports, or None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def check_driver(built_for: str | None, driver: tuple[int, int] | None) -> None:
    """A CUDA build of torch on a host whose driver is too old sees no GPU; say so instead
    of quietly running on the CPU. (Within a major version newer builds run on older
    drivers: CUDA's minor-version compatibility.)"""
    if built_for is None or driver is None:
        return  # a CPU build, or no NVIDIA driver at all: the CPU is the device
    major, minor = (int(part) for part in built_for.split(".")[:2])
    if driver[0] < major:
        raise UserError(
            f"this torch is built for CUDA {major}.{minor}, which needs an NVIDIA driver for "
            f"CUDA {major}.x or newer; the driver here supports CUDA {driver[0]}.{driver[1]}. "
            f"Update the driver, or use a build for CUDA {driver[0]}.x (torch_backend, "
            "TORCH_INDEX_URL)"
        )


def device_name(device: str) -> str:
    """The hardware behind a torch device string: the GPU's name, or the CPU's model."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


BF16_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA GPUs with bf16 in hardware


def native_bf16(device: str) -> bool:
    """Whether the GPU computes bf16 in hardware. Not `torch.cuda.is_bf16_supported()`: it
    also counts emulation and says True on a T4 or V100, where bf16 runs far slower than
    fp16."""
    return torch.cuda.get_device_capability(torch.device(device)) >= BF16_CAPABILITY


def pick_precision(requested_device: str = "auto", requested_dtype: str = "auto") -> Precision:
    """bf16 on GPUs that have it (compute capability 8.0 and newer), fp16 on older GPUs,
    fp32 on CPU.

    An explicit ``requested_dtype`` ('float32', 'bfloat16', 'float16') wins, except bf16 on
    a GPU without it, which is refused.
    """
    device = pick_device(requested_device)
    on_gpu = device.startswith("cuda")
    if requested_dtype == "bfloat16" and on_gpu and not native_bf16(device):
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        raise UserError(
            f"dtype bfloat16 needs a GPU of compute capability {BF16_CAPABILITY[0]}.0 or newer; "
            f"{device_name(device)} is {major}.{minor}. Use float16 or auto (model.dtype)"
        )
    if requested_dtype != "auto":
        return Precision(device, getattr(torch, requested_dtype))
    if not on_gpu:
        return Precision(device, torch.float32)
    return Precision(device, torch.bfloat16 if native_bf16(device) else torch.float16)
