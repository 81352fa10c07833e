"""The token-cost config (configs/token_cost.yaml) and the reference prices (configs/prices.yaml).

Typed and validated like the training and serving configs, with the same KEY=VALUE
overrides; imports only pydantic and yaml.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..config import GPU_HOURLY_USD, Section, load_yaml_config
from .money import Split
from .schema import SplitMethod


class PriceSection(Section):
    gpu_hourly_usd: float = Field(
        GPU_HOURLY_USD, gt=0, description="$ per hour of the machine that serves (all its GPUs)"
    )
    split: SplitMethod = Field("weighted", description="how input and output tokens share the bill")
    input_weight: float = Field(
        0.25, ge=0, description="weighted: one input token costs this many output tokens"
    )
    reference_prices: str | None = Field(
        "configs/prices.yaml", description="API list prices to compare with; null: none"
    )

    def split_rule(self) -> Split:
        return Split(self.split, self.input_weight)


class EndpointSection(Section):
    url: str | None = Field(
        None,
        description="an OpenAI-compatible API (http://host:8000/v1); null: start our server",
    )
    model: str | None = Field(
        None, description="`model` of the requests; null: our first adapter, else the base"
    )
    api_key_env: str | None = Field(
        None,
        description="variable holding the API key; null: server.api_key_env of the serve config",
    )
    api: Literal["chat", "completions"] = Field("chat", description="the API the requests use")
    tokenizer: str | None = Field(
        None,
        description="to cross-check token counts of an external endpoint (hub id or folder); "
        "null: our server's model",
    )
    device: str | None = Field(
        None, description="what an external endpoint runs on, written on the card (free text)"
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="to open a connection")
    request_timeout_s: float = Field(300.0, gt=0, description="one request, first byte to last")


class OwnServerSection(Section):
    config: str | None = Field(
        "configs/serve.yaml", description="the serve config our server starts from"
    )
    overrides: list[str] = Field(
        default_factory=list,
        description='KEY=VALUE for the server, e.g. ["engine.kv_cache_tokens=16384"]',
    )
    model: str | None = Field(
        None, description="shorthand for model.name_or_path (e.g. runs/<run>/merged)"
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="NAME: runs/<run>/adapter, served next to the base"
    )
    ready_timeout_s: float = Field(900.0, gt=0, description="start to /ready, cold start included")


class LoadSection(Section):
    mode: Literal["concurrency", "poisson"] = Field(
        "concurrency",
        description="concurrency: a fixed number of requests in flight; poisson: random "
        "arrivals at a rate",
    )
    concurrency: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32],
        description="concurrency: the levels, requests in flight",
    )
    rates: list[float] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0],
        description="poisson: the levels, requests per second",
    )
    max_concurrency: int | None = Field(
        None, ge=1, description="poisson: cap on requests in flight (later arrivals wait)"
    )
    requests_per_level: int = Field(
        64, ge=1, description="each level stops after this many requests..."
    )
    level_time_limit_s: float = Field(
        120.0, gt=0, description="...or after this long, whichever comes first"
    )
    warmup_requests: int = Field(2, ge=0, description="sent before the sweep, not counted")
    abort_after_errors: int = Field(
        20, ge=1, description="consecutive failed requests that stop the sweep"
    )
    seed: int = Field(0, description="seed of the prompts' order and the arrivals")
    mix: dict[str, float] = Field(
        default_factory=dict,
        description="served model: share of requests, e.g. {support: 0.7, billing: 0.2, "
        "base: 0.1}; the shares sum to 1. Empty: every request goes to endpoint.model",
    )
    alone: bool = Field(
        False,
        description="with a mix: also measure each of its models alone, at the same levels",
    )

    @model_validator(mode="after")
    def _levels(self) -> LoadSection:
        if self.mode == "concurrency" and (not self.concurrency or min(self.concurrency) < 1):
            raise ValueError("load.concurrency must be a non-empty list of integers >= 1")
        if self.mode == "poisson" and (not self.rates or min(self.rates) <= 0):
            raise ValueError("load.rates must be a non-empty list of rates > 0")
        return self

    @field_validator("mix")
    @classmethod
    def _shares(cls, mix: dict[str, float]) -> dict[str, float]:
        if not mix:
            return mix
        bad = {name: share for name, share in mix.items() if not 0 < share <= 1}
        if bad:
            raise ValueError(f"every share must be > 0 and <= 1, got {bad}")
        total = sum(mix.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"the shares must sum to 1, they sum to {total:g}: {mix}")
        return mix

    def levels(self) -> list[float]:
        return list(self.concurrency if self.mode == "concurrency" else self.rates)


class PromptSection(Section):
    source: Literal["dataset", "synthetic"] = Field(
        "dataset", description="dataset: the prompts of a data file; synthetic: random text"
    )
    dataset: str = Field(
        "data/tickets_eval.jsonl",
        description="any training data format; the answers are dropped",
    )
    input_tokens: int = Field(256, ge=1, description="synthetic: tokens of each user message")
    output_tokens: int = Field(128, ge=1, description="max_tokens of every request")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="of every request")
    ignore_eos: bool = Field(
        False, description="vLLM only: generate exactly output_tokens (its ignore_eos)"
    )


class SloSection(Section):
    ttft_s: float = Field(2.0, gt=0, description="time to first token")
    e2e_s: float = Field(30.0, gt=0, description="whole request")
    tpot_s: float | None = Field(
        None,
        gt=0,
        description="time per output token, (e2e - TTFT) / (tokens - 1); null: no bound",
    )
    attainment: float = Field(
        0.9,
        gt=0,
        le=1,
        description="share of requests that must meet every bound for a level to count",
    )


class ServerlessSection(Section):
    enabled: bool = Field(True, description="price the bursty traffic below")
    requests_per_hour: list[float] = Field(
        default_factory=lambda: [1.0, 10.0, 60.0, 600.0, 3600.0],
        description="the traffic levels priced",
    )
    idle_timeout_s: float = Field(
        300.0,
        ge=0,
        description="the instance scales to zero after this long without a request",
    )
    cold_start_s: float | None = Field(
        None,
        ge=0,
        description="null: the container's (below), else our server's spawn to ready",
    )
    container_cold_start: str | None = Field(
        None,
        description="reports/image.json from `nox -s docker -- --cold-start`: pull to first token",
    )
    # pulled: e.g. deploy/k8s's pre-pull DaemonSet put it there
    container_start: Literal["registry", "pulled"] = Field(
        "registry",
        description="registry: each cold start pulls the image (a new node); pulled: the node "
        "has it",
    )
    extra_cold_start_s: float = Field(
        0.0, ge=0, description="add what neither sees, e.g. a node's own start"
    )


class EngineSection(Section):
    """One engine of a comparison: measured after the others, on the same prompts and load."""

    name: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="on the card and its folder",
    )
    url: str | None = Field(
        None, description="an endpoint already running; null: our server started with `serve`"
    )
    serve: list[str] = Field(
        default_factory=list,
        description='KEY=VALUE for our server after server.overrides, e.g. ["engine.kind=vllm"]',
    )
    device: str | None = Field(None, description="url: what it runs on, for the card (free text)")
    container_cold_start: str | None = Field(
        None,
        description="this engine's image report from `nox -s docker`; null: "
        "serverless.container_cold_start",
    )


class QualitySection(Section):
    enabled: bool = Field(False, description="score the answers, for quality per dollar")
    dataset: str = Field(
        "data/tickets_eval.jsonl",
        description="the last turn of each record is its reference answer",
    )
    limit: int | None = Field(None, ge=1, description="the first N records; null: all")
    scorer: str = Field(
        "exact_match",
        min_length=1,
        description="exact_match (trimmed, case-insensitive, as `evaluate`) | contains | "
        "MODULE:FUNCTION (answer, reference) -> score in [0, 1]",
    )
    max_tokens: int = Field(16, ge=1, description="per answer, as `evaluate`")
    models: list[str] = Field(
        default_factory=list,
        description="served models to score; empty: load.mix's, else endpoint.model",
    )
    concurrency: int = Field(8, ge=1, description="requests in flight while scoring")


class ReportSection(Section):
    dir: str = Field(
        "reports",
        description="each run writes reports/<UTC time>-<kind>/cost_card.{json,md,png}",
    )


class TokenCostConfig(Section):
    price: PriceSection = Field(PriceSection(), description="what the serving machine costs")
    endpoint: EndpointSection = Field(EndpointSection(), description="what is measured")
    server: OwnServerSection = Field(
        OwnServerSection(), description="our server, when endpoint.url is null"
    )
    load: LoadSection = Field(LoadSection(), description="the steady traffic: a sweep of levels")
    prompts: PromptSection = Field(PromptSection(), description="what the requests ask")
    slo: SloSection = Field(SloSection(), description="what a level must meet to count")
    serverless: ServerlessSection = Field(
        ServerlessSection(), description="per-second billing with scale to zero"
    )
    engines: list[EngineSection] = Field(
        default_factory=list,
        description="two or more engines, each measured in turn on the same prompts and load; "
        "the card names the cheaper one per traffic (steady load level, bursty requests/hour). "
        "Empty: one, as above. `--engines transformers,vllm` fills it with our server on each "
        "engine.kind",
    )
    quality: QualitySection = Field(
        QualitySection(),
        description="quality per dollar: the eval set answered through the endpoint, greedy",
    )
    report: ReportSection = Field(ReportSection(), description="where the cost card goes")

    @model_validator(mode="after")
    def _engines(self) -> TokenCostConfig:
        names = [engine.name for engine in self.engines]
        if len(self.engines) == 1:
            raise ValueError("engines: list two or more to compare, or none to measure one")
        if len(set(names)) != len(names):
            raise ValueError(f"engines: names must differ, got {names}")
        return self

    def for_engine(self, engine: EngineSection) -> TokenCostConfig:
        """This config as one arm of the comparison measures it."""
        update = self.model_copy(deep=True)
        update.engines = []
        if engine.url is not None:
            update.endpoint.url = engine.url
            update.endpoint.device = engine.device or update.endpoint.device
        else:
            update.endpoint.url = None
            update.server.overrides = [*self.server.overrides, *engine.serve]
        if engine.container_cold_start is not None:
            update.serverless.container_cold_start = engine.container_cold_start
        return update


def load_token_cost_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> TokenCostConfig:
    """The YAML (or the defaults), then `extra` (from CLI flags), then KEY=VALUE overrides."""
    return load_yaml_config(TokenCostConfig, path, overrides, extra)


class ReferencePrice(Section):
    provider: str = Field(description="who sells it, e.g. OpenAI")
    model: str = Field(description="the provider's model id")
    usd_per_1m_input: float = Field(ge=0, description="$ per 1M input tokens")
    usd_per_1m_output: float = Field(ge=0, description="$ per 1M output tokens")
    source: str = Field(min_length=1, description="where these numbers were read (a URL)")
    as_of: dt.date = Field(description="the date the source gives for them")
    verified: bool = Field(False, description="read on the provider's own pricing page")


class ReferencePrices(Section):
    taken: dt.date = Field(description="when the prices were read off the providers' pages")
    source: str = Field(description="where they were read, for the card")
    note: str | None = Field(None, description="printed under the comparison")
    models: list[ReferencePrice] = Field(min_length=1, description="one entry per model")


def load_reference_prices(path: str | Path) -> ReferencePrices:
    return load_yaml_config(ReferencePrices, path, what="price list")
