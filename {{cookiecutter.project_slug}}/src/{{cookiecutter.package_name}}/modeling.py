"""Load tokenizers, base models and adapters the same way for training, merging and serving."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)


def resolve_model(name_or_path: str) -> str:
    """A local folder as an absolute path, else the hub id unchanged.

    A path that looks local but does not exist is a user error, named as such.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if name_or_path.startswith(("/", "./", "../", "~")) or path.suffix:
        raise UserError(f"model folder {name_or_path!r} does not exist; check the path")
    return name_or_path


def _load_error(name: str, error: Exception) -> UserError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return UserError(
        f"cannot load model {name!r}: {error.__class__.__name__}: {str(error).splitlines()[0]}\n"
        "  It is neither a local folder nor a model in the Hugging Face cache"
        + (" (HF_HUB_OFFLINE=1 is set)" if offline else " or reachable on the hub")
        + ".\n  Options: pass a local folder with config.json and *.safetensors, run once "
        "with network access to fill the cache, or set HF_HOME to a cache that holds it."
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    source = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise _load_error(name_or_path, error) from error
    if tokenizer.pad_token_id is None:
        # Padding only needs a token the loss and attention ignore; EOS is one.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    *,
    dtype: Any,
    device: str = "cpu",
    quantization_config: Any = None,
    trust_remote_code: bool = False,
) -> Any:
    """A causal LM from safetensors only, in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(name_or_path)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
    }
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        raise _load_error(name_or_path, error) from error
    if quantization_config is None:
        model.to(device)
    log.info("loaded %s (%s, %s)", name_or_path, dtype, device)
    return model
