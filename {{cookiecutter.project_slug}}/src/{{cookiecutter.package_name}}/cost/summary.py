"""One load level's requests -> the numbers of the card: latencies, rates, tokens, SLO, money.

Every metric is measured by the client from sending the request, and defined as `vllm bench
serve` defines it (METRIC_DEFINITIONS below, written on every card), so our numbers and
vLLM's can be compared; `vllm_bench_fields` writes them under vLLM's own JSON names.
Tokens are the server's `usage`; the stream is counted as a cross-check. Requests cancelled
at the level's time limit are left out of everything; failed requests count as misses.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .config import PriceSection, SloSection
from .load import LevelRun, RequestResult
from .money import percentiles, usd_for_tokens, window_money
from .schema import (
    BestLevel,
    Goodput,
    LevelSummary,
    MetricDefinitions,
    ModelShare,
    Money,
    RequestCounts,
    ServerCounters,
    TokenCheck,
    VllmBench,
)

METRIC_DEFINITIONS = MetricDefinitions(
    ttft="time to first token: from sending the request to the first streamed event that "
    "carries text (requests that produce no text have none and are judged on e2e alone)",
    itl="inter-token latency: the gaps between consecutive text events of a request, "
    "excluding the first token (the wait for it is TTFT), pooled over requests; a server "
    "that sends several tokens per event shows fewer, longer gaps",
    tpot="time per output token: (e2e - TTFT) / (output tokens - 1) per request with more "
    "than one token, as `vllm bench serve` computes it. GuideLLM's TPOT differs: it divides "
    "the time from first to last token by all output tokens, the first one included, so its "
    "TPOT is lower for the same stream (its ITL is close to this TPOT)",
    e2e="end-to-end latency: from sending the request to the end of its stream "
    "(data: [DONE], or the last chunk with finish_reason and usage)",
    output_throughput="output tokens of successful requests / the level's wall time, "
    "first send to last answer",
    goodput="requests per second that met every SLO (TTFT, e2e, and TPOT where set), "
    "over the level's wall time; a level meets the SLO when that share of its requests "
    "reaches slo.attainment",
)


def _level_label(mode: str, value: float) -> str:
    return f"c={int(value)}" if mode == "concurrency" else f"{value:g} req/s"


def token_check(
    ok: list[RequestResult], tokenizer: Any = None, counters: dict[str, float] | None = None
) -> TokenCheck:
    """Usage against the stream, the expected prompt length and the server's own counters."""
    without_usage = [r for r in ok if r.completion_tokens is None]
    with_usage = [r for r in ok if r.completion_tokens is not None]
    usage_output = sum(r.completion_tokens or 0 for r in with_usage)
    # One text event carries at least one token, so more events than tokens is a bug.
    too_many_events = sum(r.content_chunks > (r.completion_tokens or 0) for r in with_usage)
    expected = [r for r in with_usage if r.expected_prompt_tokens is not None]
    mismatches = sum(r.prompt_tokens != r.expected_prompt_tokens for r in expected)
    retokenized = _retokenized(with_usage, tokenizer)
    server = _server_counters(ok, counters)
    return TokenCheck(
        source="usage" if not without_usage else "usage where sent, else stream events",
        requests_without_usage=len(without_usage),
        usage_output_tokens=usage_output,
        stream_text_events=sum(r.content_chunks for r in ok),
        requests_with_more_events_than_tokens=too_many_events,
        prompt_tokens_checked=len(expected),
        prompt_tokens_mismatches=mismatches if expected else None,
        retokenized_output_tokens=retokenized,
        retokenized_over_usage=retokenized / usage_output
        if retokenized is not None and usage_output
        else None,
        server_counters=server,
        consistent=too_many_events == 0 and not mismatches and (server is None or server.match),
    )


def _retokenized(with_usage: list[RequestResult], tokenizer: Any) -> int | None:
    """Re-encoding the text is close to, not always equal to, the generated ids (the EOS is
    not in the text; BPE merges can differ): reported as a ratio."""
    if tokenizer is None or not with_usage:
        return None
    return sum(
        len(tokenizer(r.text, add_special_tokens=False)["input_ids"])
        + (1 if r.finish_reason == "stop" else 0)
        for r in with_usage
    )


