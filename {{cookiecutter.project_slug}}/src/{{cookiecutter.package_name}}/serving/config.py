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
    # hub id, local folder, or a merged run folder; default: the project's base model, so
    # `serve` with no config (as in the image) serves it
    name_or_path: str = Field(BASE_MODEL, min_length=1)
    served_name: str | None = None  # the `model` clients send for the base; default name_or_path
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    max_context: int | None = Field(None, ge=16)  # default: the model's max_position_embeddings
    # auto: on a GPU, flash attention where flash-attn is installed or the `kernels` package
    # can fetch it from the Hub (once, into the Hugging Face cache), else sdpa; CUDA graphs,
    # async batching and the fast decode path need flash attention. sdpa on a CPU.
    attn_implementation: Literal[
        "auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"
    ] = "auto"


class EngineSection(Section):
    kind: Literal["transformers", "vllm"] = "transformers"
    # Paged KV cache per served model, in tokens. null: on a GPU the library sizes it from
    # free memory (gpu_memory_fraction, split between the served models); on a CPU it holds
    # what the load needs: max_concurrency requests of kv_tokens_per_request (prompt and
    # answer), and at least one full context. (The library would size it from total RAM.)
    # A request that finds no room waits for one; none is refused for it.
    kv_cache_tokens: int | None = Field(None, ge=64)
    max_concurrency: int = Field(32, ge=1)
    kv_tokens_per_request: int = Field(512, ge=16)
    # Tokens per KV-cache page. The library reuses a cached prompt prefix (the system
    # prompt) in whole pages only, so at its default of 256 short chat prompts share
    # nothing. null: 16 on a CPU, where the shared pages raised the benchmark's tokens/s
    # up to 1.8x and cut TTFT about 2x (BENCHMARKS.md, "vs CB 16"); 256 on a GPU, the
    # library's own (unmeasured here), whose flash-attention decode path takes requests
    # of up to 32 pages by default.
    page_size: int | None = Field(None, ge=4)
    max_batch_tokens: int | None = Field(None, ge=16)  # tokens per forward pass; null: library
    # Of free GPU memory for the KV caches, shared by the served models. null: the
    # library's margin for a loop with logits processors (0.8 in transformers 5.24), which
    # leaves room for their vocabulary-wide temporaries.
    gpu_memory_fraction: float | None = Field(None, gt=0.0, le=0.98)
    # null: the library decides, on for both when the attention needs no mask (flash
    # attention on a GPU); there is no graph backend on a CPU
    cuda_graphs: bool | None = None
    async_batching: bool | None = None  # double-buffered batches, twice the cache's I/O memory
    warmup: bool = True
    # vllm only: the Python of vLLM's own environment (`nox -s vllm_env` makes it)
    vllm_python: str = ".venv-vllm/bin/python"
    # vllm only: torch.compile and graph capture at start. null: on with the CUDA build
    # (vLLM's default), off with the CPU build, where compiling takes minutes at each start
    vllm_compile: bool | None = None
    # vllm CPU build only: its KV cache in GiB (VLLM_CPU_KVCACHE_SPACE; its own default takes
    # most of the machine's memory) and the cores its threads use (VLLM_CPU_OMP_THREADS_BIND:
    # "auto", or a list such as "0-7")
    vllm_cpu_kv_cache_gib: int = Field(1, ge=1)
    vllm_cpu_threads: str = "auto"
    # vllm only: extra arguments appended to vLLM's server, e.g. ["--max-num-seqs", "64"]
    vllm_args: list[str] = Field(default_factory=list)


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


class PriceSection(Section):
    """What a token is charged, for the per-model dollars counter (llm_cost_usd) that a
    chargeback script or a Grafana panel reads. `token-cost` measures these prices and
    prints the lines to paste here; null: no dollars counter."""

    usd_per_1m_input_tokens: float | None = Field(None, ge=0)
    usd_per_1m_output_tokens: float | None = Field(None, ge=0)

    def usd(self, input_tokens: int, output_tokens: int) -> float | None:
        """The price of one request's tokens; None when no price is set."""
        if self.usd_per_1m_input_tokens is None and self.usd_per_1m_output_tokens is None:
            return None
        per_input = self.usd_per_1m_input_tokens or 0.0
        per_output = self.usd_per_1m_output_tokens or 0.0
        return (input_tokens * per_input + output_tokens * per_output) / 1e6


class ServeConfig(Section):
    model: ModelSection = ModelSection()
    # served name -> LoRA adapter folder (runs/<run>/adapter)
    adapters: dict[str, str] = Field(default_factory=dict)
    engine: EngineSection = EngineSection()
    server: ServerSection = ServerSection()
    limits: LimitsSection = LimitsSection()
    price: PriceSection = PriceSection()

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
