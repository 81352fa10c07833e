"""Several engines measured on the same traffic: is the comparison fair, and which engine
gives the cheaper output token in each traffic cell.

Steady traffic is a dedicated machine at each load level: every engine pays the same $/hour,
so the cheaper one is the one with more output tokens/s. Bursty traffic is per-second
billing with scale to zero at each requests-per-hour: cold starts and idle time are billed
too, so a slow-starting engine can lose where it wins on throughput. Where the choice flips
between two neighbouring cells, the crossover is given, and for bursty traffic the rate at
which the two bills are equal.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

from .config import TokenCostConfig
from .money import serverless_money
from .schema import (
    Crossover,
    EngineArm,
    EngineChoice,
    EngineComparison,
    EngineReason,
    LevelSummary,
    Serverless,
    ServerlessProfile,
    ServingSection,
)

# Answers longer or shorter than this share of the other engine's are called out: their
# $ per output token still compares, their $ per request does not.
LENGTH_TOLERANCE = 0.10
# Prices this close are a tie (e.g. both engines always on at one instance): no engine named.
TIE = 1e-6


def compare_engines(arms: list[EngineArm], config: TokenCostConfig) -> EngineComparison:
    measured = [arm for arm in arms if arm.serving is not None]
    unfair = [f"engine {a.name} was not measured: {a.error}" for a in arms if not a.measured]
    unfair += _differences(measured)
    choices = _steady(measured) + _bursty(measured, config)
    return EngineComparison(
        arms=arms,
        fair=not unfair and all(choice.cheaper or choice.ratio == 1.0 for choice in choices),
        unfair=unfair,
        choices=choices,
        crossovers=_crossovers(choices, measured, config),
    )


def _differences(arms: list[EngineArm]) -> list[str]:
    """What differs between the measured engines, beyond the engine itself."""
    said = []

    def same(what: str, value: Callable[[EngineArm], object], fix: str) -> None:
        values = {arm.name: value(arm) for arm in arms}
        if len({repr(v) for v in values.values()}) > 1:
            listed = ", ".join(f"{name} {v}" for name, v in values.items())
            said.append(f"{what} differ: {listed}; {fix}")

    same("models", lambda a: _section(a).model.name_or_path, "serve the same weights")
    same("served model names", lambda a: _section(a).endpoint.model, "drive the same model")
    same("prompts", lambda a: _section(a).load.prompts.sha256[:12], "use the same tokenizer")
    same(
        "load plans",
        lambda a: _section(a).load.model_dump(exclude={"prompts"}),
        "do not override load or prompts per engine",
    )
    same("dtypes", lambda a: a.dtype, "set model.dtype (both engines read it)")
    same(
        "cold start sources",
        lambda a: getattr(_section(a).serverless, "cold_start_source", None),
        "measure every engine's cold start the same way (process, or container report)",
    )
    lengths = {
        arm.name: level.output_tokens_per_request
        for arm in arms
        if (level := _first_complete(arm)) and level.output_tokens_per_request
    }
    if lengths and max(lengths.values()) > (1 + LENGTH_TOLERANCE) * min(lengths.values()):
        listed = ", ".join(f"{name} {tokens:.1f}" for name, tokens in lengths.items())
        said.append(
            f"answers differ in length (output tokens per request: {listed}): $ per output "
            "token compares, $ per request does not (prompts.ignore_eos=true evens them out "
            "where every engine honours it: vLLM does, our transformers engine does not)"
        )
    return said


def _section(arm: EngineArm) -> ServingSection:
    """The arm's measurement (only measured arms are passed around here)."""
    assert arm.serving is not None
    return arm.serving


def _first_complete(arm: EngineArm) -> LevelSummary | None:
    return next((lv for lv in _section(arm).levels if lv.status != "partial"), None)


def _choice(
    traffic: str, cell: str, cells: dict[str, float | str | None]
) -> tuple[EngineChoice, str | None, str | None]:
    """The cell with its cheaper engine (None where fewer than two engines have a price).
    `cells`: each engine's $ per 1M output tokens in the cell, or why it has none (a str)."""
    prices = {name: None if isinstance(usd, str) else usd for name, usd in cells.items()}
    missing = [f"{name} ({why})" for name, why in cells.items() if isinstance(why, str)]
    priced = sorted((usd, name) for name, usd in prices.items() if usd is not None)
    choice = EngineChoice(
        traffic=traffic, cell=cell, usd_per_1m_output_tokens=prices, cheaper=None,
        ratio=None, reason=None, note=None,
    )  # fmt: skip
    if len(priced) < 2 or missing:
        lacking = missing or [name for name, usd in prices.items() if usd is None]
        choice.note = "no comparison: no price for " + ", ".join(lacking)
        return choice, None, None
    (low, cheaper), (runner_usd, runner) = priced[0], priced[1]
    if math.isclose(low, runner_usd, rel_tol=TIE):
        choice.ratio, choice.note = 1.0, f"the same price for {cheaper} and {runner}"
        return choice, None, None
    choice.cheaper, choice.ratio = cheaper, runner_usd / low if low else None
    return choice, cheaper, runner