def _server_counters(
    ok: list[RequestResult], counters: dict[str, float] | None, model: str = ""
) -> ServerCounters | None:
    """The server's own token counters (of `model`, else of every model) beside the usage
    of `ok`; a model's series that the server never started is 0."""
    if counters is None:
        return None
    suffix = f"/{model}" if model else ""
    prompt = counters.get(f"prompt_tokens{suffix}", 0.0)
    completion = counters.get(f"completion_tokens{suffix}", 0.0)
    return ServerCounters(
        prompt_tokens=prompt,
        completion_tokens=completion,
        match=prompt == sum(r.prompt_tokens or 0 for r in ok)
        and completion == sum(r.completion_tokens or 0 for r in ok),
    )


def met_slo(slo: SloSection, r: RequestResult) -> bool:
    """Whether a request counts as good: within every bound of the SLO."""
    first = r.first_token if r.first_token is not None else r.end
    if first is None or first > slo.ttft_s or (r.end or 0.0) > slo.e2e_s:
        return False
    # vLLM counts a request of one token as TPOT 0 against the SLO.
    return slo.tpot_s is None or (request_tpot(r) or 0.0) <= slo.tpot_s


@dataclass(frozen=True)
class Samples:
    """The latencies of a level's successful requests, in seconds."""

    ttft: list[float]
    itl: list[float]
    tpot: list[float]
    e2e: list[float]

    @classmethod
    def of(cls, ok: list[RequestResult]) -> Samples:
        return cls(
            ttft=[r.first_token for r in ok if r.first_token is not None],
            itl=[b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)],
            tpot=[t for r in ok if (t := request_tpot(r)) is not None],
            e2e=[r.end for r in ok if r.end is not None],
        )


def _status(run: LevelRun) -> str:
    if run.aborted:
        return "partial"
    return "time-limited" if run.stopped_by == "time limit" else "complete"


def _per(amount: float, over: float) -> float | None:
    return amount / over if over > 0 else None


def summarize_level(
    run: LevelRun,
    slo: SloSection,
    price: PriceSection,
    *,
    tokenizer: Any = None,
    counters: dict[str, float] | None = None,
    mix: dict[str, float] | None = None,
) -> LevelSummary:
    counted = [r for r in run.results if not r.cancelled]
    ok = [r for r in counted if r.ok]
    failed = [r for r in counted if not r.ok]
    good = [r for r in ok if met_slo(slo, r)]
    duration = run.duration_s
    input_tokens, output_tokens = request_tokens(ok)
    samples = Samples.of(ok)
    status = _status(run)
    fraction = len(good) / len(counted) if counted else None
    money = window_money(
        price.gpu_hourly_usd, duration, len(ok), input_tokens, output_tokens, price.split_rule(),
        good_tokens=request_tokens(good),
    )  # fmt: skip
    return LevelSummary(
        mode=run.mode,
        value=run.level,
        label=_level_label(run.mode, run.level),
        status=status,
        stopped_by=run.stopped_by,
        duration_s=duration,
        requests=_request_counts(run, ok, failed),
        request_rate=_per(len(ok), duration),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        input_tokens_per_request=input_tokens / len(ok) if ok else None,
        output_tokens_per_request=output_tokens / len(ok) if ok else None,
        input_tokens_per_s=_per(input_tokens, duration),
        output_tokens_per_s=_per(output_tokens, duration),
        ttft_s=percentiles(samples.ttft),
        itl_s=percentiles(samples.itl),
        tpot_s=percentiles(samples.tpot),
        e2e_s=percentiles(samples.e2e),
        goodput=Goodput(
            requests_per_s=_per(len(good), duration),
            good_requests=len(good),
            fraction=fraction,
            meets_slo=status != "partial" and fraction is not None and fraction >= slo.attainment,
        ),
        tokens=token_check(ok, tokenizer, counters),
        money=money,
        vllm_bench=vllm_bench_fields(
            duration, len(ok), len(failed), input_tokens, output_tokens, len(good), samples
        ),
        models=model_shares(ok, money, mix or {}, counters),
    )


