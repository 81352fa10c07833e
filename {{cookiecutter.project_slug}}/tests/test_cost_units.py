"""Token cost without a model: the money maths on known inputs, MFU, level summaries, the
card schema, and the load client's fault handling against a scripted HTTP transport."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from {{ cookiecutter.package_name }}.cost.card import _metrics_markdown as markdown_metrics
from {{ cookiecutter.package_name }}.cost.card import _price_sources_markdown as price_sources_markdown
from {{ cookiecutter.package_name }}.cost.card import environment, markdown
from {{ cookiecutter.package_name }}.cost.config import (
    PriceSection,
    ServerlessSection,
    SloSection,
    load_reference_prices,
    load_token_cost_config,
)
from {{ cookiecutter.package_name }}.cost.container import serverless_cold_start
from {{ cookiecutter.package_name }}.cost.load import (
    Endpoint,
    LevelRun,
    LevelRunner,
    Prompt,
    RequestResult,
)
from {{ cookiecutter.package_name }}.cost.money import (
    Split,
    api_cost_per_1k_requests,
    compare_with_apis,
    percentiles,
    serverless_money,
    split_usd,
    window_money,
)
from {{ cookiecutter.package_name }}.cost.schema import (
    SCHEMA_PATH,
    CostCard,
    Prices,
    TrainingSection,
)
from {{ cookiecutter.package_name }}.cost.summary import (
    METRIC_DEFINITIONS,
    best_level,
    summarize_level,
)
from {{ cookiecutter.package_name }}.cost.training_cost import peak_tflops, training_cost
from {{ cookiecutter.package_name }}.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ money
def test_dedicated_gpu_dollars_per_million_tokens():
    # $3.60/hour = $0.001/s; 100 s -> $0.10 for 1000 output tokens -> $100 per 1M.
    money = window_money(3.6, 100.0, 10, 0, 1000, Split("output-only"))
    assert money.window_usd == pytest.approx(0.1)
    assert money.usd_per_1m_output_tokens == pytest.approx(100.0)
    assert money.usd_per_1m_input_tokens is None
    assert money.usd_per_request == pytest.approx(0.01)
    assert money.usd_per_1k_requests == pytest.approx(10.0)
    # The headline formula: ($/hour / 3600) / (tokens/s) * 1e6.
    assert money.usd_per_1m_output_tokens == pytest.approx(3.6 / 3600 / 10 * 1e6)


@pytest.mark.parametrize(
    ("split", "usd_in", "usd_out"),
    [
        (Split("output-only"), 0.0, 1.0),  # $1 over 1M output tokens; input free
        (Split("by-tokens"), 0.25, 0.25),  # $1 over 4M tokens of either kind
        (Split("weighted", 0.5), 0.5 / 2.5, 1 / 2.5),  # 1M out + 0.5 * 3M in = 2.5M units
    ],
)
def test_split_methods_share_the_bill(split, usd_in, usd_out):
    got_in, got_out = split_usd(1.0, 3_000_000, 1_000_000, split)
    assert got_in == pytest.approx(usd_in)
    assert got_out == pytest.approx(usd_out)
    # Whatever the method, the shares add back up to the bill.
    assert got_in * 3 + got_out * 1 == pytest.approx(1.0)


def test_split_rejects_an_unknown_method_and_a_negative_weight():
    with pytest.raises(ValueError, match="unknown split"):
        Split("by-time")
    with pytest.raises(ValueError, match="input_weight"):
        Split("weighted", -1.0)
    assert "0.25x" in Split("weighted", 0.25).describe()


def test_serverless_scale_to_zero_on_known_inputs():
    # 6 requests/hour (one per 600 s), idle timeout 60 s, 2 s service, 10 s cold start.
    rate = 6 / 3600
    p_cold = math.exp(-rate * 60)
    row = serverless_money(3.6, 6, 2.0, 10.0, 60.0, 100, 50, Split("output-only"))
    assert row.regime == "scale-to-zero"
    assert row.cold_request_fraction == pytest.approx(p_cold)
    billed = 6 * (2.0 + (1 - p_cold) / rate + 10.0 * p_cold)
    assert row.billed_seconds_per_hour == pytest.approx(billed)
    assert row.usd_per_hour == pytest.approx(billed * 0.001)
    assert row.usd_per_1m_output_tokens == pytest.approx(billed * 0.001 / 300 * 1e6)
    assert row.busy_seconds_per_hour == pytest.approx(12.0)
    assert row.cold_start_seconds_per_hour == pytest.approx(6 * p_cold * 10.0)
    parts = ("busy", "idle", "cold_start")
    assert sum(getattr(row, f"{p}_seconds_per_hour") for p in parts) == pytest.approx(billed)
    # Always on costs the whole hour for the same tokens.
    assert row.always_on_usd_per_hour == pytest.approx(3.6)


def test_serverless_turns_always_on_and_scales_out():
    busy = serverless_money(3.6, 3600, 2.0, 10.0, 300.0, 100, 50, Split())
    assert busy.regime == "always-on" and busy.billed_seconds_per_hour == 3600
    # 10 req/s against a measured capacity of 3 req/s: 4 instances all hour.
    fleet = serverless_money(3.6, 36000, 0.5, 10.0, 300.0, 100, 50, Split(), capacity_rps=3.0)
    assert fleet.instances == 4 and fleet.usd_per_hour == pytest.approx(4 * 3.6)
    with pytest.raises(ValueError):
        serverless_money(3.6, 0, 1.0, 1.0, 1.0, 1, 1, Split())


def test_api_price_of_a_request_shape():
    # 1000 requests of 1000 input + 100 output tokens at $1/$4 per 1M: $1.40.
    assert api_cost_per_1k_requests(1.0, 4.0, 1000, 100) == pytest.approx(1.4)


def test_percentiles_interpolate_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    stats = percentiles(values)
    assert stats.p50 == pytest.approx(5.5)
    assert stats.p90 == pytest.approx(9.1)
    assert stats.p99 == pytest.approx(9.91)
    assert stats.mean == pytest.approx(5.5) and stats.count == 10
    assert percentiles([]).p50 is None


# ------------------------------------------------------------------------------ training
def test_peak_flops_table_and_unknown_devices():
    assert peak_tflops("cuda (NVIDIA H100 80GB HBM3)", "bfloat16") == ("H100 SXM", 989.4)
    assert peak_tflops("cuda (NVIDIA H100 PCIe)", "bfloat16")[0] == "H100 PCIe"
    assert peak_tflops("cuda (NVIDIA A100-SXM4-80GB)", "bfloat16") == ("A100", 312.0)
    assert peak_tflops("cuda (NVIDIA L4)", "bfloat16")[0] == "L4"
    assert peak_tflops("cuda (NVIDIA L40S)", "bfloat16")[0] == "L40S"
    assert peak_tflops("cuda (Tesla T4)", "bfloat16") == ("T4", None)  # no bf16 on Turing
    assert peak_tflops("cpu", "float32") == (None, None)
    assert peak_tflops("cuda (Some Future GPU)", "bfloat16") == (None, None)


def _run(tmp_path: Path, device: str, dtype: str = "bfloat16") -> Path:
    run = tmp_path / "run1"
    run.mkdir()
    cost = {
        "trained_tokens": 1_000_000,
        "wall_seconds": 100.0,
        "gpu_hourly_usd": 3.6,
        "environment": {"device": device},
        "dtype": dtype,
        "quantization": "none",
    }
    metrics = {"parameters": 1_000_000_000, "trainable_parameters": 10_000_000, "global_step": 5}
    (run / "cost.json").write_text(json.dumps(cost))
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_training_cost_and_mfu_on_known_inputs(tmp_path):
    result = training_cost(_run(tmp_path, "cuda (NVIDIA H100 80GB HBM3)"))
    assert result.usd == pytest.approx(0.1)  # 100 s at $3.60/hour
    assert result.usd_per_1m_tokens == pytest.approx(0.1)
    assert result.tokens_per_second == pytest.approx(10_000)
    # (4 * 1e9 + 2 * 1e7) FLOPs/token * 1e4 tokens/s = 40.2 TFLOPS of 989.4.
    assert result.mfu.achieved_tflops == pytest.approx(40.2)
    assert result.mfu.value == pytest.approx(40.2 / 989.4)
    repriced = training_cost(tmp_path / "run1", gpu_hourly_usd=7.2)
    assert repriced.usd == pytest.approx(0.2) and repriced.price_source == "given"


def test_training_mfu_is_unknown_on_a_cpu_and_missing_runs_are_named(tmp_path):
    result = training_cost(_run(tmp_path, "cpu", "float32"))
    assert result.mfu.value is None and "unknown" in result.mfu.note
    with pytest.raises(UserError, match=r"cost\.json"):
        training_cost(tmp_path / "nope")


# ------------------------------------------------------------------------------ config
def test_config_ships_valid_and_names_a_typo():
    config = load_token_cost_config(ROOT / "configs" / "token_cost.yaml")
    assert config.price.gpu_hourly_usd > 0 and config.load.levels()
    prices = load_reference_prices(ROOT / "configs" / "prices.yaml")
    assert prices.models and prices.taken.year >= 2024
    with pytest.raises(UserError, match=r"did you mean 'slo\.ttft_s'"):
        load_token_cost_config(None, ["slo.ttft=1"])
    with pytest.raises(UserError, match=r"load\.concurrency"):
        load_token_cost_config(None, ["load.concurrency=[]"])


def test_every_list_price_has_its_source_and_date_and_the_card_shows_them(tmp_path):
    prices = load_reference_prices(ROOT / "configs" / "prices.yaml")
    for model in prices.models:
        assert model.source.startswith("https://"), model
        assert model.as_of <= prices.taken, model
    rows = compare_with_apis(prices.models, 0.5, 200, 50)
    assert [r.as_of for r in rows] == [m.as_of for m in prices.models]
    text = "\n".join(price_sources_markdown(rows))
    first = prices.models[0]
    assert f"- {first.model}: as of {first.as_of.isoformat()}, {first.source}" in text
    if not first.verified:
        assert "**unverified**" in text
    # A price without its source is refused, naming the entry and the field.
    bad = tmp_path / "prices.yaml"
    bad.write_text(
        "taken: 2026-12-01\nsource: x\nmodels:\n"
        "  - {provider: P, model: m, usd_per_1m_input: 1, usd_per_1m_output: 2,"
        " as_of: 2026-11-01}\n"
    )
    expected = r"invalid price list .*prices\.yaml:\n  models\.0\.source: Field required"
    with pytest.raises(UserError, match=expected):
        load_reference_prices(bad)


# ------------------------------------------------------------------------------ load client
def _sse(*events: dict, done: bool = True) -> bytes:
    lines = [f"data: {json.dumps(event)}\n\n" for event in events]
    if done:
        lines.append("data: [DONE]\n\n")
    return "".join(lines).encode()


def _chunk(text: str | None = None, finish: str | None = None, usage: dict | None = None):
    choices = [] if usage else [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]
    event = {"object": "chat.completion.chunk", "choices": choices}
    if usage:
        event["usage"] = usage
    return event


GOOD = _sse(
    _chunk("Hel"),
    _chunk("lo"),
    _chunk(None, "stop"),
    _chunk(usage={"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}),
)


def _runner(handler, **kwargs) -> LevelRunner:
    endpoint = Endpoint("http://meter.test/v1", "m", max_tokens=8)
    prompts = [Prompt(messages=[{"role": "user", "content": "hi"}], expected_prompt_tokens=7)]
    return LevelRunner(
        endpoint, prompts, progress=False, transport=httpx.MockTransport(handler), **kwargs
    )


def _summary(run, **slo):
    slo = SloSection(**({"ttft_s": 1.0, "e2e_s": 5.0, "attainment": 0.9} | slo))
    return summarize_level(run, slo, PriceSection(gpu_hourly_usd=3.6))


def test_level_counts_tokens_from_usage_and_checks_the_stream():
    runner = _runner(lambda request: httpx.Response(200, content=GOOD))
    run = asyncio.run(runner.run_level("concurrency", 2, 6, 30.0))
    level = _summary(run)
    assert level.status == "complete" and level.requests.ok == 6
    assert level.output_tokens == 18 and level.input_tokens == 42
    tokens = level.tokens
    assert tokens.usage_output_tokens == 18 and tokens.stream_text_events == 12
    assert tokens.prompt_tokens_mismatches == 0 and tokens.consistent
    assert level.ttft_s.count == 6 and level.goodput.meets_slo


def test_without_usage_the_goodput_price_counts_the_stream_events_too():
    # No usage event: the text events stand in for the output tokens, in every price.
    body = _sse(_chunk("Hel"), _chunk("lo"), _chunk(None, "stop"))
    runner = _runner(lambda request: httpx.Response(200, content=body))
    level = _summary(asyncio.run(runner.run_level("concurrency", 1, 3, 30.0)))
    assert level.output_tokens == 6 and level.tokens.requests_without_usage == 3
    assert level.goodput.good_requests == 3
    money = level.money
    assert money.goodput_usd_per_1m_output_tokens == pytest.approx(money.usd_per_1m_output_tokens)


def test_a_stream_that_ends_with_finish_reason_and_usage_but_no_done_is_complete():
    # What `transformers serve` sends: the last chunk has finish_reason and usage, no [DONE].
    last = _chunk(None, "length") | {"usage": {"prompt_tokens": 7, "completion_tokens": 2}}
    body = _sse(_chunk("Hel"), _chunk("lo"), last, done=False)
    run = asyncio.run(
        _runner(lambda request: httpx.Response(200, content=body)).run_level(
            "concurrency", 1, 3, 30.0
        )
    )
    assert all(r.ok and r.completion_tokens == 2 for r in run.results)
    cut = _sse(_chunk("Hel"), _chunk(None, "length"), done=False)  # no usage: cut short
    run = asyncio.run(
        _runner(lambda request: httpx.Response(200, content=cut)).run_level(
            "concurrency", 1, 2, 30.0
        )
    )
    assert {r.error_kind for r in run.results} == {"stream"}


def _scripted(index, start, chunks, end, tokens, prompt=10) -> RequestResult:
    """A request whose text events arrived at `chunks` (seconds after it was sent)."""
    return RequestResult(
        index, start, ok=True, status=200, first_token=chunks[0], end=end,
        chunk_times=list(chunks), prompt_tokens=prompt, completion_tokens=tokens,
        content_chunks=len(chunks), finish_reason="stop",
    )  # fmt: skip


def test_metrics_on_a_scripted_stream_match_hand_worked_numbers():
    run = LevelRun(
        2,
        "concurrency",
        [
            # 4 events carry 5 tokens (one event holds two): TTFT 0.5, gaps 0.2 0.3 0.1,
            # e2e 1.2, TPOT (1.2 - 0.5) / (5 - 1) = 0.175
            _scripted(0, 0.0, [0.5, 0.7, 1.0, 1.1], 1.2, 5),
            # TTFT 0.3, gap 0.2, e2e 0.6, TPOT (0.6 - 0.3) / 1 = 0.3
            _scripted(1, 0.1, [0.3, 0.5], 0.6, 2),
            # one token: TTFT 2.5, no gap, no TPOT, e2e 2.6
            _scripted(2, 0.2, [2.5], 2.6, 1),
            RequestResult(
                3, 0.3, status=500, error="HTTP 500: boom", error_kind="http_5xx", end=0.1
            ),
        ],
        duration_s=3.0,
        stopped_by="request count",
    )
    level = _summary(run, attainment=0.5, tpot_s=0.25)
    approx = pytest.approx
    assert level.ttft_s.model_dump() == approx(
        {"count": 3, "p50": 0.5, "p90": 2.1, "p99": 2.46, "mean": 1.1}
    )  # sorted 0.3 0.5 2.5: p90 at 1.8 -> 0.5 + 0.8 * 2.0; p99 at 1.98 -> 0.5 + 0.98 * 2.0
    assert level.itl_s.model_dump() == approx(
        {"count": 4, "p50": 0.2, "p90": 0.27, "p99": 0.297, "mean": 0.2}
    )
    assert level.tpot_s.model_dump() == approx(
        {"count": 2, "p50": 0.2375, "p90": 0.2875, "p99": 0.29875, "mean": 0.2375}
    )
    assert level.e2e_s.mean == approx(4.4 / 3) and level.e2e_s.p50 == approx(1.2)
    # Goodput: only the first request meets TTFT <= 1, e2e <= 5 and TPOT <= 0.25 (the second
    # misses TPOT, the third TTFT, the fourth failed): 1 request in 3 s.
    assert level.goodput.good_requests == 1
    assert level.goodput.requests_per_s == approx(1 / 3)
    assert level.goodput.fraction == approx(0.25) and not level.goodput.meets_slo
    without_tpot = _summary(run, attainment=0.5)
    assert without_tpot.goodput.good_requests == 2 and without_tpot.goodput.meets_slo

    vllm = level.vllm_bench.model_dump()
    assert vllm == approx(
        {
            "duration": 3.0, "completed": 3, "failed": 1,
            "total_input_tokens": 30, "total_output_tokens": 8,
            "request_throughput": 1.0, "request_goodput": 1 / 3,
            "output_throughput": 8 / 3, "total_token_throughput": 38 / 3,
            "mean_ttft_ms": 1100.0, "median_ttft_ms": 500.0, "p50_ttft_ms": 500.0,
            "p90_ttft_ms": 2100.0, "p99_ttft_ms": 2460.0,
            "std_ttft_ms": 1000 * math.sqrt((0.36 + 0.64 + 1.96) / 3),
            "mean_tpot_ms": 237.5, "median_tpot_ms": 237.5, "p50_tpot_ms": 237.5,
            "p90_tpot_ms": 287.5, "p99_tpot_ms": 298.75, "std_tpot_ms": 62.5,
            "mean_itl_ms": 200.0, "median_itl_ms": 200.0, "p50_itl_ms": 200.0,
            "p90_itl_ms": 270.0, "p99_itl_ms": 297.0, "std_itl_ms": 1000 * math.sqrt(0.02 / 4),
            "mean_e2el_ms": 4400 / 3, "median_e2el_ms": 1200.0, "p50_e2el_ms": 1200.0,
            "p90_e2el_ms": 2320.0, "p99_e2el_ms": 2572.0,
            "std_e2el_ms": 1000 * math.sqrt(((1.2 - 4.4 / 3) ** 2 + (0.6 - 4.4 / 3) ** 2
                                             + (2.6 - 4.4 / 3) ** 2) / 3),
        }
    )  # fmt: skip

    # The level and the definitions match the card's schema; the card states each definition.
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(
        level.model_dump(mode="json"), {"$defs": schema["$defs"], "$ref": "#/$defs/LevelSummary"}
    )
    jsonschema.validate(
        METRIC_DEFINITIONS.model_dump(),
        {"$defs": schema["$defs"], "$ref": "#/$defs/MetricDefinitions"},
    )
    text = markdown_metrics([level], METRIC_DEFINITIONS)
    text = "\n".join(text)
    assert "| c=2 | 0.237/0.287/0.299 | 0.2/0.297 | 1.1 | 1.47 |" in text
    assert "(e2e - TTFT) / (output tokens - 1)" in text and "GuideLLM" in text
    assert "excluding the first token" in text and "mean_ttft_ms" in text


def test_errors_are_classified_and_a_failing_endpoint_stops_the_sweep():
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] % 3 == 1:
            return httpx.Response(429, json={"error": {"message": "slow down"}})
        if calls["n"] % 3 == 2:
            return httpx.Response(500, json={"error": {"message": "boom"}})
        return httpx.Response(200, content=_sse(_chunk("x"), done=False))  # no [DONE]

    run = asyncio.run(_runner(handler, abort_after_errors=5).run_level("concurrency", 1, 50, 30))
    level = _summary(run)
    assert run.aborted and level.status == "partial"
    assert level.requests.errors == 5 and level.requests.ok == 0
    assert level.requests.errors_by_kind == {"http_4xx": 2, "http_5xx": 2, "stream": 1}
    assert "slow down" in level.requests.first_errors[0]
    assert not level.goodput.meets_slo
    assert best_level([level]).label is None  # a partial level is never the best


def test_unreachable_endpoint_is_a_connect_error():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    run = asyncio.run(_runner(handler, abort_after_errors=3).run_level("concurrency", 1, 10, 30))
    assert run.aborted and "3 requests in a row failed" in run.stopped_by
    assert {r.error_kind for r in run.results} == {"connect"}


def test_poisson_level_is_bounded_by_its_time_limit():
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.3)
        return httpx.Response(200, content=GOOD)

    runner = _runner(slow)
    run = asyncio.run(runner.run_level("poisson", 40.0, 1000, 0.5, seed=1))
    level = _summary(run)
    assert run.stopped_by == "time limit" and level.status == "time-limited"
    assert 0 < level.requests.ok < 1000 and level.requests.cancelled > 0
    assert run.duration_s < 2.0


def test_schema_accepts_a_training_card_and_rejects_a_broken_one(tmp_path):
    import jsonschema

    card = CostCard(
        schema_version=2,
        kind="training",
        created="2025-01-01T00:00:00Z",
        partial=False,
        partial_reasons=[],
        notes=[],
        prices=Prices(gpu_hourly_usd=3.6, gpu_hourly_usd_source="test", split=Split().record()),
        environment=environment(ROOT, "cpu", "float32"),
        serving=None,
        engines=None,
        training=TrainingSection(runs=[training_cost(_run(tmp_path, "cpu", "float32"))]),
    )
    written = json.loads(card.to_json())
    assert written["created"] == "2025-01-01T00:00:00Z"
    jsonschema.validate(written, json.loads(SCHEMA_PATH.read_text()))
    assert "| run1 |" in markdown(card) and "(2025-01-01T00:00:00Z)" in markdown(card)
    # partial without a reason: refused by the model and by the schema alike
    broken = written | {"partial": True}
    with pytest.raises(ValidationError, match="partial_reasons"):
        CostCard.model_validate(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(SCHEMA_PATH.read_text()))


def test_serverless_cold_start_prefers_the_containers_measured_start(tmp_path):
    """The report tools/image_report.py writes (its own phases_summary) feeds the card."""
    from tools import image_report

    starts = [
        image_report.Start(True, True, pull, 1.0, pull + 9, pull + 10) for pull in (11, 12, 14)
    ]
    starts.append(image_report.Start(False, True, 0.0, 0.5, 9.5, 10.0))
    report = {
        "measured_at": "2026-12-01T22:31:41+00:00",
        "host": {"machine": "x86_64", "cpus": 2, "docker": "20.10.24"},
        "size": {"image": "img:local"},
        "cold_start": {
            "runs": [dataclasses.asdict(start) for start in starts],
            "from_registry": image_report.phases_summary(starts[:3]),
            "already_pulled": image_report.phases_summary(starts[3:]),
        },
    }
    path = tmp_path / "image.json"
    path.write_text(json.dumps(report))
    process = 7.0  # our server's measured spawn to ready
    seconds, source, kind = serverless_cold_start(
        ServerlessSection(container_cold_start=str(path)), process
    )
    assert seconds == 22.0  # median of 21, 22, 24: pull to first token
    assert "img:local" in source and "median of 3" in source and "2026-12-01" in source
    assert kind == "container, from a registry"
    seconds, source, kind = serverless_cold_start(
        ServerlessSection(container_cold_start=str(path), container_start="pulled"), process
    )
    assert (seconds, kind) == (10.0, "container, already pulled")
    assert "already on the node" in source and "median of 1" in source
    assert serverless_cold_start(ServerlessSection(), process) == (
        7.0,
        "measured: process spawn to ready",
        "process",
    )
    explicit = ServerlessSection(
        cold_start_s=3.0, container_cold_start=str(path), extra_cold_start_s=1
    )
    assert serverless_cold_start(explicit, process)[::2] == (4.0, "configured")
    assert serverless_cold_start(ServerlessSection(), None) is None
    (tmp_path / "bare.json").write_text(json.dumps({"size": {}}))
    (tmp_path / "old.json").write_text(json.dumps({"cold_start": {"runs": []}}))
    with pytest.raises(UserError, match=r"old.json is not a report of tools/image_report.py"):
        serverless_cold_start(
            ServerlessSection(container_cold_start=str(tmp_path / "old.json")), None
        )
    with pytest.raises(UserError, match=r"no cold_start section.*--cold-start"):
        serverless_cold_start(
            ServerlessSection(container_cold_start=str(tmp_path / "bare.json")), None
        )


def test_vllm_start_phases_and_a_compile_cache_that_did_not_load_come_from_its_log():
    import datetime as dt

    from {{ cookiecutter.package_name }}.cost.coldstart import vllm_log_facts

    log = "\n".join([
        "(APIServer pid=1) INFO 12-07 09:55:22 [api_utils.py:347] version 0.32.0",
        "(EngineCore pid=2) INFO 12-07 09:55:30 [core.py:133] Initializing a V1 LLM engine "
        "(v0.32.0) with config: model='/m', dtype=torch.float32, device_config=cpu, seed=0",
        "(Worker pid=3) INFO 12-07 09:55:37 [base_loader.py:82] Initializing model took 0.15 "
        "seconds",
        "(Worker pid=3) INFO 12-07 09:55:38 [default_loader.py:501] Loading weights took 0.35 "
        "seconds",
        "(Worker pid=3) INFO 12-07 09:55:39 [cpu_model_runner.py:87] Warming up model for the "
        "compilation...",
        "(Worker pid=3) WARNING 12-07 09:55:41 [decorators.py:333] [backbone] Compiling model "
        "again due to a load failure from /c/model, reason: no finalize_loading",
        "(Worker pid=3) INFO 12-07 09:56:18 [decorators.py:743] [backbone] saved AOT compiled "
        "function to /c/model",
        "(EngineCore pid=2) INFO 12-07 09:56:25 [core.py:402] init engine (profile, create kv "
        "cache, warmup model) took 45.67 s",
        "INFO:     Application startup complete.",
    ])  # fmt: skip
    facts = vllm_log_facts(log, dt.datetime(2026, 12, 7, 9, 55, 16, 700000))
    assert facts.phases == {
        "api_server_start": 6.0, "engine_core_start": 8.0, "worker_start": 7.0,
        "model_init": 0.15, "weights": 0.35, "compile": 39.0, "engine_init": 45.67,
    }  # fmt: skip
    assert (facts.version, facts.dtype, facts.device) == ("0.32.0", "float32", "cpu")
    assert facts.notes == [
        "vLLM's compile cache did not load (no finalize_loading): it compiled again"
    ]
