"""The cost card as typed records: what `token-cost` writes, and the JSON schema derived from them.

Every section of cost_card.json is one model here; the meter builds the card from them, the
Markdown and the plot read their fields. cost_card.schema.json (next to this file) is
generated from `CostCard`, never edited by hand:

    python -m {{ cookiecutter.package_name }}.cost.schema   # rewrites cost_card.schema.json

tests/test_cost_schema.py fails when the committed file and the models disagree.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_PATH = Path(__file__).with_name("cost_card.schema.json")
SCHEMA_VERSION = 2

Amount = Annotated[float, Field(ge=0)]  # seconds, dollars, rates, tokens per request
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class CardSection(BaseModel):
    """A section of the card: every field required (null where unknown), no others."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------- serving levels
class Percentiles(CardSection):
    count: Count
    p50: Amount | None
    p90: Amount | None
    p99: Amount | None
    mean: Amount | None


SplitMethod = Literal["output-only", "by-tokens", "weighted"]


class SplitRule(CardSection):
    method: SplitMethod
    input_weight: Amount
    description: str


class Money(CardSection):
    """One load level on a dedicated GPU; goodput_*: the window charged to the tokens of
    requests that met the SLO."""

    window_usd: Amount
    usd_per_hour: Amount
    usd_per_request: Amount | None
    usd_per_1k_requests: Amount | None
    usd_per_1m_input_tokens: Amount | None
    usd_per_1m_output_tokens: Amount | None
    usd_per_1m_tokens_blended: Amount | None
    goodput_usd_per_1m_input_tokens: Amount | None
    goodput_usd_per_1m_output_tokens: Amount | None


class ServerCounters(CardSection):
    prompt_tokens: Amount | None
    completion_tokens: Amount | None
    match: bool


class TokenCheck(CardSection):
    """The server's usage against the stream, the expected prompts and its own counters."""

    source: str
    requests_without_usage: Count
    usage_output_tokens: Count
    stream_text_events: Count
    requests_with_more_events_than_tokens: Count
    prompt_tokens_checked: Count
    prompt_tokens_mismatches: Count | None
    retokenized_output_tokens: Count | None
    retokenized_over_usage: Amount | None
    server_counters: ServerCounters | None
    consistent: bool


class RequestCounts(CardSection):
    sent: Count
    ok: Count
    errors: Count
    cancelled: Count
    no_text: Count
    errors_by_kind: dict[str, Count]
    first_errors: list[str | None]


class Goodput(CardSection):
    requests_per_s: Amount | None
    good_requests: Count
    fraction: Fraction | None
    meets_slo: bool


class VllmBench(CardSection):
    """The level under the field names of `vllm bench serve --save-result` (milliseconds;
    null where there is no sample, where vLLM writes 0)."""

    duration: Amount
    completed: Count
    failed: Count
    total_input_tokens: Count
    total_output_tokens: Count
    request_throughput: Amount | None
    request_goodput: Amount | None
    output_throughput: Amount | None
    total_token_throughput: Amount | None
    mean_ttft_ms: Amount | None
    median_ttft_ms: Amount | None
    std_ttft_ms: Amount | None
    p50_ttft_ms: Amount | None
    p90_ttft_ms: Amount | None
    p99_ttft_ms: Amount | None
    mean_tpot_ms: Amount | None
    median_tpot_ms: Amount | None
    std_tpot_ms: Amount | None
    p50_tpot_ms: Amount | None
    p90_tpot_ms: Amount | None
    p99_tpot_ms: Amount | None
    mean_itl_ms: Amount | None
    median_itl_ms: Amount | None
    std_itl_ms: Amount | None
    p50_itl_ms: Amount | None
    p90_itl_ms: Amount | None
    p99_itl_ms: Amount | None
    mean_e2el_ms: Amount | None
    median_e2el_ms: Amount | None
    std_e2el_ms: Amount | None
    p50_e2el_ms: Amount | None
    p90_e2el_ms: Amount | None
    p99_e2el_ms: Amount | None


LoadMode = Literal["concurrency", "poisson"]