def _steady(arms: list[EngineArm]) -> list[EngineChoice]:
    """A dedicated machine at each load level the engines share."""
    labels = dict.fromkeys(lv.label for arm in arms for lv in _section(arm).levels)
    choices = []
    for label in labels:
        cells: dict[str, float | str | None] = {}
        for arm in arms:
            level = next((lv for lv in _section(arm).levels if lv.label == label), None)
            if level is None or level.status == "partial":
                cells[arm.name] = f"{label} {'not run' if level is None else 'partial'}"
            else:
                cells[arm.name] = level.money.usd_per_1m_output_tokens
        choice, cheaper, _ = _choice("steady", label, cells)
        if cheaper:
            choice.reason = "throughput"  # same $/hour: the price is 1 / output tokens/s
        choices.append(choice)
    return choices


def _bursty(arms: list[EngineArm], config: TokenCostConfig) -> list[EngineChoice]:
    """Per-second billing with scale to zero at each requests-per-hour."""
    if not config.serverless.enabled:
        return []
    choices = []
    for rate in config.serverless.requests_per_hour:
        profiles: dict[str, ServerlessProfile] = {}
        cells: dict[str, float | str | None] = {}
        for arm in arms:
            serverless = _section(arm).serverless
            found = serverless.profiles if serverless else []
            profile = next((p for p in found if p.requests_per_hour == rate), None)
            if profile:
                profiles[arm.name] = profile
                cells[arm.name] = profile.usd_per_1m_output_tokens
            else:
                cells[arm.name] = "no serverless profile: see the notes"
        choice, cheaper, runner = _choice("bursty", f"{rate:g} req/h", cells)
        if cheaper and runner:
            tokens = {arm.name: _output_tokens(arm) for arm in arms}
            choice.reason = _bursty_reason(
                profiles[cheaper], profiles[runner], tokens[cheaper], tokens[runner]
            )
        choices.append(choice)
    return choices


def _output_tokens(arm: EngineArm) -> float:
    serverless = _section(arm).serverless
    return (serverless.output_tokens_per_request if serverless else None) or 1.0


def _bursty_reason(
    cheaper: ServerlessProfile, runner: ServerlessProfile, cheaper_tokens: float,
    runner_tokens: float,
) -> EngineReason:  # fmt: skip
    """Which part of the billed hour, per output token, the cheaper engine saves most on
    (per token: an engine whose answers are longer spreads the same seconds wider)."""
    if cheaper.regime == runner.regime == "always-on":
        return "throughput"  # both never scale down: fewer instances, or the same bill

    def per_token(profile: ServerlessProfile, tokens: float) -> dict[EngineReason, float]:
        return {
            "throughput": profile.busy_seconds_per_hour / tokens,
            "cold start": profile.cold_start_seconds_per_hour / tokens,
            "idle time": profile.idle_seconds_per_hour / tokens,
        }

    ours, theirs = per_token(cheaper, cheaper_tokens), per_token(runner, runner_tokens)
    return max(ours, key=lambda part: theirs[part] - ours[part])


def _crossovers(
    choices: list[EngineChoice], arms: list[EngineArm], config: TokenCostConfig
) -> list[Crossover]:
    by_name = {arm.name: _section(arm).serverless for arm in arms}
    found = []
    for traffic in ("steady", "bursty"):
        cells = [c for c in choices if c.traffic == traffic and c.cheaper]
        for left, right in itertools.pairwise(cells):
            if left.cheaper == right.cheaper:
                continue
            assert left.cheaper and right.cheaper
            at = None
            if traffic == "bursty":
                at = _equal_bill_rate(
                    by_name[left.cheaper], by_name[right.cheaper], left, right, config
                )
                where = f"; they first cost the same at about {at:.3g} requests/hour" if at else ""
                reason = (
                    f"{left.cheaper} is cheaper at {left.cell} ({left.reason} decides), "
                    f"{right.cheaper} at {right.cell} ({right.reason} decides){where}"
                )
            else:
                reason = (
                    f"{left.cheaper} is cheaper at {left.cell}, {right.cheaper} at {right.cell}: "
                    f"{right.cheaper}'s output tokens/s overtake {left.cheaper}'s"
                )
            found.append(
                Crossover(
                    traffic=traffic,
                    between=(left.cell, right.cell),
                    from_engine=left.cheaper,
                    to_engine=right.cheaper,
                    at=at,
                    reason=reason,
                )
            )
    return found


def _equal_bill_rate(
    a: Serverless | None,
    b: Serverless | None,
    left: EngineChoice,
    right: EngineChoice,
    config: TokenCostConfig,
) -> float | None:
    """The requests/hour between two cells where the two engines' $ per 1M output tokens
    are equal: bisection on the same billing model the cells come from."""
    if a is None or b is None:
        return None
    low = float(left.cell.split()[0])
    high = float(right.cell.split()[0])

    def gap(rate: float) -> float:
        return _usd_out(a, rate, config) - _usd_out(b, rate, config)

    if gap(low) * gap(high) > 0:
        return None
    for _ in range(60):  # on a log scale: the grid spans decades
        middle = math.sqrt(low * high)
        if gap(low) * gap(middle) <= 0:
            high = middle
        else:
            low = middle
    return math.sqrt(low * high)


def _usd_out(serverless: Serverless, rate: float, config: TokenCostConfig) -> float:
    profile = serverless_money(
        config.price.gpu_hourly_usd, rate, serverless.service_s, serverless.cold_start_s,
        serverless.idle_timeout_s, serverless.input_tokens_per_request or 0.0,
        serverless.output_tokens_per_request or 0.0, config.price.split_rule(),
        capacity_rps=serverless.capacity_requests_per_s,
    )  # fmt: skip
    return profile.usd_per_1m_output_tokens or math.inf
