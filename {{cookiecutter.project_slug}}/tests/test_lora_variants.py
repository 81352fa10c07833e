"""LoRA variants from the config (rsLoRA, DoRA, PiSSA, OLoRA, LoftQ, ...), experiment
tracking and padding-free batches, each on the tiny model in a couple of steps.

The contract for every variant: the adapter as saved, on the untouched base, computes
what the model computed at the end of training, and its merged model computes the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from {{ cookiecutter.package_name }}.chat import prompt_ids
from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.merge import merge_run
from {{ cookiecutter.package_name }}.training.model import check_padding_free
from {{ cookiecutter.package_name }}.training.run import run_training
from tickets import tiny_config, write_ticket_data

PROMPT = [{"role": "user", "content": "Refund my order"}]
TWO_STEPS = ("train.max_steps=2", "train.batch_size=4", "data.eval=null", "train.logging_steps=1")


@pytest.fixture(scope="module")
def ticket_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_ticket_data(tmp_path_factory.mktemp("tickets"))


@pytest.fixture(scope="module")
def prompt(tiny_model_dir) -> torch.Tensor:
    return torch.tensor([prompt_ids(AutoTokenizer.from_pretrained(tiny_model_dir), PROMPT)])


class LogitsAtEnd(TrainerCallback):
    """The trained model's logits on one prompt, taken in eval mode when training ends,
    and the largest |lora_B| when it begins (zero for peft's default init)."""

    def __init__(self, ids: torch.Tensor):
        self.ids, self.logits, self.initial_b = ids, None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial_b = max(
            p.abs().max().item() for n, p in model.named_parameters() if "lora_B" in n
        )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.eval()
        with torch.no_grad():
            self.logits = model(self.ids.to(model.device)).logits.float().cpu()


def train_variant(tiny_model_dir, ticket_data, tmp_path, prompt, name, *overrides):
    config = tiny_config(
        tiny_model_dir, ticket_data, tmp_path, *TWO_STEPS, f"output.run_name={name}", *overrides
    )
    probe = LogitsAtEnd(prompt)
    result = run_training(config, extra_callbacks=(probe,))
    assert result.completed
    return result.run_dir, probe


def served_logits(tiny_model_dir: Path, run_dir: Path, prompt: torch.Tensor) -> torch.Tensor:
    """Plain peft on the untouched base: what `serve` and vLLM load."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        return model(prompt).logits


MERGEABLE = {
    "rslora": ["lora.use_rslora=true"],
    "dora": ["lora.use_dora=true"],
    "gaussian": ["lora.init=gaussian"],
    "orthogonal": ["lora.init=orthogonal"],
    "pissa": ["lora.init=pissa"],
    "pissa-fast": ["lora.init=pissa_niter_2", "lora.use_rslora=true"],
    "olora": ["lora.init=olora"],
    "eva": ["lora.init=eva", "lora.r=4", "train.batch_size=16"],
    "lm-head-in-full": ["lora.modules_to_save=[lm_head]"],
}


@pytest.mark.parametrize("name", MERGEABLE)
def test_variant_trains_and_serves_and_merges_as_trained(
    name, tiny_model_dir, ticket_data, tmp_path, prompt
):
    run_dir, probe = train_variant(
        tiny_model_dir, ticket_data, tmp_path, prompt, name, *MERGEABLE[name]
    )
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    served = served_logits(tiny_model_dir, run_dir, prompt)
    assert torch.allclose(served, probe.logits, atol=1e-4, rtol=1e-4), "adapter != trained model"

    merged_dir = merge_run(run_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        assert torch.allclose(merged(prompt).logits, served, atol=1e-4, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        assert not torch.allclose(base(prompt).logits, served, atol=1e-3)

    if name.startswith(("pissa", "olora")):
        # Converted to a plain LoRA of the untouched base: twice the rank, default init.
        assert adapter_config["r"] == 32 and adapter_config["init_lora_weights"] is True
        assert probe.initial_b > 0  # started from the base's principal directions
    elif name == "eva":
        # Ranks redistributed by explained variance (rho=2: up to 2r per layer, same budget).
        assert adapter_config["init_lora_weights"] == "eva" and adapter_config["rank_pattern"]
        assert probe.initial_b == 0  # EVA sets A from the data and leaves B at zero
    else:
        assert adapter_config["r"] == 16
    if name == "dora":
        assert adapter_config["use_dora"] is True
    if name == "lm-head-in-full":
        assert adapter_config["modules_to_save"] == ["lm_head"]


def test_eva_that_cannot_converge_stops_with_what_to_change(tiny_model_dir, ticket_data, tmp_path):
    # 32 components per layer from batches of 4 short answers: too few tokens to converge.
    config = tiny_config(
        tiny_model_dir, ticket_data, tmp_path, *TWO_STEPS, "lora.init=eva",
        "output.run_name=eva-short",
    )  # fmt: skip
    with pytest.raises(UserError, match=r"lora.init=eva did not converge in 4 passes"):
        run_training(config)


def test_loftq_is_refused_clearly_without_a_gpu(tiny_model_dir, ticket_data, tmp_path):
    # peft's LoftQ computes on CUDA; tests/test_gpu.py trains it on a GPU.
    config = tiny_config(
        tiny_model_dir, ticket_data, tmp_path, *TWO_STEPS, "model.device=cpu",
        "lora.init=loftq", "quantization.mode=4bit", "output.run_name=loftq",
    )  # fmt: skip
    with pytest.raises(UserError, match=r"lora.init=loftq runs peft's LoftQ, which computes on a"):
        run_training(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.init=corda"], "lora.init: Value error, corda initializes LoRA from activations"),
        (["lora.init=svd"], "lora.init: Value error, must be one of default, gaussian"),
        (["lora.init=loftq"], "set quantization.mode=4bit"),
        (["lora.init=pissa", "quantization.mode=4bit"], "rewrites the base weights"),
        (["lora.bias=half"], "lora.bias: Input should be 'none', 'all' or 'lora_only'"),
        (["lora.use_dora=maybe"], "lora.use_dora"),
        (["data.packing_strategy=ffd"], "'bfd', 'bfd_split' or 'wrapped' (got 'ffd')"),
        (
            ["data.packing=true", "data.packing_strategy=wrapped", "data.padding_free=true"],
            "wrapped rows join examples mid-sequence",
        ),
        (["train.report_to=neptune"], "'tensorboard', 'mlflow' or 'wandb' (got 'neptune')"),
        (["model.attn_implementation=flash"], "'sdpa', 'flash_attention_2'"),
    ],
)
def test_bad_variant_values_name_the_key_the_value_and_the_choices(
    overrides, message, tiny_model_dir, ticket_data, tmp_path
):
    with pytest.raises(UserError, match="invalid config") as error:
        tiny_config(tiny_model_dir, ticket_data, tmp_path, *overrides)
    assert message in str(error.value)


def test_flash_attention_on_a_cpu_is_refused_before_loading(tiny_model_dir, ticket_data, tmp_path):
    config = tiny_config(
        tiny_model_dir, ticket_data, tmp_path, *TWO_STEPS, "model.device=cpu",
        "model.attn_implementation=flash_attention_2", "output.run_name=flash",
    )  # fmt: skip
    with pytest.raises(UserError, match="flash_attention_2 needs a CUDA GPU"):
        run_training(config)


# --- experiment tracking -------------------------------------------------------------


def test_tensorboard_event_file_in_the_run_folder_holds_the_loss(
    tiny_model_dir, ticket_data, tmp_path, prompt
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = train_variant(
        tiny_model_dir, ticket_data, tmp_path, prompt, "tb", "train.report_to=tensorboard"
    )
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, f"no event file in {run_dir / 'tensorboard'}"
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    logged = {e.step: e.value for e in accumulator.Scalars("train/loss")}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    expected = {s["step"]: s["loss"] for s in metrics["steps"] if "loss" in s}
    assert logged.keys() == expected.keys() == {1, 2}
    for step, loss in expected.items():
        assert logged[step] == pytest.approx(loss, rel=1e-6)


def test_a_tracker_that_is_not_installed_names_its_extra(
    tiny_model_dir, ticket_data, tmp_path, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    config = tiny_config(
        tiny_model_dir, ticket_data, tmp_path, *TWO_STEPS, "train.report_to=wandb",
        "output.run_name=wandb",
    )  # fmt: skip
    with pytest.raises(UserError, match=r"report_to=wandb needs the wandb package.*\[wandb\]"):
        run_training(config)
    assert not (tmp_path / "wandb").exists(), "refused before the run folder was made"


# --- packing and padding-free ----------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.padding_free=true"],
        ["data.packing=true", "data.packing_strategy=bfd_split", "data.max_length=128"],
        ["data.packing=true", "data.packing_strategy=wrapped", "data.max_length=128"],
        ["data.packing=true", "model.attn_implementation=eager", "data.max_length=128"],
    ],
    ids=["padding-free", "bfd_split", "wrapped", "bfd-eager"],
)
def test_packing_options_train(overrides, tiny_model_dir, ticket_data, tmp_path, prompt):
    run_dir, probe = train_variant(tiny_model_dir, ticket_data, tmp_path, prompt, "p", *overrides)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_input_tokens_seen"] > 0 and torch.isfinite(probe.logits).all()


class MixesPackedExamples(torch.nn.Module):
    """Attention that ignores position_ids: every token sees all earlier ones in the row."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.config = type("Config", (), {"_attn_implementation": "unmasked"})()

    def forward(self, input_ids, position_ids=None, use_cache=None):
        hidden = self.embed(input_ids).cumsum(dim=1)
        return type("Output", (), {"logits": hidden})()


def test_padding_free_probe_passes_real_attention_and_refuses_one_that_mixes(tiny_model_dir):
    for implementation in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, attn_implementation=implementation
        ).train()
        check_padding_free(model)
        assert model.training, "the probe leaves the model in the mode it found it"
    with pytest.raises(UserError, match="attn_implementation=unmasked this model mixes them"):
        check_padding_free(MixesPackedExamples())
