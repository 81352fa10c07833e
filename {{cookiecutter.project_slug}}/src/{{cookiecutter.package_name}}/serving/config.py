"""The serving config: one YAML file (configs/serve.yaml), typed and validated, with overrides.

Imports only pydantic and yaml, so the CLI can check a config without importing torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from ..config import Section, load_yaml_config
from ..errors import UserError

BASE_MODEL = {{ cookiecutter.base_model | tojson }}
DEFAULT_API_KEY_ENV = "{{ cookiecutter.package_name | upper }}_API_KEY"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


class ModelSection(Section):
    name_or_path: str = Field(
        BASE_MODEL,
        min_length=1,
        description="hub id, local folder, or runs/<run>/merged; default: the project's base "
        "model, so `serve` with no config (as in the image) serves it",
    )
    served_name: str | None = Field(
        None, description="the `model` clients send for it; default: name_or_path"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model")
    max_context: int | None = Field(
        None, ge=16, description="prompt + completion tokens; default: the model's positions"
    )
    # CUDA graphs, async batching and the fast decode path need flash attention.
    attn_implementation: Literal[
        "auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"
    ] = Field(
        "auto",
        description="auto: on a GPU, flash attention where flash-attn is installed or the "
        "`kernels` package can fetch it from the Hub (once, into the Hugging Face cache), else "
        "sdpa; sdpa on a CPU",
    )


class EngineSection(Section):
    kind: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="transformers (continuous batching) | vllm (GPU, multi-LoRA batching)",
    )
    # On a CPU the library would size the cache from total RAM, hence our own rule.
    kv_cache_tokens: int | None = Field(
        None,
        ge=64,
        description="paged KV cache per served model, in tokens; null: on a GPU sized from "
        "free memory (gpu_memory_fraction, split between the served models), on a CPU "
        "max_concurrency requests of kv_tokens_per_request and at least one full context. "
        "A request that finds no room waits for one",
    )
    max_concurrency: int = Field(
        32, ge=1, description="requests the CPU cache holds at once (kv_cache_tokens: null)"
    )
    kv_tokens_per_request: int = Field(
        512, ge=16, description="prompt + answer tokens per request the CPU cache holds"
    )
    # The library reuses a cached prompt prefix (the system prompt) in whole pages only, so
    # at its default of 256 short chat prompts share nothing. 16 on a CPU raised tokens/s
    # up to 1.8x and cut TTFT about 2x in our serving benchmark; on a GPU the library's
    # flash-attention decode path takes requests of up to 32 pages by default.
    page_size: int | None = Field(
        None,
        ge=4,
        description="KV tokens per cache page; null: 16 on a CPU (a shared system prompt is "
        "cached in whole pages), 256 on a GPU (the library's)",
    )
    max_batch_tokens: int | None = Field(
        None, ge=16, description="tokens per forward pass; null: chosen by transformers"
    )
    # The library's margin leaves room for the logits processors' vocabulary-wide temporaries.
    gpu_memory_fraction: float | None = Field(
        None,
        gt=0.0,
        le=0.98,
        description="of free GPU memory for the KV caches, shared by the served models; null: "
        "the library's (0.8 in transformers 5.24)",
    )
    cuda_graphs: bool | None = Field(
        None,
        description="null: transformers decides, on when the attention needs no mask (flash "
        "attention on a GPU); no graphs on a CPU",
    )
    async_batching: bool | None = Field(
        None,
        description="double-buffered batches, twice the cache's I/O memory; null: on when "
        "CUDA graphs are",
    )
    warmup: bool = Field(True, description="generate once per model before /ready turns true")
    vllm_python: str = Field(
        ".venv-vllm/bin/python",
        description="vllm: the Python of vLLM's own environment (`nox -s vllm_env`)",
    )
    vllm_compile: bool | None = Field(
        None,
        description="vllm: torch.compile and graph capture at start; null: on with CUDA, off "
        "on a CPU (where compiling takes minutes at each start)",
    )
    vllm_cpu_kv_cache_gib: int = Field(
        1,
        ge=1,
        description="vllm CPU build: KV cache in GiB (VLLM_CPU_KVCACHE_SPACE; its default "
        "takes most of the RAM)",
    )
    vllm_cpu_threads: str = Field(
        "auto",
        description='vllm CPU build: cores for its threads (VLLM_CPU_OMP_THREADS_BIND), "auto" '
        'or e.g. "0-7"',
    )
    vllm_args: list[str] = Field(
        default_factory=list,
        description='extra arguments to vLLM\'s server, e.g. ["--max-num-seqs", "128"]',
    )


class ServerSection(Section):
    host: str = Field(
        "127.0.0.1", description="0.0.0.0 to listen on every interface (in a container)"
    )
    port: int = Field(8000, ge=0, le=65535, description="0: any free port (logged at start)")
    api_key_env: str = Field(
        DEFAULT_API_KEY_ENV,
        description='when this variable is set, /v1/* needs "Authorization: Bearer <key>"',
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="larger requests are refused")
    shutdown_grace_s: float = Field(
        30.0, ge=0.0, description="SIGTERM: in-flight requests get this long to finish"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="the server's log level"
    )


class LimitsSection(Section):
    max_tokens_default: int = Field(256, ge=1, description="when a request does not set max_tokens")
    max_tokens_cap: int = Field(1024, ge=1, description="larger max_tokens are capped to this")
    max_stop_sequences: int = Field(4, ge=0, description="stop sequences a request may send")


class PriceSection(Section):
    """The per-model dollars counter (llm_cost_usd) is what a chargeback script or a
    Grafana panel reads."""

    usd_per_1m_input_tokens: float | None = Field(
        None, ge=0, description="`token-cost` prints the measured prices to paste here"
    )
    usd_per_1m_output_tokens: float | None = Field(
        None, ge=0, description="null (both): no dollars counter"
    )

    def usd(self, input_tokens: int, output_tokens: int) -> float | None:
        """The price of one request's tokens; None when no price is set."""
        if self.usd_per_1m_input_tokens is None and self.usd_per_1m_output_tokens is None:
            return None
        per_input = self.usd_per_1m_input_tokens or 0.0
        per_output = self.usd_per_1m_output_tokens or 0.0
        return (input_tokens * per_input + output_tokens * per_output) / 1e6


class ServeConfig(Section):
    model: ModelSection = Field(ModelSection(), description="the base model and how it loads")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters served next to the base, by name (the `model` field of a "
        "request): NAME: runs/<run>/adapter",
    )
    engine: EngineSection = Field(EngineSection(), description="what generates the tokens")
    server: ServerSection = Field(ServerSection(), description="the HTTP server")
    limits: LimitsSection = Field(LimitsSection(), description="what one request may ask")
    price: PriceSection = Field(
        PriceSection(),
        description="what a token is charged: the llm_cost_usd counter, per served model",
    )

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


def load_serve_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    model: str | None = None,
    adapters: list[str] | None = None,
) -> ServeConfig:
    """Read the YAML (if any), apply `--model`, `--adapter NAME=PATH` and KEY=VALUE overrides."""
    extra: dict[str, Any] = {}
    if model is not None:
        extra["model"] = {"name_or_path": model}
    for item in adapters or []:
        name, sep, adapter_path = item.partition("=")
        if not sep or not name or not adapter_path:
            raise UserError(f"--adapter {item!r} is not NAME=PATH, e.g. support=runs/r1/adapter")
        extra.setdefault("adapters", {})[name] = adapter_path
    config = load_yaml_config(ServeConfig, path, overrides, extra)
    config.served_names()
    return config
