"""What generating needs beyond loading a model: LoRA adapters, stop tokens, context length.

Shared by `generate` (the CLI) and the server, so both load an adapter the same way.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import quantized_base
from .errors import UserError
from .runs import ADAPTER_CONFIG, ADAPTER_WEIGHTS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How one answer is sampled, for `generate` (transformers' generate) and the server
    (continuous batching's per-request processors) alike."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        """For `model.generate`: the sampling switches (the seed is set on torch's generator)."""
        if self.temperature > 0:
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        # Greedy: unset the model's own sampling defaults, or transformers warns.
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}

    def processor_kwargs(self) -> dict[str, Any]:
        """For the batching loop. Greedy: no seed (the loop's argmax decides). Sampled: a seed
        always, a random one when the request gave none, since the seeded sampler picks every
        sampled token."""
        if self.temperature == 0.0:
            return {"temperature": 1.0, "top_p": 1.0}
        seed = random.getrandbits(63) if self.seed is None else int(self.seed)
        return {"temperature": float(self.temperature), "top_p": float(self.top_p), "seed": seed}


def check_adapter_dir(path: str | Path) -> dict[str, Any]:
    """The adapter's config, after checking the folder holds safetensors weights."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"adapter folder {str(path)!r} does not exist; check the path")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise UserError(f"{folder} has no {ADAPTER_CONFIG}; is it a PEFT LoRA adapter folder?")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickled = [p.name for p in folder.glob("adapter_model.*")]
        raise UserError(
            f"{folder} has no {ADAPTER_WEIGHTS}"
            + (f" (found {', '.join(pickled)}: only safetensors are loaded)" if pickled else "")
        )
    config: dict[str, Any] = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{folder} holds a {config.get('peft_type')} adapter; only LoRA is served")
    return config


def share_weights_clone(model: Any) -> Any:
    """A new module tree whose parameters and buffers ARE the model's (no weight copy).

    Injecting a LoRA adapter into the clone leaves the original untouched, so the
    base and every adapter can run at the same time on one copy of the base weights.
    """
    memo = {id(tensor): tensor for tensor in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def attach_adapter(model: Any, path: str | Path, name: str, share_base: bool) -> Any:
    """The model with a LoRA adapter injected (unmerged), ready for inference."""
    from peft import PeftModel

    adapter_config = check_adapter_dir(path)
    base_ref = adapter_config.get("base_model_name_or_path")
    if base_ref and Path(base_ref).expanduser().is_dir():
        base_ref = str(Path(base_ref).expanduser().resolve())
    if base_ref and base_ref != model.name_or_path:
        log.warning(
            "adapter %s was trained on %r and is served on %r; check that they are the same model",
            path,
            base_ref,
            model.name_or_path,
        )
    target = share_weights_clone(model) if share_base else model
    base_tensors = {id(tensor) for tensor in (*model.parameters(), *model.buffers())}
    # Injects the LoRA layers into `target` in place; the returned wrapper is not needed
    # for inference, the layers carry their weights and active adapter.
    PeftModel.from_pretrained(
        target, str(Path(path).expanduser()), adapter_name=name, is_trainable=False
    )
    # peft loads adapter weights in float32; only they take the serving dtype. Not
    # `target.to(dtype)`: that would also cast buffers the model keeps in float32 on
    # purpose, such as the rotary inverse frequencies, whose bf16 rounding turns into
    # an angle error that grows with the position (over a radian at position 1024).
    for parameter in target.parameters():
        if id(parameter) not in base_tensors and parameter.is_floating_point():
            parameter.data = parameter.data.to(model.dtype)
    quantized_base.apply_if_needed(target, path)  # LoftQ: the adapter's base is Q(W)
    target.eval()
    return target


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a turn: the generation config's and the tokenizer's EOS."""
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif configured:
        ids.extend(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


def context_length(model: Any, override: int | None = None) -> int:
    """The longest sequence (prompt + completion) the model is served with."""
    config = model.config.get_text_config()
    native = getattr(config, "max_position_embeddings", None)
    if override is not None:
        if native is not None and override > native:
            raise UserError(
                f"model.max_context={override} exceeds the model's {native} positions; lower it"
            )
        return override
    if native is None:
        raise UserError("the model config has no max_position_embeddings; set model.max_context")
    return int(native)
