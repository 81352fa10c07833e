"""The serving config: one YAML file (configs/serve.yaml), typed and validated, with overrides.

Imports only pydantic and yaml, so the CLI can check a config without importing torch.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import UserError

BASE_MODEL = {{ cookiecutter.base_model | tojson }}
DEFAULT_API_KEY_ENV = "{{ cookiecutter.package_name | upper }}_API_KEY"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    # hub id, local folder, or a merged run folder; default: the project's base model, so
    # `serve` with no config (as in the image) serves it
    name_or_path: str = Field(BASE_MODEL, min_length=1)
    served_name: str | None = None  # the `model` clients send for the base; default name_or_path
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    max_context: int | None = Field(None, ge=16)  # default: the model's max_position_embeddings


class EngineSection(Section):
    kind: Literal["transformers", "vllm"] = "transformers"
    # Paged KV cache per served model, in tokens. null: on a GPU the library sizes it from
    # free memory (gpu_memory_fraction, split between the served models); on a CPU it holds
    # 8 full contexts (the library would otherwise size it from total RAM).
    kv_cache_tokens: int | None = Field(None, ge=64)
    page_size: int = Field(256, ge=16)
    max_batch_tokens: int | None = Field(None, ge=16)  # tokens per forward pass; null: library
    gpu_memory_fraction: float = Field(0.9, gt=0.0, le=0.98)
    warmup: bool = True
    # vllm only: extra arguments appended to `vllm serve`, e.g. ["--max-num-seqs", "64"]
    vllm_args: list[str] = []


class ServerSection(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port (logged at start)
    api_key_env: str = DEFAULT_API_KEY_ENV  # when this variable is set, /v1/* needs the key
    max_body_bytes: int = Field(1_048_576, ge=1024)
    shutdown_grace_s: float = Field(30.0, ge=0.0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class LimitsSection(Section):
    max_tokens_default: int = Field(256, ge=1)  # when a request does not say
    max_tokens_cap: int = Field(1024, ge=1)  # larger requests are capped to this
    max_stop_sequences: int = Field(4, ge=0)


class ServeConfig(Section):
    model: ModelSection = ModelSection()
    adapters: dict[str, str] = {}  # served name -> LoRA adapter folder (runs/<run>/adapter)
    engine: EngineSection = EngineSection()
    server: ServerSection = ServerSection()
    limits: LimitsSection = LimitsSection()

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str]) -> dict[str, str]:
        for name in adapters:
            if not NAME.match(name):
                raise ValueError(f"adapter name {name!r} must match {NAME.pattern}")
        return adapters

    @property
    def base_name(self) -> str:
        return self.model.served_name or self.model.name_or_path

    def served_names(self) -> list[str]:
        names = [self.base_name, *self.adapters]
        if len(set(names)) != len(names):
            raise UserError(f"served model names must be unique, got {names}")
        return names


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _valid_keys(field.annotation, f"{prefix}{name}.")
    return keys


def _describe(error: ValidationError, source: str) -> str:
    valid = _valid_keys(ServeConfig)
    lines = [f"invalid serve config {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            lines.append(
                f"  {key}: unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
            )
        else:
            lines.append(f"  {key or '<root>'}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`server.port=9000 engine.kind=vllm` -> nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise UserError(f"override {override!r} is not KEY=VALUE, e.g. server.port=9000")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {override!r} conflicts with an earlier one")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_serve_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    model: str | None = None,
    adapters: list[str] | None = None,
) -> ServeConfig:
    """Read the YAML (if any), apply `--model`, `--adapter NAME=PATH` and KEY=VALUE overrides."""
    raw: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise UserError(f"config file {source} does not exist") from None
        except yaml.YAMLError as error:
            raise UserError(f"config file {source} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {source} must hold a mapping of sections")
    extra: dict[str, Any] = parse_overrides(overrides or [])
    if model is not None:
        extra = _merge(extra, {"model": {"name_or_path": model}})
    for item in adapters or []:
        name, sep, adapter_path = item.partition("=")
        if not sep or not name or not adapter_path:
            raise UserError(f"--adapter {item!r} is not NAME=PATH, e.g. support=runs/r1/adapter")
        extra = _merge(extra, {"adapters": {name: adapter_path}})
    if extra:
        raw = _merge(raw, extra)
        source += " with overrides"
    try:
        config = ServeConfig.model_validate(raw)
    except ValidationError as error:
        raise UserError(_describe(error, source)) from None
    config.served_names()
    return config
