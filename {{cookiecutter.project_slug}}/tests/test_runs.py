"""The run folder: typed files round-trip, old runs still read, bad ones name the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.config import load_config
from {{ cookiecutter.package_name }}.cost.training_cost import training_cost
from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.runs import (
    RunFolder,
    StepLog,
    TrainingCost,
    TrainingMetrics,
    replace_atomically,
)

PROJECT = Path(__file__).resolve().parents[1]
METRICS = TrainingMetrics(
    steps=[
        StepLog(step=0, epoch=0.0, eval_loss=3.5),
        StepLog(step=5, epoch=0.5, loss=3.1, learning_rate=1e-4),
        StepLog(step=10, epoch=1.0, eval_loss=2.25),
    ],
    global_step=10,
    processes=2,
    train_examples=80,
    train_records=82,
    truncated=1,
    dropped=2,
    num_input_tokens_seen=12_345,
    parameters=1_000_000,
    trainable_parameters=8_192,
)
COST = TrainingCost(
    trained_tokens=12_345,
    wall_seconds=61.5,
    tokens_per_second=200.73,
    gpu_hourly_usd=2.5,
    usd=0.042708,
    usd_per_1m_tokens=3.459546,
    environment={"device": "cuda (NVIDIA H100 80GB HBM3)", "dtype": "bfloat16"},
    quantization="none",
    dtype="bfloat16",
)


def test_metrics_cost_and_config_round_trip_in_the_format_train_has_always_written(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.write_metrics(METRICS)
    run.write_cost(COST)
    config = load_config(PROJECT / "configs" / "train.yaml", ["lora.r=4", "output.run_name=run"])
    run.write_config(config)
    assert run.read_metrics() == METRICS and run.read_cost() == COST
    assert run.read_config() == config
    assert run.read_metrics().eval_losses == [3.5, 2.25]
    # Same names and keys as before the typed folder: a step row holds only what was logged.
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["steps"][0] == {"step": 0, "epoch": 0.0, "eval_loss": 3.5}
    assert on_disk["global_step"] == 10 and on_disk["trainable_parameters"] == 8_192
    assert json.loads((tmp_path / "run" / "cost.json").read_text())["usd_per_1m_tokens"] == 3.459546
    assert sorted(p.name for p in run.path.iterdir()) == [
        "config.yaml",
        "cost.json",
        "metrics.json",
    ]


def test_an_older_run_with_fewer_and_unknown_keys_still_reads(tmp_path):
    run = RunFolder(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"global_step": 3, "new_key": 1}))
    (tmp_path / "cost.json").write_text(
        json.dumps({"trained_tokens": 10, "wall_seconds": 2.0, "gpu_hourly_usd": 1.0})
    )
    assert run.read_metrics().global_step == 3 and run.read_metrics().parameters is None
    assert run.read_cost().device == "unknown"


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("cost.json", None, r"cost\.json is missing: .* is not a finished training run"),
        ("cost.json", '{"trained_tokens": 10', r"cost\.json is malformed \(.*Invalid JSON"),
        ("cost.json", '{"trained_tokens": "many"}', r"cost\.json is malformed \(trained_tokens: "),
        ("metrics.json", "[]", r"metrics\.json is malformed \(the file: "),
    ],
)
def test_a_missing_or_malformed_file_is_one_line_naming_it_and_the_fix(
    tmp_path, name, content, problem
):
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    if content is not None:
        (run.path / name).write_text(content)
    read = run.read_cost if name == "cost.json" else run.read_metrics
    with pytest.raises(UserError, match=problem) as raised:
        read()
    message = str(raised.value)
    assert "\n" not in message and f"train --resume {run.path}" in message


def test_a_folder_without_config_or_adapter_is_not_taken_for_a_run(tmp_path):
    with pytest.raises(UserError, match=r"config\.yaml is missing"):
        RunFolder(tmp_path).read_config()
    with pytest.raises(UserError, match=r"no finished adapter .*adapter_config\.json"):
        RunFolder(tmp_path).finished_adapter()


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path):
    run = RunFolder(tmp_path)
    run.write_cost(COST)

    def crash(scratch: Path) -> None:
        scratch.write_text('{"trained_tokens": 1')  # half written, then the process dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_atomically(run.cost_file, crash)
    assert run.read_cost() == COST
    assert [p.name for p in tmp_path.iterdir()] == ["cost.json"]  # no scratch file left


def test_training_cost_and_latest_run_read_through_the_folder(tmp_path):
    for name, cost in (("old", COST), ("new", COST.model_copy(update={"quantization": "4bit"}))):
        run = RunFolder(tmp_path / name)
        run.path.mkdir()
        run.write_metrics(METRICS)
        run.write_cost(cost)
    os.utime(tmp_path / "old" / "cost.json", (1e9, 1e9))  # finished long before "new"
    assert RunFolder.latest(tmp_path).path == tmp_path / "new"
    card = training_cost(tmp_path / "new")
    assert card.trained_tokens == 12_345 and card.global_step == 10
    assert card.device == COST.device and card.dtype == "bfloat16"
    # (4 * 1e6 + 2 * 8192) FLOPs/token * 12345 / 61.5 tokens/s, against the H100's peak.
    assert card.mfu.achieved_tflops == pytest.approx(4_016_384 * 12_345 / 61.5 / 1e12)
    assert "packed weights" in card.mfu.note
    (tmp_path / "new" / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match=r"metrics\.json is malformed \(global_step: Field"):
        training_cost(tmp_path / "new")
    with pytest.raises(UserError, match=r"no finished training run in .*empty"):
        RunFolder.latest(tmp_path / "empty")