def model_shares(
    ok: list[RequestResult], money: Money, mix: dict[str, float], counters: dict[str, float] | None
) -> list[ModelShare]:
    """Each model's part of the level: its tokens at the level's prices, so the parts add
    up to the level's bill, and the server's own counters of it beside the meter's count."""
    shares = []
    prices = money.usd_per_1m_input_tokens or 0.0, money.usd_per_1m_output_tokens or 0.0
    for model, weight in mix.items():
        mine = [r for r in ok if r.model == model]
        input_tokens, output_tokens = request_tokens(mine)
        usd = usd_for_tokens(input_tokens, output_tokens, *prices)
        shares.append(
            ModelShare(
                model=model, weight=weight, requests=len(mine), input_tokens=input_tokens,
                output_tokens=output_tokens, usd=usd,
                usd_per_1m_input_tokens=money.usd_per_1m_input_tokens,
                usd_per_1m_output_tokens=money.usd_per_1m_output_tokens,
                server_counters=_server_counters(mine, counters, model),
            )
        )  # fmt: skip
    return shares


def _request_counts(
    run: LevelRun, ok: list[RequestResult], failed: list[RequestResult]
) -> RequestCounts:
    kinds = Counter(r.error_kind or "unknown" for r in failed)
    return RequestCounts(
        sent=len(run.results),
        ok=len(ok),
        errors=len(failed),
        cancelled=sum(r.cancelled for r in run.results),
        no_text=sum(r.first_token is None for r in ok),
        errors_by_kind=dict(sorted(kinds.items())),
        first_errors=[r.error for r in failed[:5]],
    )


def _output_tokens(r: RequestResult) -> int:
    return r.completion_tokens if r.completion_tokens is not None else r.content_chunks


def request_tokens(results: list[RequestResult]) -> tuple[int, int]:
    """(input, output) tokens of these requests: their usage, else their text events."""
    return sum(r.prompt_tokens or 0 for r in results), sum(map(_output_tokens, results))


def request_tpot(r: RequestResult) -> float | None:
    """(e2e - TTFT) / (output tokens - 1), as `vllm bench serve`; None below two tokens."""
    tokens = _output_tokens(r)
    if r.first_token is None or r.end is None or tokens < 2:
        return None
    return (r.end - r.first_token) / (tokens - 1)


def vllm_bench_fields(
    duration: float,
    completed: int,
    failed: int,
    input_tokens: int,
    output_tokens: int,
    good_requests: int,
    samples: Samples,
) -> VllmBench:
    """The level under the field names of `vllm bench serve --save-result` (vllm/benchmarks/
    serve.py): milliseconds, population std as numpy's, percentiles interpolated as
    numpy's; None where we have no sample (vLLM writes 0 there)."""
    fields: dict[str, float | int | None] = {
        "duration": duration,
        "completed": completed,
        "failed": failed,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": _per(completed, duration),
        "request_goodput": _per(good_requests, duration),
        "output_throughput": _per(output_tokens, duration),
        "total_token_throughput": _per(input_tokens + output_tokens, duration),
    }
    for name, values in (
        ("ttft", samples.ttft), ("tpot", samples.tpot), ("itl", samples.itl), ("e2el", samples.e2e),
    ):  # fmt: skip
        ms = {
            key: None if v is None else v * 1000 for key, v in percentiles(values) if key != "count"
        }
        ms["median"] = ms["p50"]
        ms["std"] = statistics.pstdev(values) * 1000 if values else None
        fields.update({f"{key}_{name}_ms": value for key, value in ms.items()})
    return VllmBench.model_validate(fields)


def best_level(levels: list[LevelSummary]) -> BestLevel:
    """The cheapest level per output token among those that met the SLO (never a partial one).

    With any split the ranking is the same: the level that serves the most
    (output + w * input) tokens per second.
    """
    priced = [lv for lv in levels if lv.status != "partial" and lv.money.usd_per_1m_output_tokens]
    met = [lv for lv in priced if lv.goodput.meets_slo]
    if not priced:
        return BestLevel(label=None, value=None, meets_slo=False, reason="no level served a token")
    best = min(met or priced, key=lambda lv: lv.money.usd_per_1m_output_tokens or math.inf)
    reason = (
        "lowest $ per 1M output tokens among the levels that met the SLO"
        if met
        else "no level met the SLO: this is the cheapest level, SLO ignored"
    )
    return BestLevel(label=best.label, value=best.value, meets_slo=bool(met), reason=reason)
