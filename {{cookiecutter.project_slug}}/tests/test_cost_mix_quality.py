"""Mixed multi-adapter traffic and quality per dollar, through our real server.

One server start: the base and two adapters behind one endpoint, a weighted mix of the
three, each measured alone as well, then the eval set answered by each model and scored.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from lora_adapters import QUESTIONS, STOP_ANSWER, random_adapter, stop_adapter
from {{ cookiecutter.package_name }}.cost.command import run_token_cost
from {{ cookiecutter.package_name }}.cost.config import load_token_cost_config
from {{ cookiecutter.package_name }}.cost.quality import eval_items
from {{ cookiecutter.package_name }}.cost.schema import SCHEMA_PATH, MeteredModel
from {{ cookiecutter.package_name }}.cost.target import Target, check_models
from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.scoring import resolve_scorer

ROOT = Path(__file__).resolve().parents[1]
MIX = {"base": 0.5, "stopper": 0.25, "other": 0.25}


def eval_set(path: Path, answered: bool = True) -> Path:
    with path.open("w") as out:
        for question in QUESTIONS:
            turns = [{"role": "user", "content": question}]
            if answered:
                turns.append({"role": "assistant", "content": STOP_ANSWER})
            out.write(json.dumps({"messages": turns}) + "\n")
    return path


def config_for(tmp_path: Path, *overrides: str):
    return load_token_cost_config(
        ROOT / "configs" / "token_cost.yaml",
        [
            "server.config=null",
            f"prompts.dataset={ROOT / 'data' / 'tickets_eval.jsonl'}",
            "price.reference_prices=null",
            f"report.dir={tmp_path / 'reports'}",
            *overrides,
        ],
    )


@pytest.mark.slow
def test_mixed_traffic_is_attributed_per_model_and_scored_through_the_endpoint(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(ROOT)
    stopper = stop_adapter(tiny_model_dir, tmp_path / "stopper")
    other = random_adapter(tiny_model_dir, tmp_path / "other", seed=3)
    config = config_for(
        tmp_path,
        f"server.model={tiny_model_dir}",
        "server.overrides=[model.served_name=base]",
        "server.adapters=" + json.dumps({"stopper": str(stopper), "other": str(other)}),
        "server.ready_timeout_s=180",
        "prompts.output_tokens=8",
        "load.warmup_requests=1",
        "load.concurrency=[3]",
        "load.requests_per_level=8",
        f"load.mix={json.dumps(MIX)}",
        "load.alone=true",
        "slo.ttft_s=60",
        "slo.e2e_s=120",
        "quality.enabled=true",
        f"quality.dataset={eval_set(tmp_path / 'eval.jsonl')}",
        "quality.concurrency=3",
    )
    card, paths = run_token_cost(config)
    on_disk = json.loads(paths["json"].read_text())
    jsonschema.validate(on_disk, json.loads(SCHEMA_PATH.read_text()))
    assert not card.partial
    serving = card.serving
    (level,) = serving.levels

    # The mix: exact shares of the 8 requests, and the attribution adds up exactly.
    shares = {share.model: share for share in level.models}
    assert {m: s.requests for m, s in shares.items()} == {"base": 4, "stopper": 2, "other": 2}
    assert sum(s.input_tokens for s in shares.values()) == level.input_tokens
    assert sum(s.output_tokens for s in shares.values()) == level.output_tokens
    for share in shares.values():
        counters = share.server_counters
        assert counters is not None and counters.match
        assert (counters.prompt_tokens, counters.completion_tokens) == (
            share.input_tokens, share.output_tokens
        )  # fmt: skip
    assert sum(s.usd for s in shares.values()) == pytest.approx(level.money.window_usd)
    assert [alone.model for alone in serving.alone] == list(MIX)
    for alone in serving.alone:
        (own,) = alone.levels
        assert own.requests.ok == 8 and own.models == []

    # Quality: the endpoint's answers are evaluate's answers, in process, greedy.
    quality = serving.quality
    assert quality is not None and [m.model for m in quality.models] == list(MIX)
    rows = [json.loads(line) for line in Path(quality.answers_file).read_text().splitlines()]
    in_process = answers_in_process(tiny_model_dir, {"stopper": stopper, "other": other})
    for entry in quality.models:
        served = [r["answer"] for r in rows if r["model"] == entry.model]
        assert served == [a.got for a in in_process[entry.model]]
        correct = sum(a.correct for a in in_process[entry.model])
        assert entry.correct == correct and entry.accuracy == correct / len(QUESTIONS)
        assert entry.usd is not None and entry.usd > 0
        if correct:
            assert entry.usd_per_1k_correct == pytest.approx(entry.usd / correct * 1000)
        assert entry.prices_from.endswith("alone")
    by_model = {m.model: m for m in quality.models}
    assert by_model["stopper"].accuracy > by_model["base"].accuracy

    text = paths["markdown"].read_text()
    assert "### Per model under the mix (c=3)" in text and "### Quality per dollar" in text
    assert "usd_per_1m_output_tokens:" in text  # the lines for serve.yaml's price


def answers_in_process(base_dir: Path, adapters: dict[str, Path]) -> dict[str, list]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from {{ cookiecutter.package_name }}.training.evaluate import generate_answers

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": STOP_ANSWER}]
        for q in QUESTIONS
    ]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    answers = {"base": generate_answers(base, tokenizer, conversations)}
    for name, path in adapters.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), path)
        answers[name] = generate_answers(model, tokenizer, conversations)
    return answers


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ('load.mix={"a": 0.7, "b": 0.2}', ["load.mix", "sum to 1", "0.9"]),
        ('load.mix={"a": 1.5, "b": -0.5}', ["load.mix", "> 0"]),
    ],
)
def test_a_mix_whose_shares_are_wrong_is_refused(tmp_path, override, words):
    with pytest.raises(UserError) as caught:
        config_for(tmp_path, override)
    assert all(word in str(caught.value) for word in words), caught.value


def test_a_mix_or_quality_model_the_endpoint_does_not_serve_is_named(tmp_path):
    served = MeteredModel(name_or_path=None, served_name=None, adapters={}, engine=None,
                         engine_version=None, tokenizer=None)  # fmt: skip
    target = Target("http://x/v1", "base", None, None, served, served_ids=["base", "support"])
    check_models(config_for(tmp_path, 'load.mix={"base": 0.5, "support": 0.5}'), target)
    with pytest.raises(UserError, match=r"load.mix names 'billing'.*serves base, support"):
        check_models(config_for(tmp_path, 'load.mix={"base": 0.5, "billing": 0.5}'), target)
    config = config_for(tmp_path, "quality.enabled=true", "quality.models=[base, gone]")
    with pytest.raises(UserError, match=r"quality.models names 'gone'"):
        check_models(config, target)


def test_an_unknown_scorer_and_an_eval_set_without_answers_are_named(tmp_path):
    with pytest.raises(UserError, match=r"quality.scorer: no scorer 'f1'.*exact_match, contains"):
        resolve_scorer("f1")
    with pytest.raises(UserError, match=r"quality.scorer: cannot import 'no_such_module'"):
        resolve_scorer("no_such_module:score")
    assert resolve_scorer("exact_match")(" OK\n", "ok") == 1.0
    unanswered = eval_set(tmp_path / "eval.jsonl", answered=False)
    config = config_for(tmp_path, "quality.enabled=true", f"quality.dataset={unanswered}")
    with pytest.raises(UserError, match=r"quality.dataset: .*eval.jsonl:1: .*reference answer"):
        eval_items(config.quality)


def test_cli_refuses_a_bad_quality_config_with_one_line_and_exit_2(tmp_path, capsys):
    from {{ cookiecutter.package_name }}.cli import main

    code = main(["token-cost", "--config", str(ROOT / "configs" / "token_cost.yaml"),
                 "quality.enabled=true", "quality.scorer=nope", "server.config=null"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quality.scorer" in err[0]
