"""Preference tuning on the tiny model: DPO moves held-out margins the right way, from the
base or from an SFT run, through the same prompt format and the same run folder as SFT."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from {{ cookiecutter.package_name }}.chat import encode_conversation, prompt_ids
from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.config import load_config
from {{ cookiecutter.package_name }}.data import load_preference_splits
from {{ cookiecutter.package_name }}.merge import merge_run
from {{ cookiecutter.package_name }}.training.dpo import margins
from {{ cookiecutter.package_name }}.training.run import run_training
from tickets import CONFIG, PROJECT, tiny_config, write_ticket_data

PAIRS = {split: PROJECT / "data" / f"preferences_{split}.jsonl" for split in ("train", "eval")}
DPO = ("train.method=dpo", f"data.train={PAIRS['train']}", f"data.eval={PAIRS['eval']}")
# In 60 steps at this learning rate the mean held-out margin, log p(chosen) - log p(rejected)
# summed over the answer's tokens, grows by about 1.6 nats on this model; 1.0 is the bar.
MARGIN_GAIN = 1.0


def dpo_config(model: Path, out: Path, *overrides: str):
    return load_config(
        CONFIG,
        [
            f"model.name_or_path={model}", f"output.dir={out}", *DPO, "train.batch_size=8",
            "train.learning_rate=1e-2", "train.max_steps=60", "train.eval_steps=30", *overrides,
        ],
    )  # fmt: skip


def held_out_pairs(model_dir: Path):
    config = load_config(CONFIG, [f"model.name_or_path={model_dir}", *DPO])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return load_preference_splits(config.data, tokenizer, seed=0)[1]


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, tmp_path_factory) -> Path:
    result = run_training(
        dpo_config(tiny_model_dir, tmp_path_factory.mktemp("runs"), "output.run_name=dpo")
    )
    assert result.completed
    return result.run_dir


def test_held_out_margin_grows(dpo_run, tiny_model_dir):
    pairs = held_out_pairs(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = statistics.mean(margins(base, pairs))
    tuned = PeftModel.from_pretrained(base, dpo_run / "adapter").eval()
    after = statistics.mean(margins(tuned, pairs))
    assert after - before >= MARGIN_GAIN, (before, after)


def test_dpo_writes_the_run_folder_that_merge_and_cost_read(dpo_run, tiny_model_dir):
    for name in ("config.yaml", "metrics.json", "cost.json", "loss.png", "adapter"):
        assert (dpo_run / name).exists(), name
    adapter = sorted(p.name for p in (dpo_run / "adapter").iterdir())
    assert "ref" not in adapter  # TRL's frozen reference copy is not part of the result
    metrics = json.loads((dpo_run / "metrics.json").read_text())
    assert metrics["global_step"] == 60
    # The policy starts as its reference: the first eval loss is -log sigmoid(0) = ln 2.
    assert metrics["steps"][0]["eval_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert json.loads((dpo_run / "cost.json").read_text())["trained_tokens"] > 0
    merged = AutoModelForCausalLM.from_pretrained(merge_run(dpo_run)).eval()
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), dpo_run / "adapter"
    ).eval()
    pairs = held_out_pairs(tiny_model_dir)
    assert margins(merged, pairs)[:4] == pytest.approx(margins(tuned, pairs)[:4], abs=1e-3)


def test_push_and_the_cost_card_read_a_dpo_run(dpo_run):
    from {{ cookiecutter.package_name }}.cost.training_cost import training_cost
    from {{ cookiecutter.package_name }}.push import PushOptions, plan_push

    plan = plan_push(PushOptions(run=dpo_run, repo_id="me/tiny-dpo"))
    assert "- Method: dpo (beta 0.1, sigmoid loss)" in plan.card
    assert "dpo" in plan.card.split("---")[1]  # a tag in the Hub metadata
    assert "adapter_model.safetensors" in [u.in_repo for u in plan.uploads]
    cost = training_cost(dpo_run)
    assert cost.trained_tokens > 0 and cost.usd > 0


def test_pairs_use_the_prompt_format_sft_trains_and_serving_sends(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    record = json.loads(PAIRS["eval"].read_text().splitlines()[0])
    pair = held_out_pairs(tiny_model_dir).examples[0]
    assert pair.prompt_ids == prompt_ids(tokenizer, record["prompt"])
    sft = encode_conversation(tokenizer, record["prompt"] + record["chosen"])
    assert pair.prompt_ids + pair.chosen_ids == sft.input_ids
    assert pair.chosen_ids[-1] == tokenizer.eos_token_id  # a preferred answer still stops


def test_dpo_continues_an_sft_run(tiny_model_dir, tmp_path):
    """dpo.from_run: the SFT adapter is the starting point and the reference."""
    data = write_ticket_data(tmp_path)
    sft = run_training(
        tiny_config(tiny_model_dir, data, tmp_path, "train.max_steps=20", "output.run_name=sft")
    )
    overrides = ["output.run_name=dpo", "train.max_steps=10", "train.eval_steps=10"]
    result = run_training(
        dpo_config(tiny_model_dir, tmp_path, *overrides, f"dpo.from_run={sft.run_dir}")
    )
    pairs = held_out_pairs(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    start = PeftModel.from_pretrained(base, sft.run_dir / "adapter").eval()
    start_margin = statistics.mean(margins(start, pairs))
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    # At step 0 the policy equals its reference (the SFT model), not the base.
    assert metrics["steps"][0]["eval_loss"] == pytest.approx(0.6931, abs=1e-3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, result.run_dir / "adapter").eval()
    assert statistics.mean(margins(tuned, pairs)) > start_margin


def test_from_run_on_another_base_is_refused(capsys, tiny_model_dir, tmp_path):
    other = tmp_path / "sft"
    (other / "adapter").mkdir(parents=True)
    (other / "adapter" / "adapter_config.json").write_text("{}")
    (other / "config.yaml").write_text(
        "model:\n  name_or_path: some/other-model\ncost:\n  gpu_hourly_usd: 1.0\n"
    )
    err = run_cli(capsys, tmp_path, f"model.name_or_path={tiny_model_dir}",
                  f"dpo.from_run={other}")  # fmt: skip
    assert "was trained on 'some/other-model'" in err


# --- bad preference records: one line naming file:line and the fix ----------------------


def run_cli(capsys, tmp_path: Path, *args: str) -> str:
    code = main(["train", "--config", str(CONFIG), f"output.dir={tmp_path}", *DPO, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    return err


GOOD = {"prompt": "Where is my parcel?", "chosen": "shipping", "rejected": "billing"}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": "Where is my parcel?", "chosen": "shipping"}, "'rejected' missing"),
        ({"prompt": "Where is my parcel?", "rejected": "x"}, "'chosen' missing"),
        ({**GOOD, "rejected": "shipping "}, "'chosen' and 'rejected' are the same text"),
        ({**GOOD, "prompt": "  "}, "field 'prompt' must be a non-empty string"),
        ({**GOOD, "prompt": []}, "field 'prompt' must be a non-empty list of messages"),
        ({**GOOD, "chosen": [{"role": "user", "content": "hi"}]}, "one assistant message"),
    ],
)
def test_bad_pair_names_file_line_and_fix(capsys, tmp_path, tiny_model_dir, bad, message):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    err = run_cli(capsys, tmp_path, f"model.name_or_path={tiny_model_dir}", f"data.train={pairs}")
    assert f"{pairs}:2: " in err and message in err
    assert not any(tmp_path.glob("*/adapter"))


def test_text_and_chat_pairs_tokenize_alike(tmp_path, tiny_model_dir):
    text = tmp_path / "text.jsonl"
    chat = tmp_path / "chat.jsonl"
    text.write_text(json.dumps(GOOD) + "\n")
    chat.write_text(
        json.dumps(
            {
                "prompt": [{"role": "user", "content": GOOD["prompt"]}],
                "chosen": [{"role": "assistant", "content": "shipping"}],
                "rejected": [{"role": "assistant", "content": "billing"}],
            }
        )
        + "\n"
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = []
    for path in (text, chat):
        config = load_config(CONFIG, [f"model.name_or_path={tiny_model_dir}", *DPO,
                                      f"data.train={path}", "data.eval=null"])  # fmt: skip
        encoded.append(load_preference_splits(config.data, tokenizer, seed=0)[0].examples)
    assert encoded[0] == encoded[1]
    assert torch.tensor(encoded[0][0].chosen_ids).numel() > 0
