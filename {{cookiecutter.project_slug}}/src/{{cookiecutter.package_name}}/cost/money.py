"""Dollars from measurements: pure arithmetic, no I/O, so every formula is tested on known inputs.

Dedicated GPU (billed every second it runs, busy or not), over a measured window:

    usd            = gpu_hourly_usd / 3600 * window_seconds
    usd_per_1m_tok = usd / tokens * 1e6  =  ($/hour / 3600) / (tokens/s) * 1e6

How one window's dollars are shared between input (prompt) and output (generated) tokens
is a choice, not a fact: prefill and decode run in the same batches. The choice is stated
on every card (`Split`). With an input token costing `w` output tokens:

    usd = rate_out * (output_tokens + w * input_tokens),   rate_in = w * rate_out

`output-only` is w = 0 (prompts are free, generated tokens carry the bill), `by-tokens`
is w = 1 (one blended price), `weighted` takes w from the config (API price lists put an
input token at about a quarter of an output token).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

from .schema import (
    ComparisonRow,
    Money,
    Percentiles,
    Regime,
    ServerlessProfile,
    SplitMethod,
    SplitRule,
)

if TYPE_CHECKING:
    from .config import ReferencePrice

MILLION = 1_000_000


@dataclass(frozen=True)
class Split:
    method: SplitMethod = "weighted"
    input_weight: float = 0.25  # used by "weighted" only

    def __post_init__(self) -> None:
        if self.method not in get_args(SplitMethod):
            raise ValueError(f"unknown split method {self.method!r}")
        if self.method == "weighted" and not (
            self.input_weight >= 0 and math.isfinite(self.input_weight)
        ):
            raise ValueError(f"input_weight must be >= 0, got {self.input_weight}")

    @property
    def weight(self) -> float:
        """What one input token costs, in output tokens."""
        return {"output-only": 0.0, "by-tokens": 1.0}.get(self.method, self.input_weight)

    def describe(self) -> str:
        if self.method == "output-only":
            return "output-only: the whole bill is shared by generated tokens; input tokens cost 0"
        if self.method == "by-tokens":
            return "by-tokens: the bill is shared by all tokens equally, input and output alike"
        return (
            f"weighted: an input token costs {self.input_weight:g}x an output token "
            f"(usd = rate_out * (output_tokens + {self.input_weight:g} * input_tokens))"
        )

    def record(self) -> SplitRule:
        return SplitRule(method=self.method, input_weight=self.weight, description=self.describe())


def usd_for_seconds(gpu_hourly_usd: float, seconds: float) -> float:
    return gpu_hourly_usd / 3600.0 * seconds


def usd_per_million(usd: float, tokens: float) -> float | None:
    return usd / tokens * MILLION if tokens > 0 else None


def usd_for_tokens(
    input_tokens: float, output_tokens: float, usd_per_1m_input: float, usd_per_1m_output: float
) -> float:
    """What these tokens cost at these prices per 1M tokens."""
    return (input_tokens * usd_per_1m_input + output_tokens * usd_per_1m_output) / MILLION


def split_usd(
    usd: float, input_tokens: float, output_tokens: float, split: Split
) -> tuple[float | None, float | None]:
    """($ per 1M input tokens, $ per 1M output tokens) for `usd` spent on these tokens.

    None where the price is undefined (no tokens of that kind carry any cost).
    """
    units = output_tokens + split.weight * input_tokens
    if units <= 0:
        return None, None
    rate_out = usd / units * MILLION
    rate_in = split.weight * rate_out
    return (rate_in if input_tokens > 0 else None), (rate_out if output_tokens > 0 else None)


def window_money(
    gpu_hourly_usd: float,
    seconds: float,
    requests: int,
    input_tokens: int,
    output_tokens: int,
    split: Split,
    good_tokens: tuple[int, int] | None = None,
) -> Money:
    """Money of one measured window on a dedicated GPU (one load level).

    The `goodput` prices charge the whole window to `good_tokens` (input, output), those
    of the requests that met the SLO: what a token costs when only answers fast enough count.
    """
    usd = usd_for_seconds(gpu_hourly_usd, seconds)
    usd_in, usd_out = split_usd(usd, input_tokens, output_tokens, split)
    good_in, good_out = split_usd(usd, *good_tokens, split) if good_tokens else (None, None)
    return Money(
        window_usd=usd,
        usd_per_hour=gpu_hourly_usd,
        usd_per_request=usd / requests if requests else None,
        usd_per_1k_requests=usd / requests * 1000 if requests else None,
        usd_per_1m_input_tokens=usd_in,
        usd_per_1m_output_tokens=usd_out,
        usd_per_1m_tokens_blended=usd_per_million(usd, input_tokens + output_tokens),
        goodput_usd_per_1m_input_tokens=good_in,
        goodput_usd_per_1m_output_tokens=good_out,
    )


def serverless_money(
    gpu_hourly_usd: float,
    requests_per_hour: float,
    service_s: float,
    cold_start_s: float,
    idle_timeout_s: float,
    input_tokens_per_request: float,
    output_tokens_per_request: float,
    split: Split,
    capacity_rps: float | None = None,
) -> ServerlessProfile:
    """Expected bill of one hour of per-second (serverless) billing with scale to zero.

    Model: Poisson arrivals at `requests_per_hour`; a request at a warm instance is served
    at once and takes `service_s` (the mean end-to-end latency at the lowest load); after a
    request the instance stays up, billed, until `idle_timeout_s` passes without one; then
    it scales to zero and the next request pays `cold_start_s` of billed start-up first.
    The gap from a request's end to the next arrival is exponential (memoryless), so

        P(cold)             = exp(-lambda * idle_timeout)
        idle billed / req   = E[min(gap, idle_timeout)] = (1 - P(cold)) / lambda
        billed / req        = service + idle + cold_start * P(cold)

    When that adds up to the whole hour the instance never scales down (always on); when
    the traffic exceeds one instance's measured capacity (`capacity_rps`, requests/s at the
    best load that met the SLO) it needs ceil(rate / capacity) always-on instances.
    """
    if requests_per_hour <= 0:
        raise ValueError("requests_per_hour must be > 0")
    rate = requests_per_hour / 3600.0
    p_cold = math.exp(-rate * idle_timeout_s)
    billed_per_request = service_s + (1.0 - p_cold) / rate + cold_start_s * p_cold
    instances = math.ceil(rate / capacity_rps) if capacity_rps and rate > capacity_rps else 1
    regime: Regime = "scale-to-zero"
    billed, busy = requests_per_hour * billed_per_request, requests_per_hour * service_s
    if instances > 1 or billed >= 3600.0:
        regime, billed, p_cold = "always-on", 3600.0 * instances, 0.0
        busy = min(busy, billed)
    cold_starts = requests_per_hour * p_cold
    usd_hour = usd_for_seconds(gpu_hourly_usd, billed)
    tokens_in = requests_per_hour * input_tokens_per_request
    tokens_out = requests_per_hour * output_tokens_per_request
    usd_in, usd_out = split_usd(usd_hour, tokens_in, tokens_out, split)
    always_on_usd = gpu_hourly_usd * instances
    always_in, always_out = split_usd(always_on_usd, tokens_in, tokens_out, split)
    return ServerlessProfile(
        requests_per_hour=requests_per_hour,
        regime=regime,
        instances=instances,
        billed_seconds_per_hour=billed,
        busy_seconds_per_hour=busy,
        idle_seconds_per_hour=max(billed - busy - cold_starts * cold_start_s, 0.0),
        cold_start_seconds_per_hour=cold_starts * cold_start_s,
        cold_starts_per_hour=cold_starts,
        cold_request_fraction=p_cold,
        utilization=busy / billed if billed else None,
        usd_per_hour=usd_hour,
        usd_per_1k_requests=usd_hour / requests_per_hour * 1000,
        usd_per_1m_input_tokens=usd_in,
        usd_per_1m_output_tokens=usd_out,
        usd_per_1m_tokens_blended=usd_per_million(usd_hour, tokens_in + tokens_out),
        always_on_usd_per_hour=always_on_usd,
        always_on_usd_per_1m_input_tokens=always_in,
        always_on_usd_per_1m_output_tokens=always_out,
    )


def api_cost_per_1k_requests(
    usd_per_1m_input: float,
    usd_per_1m_output: float,
    input_tokens_per_request: float,
    output_tokens_per_request: float,
) -> float:
    """What a hosted API charges for 1000 requests of this shape (list prices, no caching)."""
    tokens = input_tokens_per_request, output_tokens_per_request
    return usd_for_tokens(*tokens, usd_per_1m_input, usd_per_1m_output) * 1000


def compare_with_apis(
    references: Sequence[ReferencePrice],
    ours_usd_per_1k_requests: float | None,
    input_tokens_per_request: float,
    output_tokens_per_request: float,
) -> list[ComparisonRow]:
    """Each reference API priced on our measured request shape, next to our own cost.

    Comparing per request of the same shape (mean input and output tokens) needs no
    split method: it is what the same workload costs on either side.
    """
    rows = []
    ours = ours_usd_per_1k_requests
    for ref in references:
        theirs = api_cost_per_1k_requests(
            ref.usd_per_1m_input,
            ref.usd_per_1m_output,
            input_tokens_per_request,
            output_tokens_per_request,
        )
        rows.append(
            ComparisonRow(
                **ref.model_dump(),  # the provider, model, list prices and their source
                usd_per_1k_requests=theirs,
                ours_usd_per_1k_requests=ours,
                ours_over_theirs=ours / theirs if ours is not None and theirs > 0 else None,
            )
        )
    return rows


def percentiles(values: Sequence[float]) -> Percentiles:
    """p50/p90/p99 (linear interpolation between order statistics, as numpy's default),
    the mean and the count; every value None when there is no data."""
    if not values:
        return Percentiles(count=0, p50=None, p90=None, p99=None, mean=None)
    # "inclusive" is numpy's linear method; before Python 3.13 it needs two values.
    data = [*values] * 2 if len(values) == 1 else values
    cuts = statistics.quantiles(data, n=100, method="inclusive")
    return Percentiles(
        count=len(values), p50=cuts[49], p90=cuts[89], p99=cuts[98], mean=statistics.fmean(values)
    )
