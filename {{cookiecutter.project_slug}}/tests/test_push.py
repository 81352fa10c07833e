"""`push`: everything up to the upload is tested offline; the upload itself needs the Hub.

--dry-run plans the one commit (every file and its size) and writes the model card; a
missing token, a missing file or a bad repo id stops before anything is sent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.push import PushOptions, plan_push
from {{ cookiecutter.package_name }}.runs import HeldOutEval
from {{ cookiecutter.package_name }}.training.run import run_training
from tickets import tiny_config, write_ticket_data

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("push")
    data = write_ticket_data(root)
    config = tiny_config(
        tiny_model_dir, data, root / "runs", "train.max_steps=6", "train.eval_steps=3",
        "output.run_name=shipped",
    )  # fmt: skip
    result = run_training(config)
    result.run.write_eval(HeldOutEval(accuracy=0.75, examples=80, data=str(data["eval"])))
    return result.run_dir


@pytest.fixture(autouse=True)
def no_token(monkeypatch, tmp_path):
    """No HF_TOKEN and no saved login: the tests never reach the Hub."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def push(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["push", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def card_metadata(card: str) -> dict:
    _, front, _ = card.split("---\n", 2)
    return yaml.safe_load(front)


def test_dry_run_lists_every_file_with_its_size_and_writes_the_card(capsys, run_dir, tmp_path):
    card = tmp_path / "card.md"
    code, out, err = push(
        capsys, str(run_dir), "--repo-id", "me/tiny-tickets", "--dry-run", "--card-out", str(card)
    )
    assert code == 0, err
    for path in sorted((run_dir / "adapter").iterdir()):
        if path.name != "README.md":  # peft's placeholder card; ours replaces it
            assert f"{path.name}" in out and f"{path.stat().st_size:,} bytes" in out
    assert "README.md" in out and "one commit" in out and "(private)" in out
    assert card.is_file()


def test_card_has_hub_metadata_and_what_the_run_measured(run_dir, tiny_model_dir, tmp_path):
    plan = plan_push(PushOptions(run=run_dir, repo_id="me/tiny-tickets", what="adapter"))
    metadata = card_metadata(plan.card)
    assert metadata["library_name"] == "peft"
    assert metadata["license"] == "{% if cookiecutter.license == 'Proprietary' %}other{% else %}{{ cookiecutter.license | lower }}{% endif %}"
    assert {"lora", "sft"} <= set(metadata["tags"])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    train_data = Path(config["data"]["train"])
    assert hashlib.sha256(train_data.read_bytes()).hexdigest() in plan.card
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"Steps: {metrics['global_step']};" in plan.card
    first, last = metrics["steps"][0]["eval_loss"], metrics["steps"][-1]["eval_loss"]
    assert f"Eval loss: {first:.4f} before training -> {last:.4f} after" in plan.card
    assert "Held-out accuracy: 75.0% on 80 examples of `eval.jsonl`" in plan.card
    cost = json.loads((run_dir / "cost.json").read_text())
    assert f"${cost['usd']:.4f}" in plan.card
    assert "r=16, alpha=32" in plan.card
    assert "<|im_start|>assistant" in plan.card  # the chat template, rendered and as source
    assert "PeftModel.from_pretrained" in plan.card and "vllm serve" in plan.card
    assert [u.in_repo for u in plan.uploads] == sorted(
        p.name for p in (run_dir / "adapter").iterdir() if p.name != "README.md"
    )


def test_base_model_on_the_hub_is_named_in_the_metadata(run_dir, tmp_path):
    run = tmp_path / "hub-base"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoints"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    plan = plan_push(PushOptions(run=run, repo_id="me/x"))
    assert card_metadata(plan.card)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_both_puts_the_merged_model_at_the_root_and_the_adapter_beside(run_dir):
    from {{ cookiecutter.package_name }}.merge import merge_run

    merge_run(run_dir)
    plan = plan_push(PushOptions(run=run_dir, repo_id="me/x", what="both", private=False))
    names = [u.in_repo for u in plan.uploads]
    assert "config.json" in names and "model.safetensors" in names
    assert "adapter/adapter_config.json" in names and "adapter/README.md" not in names
    assert not plan.private
    assert card_metadata(plan.card)["library_name"] == "transformers"


