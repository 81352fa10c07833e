"""The model a run trains: the base (quantized or not) with its LoRA adapter, built the
same way for every method.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import Config
from ..device import Precision
from ..errors import UserError


def quantization_config(config: Config, precision: Precision) -> Any:
    mode = config.quantization.mode
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    # BitsAndBytesConfig's __init__ is unannotated (no-untyped-call below).
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    # FSDP can only shard 4-bit weights stored in a float dtype (QLoRA + FSDP).
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quantization.quant_type,
        bnb_4bit_use_double_quant=config.quantization.double_quant,
        bnb_4bit_compute_dtype=precision.dtype,
        bnb_4bit_quant_storage=precision.dtype if fsdp else "uint8",
    )


def check_quantization_backend(mode: str, device: str) -> None:
    """A quantized base needs bitsandbytes, and on a GPU its CUDA library, which bitsandbytes
    otherwise reports only at the first 4-bit matmul: say so before the run starts."""
    if mode == "none":
        return
    try:
        from bitsandbytes import cextension
    except ImportError:
        raise UserError(
            f"quantization.mode={mode} needs bitsandbytes: pip install -e '.[qlora]' (it is in "
            "the dev lock), or train with quantization.mode=none"
        ) from None
    if device.startswith("cuda") and isinstance(
        cextension.lib, cextension.ErrorHandlerMockBNBNativeLibrary
    ):
        import torch

        reason = cextension.lib.error_msg.strip().splitlines()[0]
        raise UserError(
            f"quantization.mode={mode} on {device} needs bitsandbytes' CUDA library, which did "
            f"not load ({reason}). Install a bitsandbytes release built for CUDA "
            f"{torch.version.cuda}, or train with quantization.mode=none"
        )


def peft_lora_config(config: Config) -> Any:
    from peft import EvaConfig, LoraConfig

    lora = config.lora
    # loftq starts from peft's default init; replace_lora_weights_loftq then refits it.
    init = True if lora.init in ("default", "loftq") else lora.init
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft says int; any number scales
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=init,  # type: ignore[arg-type]  # config checked it is peft's name
        bias=lora.bias,
        modules_to_save=lora.modules_to_save,
        eva_config=EvaConfig() if lora.init == "eva" else None,  # peft's defaults, said outright
        task_type="CAUSAL_LM",
    )


def build_peft_model(config: Config, precision: Precision, eva_data: Any = None) -> Any:
    """The base with LoRA layers; `eva_data` (the encoded train split) feeds lora.init=eva."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from ..modeling import load_model, resolve_model

    if config.lora.init == "loftq" and not precision.device.startswith("cuda"):
        raise UserError(
            f"lora.init=loftq runs peft's LoftQ, which computes on a CUDA GPU; the device is "
            f"{precision.device}. Train on a GPU, or use lora.init=default with QLoRA here"
        )
    model = load_model(
        config.model.name_or_path,
        dtype=precision.dtype,
        device=precision.device,
        quantization_config=quantization_config(config, precision),
        trust_remote_code=config.model.trust_remote_code,
        attn_implementation=config.model.attn_implementation,
    )
    if config.quantization.mode != "none":
        # peft leaves prepare_model_for_kbit_training unannotated.
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=config.train.gradient_checkpointing
        )
    model = get_peft_model(model, peft_lora_config(config))
    if config.lora.init == "eva":
        from peft import initialize_lora_eva_weights

        batches = eva_batches(eva_data, config.train.batch_size, model.device)
        initialize_lora_eva_weights(
            model, dataloader=batches, forward_fn=_bounded_forward(len(batches) * EVA_PASSES),
            show_progress_bar=False,
        )  # fmt: skip
    if config.lora.init == "loftq":
        from peft import replace_lora_weights_loftq

        # Reads the unquantized weights from the base model's safetensors.
        replace_lora_weights_loftq(model, model_path=_safetensors_file(resolve_model(
            config.model.name_or_path)))  # fmt: skip
    return model


EVA_PASSES = 4  # passes over the train split before EVA gives up converging


def _bounded_forward(limit: int) -> Any:
    """peft's EVA cycles the data until every layer's components converge, which may be
    never: stop after `limit` batches with what to change."""
    calls = 0

    def forward(model: Any, inputs: dict[str, Any]) -> Any:
        nonlocal calls
        calls += 1
        if calls > limit:
            raise UserError(
                f"lora.init=eva did not converge in {EVA_PASSES} passes over the training data "
                f"({limit} batches): lower lora.r, raise train.batch_size or add data, or use "
                "lora.init=default"
            )
        return model(**inputs)

    return forward


def eva_batches(split: Any, batch_size: int, device: Any) -> list[dict[str, Any]]:
    """The train split as padded batches for EVA: one pass, in order. EVA takes the SVD of
    each target layer's inputs at the tokens that carry loss (labels != -100)."""
    import torch

    from ..chat import IGNORE_INDEX

    batches = []
    examples = split.examples
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        pad = [width - len(e.input_ids) for e in chunk]
        batches.append(
            {
                "input_ids": torch.tensor(
                    [e.input_ids + [0] * n for e, n in zip(chunk, pad, strict=True)], device=device
                ),
                "attention_mask": torch.tensor(
                    [[1] * len(e.input_ids) + [0] * n for e, n in zip(chunk, pad, strict=True)],
                    device=device,
                ),
                "labels": torch.tensor(
                    [e.labels + [IGNORE_INDEX] * n for e, n in zip(chunk, pad, strict=True)],
                    device=device,
                ),
            }
        )
    return batches


def _safetensors_file(source: str) -> str | None:
    """The single safetensors file of a local model folder (what LoftQ reads); None lets
    peft find it for a hub id."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise UserError(
            f"lora.init=loftq reads the base weights from one safetensors file; {folder} has "
            f"{len(files)}. Use lora.init=default with QLoRA instead"
        )
    return str(files[0])


def check_padding_free(model: Any) -> None:
    """Padding-free batches are one row of several examples told apart only by their
    position_ids; an attention implementation that ignores them mixes the examples.
    Two short sequences packed into one row must give the same logits as apart. Without a
    cache, as TRL trains: transformers only looks for packed rows when there is none."""
    import torch

    first, second = [5, 6, 7, 8], [9, 10, 11]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(
                input_ids=torch.tensor([first + second], device=device),
                position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device),
                use_cache=False,
            ).logits[0, len(first) :]
            alone = model(input_ids=torch.tensor([second], device=device), use_cache=False)
            alone = alone.logits[0]
    finally:
        model.train(was_training)
    scale = alone.float().std().item() or 1.0
    error = (packed.float() - alone.float()).abs().max().item() / scale
    if error > 0.05:  # low-precision kernels differ by far less; a mixed row by far more
        implementation = getattr(model.config, "_attn_implementation", "unknown")
        raise UserError(
            f"padding-free training needs attention that separates packed examples by their "
            f"position_ids; with attn_implementation={implementation} this model mixes them "
            f"(logits off by {error:.2f} std). Set data.padding_free=false and "
            "data.packing_strategy=wrapped or data.packing=false, or "
            "model.attn_implementation=flash_attention_2 on a GPU"
        )


def padding_free(config: Config) -> bool:
    """Whether TRL flattens batches into one row: asked for, or implied by bfd packing."""
    data = config.data
    return data.padding_free or (data.packing and data.packing_strategy != "wrapped")
