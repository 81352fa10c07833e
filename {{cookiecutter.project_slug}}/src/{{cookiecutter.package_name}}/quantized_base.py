"""Adapters fitted to a 4-bit base, and the base they must be applied to.

LoftQ (lora.init=loftq) fits B·A to W - Q(W), the gap between the full weights and their
4-bit form, so the trained model is Q(W) + B·A. Applied to the full-precision W, the same
adapter gives about 2W - Q(W): the quantization error counted twice (about 10% of a
weight's norm with NF4), where it should cancel. Such an adapter therefore carries
`quantized_base.json`, how its base was quantized, and merging and serving rebuild Q(W)
from the full weights with the same bitsandbytes settings before applying it.

Imports nothing heavy at module level: training writes the file, merge and serve read it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

FILE = "quantized_base.json"


@dataclass(frozen=True)
class QuantizedBase:
    """How the base weights were quantized when the adapter was fitted to them."""

    quant_type: str  # bitsandbytes 4-bit type: nf4 or fp4
    blocksize: int  # values per absmax block
    double_quant: bool  # the absmax values themselves quantized (compress_statistics)
    dtype: str  # the weights' dtype before quantizing (the training compute dtype)

    @classmethod
    def of_model(cls, model: Any) -> QuantizedBase:
        """The settings of the first bitsandbytes 4-bit layer of a loaded model."""
        from bitsandbytes.nn.modules import Linear4bit

        from .device import dtype_name

        for module in model.modules():
            if isinstance(module, Linear4bit):
                state = module.weight.quant_state  # type: ignore[attr-defined]  # Params4bit
                return cls(
                    quant_type=str(state.quant_type),
                    blocksize=int(state.blocksize),
                    double_quant=bool(state.nested),
                    dtype=dtype_name(state.dtype),
                )
        raise ValueError("the model has no bitsandbytes 4-bit layer")

    def write(self, adapter_dir: Path) -> None:
        text = json.dumps(asdict(self), indent=2) + "\n"
        (adapter_dir / FILE).write_text(text, encoding="utf-8")


def read(adapter_dir: str | Path) -> QuantizedBase | None:
    """The adapter's quantized base, or None for an adapter of the full-precision base."""
    path = Path(adapter_dir).expanduser() / FILE
    if not path.is_file():
        return None
    try:
        return QuantizedBase(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:
        raise UserError(
            f"{path} is not a valid quantized-base description ({error}); restore it from the "
            "run folder, or retrain the run"
        ) from None


def quantize_roundtrip(weight: Any, spec: QuantizedBase) -> Any:
    """Q(W) as the 4-bit base computed it: quantized and dequantized by bitsandbytes with
    the same settings, returned in the weight's own dtype."""
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    source = weight.detach().to(getattr(torch, spec.dtype))
    packed, state = quantize_4bit(
        source,
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
    )
    return dequantize_4bit(packed, state).to(weight.dtype)


def apply_to_base(model: Any, spec: QuantizedBase) -> int:
    """Give each LoRA layer of `model` the 4-bit form of its base weight, as new tensors:
    a base shared with other served models keeps its own weights. Returns the layer count.
    Costs one more copy of the adapted layers' weights."""
    import torch
    from peft.tuners.lora import LoraLayer

    layers = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        weight = base.weight
        base.weight = torch.nn.Parameter(quantize_roundtrip(weight, spec), requires_grad=False)
        layers += 1
    return layers


def apply_if_needed(model: Any, adapter_dir: str | Path) -> QuantizedBase | None:
    """apply_to_base for an adapter that has a quantized base; None (and nothing done)
    for one that has not."""
    spec = read(adapter_dir)
    if spec is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            f"the adapter {adapter_dir} was fitted to a 4-bit base (lora.init=loftq), which "
            "takes bitsandbytes to rebuild and it is not installed here (the serving image "
            "leaves it out). Install bitsandbytes, or merge the run and serve the merged model"
        ) from None
    apply_to_base(model, spec)
    return spec
