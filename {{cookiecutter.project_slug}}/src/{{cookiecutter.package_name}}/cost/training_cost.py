"""Training cost from a run folder: $ per 1M trained tokens, per run, tokens/s and MFU.

Reads what `train` writes, through `RunFolder`: the run's cost (trained tokens, wall
seconds, price, environment with the device name, dtype) and metrics (parameter counts).

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

import re
from pathlib import Path

from ..runs import RunFolder, TrainingCost
from .money import usd_for_seconds, usd_per_million
from .schema import Mfu, TrainingRun

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


def training_cost(run_dir: Path, gpu_hourly_usd: float | None = None) -> TrainingRun:
    """One run's cost section of the card; `gpu_hourly_usd` re-prices it (else the run's)."""
    run = RunFolder(run_dir)
    cost = run.read_cost()
    metrics = run.read_metrics()
    tokens, seconds = cost.trained_tokens, cost.wall_seconds
    price = gpu_hourly_usd if gpu_hourly_usd is not None else cost.gpu_hourly_usd
    usd = usd_for_seconds(price, seconds)
    tokens_per_s = tokens / seconds if seconds > 0 else None
    return TrainingRun(
        run=run.name,
        path=str(run_dir),
        trained_tokens=tokens,
        wall_seconds=seconds,
        tokens_per_second=tokens_per_s,
        gpu_hourly_usd=price,
        price_source="given" if gpu_hourly_usd is not None else "the run's cost.json",
        usd=usd,
        usd_per_1m_tokens=usd_per_million(usd, tokens),
        parameters=metrics.parameters,
        trainable_parameters=metrics.trainable_parameters,
        global_step=metrics.global_step,
        quantization=cost.quantization,
        device=cost.device,
        dtype=_dtype(cost),
        mfu=mfu(cost, metrics.parameters, metrics.trainable_parameters, tokens_per_s),
    )


def _dtype(cost: TrainingCost) -> str:
    return cost.dtype or cost.environment.get("dtype", "unknown")


def mfu(
    cost: TrainingCost, parameters: int | None, trainable: int | None, tokens_per_s: float | None
) -> Mfu:
    """The MFU estimate with its inputs, or why it is unknown."""
    device, dtype = cost.device, _dtype(cost)
    gpu, peak = peak_tflops(device, dtype)
    per_token = (
        flops_per_token(parameters, trainable) if parameters and trainable is not None else None
    )
    achieved = per_token * tokens_per_s / 1e12 if per_token and tokens_per_s else None
    value = achieved / peak if peak and achieved is not None else None
    note = None if value is not None else _why_unknown(device, dtype, gpu, peak)
    if cost.quantization in ("4bit", "8bit"):
        packed = f"{cost.quantization} run: parameters are counted from the packed weights"
        note = f"{note}; {packed}" if note else packed
    return Mfu(
        value=value,
        gpu=gpu,
        peak_tflops=peak,
        dtype=dtype,
        flops_per_token=per_token,
        achieved_tflops=achieved,
        formula="(4 * parameters + 2 * trainable_parameters) * tokens_per_s / peak",
        note=note,
    )


def _why_unknown(device: str, dtype: str, gpu: str | None, peak: float | None) -> str | None:
    if not device.startswith("cuda"):
        return f"unknown: no peak-FLOPs figure for {device!r} (CPUs are not in the table)"
    if gpu is None:
        return f"unknown: {device!r} is not in the peak-FLOPs table"
    if peak is None:
        return f"unknown: no {dtype} peak for {gpu}"
    return None
