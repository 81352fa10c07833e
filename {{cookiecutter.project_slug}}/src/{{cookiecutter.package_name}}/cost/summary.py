"""One load level's requests -> the numbers of the card: latencies, rates, tokens, SLO, money.

Every metric is measured by the client from sending the request, and defined as `vllm bench
serve` defines it (METRIC_DEFINITIONS below, written on every card), so our numbers and
vLLM's can be compared; `vllm_bench_fields` writes them under vLLM's own JSON names.
Tokens are the server's `usage`; the stream is counted as a cross-check. Requests cancelled
at the level's time limit are left out of everything; failed requests count as misses.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .load import LevelRun, RequestResult
from .money import Split, percentiles, window_money

METRIC_DEFINITIONS = {
    "ttft": "time to first token: from sending the request to the first streamed event that "
    "carries text (requests that produce no text have none and are judged on e2e alone)",
    "itl": "inter-token latency: the gaps between consecutive text events of a request, "
    "excluding the first token (the wait for it is TTFT), pooled over requests; a server "
    "that sends several tokens per event shows fewer, longer gaps",
    "tpot": "time per output token: (e2e - TTFT) / (output tokens - 1) per request with more "
    "than one token, as `vllm bench serve` computes it. GuideLLM's TPOT differs: it divides "
    "the time from first to last token by all output tokens, the first one included, so its "
    "TPOT is lower for the same stream (its ITL is close to this TPOT)",
    "e2e": "end-to-end latency: from sending the request to the end of its stream "
    "(data: [DONE], or the last chunk with finish_reason and usage)",
    "output_throughput": "output tokens of successful requests / the level's wall time, "
    "first send to last answer",
    "goodput": "requests per second that met every SLO (TTFT, e2e, and TPOT where set), "
    "over the level's wall time; a level meets the SLO when that share of its requests "
    "reaches slo.attainment",
}
# `vllm bench serve --save-result` names: {mean,median,std,p<N>}_<metric>_ms.
VLLM_METRICS = {"ttft_s": "ttft", "tpot_s": "tpot", "itl_s": "itl", "e2e_s": "e2el"}


def _level_label(mode: str, value: float) -> str:
    return f"c={int(value)}" if mode == "concurrency" else f"{value:g} req/s"


def token_check(
    ok: list[RequestResult], tokenizer: Any = None, counters: dict[str, float] | None = None
) -> dict[str, Any]:
    """Usage against the stream, the expected prompt length and the server's own counters."""
    without_usage = [r for r in ok if r.completion_tokens is None]
    with_usage = [r for r in ok if r.completion_tokens is not None]
    check: dict[str, Any] = {
        "source": "usage" if not without_usage else "usage where sent, else stream events",
        "requests_without_usage": len(without_usage),
        "usage_output_tokens": sum(r.completion_tokens or 0 for r in with_usage),
        "stream_text_events": sum(r.content_chunks for r in ok),
        # One text event carries at least one token, so more events than tokens is a bug.
        "requests_with_more_events_than_tokens": sum(
            r.content_chunks > r.completion_tokens for r in with_usage
        ),
        "prompt_tokens_checked": 0,
        "prompt_tokens_mismatches": None,
        "retokenized_output_tokens": None,
        "retokenized_over_usage": None,
        "server_counters": None,
        "consistent": True,
    }
    expected = [r for r in with_usage if r.expected_prompt_tokens is not None]
    if expected:
        check["prompt_tokens_checked"] = len(expected)
        check["prompt_tokens_mismatches"] = sum(
            r.prompt_tokens != r.expected_prompt_tokens for r in expected
        )
    if tokenizer is not None and with_usage:
        # Re-encoding the text is close to, not always equal to, the generated ids (the
        # EOS is not in the text; BPE merges can differ): reported as a ratio.
        retokenized = sum(
            len(tokenizer(r.text, add_special_tokens=False)["input_ids"])
            + (1 if r.finish_reason == "stop" else 0)
            for r in with_usage
        )
        check["retokenized_output_tokens"] = retokenized
        usage = check["usage_output_tokens"]
        check["retokenized_over_usage"] = retokenized / usage if usage else None
    if counters is not None:
        prompt = sum(r.prompt_tokens or 0 for r in ok)
        completion = sum(r.completion_tokens or 0 for r in ok)
        check["server_counters"] = {
            "prompt_tokens": counters.get("prompt_tokens"),
            "completion_tokens": counters.get("completion_tokens"),
            "match": counters.get("prompt_tokens") == prompt
            and counters.get("completion_tokens") == completion,
        }
    check["consistent"] = (
        check["requests_with_more_events_than_tokens"] == 0
        and not check["prompt_tokens_mismatches"]
        and (check["server_counters"] is None or check["server_counters"]["match"])
    )
    return check


