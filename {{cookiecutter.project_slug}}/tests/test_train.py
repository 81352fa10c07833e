"""Training on the tiny model: it learns, and the field's classic bugs are caught.

Contracts checked here: training ids == serving ids, generation stops at EOS,
merged == adapter, resumed == uninterrupted, the adapter loads with plain peft.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from {{ cookiecutter.package_name }}.chat import IGNORE_INDEX, encode_conversation, prompt_ids
from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.config import load_config
from {{ cookiecutter.package_name }}.merge import merge_run
from {{ cookiecutter.package_name }}.runs import RunFolder
from {{ cookiecutter.package_name }}.training.evaluate import accuracy, generate_answers
from {{ cookiecutter.package_name }}.training.run import run_training
from tickets import CONFIG, conversations, tiny_config, write_ticket_data

# Chance for a model that learned the answer format but not the routing is 1/4.
HELD_OUT_ACCURACY = 0.6


@pytest.fixture(scope="session")
def ticket_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_ticket_data(tmp_path_factory.mktemp("tickets"))


@pytest.fixture(scope="session")
def trained_run(tiny_model_dir, ticket_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    config = tiny_config(
        tiny_model_dir, ticket_data, out, "train.max_steps=150", "train.eval_steps=50",
        "train.save_steps=50", "output.run_name=learn",
    )  # fmt: skip
    result = run_training(config)
    assert result.completed
    return result.run_dir


def load_adapter_model(tiny_model_dir: Path, run_dir: Path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return PeftModel.from_pretrained(base, run_dir / "adapter").eval()


# --- prompt format contracts ---------------------------------------------------------


def test_training_ids_equal_serving_ids_for_every_assistant_turn(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "system", "content": "Route tickets."},
        {"role": "user", "content": "My parcel is late."},
        {"role": "assistant", "content": "shipping"},
        {"role": "user", "content": "And the invoice is wrong."},
        {"role": "assistant", "content": "billing"},
    ]
    encoded = encode_conversation(tokenizer, messages)
    eos = tokenizer.eos_token_id
    for turn in (2, 4):
        serving = prompt_ids(tokenizer, messages[:turn])
        assert encoded.input_ids[: len(serving)] == serving
        answer = tokenizer(messages[turn]["content"], add_special_tokens=False)["input_ids"]
        trained = encoded.input_ids[len(serving) : len(serving) + len(answer) + 1]
        assert trained == [*answer, eos]
        labels = encoded.labels[len(serving) : len(serving) + len(answer) + 1]
        assert labels == trained, "the answer and its EOS carry the loss"
    # Everything else is masked: exactly the two answers and their EOS are trained.
    assert encoded.trained_tokens == sum(
        len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) + 1
        for m in messages
        if m["role"] == "assistant"
    )
    with_prompt = encode_conversation(tokenizer, messages, train_on_prompt=True)
    assert with_prompt.input_ids == encoded.input_ids
    assert IGNORE_INDEX not in with_prompt.labels


def test_eos_is_appended_when_the_template_omits_it(tiny_model_dir, template_without_eos):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = template_without_eos
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bug"}]
    encoded = encode_conversation(tokenizer, messages)
    pairs = zip(encoded.input_ids, encoded.labels, strict=True)
    trained = [token for token, label in pairs if label != IGNORE_INDEX]
    assert trained[-1] == tokenizer.eos_token_id


# --- learning ------------------------------------------------------------------------


def test_loss_falls_and_held_out_accuracy_rises(trained_run, tiny_model_dir, ticket_data):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    losses = [s["loss"] for s in metrics["steps"] if "loss" in s]
    eval_losses = [s["eval_loss"] for s in metrics["steps"] if "eval_loss" in s]
    assert losses[-1] < 0.25 * losses[0]
    assert eval_losses[-1] < eval_losses[0]

    tokenizer = AutoTokenizer.from_pretrained(trained_run / "adapter")
    held_out = conversations(ticket_data["eval"])
    untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = accuracy(generate_answers(untrained, tokenizer, held_out))
    answers = generate_answers(load_adapter_model(tiny_model_dir, trained_run), tokenizer, held_out)
    after = accuracy(answers)
    assert before < 0.1
    assert after >= HELD_OUT_ACCURACY, f"held-out accuracy {after:.2f}"
    # A trained model stops by itself: EOS, not the token limit, ends its answers.
    assert sum(a.stopped for a in answers) / len(answers) > 0.95


def test_run_folder_holds_everything_to_serve_resume_and_price(trained_run):
    adapter = trained_run / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in adapter.iterdir()
    }
    assert AutoTokenizer.from_pretrained(adapter).chat_template
    assert (trained_run / "config.yaml").is_file()
    assert (trained_run / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert RunFolder(trained_run).last_checkpoint() is not None
    cost = json.loads((trained_run / "cost.json").read_text())
    assert cost["trained_tokens"] > 0 and cost["wall_seconds"] > 0
    assert cost["usd"] == pytest.approx(cost["wall_seconds"] / 3600 * cost["gpu_hourly_usd"], 1e-3)
    assert cost["tokens_per_second"] == pytest.approx(
        cost["trained_tokens"] / cost["wall_seconds"], rel=1e-3
    )
    assert not list(trained_run.glob(".*partial"))


def test_adapter_loads_with_plain_peft_in_the_vllm_layout(trained_run, tiny_model_dir):
    config = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16 and config["lora_alpha"] == 32
    weights = load_file(trained_run / "adapter" / "adapter_model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    model = load_adapter_model(tiny_model_dir, trained_run)
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)


def test_merged_model_equals_adapter_model(trained_run, tiny_model_dir):
    merged_dir = merge_run(trained_run)
    assert (merged_dir / "model.safetensors").is_file()
    assert not list(merged_dir.glob("adapter_*"))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": "Refund my order"}])])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapter = load_adapter_model(tiny_model_dir, trained_run)
    with torch.no_grad():
        expected = adapter(ids).logits
        got = merged(ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, expected, atol=1e-3)


# --- checkpoints and resume ----------------------------------------------------------


class InterruptAt(TrainerCallback):
    """Sends the process a real SIGINT (Ctrl-C) at a given step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