def test_serving_cost_headline_goes_on_the_card(run_dir, tmp_path):
    # A measured card cut to its best level (c=32 of a token-cost run on a CPU).
    card_file = DATA / "serving_cost_card.json"
    plan = plan_push(PushOptions(run=run_dir, repo_id="me/x", cost_card=card_file))
    assert (
        "Serving cost (measured): $3.738 per 1M output tokens and $0.9345 per 1M input tokens "
        "at c=32 (111.5 output tokens/s"
    ) in plan.card


def test_an_unreadable_cost_card_is_one_line(capsys, run_dir, tmp_path):
    card_file = tmp_path / "cost_card.json"
    card_file.write_text(json.dumps({"schema_version": 2}))
    code, _, err = push(capsys, str(run_dir), "--repo-id", "me/x", "--dry-run",
                        "--cost-card", str(card_file))  # fmt: skip
    assert code == 2 and f"cost card {card_file} is not a cost card" in one_error(err)


def test_upload_is_one_commit_of_every_planned_file(capsys, run_dir, monkeypatch):
    """The Hub client is replaced by a recorder: one repo, one commit, every file."""
    import huggingface_hub

    calls: list[tuple[str, dict]] = []

    class Recorder:
        def __init__(self, token: str) -> None:
            calls.append(("token", {"token": token}))

        def create_repo(self, repo_id: str, **options) -> None:
            calls.append(("create_repo", {"repo_id": repo_id, **options}))

        def create_commit(self, repo_id: str, operations, commit_message: str):
            calls.append(("create_commit", {"repo_id": repo_id, "operations": operations}))
            return type("Commit", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    code, out, err = push(capsys, str(run_dir), "--repo-id", "me/tiny", "--public")
    assert code == 0, err
    assert [name for name, _ in calls] == ["token", "create_repo", "create_commit"]
    assert calls[0][1]["token"] == "hf_test"
    assert calls[1][1] == {"repo_id": "me/tiny", "private": False, "exist_ok": True,
                           "repo_type": "model"}  # fmt: skip
    paths = [op.path_in_repo for op in calls[2][1]["operations"]]
    plan = plan_push(PushOptions(run=run_dir, repo_id="me/tiny"))
    assert paths == [u.in_repo for u in plan.uploads] + ["README.md"]
    assert "uploaded: https://hub/me/tiny/commit/1" in out


def one_error(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_without_a_token_nothing_is_uploaded(capsys, run_dir):
    code, _, err = push(capsys, str(run_dir), "--repo-id", "me/tiny-tickets")
    assert code == 2
    assert "no Hugging Face token, so nothing was uploaded: export HF_TOKEN" in one_error(err)


def test_a_missing_file_stops_before_uploading(capsys, run_dir, tmp_path):
    run = tmp_path / "unmerged"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "merged"))
    code, _, err = push(capsys, str(run), "--repo-id", "me/x", "--what", "merged", "--dry-run")
    assert code == 2
    missing = run / "merged" / "config.json"
    assert f"{missing} is missing, so nothing was uploaded; merge the run first" in one_error(err)


@pytest.mark.parametrize("repo_id", ["me/bad name", "me/tiny..x", "just-a-name", "-me/x"])
def test_bad_repo_id_is_one_line(capsys, run_dir, repo_id):
    code, _, err = push(capsys, str(run_dir), f"--repo-id={repo_id}", "--dry-run")
    assert code == 2
    assert f"Hub repo id {repo_id!r}" in one_error(err)


def test_repo_id_from_the_config(capsys, run_dir):
    code, _, err = push(capsys, str(run_dir), "--dry-run")
    assert code == 2 and "no Hub repo id: give --repo-id" in one_error(err)
