"""Fold a run's LoRA adapter into the base weights: one safetensors model to serve."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from . import quantized_base
from .runs import RunFolder


def merge_run(run_dir: Path, output: Path | None = None, dtype: str = "auto") -> Path:
    """Write base + adapter as a plain model folder (safetensors + tokenizer).

    A 4-bit or 8-bit run is merged into the unquantized base weights: adding a
    LoRA delta to quantized weights would round it away. The merged model is
    therefore the full-precision base plus the adapter, which differs slightly
    from the quantized model the adapter was trained against. A LoftQ adapter is the
    exception: it was fitted to the quantization error, so it is merged into the
    dequantized 4-bit weights (quantized_base.py), as it was trained.
    """
    import torch
    from peft import PeftModel

    from .device import pick_precision
    from .modeling import load_model, load_tokenizer
    from .runs import tokenizer_source

    run = RunFolder(run_dir)
    adapter = run.finished_adapter()
    config = run.read_config()
    if config.quantization.mode != "none" and quantized_base.read(adapter) is None:
        print(
            f"note: this run trained on a {config.quantization.mode} base; merging into the "
            "dequantized (full-precision) base weights instead"
        )
    precision = pick_precision("cpu", dtype)
    # Merge in at least fp32 on CPU: the sum W + BA is exact enough to serve in any dtype.
    merge_dtype = torch.float32 if precision.dtype == torch.float32 else precision.dtype
    base = load_model(
        config.model.name_or_path,
        dtype=merge_dtype,
        trust_remote_code=config.model.trust_remote_code,
    )
    adapted = PeftModel.from_pretrained(base, adapter)
    if quantized_base.apply_if_needed(adapted, adapter) is not None:
        print("note: this adapter was fitted to the 4-bit base (LoftQ): merged into it")
    merged = adapted.merge_and_unload()
    tokenizer = load_tokenizer(
        tokenizer_source(config.model.name_or_path, adapter), config.model.trust_remote_code
    )

    output = output or run.merged
    partial = output.with_name(f".{output.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)
    return output


@dataclass(frozen=True)
class MergeOptions:
    """`merge`'s command line."""

    run: Path  # the run folder
    output: Path | None = None  # default: <run>/merged


def merge_command(options: MergeOptions) -> int:
    output = merge_run(options.run, options.output)
    print(f"merged model: {output}")
    return 0