class StepsTaken(TrainerCallback):
    """The global step after each optimizer step this session took."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def interrupt_and_resume(config, at: int):
    """Train `config` with a Ctrl-C after step `at`, check the stop was clean, and resume it
    from its checkpoint to the end. Returns the resumed run's result."""
    cut = run_training(config, extra_callbacks=(InterruptAt(at),))
    assert not cut.completed
    assert not (cut.run_dir / "adapter").exists(), "an interrupted run must not look complete"
    checkpoint = RunFolder(cut.run_dir).last_checkpoint()
    # Ctrl-C came after step `at` was done, so the next step finished and was saved.
    assert checkpoint is not None and checkpoint.name == f"checkpoint-{at + 1}"

    taken = StepsTaken()
    resumed = run_training(
        load_config(cut.run_dir / "config.yaml"), resume=cut.run_dir, extra_callbacks=(taken,)
    )
    assert resumed.completed
    # It went on from the checkpoint; starting over would also end equal to an uninterrupted run.
    assert taken.steps == list(range(at + 2, config.train.max_steps + 1))
    return resumed


def assert_same_adapter(got_run: Path, expected_run: Path) -> None:
    expected, got = adapter_weights(expected_run), adapter_weights(got_run)
    assert expected.keys() == got.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.allclose(got[name], expected[name], atol=1e-5), name