class ModelShare(CardSection):
    """One served model's part of a level of mixed traffic (load.mix)."""

    model: str
    weight: Fraction = Field(description="its share of the requests sent (load.mix)")
    requests: Count = Field(description="its requests answered")
    input_tokens: Count
    output_tokens: Count
    usd: Amount = Field(description="its part of the bill: its tokens at the level's prices")
    usd_per_1m_input_tokens: Amount | None
    usd_per_1m_output_tokens: Amount | None
    server_counters: ServerCounters | None = Field(
        description="the server's own counters of this model over the level; match: equal to "
        "what the meter counted from its answers' usage"
    )


class LevelSummary(CardSection):
    mode: LoadMode
    value: Positive
    label: str
    status: Literal["complete", "time-limited", "partial"]
    stopped_by: str
    duration_s: Amount
    requests: RequestCounts
    request_rate: Amount | None
    input_tokens: Count
    output_tokens: Count
    input_tokens_per_request: Amount | None
    output_tokens_per_request: Amount | None
    input_tokens_per_s: Amount | None
    output_tokens_per_s: Amount | None
    ttft_s: Percentiles
    itl_s: Percentiles
    tpot_s: Percentiles
    e2e_s: Percentiles
    goodput: Goodput
    tokens: TokenCheck
    money: Money
    vllm_bench: VllmBench
    models: list[ModelShare] = Field(
        default_factory=list, description="per served model, with mixed traffic (load.mix)"
    )


class BestLevel(CardSection):
    label: str | None
    value: float | None
    meets_slo: bool
    reason: str


# ---------------------------------------------------------------------------- serving section
class EndpointInfo(CardSection):
    url: str
    own_server: bool
    model: str | None
    api: Literal["chat", "completions"]
    api_key_env: str | None
    served_models: list[str | None]


class MeteredModel(CardSection):
    """What was served. engine, engine_version and tokenizer are the server's own answer on
    GET /info; null where it has none (an external server such as vLLM)."""

    name_or_path: str | None
    served_name: str | None
    adapters: dict[str, str]
    engine: str | None
    engine_version: str | None
    tokenizer: str | None = Field(description="where the served model's tokenizer came from")


class PromptSet(CardSection):
    source: Literal["dataset", "synthetic"]
    dataset: str | None
    count: Count
    input_tokens: Count | None
    output_tokens: Count
    description: str
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] = Field(
        description="digest of the prompts as sent: arms with the same digest got the same prompts"
    )


class LoadPlan(CardSection):
    mode: LoadMode
    levels: list[float] = Field(min_length=1)
    requests_per_level: Annotated[int, Field(ge=1)]
    level_time_limit_s: Amount
    warmup_requests: Count
    max_concurrency: Count | None
    max_tokens: Annotated[int, Field(ge=1)]
    temperature: Amount
    ignore_eos: bool
    seed: int
    prompts: PromptSet


class Slo(CardSection):
    ttft_s: Amount
    e2e_s: Amount
    tpot_s: Positive | None
    attainment: Annotated[float, Field(gt=0, le=1)]


class PhaseFloor(CardSection):
    phase: str
    measured_s: Amount
    floor_s: Amount = Field(description="the least this phase could take on this machine")
    ratio: Amount | None = Field(description="measured over floor")
    floor: str = Field(description="how the floor was measured")


class ColdStart(CardSection):
    measured: bool
    source: str
    command: list[str] | None
    listening_s: Amount | None
    ready_s: Amount | None
    first_token_s: Amount | None
    first_request_ttft_s: Amount | None
    warm_request_ttft_s: Amount | None = Field(
        description="another prompt of the nearest length right after the first: what the "
        "first request would cost on a warm server"
    )
    server_phases_s: dict[str, Amount]
    floors: list[PhaseFloor] = Field(description="each phase beside its floor (our server)")
    outside_server_s: float | None
    first_request_error: str | None
    note: str | None


Regime = Literal["scale-to-zero", "always-on"]


class ServerlessProfile(CardSection):
    requests_per_hour: Positive
    regime: Regime
    instances: Annotated[int, Field(ge=1)]
    billed_seconds_per_hour: Amount
    busy_seconds_per_hour: Amount
    idle_seconds_per_hour: Amount
    cold_start_seconds_per_hour: Amount
    cold_starts_per_hour: Amount
    cold_request_fraction: Fraction
    utilization: Amount | None
    usd_per_hour: Amount
    usd_per_1k_requests: Amount
    usd_per_1m_input_tokens: Amount | None
    usd_per_1m_output_tokens: Amount | None
    usd_per_1m_tokens_blended: Amount | None
    always_on_usd_per_hour: Amount
    always_on_usd_per_1m_input_tokens: Amount | None
    always_on_usd_per_1m_output_tokens: Amount | None


