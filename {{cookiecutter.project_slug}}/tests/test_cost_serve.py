"""token-cost against our real server on a free loopback port, started by the meter itself.

Two server starts in all: one short sweep that must give a complete cost card, and one
whose server is killed mid-level, which must give a partial one.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import jsonschema
import pytest

from {{ cookiecutter.package_name }}.cost.command import run_token_cost
from {{ cookiecutter.package_name }}.cost.config import load_token_cost_config
from {{ cookiecutter.package_name }}.cost.schema import SCHEMA_PATH
from {{ cookiecutter.package_name }}.cost.sweep import Hooks
from {{ cookiecutter.package_name }}.errors import UserError

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def config_for(tiny_model_dir: Path, reports: Path, *overrides: str):
    return load_token_cost_config(
        ROOT / "configs" / "token_cost.yaml",
        [
            f"server.model={tiny_model_dir}",
            "server.config=null",
            "server.ready_timeout_s=180",
            f"prompts.dataset={ROOT / 'data' / 'tickets_eval.jsonl'}",
            f"price.reference_prices={ROOT / 'configs' / 'prices.yaml'}",
            f"report.dir={reports}",
            "prompts.output_tokens=8",
            "load.warmup_requests=1",
            *overrides,
        ],
    )


def test_sweep_against_our_server_writes_a_complete_card(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the lock files are read from the project root
    results = []
    config = config_for(
        tiny_model_dir,
        tmp_path / "reports",
        "load.concurrency=[1,3]",
        "load.requests_per_level=6",
        "slo.ttft_s=60",
        "slo.e2e_s=120",
    )
    typed, paths = run_token_cost(config, hooks=Hooks(on_result=results.append))

    on_disk = json.loads(paths["json"].read_text())
    jsonschema.validate(on_disk, SCHEMA)
    card = typed.model_dump(mode="json")
    assert on_disk == card
    assert paths["markdown"].read_text().startswith("# Cost card: serving")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["json"].parent.parent == tmp_path / "reports"
    assert not card["partial"] and card["kind"] == "serving"

    serving = card["serving"]
    levels = serving["levels"]
    assert [lv["label"] for lv in levels] == ["c=1", "c=3"]
    for level in levels:
        assert level["status"] == "complete" and level["requests"]["ok"] == 6
        assert level["requests"]["errors"] == 0
        for key in ("ttft_s", "e2e_s"):
            assert 0 < level[key]["p50"] <= level[key]["p90"] <= level[key]["p99"]
        assert level["output_tokens_per_s"] > 0 and level["money"]["usd_per_1m_output_tokens"] > 0
    assert serving["best"]["meets_slo"] and serving["best"]["label"] in ("c=1", "c=3")
    assert serving["serverless"]["profiles"] and serving["comparison"]["rows"]
    assert card["environment"]["lock"]["files"]["requirements/dev.txt"]["sha256"]
    # The device is the server's own answer (GET /info), not the meter's guess.
    assert card["environment"]["device"].startswith("cpu (")
    assert card["environment"]["dtype"] == "float32"
    model = serving["model"]
    assert model["engine"] == "transformers-continuous-batching" and model["engine_version"]
    assert model["tokenizer"] == str(tiny_model_dir)

    check_token_counts(levels, results)
    check_cold_start(serving["cold_start"])


def check_token_counts(levels: list[dict], results: list) -> None:
    """The meter's totals are the server's usage, request by request, and equal the
    server's own Prometheus counters over each level."""
    assert len(results) == 12 and all(r.ok for r in results)
    for result in results:
        assert result.completion_tokens is not None and result.prompt_tokens is not None
        assert result.content_chunks <= result.completion_tokens
        assert result.prompt_tokens == result.expected_prompt_tokens
    assert sum(lv["output_tokens"] for lv in levels) == sum(r.completion_tokens for r in results)
    assert sum(lv["input_tokens"] for lv in levels) == sum(r.prompt_tokens for r in results)
    for level in levels:
        tokens = level["tokens"]
        assert tokens["server_counters"]["match"] is True
        assert tokens["server_counters"]["completion_tokens"] == level["output_tokens"]
        assert tokens["prompt_tokens_mismatches"] == 0 and tokens["consistent"]


def check_cold_start(cold: dict) -> None:
    """Measured by the meter and broken into the server's own phases."""
    assert cold["measured"]
    assert 0 < cold["listening_s"] <= cold["ready_s"] < cold["first_token_s"]
    for phase in ("imports", "tokenizer", "weights", "warmup", "ready"):
        assert cold["server_phases_s"][phase] > 0, phase
    assert cold["server_phases_s"]["adapters"] >= 0
    # The same request once warm, and each phase beside its floor, measured.
    assert 0 < cold["warm_request_ttft_s"] < cold["first_token_s"]
    floors = {row["phase"]: row for row in cold["floors"]}
    assert {"startup", "imports", "tokenizer", "weights", "warmup"} <= set(floors)
    for row in floors.values():
        assert row["floor_s"] > 0 and row["ratio"] == pytest.approx(
            row["measured_s"] / row["floor_s"]
        )
    assert floors["warmup"]["floor_s"] == cold["warm_request_ttft_s"]
    assert "MB at their read speed here" in floors["weights"]["floor"]