def test_interrupted_and_resumed_equals_uninterrupted(tiny_model_dir, ticket_data, tmp_path):
    steps = ["train.max_steps=8", "train.save_steps=100", "train.eval_steps=100"]
    config = tiny_config(tiny_model_dir, ticket_data, tmp_path, *steps, "output.run_name=whole")
    whole = run_training(config)

    config = tiny_config(tiny_model_dir, ticket_data, tmp_path, *steps, "output.run_name=cut")
    resumed = interrupt_and_resume(config, at=3)
    assert_same_adapter(resumed.run_dir, whole.run_dir)


# --- QLoRA (bitsandbytes 4-bit) on the CPU --------------------------------------------

# 30 steps: the logged loss (mean of 5 steps) falls from about 8.9 to 2.2-2.7 over seeds
# 0-5 and 42, so "last < half of first" has a wide margin; at 20 steps it sits at 0.5.
# The CPU even where a GPU is present: this is the CPU suite, and resumed == uninterrupted
# relies on the CPU's deterministic kernels.
QLORA = (
    "quantization.mode=4bit", "model.device=cpu", "train.max_steps=30", "data.eval=null",
    "train.save_steps=100",
)  # fmt: skip


class QuantizedLayers(TrainerCallback):
    """The model the trainer trains: every LoRA layer's base layer, and the output layer."""

    def __init__(self) -> None:
        self.bases: dict[str, torch.nn.Module] = {}
        self.lm_head: torch.nn.Module | None = None
        self.num_hidden_layers = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.bases = {
            name: module.get_base_layer()
            for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer)
        }
        self.lm_head = model.get_output_embeddings()
        self.num_hidden_layers = model.config.num_hidden_layers


@dataclass
class QLoraRun:
    run_dir: Path
    layers: QuantizedLayers


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, ticket_data, tmp_path_factory) -> QLoraRun:
    """One 4-bit run that the QLoRA tests share."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("qlora")
    config = tiny_config(tiny_model_dir, ticket_data, out, *QLORA, "output.run_name=whole")
    layers = QuantizedLayers()
    result = run_training(config, extra_callbacks=(layers,))
    assert result.completed
    return QLoraRun(result.run_dir, layers)


def test_qlora_trains_nf4_double_quantized_layers(qlora_run):
    from bitsandbytes.nn import Linear4bit

    bases = qlora_run.layers.bases
    # all-linear: q, k, v, o, gate, up and down in each decoder layer.
    assert len(bases) == 7 * qlora_run.layers.num_hidden_layers
    for name, layer in bases.items():
        assert isinstance(layer, Linear4bit), name
        weight = layer.weight
        assert weight.quant_type == "nf4", name
        # Double quantization: the per-block absmax constants are quantized again.
        assert weight.compress_statistics and weight.quant_state.nested, name
        # Two 4-bit values packed in each byte.
        assert weight.dtype == torch.uint8
        assert weight.numel() * 2 == layer.in_features * layer.out_features, name
    # The compute dtype is the run's precision (model.dtype=auto: float32 on the CPU).
    cost = json.loads((qlora_run.run_dir / "cost.json").read_text())
    assert cost["quantization"] == "4bit" and cost["dtype"] == "float32"
    assert {layer.compute_dtype for layer in bases.values()} == {torch.float32}
    # The output layer is not quantized (transformers keeps it in full precision).
    assert type(qlora_run.layers.lm_head) is torch.nn.Linear


def test_qlora_loss_falls(qlora_run):
    metrics = json.loads((qlora_run.run_dir / "metrics.json").read_text())
    losses = [s["loss"] for s in metrics["steps"] if "loss" in s]
    assert metrics["global_step"] == 30 and len(losses) == 6
    assert losses[-1] < 0.5 * losses[0], losses


def run_conversations(model, tokenizer, held_out: list[list[dict[str, str]]]):
    """Each conversation's logits, and its loss on the assistant tokens."""
    outputs = []
    with torch.no_grad():
        for messages in held_out:
            encoded = encode_conversation(tokenizer, messages)
            ids, labels = torch.tensor([encoded.input_ids]), torch.tensor([encoded.labels])
            output = model(input_ids=ids, labels=labels)
            outputs.append((output.logits, output.loss.item()))
    return outputs