def summarize_level(
    run: LevelRun,
    *,
    ttft_slo_s: float,
    e2e_slo_s: float,
    attainment: float,
    gpu_hourly_usd: float,
    split: Split,
    tokenizer: Any = None,
    counters: dict[str, float] | None = None,
    tpot_slo_s: float | None = None,
) -> dict[str, Any]:
    counted = [r for r in run.results if not r.cancelled]
    cancelled = len(run.results) - len(counted)
    ok = [r for r in counted if r.ok]
    failed = [r for r in counted if not r.ok]
    duration = run.duration_s
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(_output_tokens(r) for r in ok)
    ttft = [r.first_token for r in ok if r.first_token is not None]
    e2e = [r.end for r in ok if r.end is not None]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    tpot = [t for r in ok if (t := request_tpot(r)) is not None]

    def good(r: RequestResult) -> bool:
        first = r.first_token if r.first_token is not None else r.end
        if first is None or first > ttft_slo_s or (r.end or 0.0) > e2e_slo_s:
            return False
        # vLLM counts a request of one token as TPOT 0 against the SLO.
        return tpot_slo_s is None or (request_tpot(r) or 0.0) <= tpot_slo_s

    good_requests = [r for r in ok if good(r)]
    fraction = len(good_requests) / len(counted) if counted else None
    if run.aborted:
        status = "partial"
    elif run.stopped_by == "time limit":
        status = "time-limited"
    else:
        status = "complete"
    kinds = Counter(r.error_kind for r in failed)
    money = window_money(
        gpu_hourly_usd,
        duration,
        len(ok),
        input_tokens,
        output_tokens,
        split,
        good_input_tokens=sum(r.prompt_tokens or 0 for r in good_requests),
        good_output_tokens=sum(r.completion_tokens or 0 for r in good_requests),
    )
    return {
        "mode": run.mode,
        "value": run.level,
        "label": _level_label(run.mode, run.level),
        "status": status,
        "stopped_by": run.stopped_by,
        "duration_s": duration,
        "requests": {
            "sent": len(run.results),
            "ok": len(ok),
            "errors": len(failed),
            "cancelled": cancelled,
            "no_text": sum(r.first_token is None for r in ok),
            "errors_by_kind": dict(sorted(kinds.items())),
            "first_errors": [r.error for r in failed[:5]],
        },
        "request_rate": len(ok) / duration if duration > 0 else None,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_tokens_per_request": input_tokens / len(ok) if ok else None,
        "output_tokens_per_request": output_tokens / len(ok) if ok else None,
        "input_tokens_per_s": input_tokens / duration if duration > 0 else None,
        "output_tokens_per_s": output_tokens / duration if duration > 0 else None,
        "ttft_s": percentiles(ttft),
        "itl_s": percentiles(itl),
        "tpot_s": percentiles(tpot),
        "e2e_s": percentiles(e2e),
        "goodput": {
            "requests_per_s": len(good_requests) / duration if duration > 0 else None,
            "good_requests": len(good_requests),
            "fraction": fraction,
            "meets_slo": bool(
                status != "partial" and fraction is not None and fraction >= attainment
            ),
        },
        "tokens": token_check(ok, tokenizer, counters),
        "money": money,
        "vllm_bench": vllm_bench_fields(
            duration,
            len(ok),
            len(failed),
            input_tokens,
            output_tokens,
            len(good_requests),
            {"ttft_s": ttft, "tpot_s": tpot, "itl_s": itl, "e2e_s": e2e},
        ),
    }


def _output_tokens(r: RequestResult) -> int:
    return r.completion_tokens if r.completion_tokens is not None else r.content_chunks


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
    samples: dict[str, Sequence[float]],
) -> dict[str, Any]:
    """The level under the field names of `vllm bench serve --save-result` (vllm/benchmarks/
    serve.py): milliseconds, population std as numpy's, percentiles interpolated as
    numpy's; None where we have no sample (vLLM writes 0 there)."""
    rate = (lambda n: n / duration) if duration > 0 else (lambda n: None)
    fields: dict[str, Any] = {
        "duration": duration,
        "completed": completed,
        "failed": failed,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": rate(completed),
        "request_goodput": rate(good_requests),
        "output_throughput": rate(output_tokens),
        "total_token_throughput": rate(input_tokens + output_tokens),
    }
    for ours, name in VLLM_METRICS.items():
        values = samples[ours]
        stats = percentiles(values)
        ms = {key: None if v is None else v * 1000 for key, v in stats.items() if key != "count"}
        fields[f"mean_{name}_ms"] = ms["mean"]
        fields[f"median_{name}_ms"] = ms["p50"]
        fields[f"std_{name}_ms"] = _std(values) * 1000 if values else None
        for point in ("p50", "p90", "p99"):
            fields[f"{point}_{name}_ms"] = ms[point]
    return fields


def _std(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def best_level(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """The cheapest level per output token among those that met the SLO (never a partial one).

    With any split the ranking is the same: the level that serves the most
    (output + w * input) tokens per second.
    """
    candidates = [
        level
        for level in levels
        if level["goodput"]["meets_slo"] and level["money"]["usd_per_1m_output_tokens"]
    ]
    if candidates:
        best = min(candidates, key=lambda level: level["money"]["usd_per_1m_output_tokens"])
        return {
            "label": best["label"],
            "value": best["value"],
            "meets_slo": True,
            "reason": "lowest $ per 1M output tokens among the levels that met the SLO",
        }
    priced = [
        level
        for level in levels
        if level["status"] != "partial" and level["money"]["usd_per_1m_output_tokens"]
    ]
    if not priced:
        reason = "no level served a token"
        return {"label": None, "value": None, "meets_slo": False, "reason": reason}
    cheapest = min(priced, key=lambda level: level["money"]["usd_per_1m_output_tokens"])
    return {
        "label": cheapest["label"],
        "value": cheapest["value"],
        "meets_slo": False,
        "reason": "no level met the SLO: this is the cheapest level, SLO ignored",
    }