ColdStartKind = Literal[
    "configured", "process", "container, already pulled", "container, from a registry"
]


class Serverless(CardSection):
    cold_start_s: Amount
    cold_start_kind: ColdStartKind = Field(
        description="which cold start the billing used: serverless.cold_start_s, the server "
        "process's, or the container's with its image on the node or pulled"
    )
    cold_start_source: str
    idle_timeout_s: Amount
    service_s: Amount
    service_from_level: str
    capacity_requests_per_s: Amount | None
    input_tokens_per_request: Amount | None
    output_tokens_per_request: Amount | None
    model: str
    profiles: list[ServerlessProfile] = Field(min_length=1)


class ComparisonRow(CardSection):
    provider: str
    model: str
    usd_per_1m_input: Amount
    usd_per_1m_output: Amount
    usd_per_1k_requests: Amount
    ours_usd_per_1k_requests: Amount | None
    ours_over_theirs: Amount | None
    source: str
    as_of: dt.date
    verified: bool


class Comparison(CardSection):
    file: str
    taken: dt.date
    source: str
    note: str | None
    level: str
    input_tokens_per_request: Amount | None
    output_tokens_per_request: Amount | None
    rows: list[ComparisonRow]


class MetricDefinitions(CardSection):
    """How each metric is measured (as `vllm bench serve` defines it)."""

    ttft: str
    itl: str
    tpot: str
    e2e: str
    output_throughput: str
    goodput: str


class ModelAlone(CardSection):
    """A model of the mix measured on its own, at the same levels (load.alone)."""

    model: str
    levels: list[LevelSummary]
    best: BestLevel


class ModelQuality(CardSection):
    """A model's answers to the eval set, through the endpoint, scored and priced."""

    model: str
    examples: Count
    correct: Amount = Field(description="the scores' sum (a scorer may give partial credit)")
    accuracy: Fraction
    input_tokens: Count
    output_tokens: Count
    prices_from: str = Field(description="the level whose $ per 1M tokens price these answers")
    usd_per_1m_input_tokens: Amount | None
    usd_per_1m_output_tokens: Amount | None
    usd: Amount | None = Field(description="answering the whole eval set at those prices")
    usd_per_1k_correct: Amount | None = Field(description="null: no answer was correct")


class Quality(CardSection):
    """Quality per dollar: the eval set's answers through the served endpoint, greedy."""

    dataset: str
    examples: Count
    sha256: str = Field(description="of the prompts and reference answers sent")
    scorer: str
    max_tokens: Annotated[int, Field(ge=1)]
    answers_file: str = Field(description="every answer, its reference and its score (JSONL)")
    models: list[ModelQuality]


class ServingSection(CardSection):
    endpoint: EndpointInfo
    model: MeteredModel
    load: LoadPlan
    slo: Slo
    metric_definitions: MetricDefinitions
    cold_start: ColdStart | None
    levels: list[LevelSummary]
    best: BestLevel
    serverless: Serverless | None
    comparison: Comparison | None
    server_log: str | None
    alone: list[ModelAlone] = Field(
        default_factory=list, description="each model of the mix measured on its own"
    )
    quality: Quality | None = None

    def best_level(self) -> LevelSummary | None:
        """The level `best` names, or None when no level is the best."""
        return find_level(self.levels, self.best)


def find_level(levels: list[LevelSummary], best: BestLevel) -> LevelSummary | None:
    return next((level for level in levels if level.label == best.label), None)


