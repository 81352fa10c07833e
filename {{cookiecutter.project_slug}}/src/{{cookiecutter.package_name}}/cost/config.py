"""The token-cost config (configs/token_cost.yaml) and the reference prices (configs/prices.yaml).

Typed and validated like the training and serving configs, with the same KEY=VALUE
overrides; imports only pydantic and yaml.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..config import Section, load_yaml_config
from .money import Split

# $ per hour of the machine that serves: the template's gpu_hourly_usd
GPU_HOURLY_USD = {{ cookiecutter.gpu_hourly_usd | float }}


class PriceSection(Section):
    gpu_hourly_usd: float = Field(GPU_HOURLY_USD, gt=0)  # the machine that serves, all its GPUs
    split: Literal["output-only", "by-tokens", "weighted"] = "weighted"
    input_weight: float = Field(0.25, ge=0)  # weighted: an input token costs this x an output
    reference_prices: str | None = "configs/prices.yaml"  # null: no comparison

    def split_rule(self) -> Split:
        return Split(self.split, self.input_weight)


class EndpointSection(Section):
    url: str | None = None  # base URL of an OpenAI-compatible API; null: start our server
    model: str | None = None  # `model` of the requests; null: the first of /v1/models
    api_key_env: str | None = None  # variable holding the key; null: the server config's
    api: Literal["chat", "completions"] = "chat"
    tokenizer: str | None = None  # to cross-check token counts; null: our server's model
    device: str | None = None  # what the remote endpoint runs on, for the card (free text)
    connect_timeout_s: float = Field(10.0, gt=0)
    request_timeout_s: float = Field(300.0, gt=0)  # one request, first byte to last


class OwnServerSection(Section):
    config: str | None = "configs/serve.yaml"  # the serve config our server starts from
    # KEY=VALUE for the server, e.g. ["engine.kv_cache_tokens=8192"]
    overrides: list[str] = Field(default_factory=list)
    model: str | None = None  # shorthand for model.name_or_path
    adapters: dict[str, str] = Field(default_factory=dict)  # NAME: PATH next to the base
    ready_timeout_s: float = Field(900.0, gt=0)


class LoadSection(Section):
    mode: Literal["concurrency", "poisson"] = "concurrency"
    concurrency: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    # poisson: requests per second
    rates: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0])
    max_concurrency: int | None = Field(None, ge=1)  # poisson: cap on requests in flight
    requests_per_level: int = Field(64, ge=1)
    level_time_limit_s: float = Field(120.0, gt=0)  # a level stops here, whatever is left
    warmup_requests: int = Field(2, ge=0)  # before the sweep, not counted
    abort_after_errors: int = Field(20, ge=1)  # consecutive failures that stop the sweep
    seed: int = 0
    # served model -> its share of the requests, e.g. {support: 0.7, billing: 0.2, base: 0.1};
    # the shares sum to 1. Empty: every request goes to endpoint.model.
    mix: dict[str, float] = Field(default_factory=dict)
    alone: bool = False  # with a mix: also measure each of its models alone, at the same levels

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
    source: Literal["dataset", "synthetic"] = "dataset"
    dataset: str = "data/tickets_eval.jsonl"  # records in any training format; answers dropped
    input_tokens: int = Field(256, ge=1)  # synthetic: tokens of the user message
    output_tokens: int = Field(128, ge=1)  # max_tokens of every request
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    ignore_eos: bool = False  # send vLLM's ignore_eos, so every answer is output_tokens long


class SloSection(Section):
    ttft_s: float = Field(2.0, gt=0)  # time to first token
    e2e_s: float = Field(30.0, gt=0)  # whole request
    tpot_s: float | None = Field(None, gt=0)  # time per output token; null: not an SLO
    attainment: float = Field(0.9, gt=0, le=1)  # share of requests that must meet both


class ServerlessSection(Section):
    enabled: bool = True
    requests_per_hour: list[float] = Field(default_factory=lambda: [1.0, 10.0, 60.0, 600.0, 3600.0])
    idle_timeout_s: float = Field(300.0, ge=0)  # scale to zero after this long without a request
    cold_start_s: float | None = Field(None, ge=0)  # null: measured (start to ready)
    # reports/image.json of `nox -s docker -- --cold-start`: the container's pull to first token
    container_cold_start: str | None = None
    # with container_cold_start: "registry", each cold start pulls the image (a new node);
    # "pulled", the node has it already (pre-pulled, e.g. deploy/k8s's pre-pull DaemonSet)
    container_start: Literal["registry", "pulled"] = "registry"
    extra_cold_start_s: float = Field(0.0, ge=0)  # what neither measures, e.g. node start


class EngineSection(Section):
    """One engine of a comparison: measured after the others, on the same prompts and load."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")  # on the card and its folder
    url: str | None = None  # an endpoint already running; null: our server started with `serve`
    # KEY=VALUE for our server after server.overrides, e.g. ["engine.kind=vllm"]
    serve: list[str] = Field(default_factory=list)
    device: str | None = None  # url: what it runs on, for the card (free text)
    # this engine's image report from `nox -s docker`; null: serverless.container_cold_start
    container_cold_start: str | None = None


class QualitySection(Section):
    """Quality per dollar: the eval set answered through the endpoint (greedy), scored."""

    enabled: bool = False
    dataset: str = "data/tickets_eval.jsonl"  # the last turn of each record is its answer
    limit: int | None = Field(None, ge=1)  # the first N records; null: all
    # exact_match (trimmed, case-insensitive, as `evaluate`) | contains | MODULE:FUNCTION,
    # a function (answer, reference) -> a score in [0, 1]
    scorer: str = Field("exact_match", min_length=1)
    max_tokens: int = Field(16, ge=1)  # per answer; `evaluate` generates 16
    models: list[str] = Field(default_factory=list)  # served models; empty: load.mix's, or one
    concurrency: int = Field(8, ge=1)


class ReportSection(Section):
    dir: str = "reports"


class TokenCostConfig(Section):
    price: PriceSection = PriceSection()
    endpoint: EndpointSection = EndpointSection()
    server: OwnServerSection = OwnServerSection()
    load: LoadSection = LoadSection()
    prompts: PromptSection = PromptSection()
    slo: SloSection = SloSection()
    serverless: ServerlessSection = ServerlessSection()
    # Two or more: each measured in turn on the same traffic, and the card names the cheaper
    # one per traffic. Empty: the one endpoint (or our server) above.
    engines: list[EngineSection] = Field(default_factory=list)
    quality: QualitySection = QualitySection()
    report: ReportSection = ReportSection()

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
    provider: str
    model: str
    usd_per_1m_input: float = Field(ge=0)
    usd_per_1m_output: float = Field(ge=0)
    source: str = Field(min_length=1)  # where these numbers were read (a URL)
    as_of: dt.date  # the date the source gives for them
    verified: bool = False  # read on the provider's own pricing page


class ReferencePrices(Section):
    taken: dt.date  # when the prices were read off the providers' pages
    source: str
    note: str | None = None
    models: list[ReferencePrice] = Field(min_length=1)


def load_reference_prices(path: str | Path) -> ReferencePrices:
    return load_yaml_config(ReferencePrices, path, what="price list")