def test_server_killed_mid_run_keeps_partial_results(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    seen = []
    server = {}

    def on_result(result):
        seen.append(result)
        # Level 1 has 4 requests; kill the server after 2 requests of level 2.
        if len(seen) == 6:
            os.kill(server["process"].pid, signal.SIGKILL)

    hooks = Hooks(on_server_started=lambda s: server.update(process=s.process), on_result=on_result)
    config = config_for(
        tiny_model_dir,
        tmp_path / "reports",
        "load.concurrency=[1,2]",
        "load.requests_per_level=4",
        "load.level_time_limit_s=60",
        "prompts.output_tokens=16",
        "serverless.enabled=false",
    )
    _, paths = run_token_cost(config, hooks=hooks)
    card = json.loads(paths["json"].read_text())
    jsonschema.validate(card, SCHEMA)
    assert card["partial"] is True
    assert any("exited" in reason for reason in card["partial_reasons"])
    first, second = card["serving"]["levels"]
    assert first["status"] == "complete" and first["requests"]["ok"] == 4
    assert second["status"] == "partial" and second["requests"]["ok"] >= 2
    assert card["serving"]["best"]["label"] == "c=1"  # never the partial level
    assert "PARTIAL RESULT" in paths["markdown"].read_text()


def test_unreachable_url_is_a_clear_error(tmp_path):
    config = load_token_cost_config(
        None,
        [
            "endpoint.url=http://127.0.0.1:9/v1",
            "endpoint.model=m",
            "prompts.source=synthetic",
            f"report.dir={tmp_path}",
        ],
    )
    with pytest.raises(UserError, match=r"cannot reach http://127\.0\.0\.1:9/v1"):
        run_token_cost(config)


def test_engines_on_the_same_traffic_name_the_cheaper_one_per_cell(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Two engines measured in turn (here our server twice, with different batch limits),
    and one that cannot start: it is named with its cause, and the others are measured."""
    monkeypatch.chdir(ROOT)
    config = config_for(
        tiny_model_dir,
        tmp_path / "reports",
        "load.concurrency=[1,4]",
        "load.requests_per_level=4",
        "slo.ttft_s=60",
        "slo.e2e_s=120",
        "prompts.ignore_eos=true",
        "serverless.requests_per_hour=[1,60,3600]",
        "engines=[{name: batched}, {name: missing, serve: [engine.kind=vllm, "
        "engine.vllm_python=/nonexistent/bin/python]}, {name: one-request, "
        "serve: [engine.max_batch_tokens=16]}]",
    )
    typed, paths = run_token_cost(config)
    card = json.loads(paths["json"].read_text())
    jsonschema.validate(card, SCHEMA)
    engines = card["engines"]
    names = [arm["name"] for arm in engines["arms"]]
    assert names == ["batched", "missing", "one-request"]
    missing = engines["arms"][1]
    assert not missing["measured"] and missing["serving"] is None
    assert card["partial"] and any(
        "engine missing was not measured" in r and "/nonexistent/bin/python does not exist" in r
        for r in card["partial_reasons"]
    )
    assert card["serving"] == engines["arms"][0]["serving"]  # the first measured
    assert not engines["fair"] and any("missing" in u for u in engines["unfair"])
    # both measured engines got the same prompts
    digests = {arm["serving"]["load"]["prompts"]["sha256"] for arm in engines["arms"][::2]}
    assert len(digests) == 1

    choices = engines["choices"]
    assert [(c["traffic"], c["cell"]) for c in choices] == [
        ("steady", "c=1"), ("steady", "c=4"),
        ("bursty", "1 req/h"), ("bursty", "60 req/h"), ("bursty", "3600 req/h"),
    ]  # fmt: skip
    named = 0
    for choice in choices:
        prices = choice["usd_per_1m_output_tokens"]
        assert set(prices) == {"batched", "one-request"}
        if choice["cheaper"] is None:  # both always on at one instance: a tie, said so
            assert len(set(prices.values())) == 1 and "the same price" in choice["note"]
            continue
        named += 1
        assert prices[choice["cheaper"]] == min(prices.values())  # the lower measured price
        others = [usd for name, usd in prices.items() if name != choice["cheaper"]]
        assert choice["ratio"] == pytest.approx(others[0] / prices[choice["cheaper"]])
        assert choice["reason"] in ("throughput", "cold start", "idle time")
    assert named >= 2  # the two steady levels: measured prices are never exactly equal
    text = paths["markdown"].read_text()
    assert "## Which engine gives the cheaper token" in text
    assert "## Serving: batched" in text and "## Serving: one-request" in text
    assert "**missing**: not measured" in text
    assert typed.engines is not None
