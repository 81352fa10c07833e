"""Training cost from a run folder: $ per 1M trained tokens, per run, tokens/s and MFU.

Reads what `train` writes: `runs/<run>/cost.json` (trained tokens, wall seconds, price,
environment with the device name, dtype) and `metrics.json` (parameter counts).

MFU (model FLOPs utilization) = model FLOPs per second / the device's peak dense FLOPs at
the training dtype. Model FLOPs per trained token for LoRA, N = all parameters,
N_t = trainable (adapter) parameters:

    forward 2N  +  backward through activations 2N  +  weight gradients 2 N_t  =  4N + 2N_t

(full fine-tuning would be 6N; the frozen base needs no weight gradients). Recomputation
by gradient checkpointing is not model FLOPs and is not counted; attention-score FLOPs are
left out (small at these sequence lengths), and N includes the input embeddings, so the
estimate is a little high. For a 4-bit run N is counted from the packed weights, which
holds half as many elements: the card says so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import UserError
from .money import usd_for_seconds, usd_per_million

# Peak dense (no sparsity) tensor-core TFLOPS by compute dtype, from the vendors' data
# sheets. fp32 is the non-tensor-core rate (TF32 tensor cores are faster, but a run in
# fp32 only uses them if allow_tf32 is set). T4 (Turing) has no bf16. The patterns match
# torch.cuda.get_device_name(); the first match wins, so specific names come first.
PEAK_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    (r"H100.*(PCIe)", "H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.0}),
    (r"H100.*NVL", "H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "float32": 60.0}),
    (r"H100", "H100 SXM", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),
    (r"H200", "H200", {"bfloat16": 989.4, "float16": 989.4, "float32": 66.9}),
    (r"A100", "A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    (r"A10G", "A10G", {"bfloat16": 70.0, "float16": 70.0, "float32": 31.2}),
    (r"L40S", "L40S", {"bfloat16": 362.1, "float16": 362.1, "float32": 91.6}),
    (r"\bL4\b", "L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3}),
    (r"RTX 4090", "RTX 4090", {"bfloat16": 165.2, "float16": 165.2, "float32": 82.6}),
    (r"\bT4\b", "T4", {"float16": 65.0, "float32": 8.1}),
]


def peak_tflops(device: str, dtype: str) -> tuple[str | None, float | None]:
    """(GPU name in the table, peak TFLOPS at dtype), or (None, None) when unknown.

    `device` is what `info.describe()` reports ("cuda (NVIDIA H100 80GB HBM3)", "cpu").
    CPUs and GPUs outside the table are unknown: no MFU is better than a wrong one.
    """
    if not device.startswith("cuda"):
        return None, None
    for pattern, name, peaks in PEAK_TFLOPS:
        if re.search(pattern, device):
            return name, peaks.get(dtype)
    return None, None


def flops_per_token(parameters: int, trainable_parameters: int) -> float:
    return 4.0 * parameters + 2.0 * trainable_parameters


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{path} does not exist: is {path.parent} a finished training run "
            "(runs/<run>/ with cost.json and metrics.json)?"
        ) from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None


def latest_run(runs_dir: Path) -> Path:
    runs = sorted(
        (p for p in runs_dir.glob("*") if (p / "cost.json").is_file()),
        key=lambda p: (p / "cost.json").stat().st_mtime,
    )
    if not runs:
        raise UserError(f"no finished training run in {runs_dir}/ (none has a cost.json)")
    return runs[-1]


def training_cost(run_dir: Path, gpu_hourly_usd: float | None = None) -> dict[str, Any]:
    """One run's cost section of the card; `gpu_hourly_usd` re-prices it (else the run's)."""
    cost = _read_json(run_dir / "cost.json")
    metrics = _read_json(run_dir / "metrics.json")
    for key in ("trained_tokens", "wall_seconds", "gpu_hourly_usd"):
        if key not in cost:
            raise UserError(f"{run_dir / 'cost.json'} has no {key!r}")
    tokens = int(cost["trained_tokens"])
    seconds = float(cost["wall_seconds"])
    price = float(gpu_hourly_usd if gpu_hourly_usd is not None else cost["gpu_hourly_usd"])
    usd = usd_for_seconds(price, seconds)
    environment = cost.get("environment", {})
    device = str(environment.get("device", "unknown"))
    dtype = str(cost.get("dtype", environment.get("dtype", "unknown")))
    gpu, peak = peak_tflops(device, dtype)
    parameters = metrics.get("parameters")
    trainable = metrics.get("trainable_parameters")
    tokens_per_s = tokens / seconds if seconds > 0 else None
    mfu: dict[str, Any] = {
        "value": None,
        "gpu": gpu,
        "peak_tflops": peak,
        "dtype": dtype,
        "flops_per_token": None,
        "achieved_tflops": None,
        "formula": "(4 * parameters + 2 * trainable_parameters) * tokens_per_s / peak",
        "note": None,
    }
    if parameters and trainable is not None:
        mfu["flops_per_token"] = flops_per_token(int(parameters), int(trainable))
    if mfu["flops_per_token"] and tokens_per_s:
        mfu["achieved_tflops"] = mfu["flops_per_token"] * tokens_per_s / 1e12
    if peak and mfu["achieved_tflops"] is not None:
        mfu["value"] = mfu["achieved_tflops"] / peak
    elif not device.startswith("cuda"):
        mfu["note"] = f"unknown: no peak-FLOPs figure for {device!r} (CPUs are not in the table)"
    elif gpu is None:
        mfu["note"] = f"unknown: {device!r} is not in the peak-FLOPs table"
    elif peak is None:
        mfu["note"] = f"unknown: no {dtype} peak for {gpu}"
    if cost.get("quantization") in ("4bit", "8bit"):
        mfu["note"] = (mfu["note"] + "; " if mfu["note"] else "") + (
            f"{cost['quantization']} run: parameters are counted from the packed weights"
        )
    return {
        "run": run_dir.name,
        "path": str(run_dir),
        "trained_tokens": tokens,
        "wall_seconds": seconds,
        "tokens_per_second": tokens_per_s,
        "gpu_hourly_usd": price,
        "price_source": "given" if gpu_hourly_usd is not None else "the run's cost.json",
        "usd": usd,
        "usd_per_1m_tokens": usd_per_million(usd, tokens),
        "parameters": parameters,
        "trainable_parameters": trainable,
        "global_step": metrics.get("global_step"),
        "quantization": cost.get("quantization"),
        "device": device,
        "dtype": dtype,
        "mfu": mfu,
    }
