"""Which engine is cheaper per traffic cell, from measured numbers (no server here: the
measurements are built by hand, with the billing model the meter uses)."""

from __future__ import annotations

import pytest

from {{ cookiecutter.package_name }}.cost.config import load_token_cost_config
from {{ cookiecutter.package_name }}.cost.engines import compare_engines
from {{ cookiecutter.package_name }}.cost.money import Split, serverless_money
from {{ cookiecutter.package_name }}.cost.schema import (
    EngineArm,
    LevelSummary,
    LoadPlan,
    Money,
    PromptSet,
    Serverless,
    ServingSection,
)

CONFIG = load_token_cost_config(None, ["serverless.requests_per_hour=[1,10,100,1000]"])
HOURLY = CONFIG.price.gpu_hourly_usd


def arm(
    name: str,
    usd_out: dict[str, float],
    cold_start_s: float,
    service_s: float,
    *,
    prompts: str = "a" * 64,
    dtype: str = "float32",
    partial: tuple[str, ...] = (),
) -> EngineArm:
    """An engine measured at c=1 and c=8 with these $ per 1M output tokens."""
    levels = [
        LevelSummary.model_construct(
            label=label,
            value=float(label[2:]),
            status="partial" if label in partial else "complete",
            money=Money.model_construct(usd_per_1m_output_tokens=usd),
            output_tokens_per_request=32.0,
        )
        for label, usd in usd_out.items()
    ]
    capacity = 0.4 / service_s  # requests/s of one instance
    profiles = [
        serverless_money(
            HOURLY, rate, service_s, cold_start_s, 300.0, 64.0, 32.0, Split(), capacity
        )
        for rate in CONFIG.serverless.requests_per_hour
    ]
    serverless = Serverless.model_construct(
        cold_start_s=cold_start_s, cold_start_kind="process",
        cold_start_source="measured: process spawn to ready",
        idle_timeout_s=300.0, service_s=service_s, input_tokens_per_request=64.0,
        output_tokens_per_request=32.0, capacity_requests_per_s=capacity, profiles=profiles,
    )  # fmt: skip
    prompt_set = PromptSet.model_construct(sha256=prompts)
    load = LoadPlan.model_construct(mode="concurrency", levels=[1.0, 8.0], prompts=prompt_set)
    serving = ServingSection.model_construct(
        levels=levels, serverless=serverless, load=load,
        model=type("Model", (), {"name_or_path": "m"})(),
        endpoint=type("Endpoint", (), {"model": "m"})(),
    )  # fmt: skip
    return EngineArm.model_construct(
        name=name, measured=True, error=None, device="cpu", dtype=dtype, serving=serving
    )


def test_the_named_engine_has_the_lower_price_in_every_cell_and_the_crossover_is_exact():
    # fast to start, slow to serve; and slow to start, fast to serve
    quick = arm("quick", {"c=1": 30.0, "c=8": 12.0}, cold_start_s=5.0, service_s=2.0)
    fast = arm("fast", {"c=1": 24.0, "c=8": 7.0}, cold_start_s=120.0, service_s=1.2)
    result = compare_engines([quick, fast], CONFIG)
    assert result.fair and not result.unfair
    for choice in result.choices:
        prices = choice.usd_per_1m_output_tokens
        if choice.cheaper is None:  # both always on at one instance: the same bill
            assert choice.ratio == 1.0 and len(set(prices.values())) == 1
            continue
        assert choice.cheaper == min(prices, key=lambda name: prices[name])
        runner = max(prices.values())
        assert choice.ratio == pytest.approx(runner / prices[choice.cheaper])
    steady = [c for c in result.choices if c.traffic == "steady"]
    assert {c.cheaper for c in steady} == {"fast"} and {c.reason for c in steady} == {"throughput"}
    bursty = {c.cell: c for c in result.choices if c.traffic == "bursty"}
    assert bursty["1 req/h"].cheaper == "quick" and bursty["1 req/h"].reason == "cold start"
    assert bursty["1000 req/h"].cheaper == "fast" and bursty["1000 req/h"].reason == "throughput"
    (crossing,) = result.crossovers
    assert (crossing.from_engine, crossing.to_engine) == ("quick", "fast")
    assert crossing.at is not None
    low, high = (float(cell.split()[0]) for cell in crossing.between)
    assert low < crossing.at < high
    # at the crossover both engines' bills per output token are equal
    bills = [
        serverless_money(
            HOURLY, crossing.at, service, cold, 300.0, 64.0, 32.0, Split(), 0.4 / service
        )
        for service, cold in ((2.0, 5.0), (1.2, 120.0))
    ]
    first, second = (bill.usd_per_1m_output_tokens for bill in bills)
    assert first == pytest.approx(second, rel=1e-6)


def test_an_unfair_comparison_is_said_and_a_partial_level_names_no_engine():
    one = arm("one", {"c=1": 30.0, "c=8": 12.0}, 5.0, 2.0)
    other = arm(
        "other", {"c=1": 24.0, "c=8": 7.0}, 120.0, 1.2,
        prompts="b" * 64, dtype="bfloat16", partial=("c=8",),
    )  # fmt: skip
    result = compare_engines([one, other], CONFIG)
    assert not result.fair
    said = " | ".join(result.unfair)
    assert "prompts differ" in said and "dtypes differ: one float32, other bfloat16" in said
    cell = next(c for c in result.choices if c.cell == "c=8")
    assert cell.cheaper is None and "other (c=8 partial)" in (cell.note or "")


def test_equal_prices_are_a_tie_not_a_winner():
    same = {"c=1": 10.0, "c=8": 5.0}
    result = compare_engines([arm("a", same, 5.0, 1.0), arm("b", same, 5.0, 1.0)], CONFIG)
    assert all(c.cheaper is None and c.ratio == 1.0 for c in result.choices)
    assert not result.crossovers and result.fair  # a tie is a fair answer