def test_qlora_merged_equals_adapter_on_the_full_precision_base(
    qlora_run, tiny_model_dir, ticket_data
):
    """merge.py folds a 4-bit run's adapter into the full-precision base, which is also what
    the server loads the adapter onto: those two must agree."""
    merged_dir = merge_run(qlora_run.run_dir)
    assert (merged_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not hasattr(merged.config, "quantization_config"), "the merged model is not 4-bit"
    adapter = load_adapter_model(tiny_model_dir, qlora_run.run_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    held_out = conversations(ticket_data["eval"])[:8]
    merged_out, adapter_out, base_out = (
        run_conversations(model, tokenizer, held_out) for model in (merged, adapter, base)
    )
    # Both compute W@x + s*B@A@x in float32, in another order: (W + s*B@A)@x after the
    # merge. This random model's wide init amplifies rounding; over 20 held-out
    # conversations the two were at most 6e-6 of the largest logit apart (7e-5 on logits
    # of ~10). 1e-4 of it leaves room for other CPUs' kernels and is far below a real error:
    # this adapter on the 4-bit base instead gives logits up to ~9 away.
    tolerance = 1e-4 * max(logits.abs().max().item() for logits, _ in adapter_out)
    for (got, _), (expected, _) in zip(merged_out, adapter_out, strict=True):
        error = (got - expected).abs().max().item()
        assert error < tolerance, f"merged is {error:.2g} off (tolerance {tolerance:.2g})"
    # The adapter moves every conversation's logits by far more than the tolerance (~1e4
    # times measured)...
    for (expected, _), (untrained, _) in zip(adapter_out, base_out, strict=True):
        assert (expected - untrained).abs().max().item() > 1000 * tolerance
    # ...and the right way: trained against the 4-bit base, it helps the full-precision base
    # that is served (measured: answer loss 9.0 without, 2.2 with).
    loss = sum(loss for _, loss in merged_out) / len(held_out)
    untrained_loss = sum(loss for _, loss in base_out) / len(held_out)
    assert loss < 0.5 * untrained_loss


def test_qlora_interrupted_and_resumed_equals_uninterrupted(
    qlora_run, tiny_model_dir, ticket_data, tmp_path
):
    config = tiny_config(tiny_model_dir, ticket_data, tmp_path, *QLORA, "output.run_name=cut")
    resumed = interrupt_and_resume(config, at=14)
    cost = json.loads((resumed.run_dir / "cost.json").read_text())
    assert cost["quantization"] == "4bit"
    assert_same_adapter(resumed.run_dir, qlora_run.run_dir)


# --- other paths -------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tiny_model_dir, ticket_data, tmp_path, capfd):
    code = main(
        [
            "train", "--config", str(CONFIG), "--num-processes", "2",
            f"model.name_or_path={tiny_model_dir}", f"data.train={ticket_data['train']}",
            "data.eval=null", f"output.dir={tmp_path}", "output.run_name=ddp",
            "train.max_steps=4", "train.batch_size=4",
        ]
    )  # fmt: skip
    assert code == 0, capfd.readouterr().err[-3000:]
    run = tmp_path / "ddp"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    state = json.loads((RunFolder(run).last_checkpoint() / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # Two processes in one gloo group: each step saw a batch from both.
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["num_input_tokens_seen"] > 0


# --- bad input: one clear message, exit code 2, no traceback -------------------------------


def run_cli(capsys, tmp_path, *args: str) -> str:
    code = main(["train", "--config", str(CONFIG), f"output.dir={tmp_path}", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    return err


def test_malformed_jsonl_names_file_and_line(capsys, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    bad.write_text(f"{good}\n{good}\nnot json\n")
    err = run_cli(capsys, tmp_path, f"model.name_or_path={tiny_model_dir}", f"data.train={bad}")
    assert f"{bad}:3: not valid JSON" in err


def test_bad_record_field_names_file_line_and_field(capsys, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    err = run_cli(capsys, tmp_path, f"model.name_or_path={tiny_model_dir}", f"data.train={bad}")
    assert f"{bad}:1: field 'messages[0].role' is 'bot'" in err


def test_empty_dataset_is_an_error(capsys, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    err = run_cli(capsys, tmp_path, f"model.name_or_path={tiny_model_dir}", f"data.train={empty}")
    assert "holds no records" in err


def test_unknown_config_key_names_the_nearest_valid_one(capsys, tmp_path):
    err = run_cli(capsys, tmp_path, "lora.rank=8")
    assert "lora.rank: unknown key; did you mean 'lora.r'?" in err


def test_out_of_range_value_is_named(capsys, tmp_path):
    err = run_cli(capsys, tmp_path, "lora.dropout=1.5")
    assert "lora.dropout" in err and "1.5" in err


def test_missing_model_path_is_named(capsys, tmp_path):
    err = run_cli(capsys, tmp_path, f"model.name_or_path={tmp_path / 'no-such-model'}")
    assert "no-such-model" in err and "does not exist" in err


def test_overlong_records_are_truncated_or_dropped_with_counts(tiny_model_dir, ticket_data):
    from {{ cookiecutter.package_name }}.data import encode_records, load_records

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = tiny_config(tiny_model_dir, ticket_data, Path("unused"), "data.max_length=20")
    records = load_records(str(ticket_data["train"]), config.data)[:10]
    truncated = encode_records(records, tokenizer, config.data)
    assert truncated.truncated + truncated.dropped == 10
    assert all(len(e.input_ids) <= 20 for e in truncated.examples)
    drop = config.data.model_copy(update={"overlong": "drop"})
    dropped = encode_records(records, tokenizer, drop)
    assert dropped.dropped == 10 and not dropped.examples


def test_packing_trains_padding_free(tiny_model_dir, ticket_data, tmp_path):
    config = tiny_config(
        tiny_model_dir, ticket_data, tmp_path, "data.packing=true", "data.max_length=256",
        "train.max_steps=10", "train.batch_size=4", "data.eval=null", "output.run_name=packed",
    )  # fmt: skip
    result = run_training(config)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    losses = [s["loss"] for s in metrics["steps"] if "loss" in s]
    assert losses[-1] < losses[0]
    # 10 steps of 4 packed rows of up to 256 tokens; padding-free rows hold only real tokens.
    assert 0 < metrics["num_input_tokens_seen"] <= 10 * 4 * 256


# --- data sources and formats ----------------------------------------------------------


def test_every_format_and_file_type_maps_to_the_same_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from {{ cookiecutter.package_name }}.config import DataConfig
    from {{ cookiecutter.package_name }}.data import load_records

    records = [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
        {"prompt": "Q", "completion": "A"},
        {"instruction": "Q", "output": "A"},
        {"instruction": "Q", "input": "more", "output": "A"},
    ]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(records))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text(jsonl.read_text())
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([records[1], records[1]]), parquet)

    config = DataConfig(system_prompt="Be brief.")
    expected = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    for source in (jsonl, as_json, folder):
        loaded = load_records(str(source), config)
        assert [r.messages for r in loaded[:3]] == [expected] * 3
        assert loaded[3].messages[1]["content"] == "Q\n\nmore"
    assert [r.messages for r in load_records(str(parquet), config)] == [expected] * 2


def test_unreachable_hub_dataset_is_a_clear_error(capsys, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    err = run_cli(
        capsys, tmp_path, f"model.name_or_path={tiny_model_dir}", "data.train=no-org/no-data"
    )
    assert "cannot load dataset 'no-org/no-data'" in err
    assert "HF_HUB_OFFLINE=1" in err
