"""Pick the device and the compute precision from the hardware, never from a default.

bf16 is only fast where the hardware has it: on a CPU without native bf16 a
bf16 matmul falls back to a reference kernel tens of times slower than fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


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


def pick_device(requested: str = "auto") -> str:
    """Return 'cuda' when a GPU is visible (or asked for), else 'cpu'.

    Under `accelerate launch` (LOCAL_RANK set) 'auto' is this process's own GPU,
    'cuda:<LOCAL_RANK>': a model loaded before the Trainer exists (a 4-bit one cannot be
    moved afterwards) must not land on GPU 0 in every process.
    """
    if requested == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        local_rank = os.environ.get("LOCAL_RANK", "")
        if local_rank.isdigit() and int(local_rank) < torch.cuda.device_count():
            return f"cuda:{local_rank}"
        return "cuda"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was requested but no CUDA device is visible")
    return requested


def pick_precision(requested_device: str = "auto", requested_dtype: str = "auto") -> Precision:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.

    An explicit ``requested_dtype`` ('float32', 'bfloat16', 'float16') wins.
    """
    device = pick_device(requested_device)
    if requested_dtype != "auto":
        return Precision(device, getattr(torch, requested_dtype))
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    return Precision(device, dtype)