def sha256_json(sent: Any) -> str:
    """The card's digest of what was sent (prompts, answers): equal digests, equal requests."""
    return hashlib.sha256(json.dumps(sent, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------- engines
EngineReason = Literal["throughput", "cold start", "idle time"]


class EngineArm(CardSection):
    """One engine of a comparison, measured on the same prompts and load as the others."""

    name: str
    measured: bool
    error: str | None = Field(description="why the engine was not measured (measured: false)")
    device: str
    dtype: str
    serving: ServingSection | None


class EngineChoice(CardSection):
    """One traffic cell: the engine whose measured $ per 1M output tokens is lowest."""

    traffic: Literal["steady", "bursty"]
    cell: str = Field(description="steady: the load level (c=8); bursty: requests per hour")
    usd_per_1m_output_tokens: dict[str, Amount | None] = Field(description="per engine name")
    cheaper: str | None = Field(description="null: no fair comparison in this cell (see note)")
    ratio: Amount | None = Field(description="the other engine's price over the cheaper one's")
    reason: EngineReason | None
    note: str | None


class Crossover(CardSection):
    """Where the cheaper engine changes between two neighbouring cells of one traffic kind."""

    traffic: Literal["steady", "bursty"]
    between: tuple[str, str]
    from_engine: str
    to_engine: str
    at: Amount | None = Field(
        description="bursty: requests per hour where the two prices are equal; steady: null"
    )
    reason: str


class EngineComparison(CardSection):
    arms: list[EngineArm] = Field(min_length=2)
    fair: bool = Field(description="same model, prompts, load, SLO, price; every level complete")
    unfair: list[str] = Field(description="what differs between the arms, said plainly")
    choices: list[EngineChoice]
    crossovers: list[Crossover]


# ---------------------------------------------------------------------------- training
class Mfu(CardSection):
    value: Amount | None
    gpu: str | None
    peak_tflops: Amount | None
    dtype: str
    flops_per_token: Amount | None
    achieved_tflops: Amount | None
    formula: str
    note: str | None


class TrainingRun(CardSection):
    run: str
    path: str
    trained_tokens: Count
    wall_seconds: Amount
    tokens_per_second: Amount | None
    gpu_hourly_usd: Amount
    price_source: str
    usd: Amount
    usd_per_1m_tokens: Amount | None
    parameters: Count | None
    trainable_parameters: Count | None
    global_step: Count | None
    quantization: str | None
    device: str
    dtype: str
    mfu: Mfu


class TrainingSection(CardSection):
    runs: list[TrainingRun] = Field(min_length=1)


# ---------------------------------------------------------------------------- the card
class Prices(CardSection):
    gpu_hourly_usd: Positive
    gpu_hourly_usd_source: str
    split: SplitRule


class LockFile(CardSection):
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    input_hash: str | None
    installed_matches: bool
    mismatches: list[str]
    missing: list[str]


class LockInfo(CardSection):
    files: dict[str, LockFile] = Field(min_length=1)
    environment_matches: str | None


class Environment(CardSection):
    python: str
    platform: str
    project_version: str
    packages: dict[str, str]
    device: str = Field(description="what served (or trained): torch device and its hardware")
    dtype: str
    lock: LockInfo | None


CardKind = Literal["serving", "training", "serving-training"]
PARTIAL_RULE: dict[str, Any] = {
    "allOf": [
        {
            "if": {"properties": {"partial": {"const": True}}},
            "then": {"properties": {"partial_reasons": {"minItems": 1}}},
        },
        {
            "if": {"properties": {"partial": {"const": False}}},
            "then": {"properties": {"partial_reasons": {"maxItems": 0}}},
        },
    ]
}


class CostCard(CardSection):
    """What a token costs to serve and to train, with the prices, method, device, package
    versions and lock that produced the numbers. Written by `token-cost`."""

    model_config = ConfigDict(
        extra="forbid",
        title="Cost card",
        json_schema_extra={
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "cost_card.schema.json",
            **PARTIAL_RULE,
        },
    )

    schema_version: Literal[2]
    kind: CardKind
    created: dt.datetime
    partial: bool
    partial_reasons: list[str]
    notes: list[str]
    prices: Prices
    environment: Environment
    serving: ServingSection | None = Field(
        description="the measured serving; with several engines, the first one measured"
    )
    engines: EngineComparison | None = Field(
        description="several engines on the same traffic, and the cheaper one per cell"
    )
    training: TrainingSection | None

    @model_validator(mode="after")
    def _partial_has_reasons(self) -> CostCard:
        if self.partial != bool(self.partial_reasons):
            raise ValueError("partial is true exactly when partial_reasons lists why")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def schema_text() -> str:
    """cost_card.schema.json as it must be committed."""
    return json.dumps(CostCard.model_json_schema(), indent=2) + "\n"


def main() -> None:
    SCHEMA_PATH.write_text(schema_text(), encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")


if __name__ == "__main__":
    main()
