"""The training config: one YAML file, typed and validated, with command-line overrides."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .config_keys import key_docs
from .errors import UserError

SchemaT = TypeVar("SchemaT", bound=BaseModel)

# $ per GPU hour unless a config says otherwise: training's (cost.gpu_hourly_usd) and
# serving's (token-cost's price.gpu_hourly_usd).
GPU_HOURLY_USD = {{ cookiecutter.gpu_hourly_usd | float }}


class Section(BaseModel):
    """The base of every config section (training, serving, token cost): unknown keys are
    errors, and so are bad values assigned later."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = Field(description="hub id or local folder (safetensors)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model")
    attn_implementation: Literal[
        "auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"
    ] = Field(
        "auto",
        description="transformers' attention kernel; auto: the library's choice (sdpa where "
        "the model has it)",
    )


class DataConfig(Section):
    train: str = Field(
        "data/tickets_train.jsonl",
        description=".jsonl, .json, .parquet, a folder of them or a Hugging Face dataset id",
    )
    eval: str | None = Field(
        "data/tickets_eval.jsonl", description="null: split eval_fraction off the train data"
    )
    eval_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="share of the train data held out for eval (seeded)"
    )
    split: str = Field("train", description="split of a Hugging Face dataset")
    format: Literal["auto", "messages", "prompt_completion", "instruction"] = Field(
        "auto", description="the records' format; auto: read from their keys"
    )
    system_prompt: str | None = Field(None, description="added to records without a system message")
    max_length: int = Field(512, ge=16, le=131072, description="tokens per example")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="what happens to examples longer than max_length"
    )
    train_on_prompt: bool = Field(False, description="false: loss on assistant tokens only")
    packing: bool = Field(
        False, description="pack several examples into each row of max_length tokens"
    )
    packing_strategy: Literal["bfd", "bfd_split", "wrapped"] = Field(
        "bfd",
        description="TRL's packing: bfd (best-fit decreasing, overflow truncated), bfd_split "
        "(overflow split into more examples), wrapped (one stream cut into rows, examples cut "
        "mid-way)",
    )
    padding_free: bool = Field(
        False,
        description="without packing: each batch as one row, no pad tokens (bfd packing always is)",
    )

    @model_validator(mode="after")
    def _padding_free(self) -> DataConfig:
        if self.padding_free and self.packing and self.packing_strategy == "wrapped":
            raise ValueError(
                "data.padding_free=true with data.packing_strategy=wrapped: wrapped rows join "
                "examples mid-sequence, so a padding-free batch would let them attend to each "
                "other; use data.packing_strategy=bfd (always padding-free) or padding_free=false"
            )
        return self


# peft's init_lora_weights, by name. default: A random, B zero (the adapter starts as a
# no-op). pissa/olora start from the base weights' principal directions; eva from those of
# the layers' inputs on the training data (and redistributes ranks); loftq from the 4-bit
# quantization error.
LORA_INITS = (
    *("default", "gaussian", "orthogonal", "pissa", "pissa_niter_<N>", "olora", "eva", "loftq"),
)
PISSA_FAST = re.compile(r"^pissa_niter_\d+$")  # PiSSA with N fast-SVD iterations
# CorDA needs peft's own covariance pass over calibration data, which this project lacks.
DATA_INITS = ("corda",)


class LoraConfig(Section):
    r: int = Field(16, ge=1, le=1024, description="rank of the adapter's update matrices")
    alpha: float = Field(32, gt=0, description="scale of the update: alpha / r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: str | list[str] = Field(
        "all-linear", description="layers that get an adapter: all-linear or a list of names"
    )
    use_rslora: bool = Field(
        False, description="scale by alpha / sqrt(r) (rsLoRA): steadier at high ranks"
    )
    use_dora: bool = Field(
        False,
        description="DoRA: a magnitude vector per target layer; vLLM cannot serve it unmerged",
    )
    init: str = Field(
        "default",
        description="peft's init_lora_weights: default | gaussian | orthogonal | pissa | "
        "pissa_niter_<N> | olora | eva | loftq (4-bit)",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="biases trained with the adapter; vLLM serves only none unmerged"
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="layers trained in full and saved, e.g. [lm_head]; vLLM cannot serve "
        "them unmerged",
    )

    @field_validator("init")
    @classmethod
    def _init(cls, value: str) -> str:
        if value in DATA_INITS:
            raise ValueError(
                f"{value} initializes LoRA from activations of calibration data, which this "
                f"project does not collect; use one of {', '.join(LORA_INITS)}"
            )
        if value not in LORA_INITS and not PISSA_FAST.match(value):
            raise ValueError(f"must be one of {', '.join(LORA_INITS)}")
        return value

    @property
    def mutates_base(self) -> bool:
        """PiSSA and OLoRA move the adapter's start out of the base weights: the adapter is
        converted into a plain LoRA of the untouched base when it is saved."""
        return self.init == "olora" or self.init.startswith("pissa")


class QuantizationConfig(Section):
    mode: Literal["none", "8bit", "4bit"] = Field(
        "none", description="4bit: QLoRA (the base in 4 bits, the adapter in full precision)"
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4bit: the 4-bit data type")
    double_quant: bool = Field(True, description="4bit: quantize the quantization constants too")


class TrainConfig(Section):
    method: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft: supervised on the answers; dpo: preference pairs (chosen over "
        "rejected, e.g. data/preferences_train.jsonl)",
    )
    learning_rate: float = Field(2e-4, gt=0, le=1, description="peak learning rate")
    lr_scheduler: str = Field("cosine", description="transformers' scheduler name")
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="share of the steps that warm the learning rate up"
    )
    weight_decay: float = Field(0.0, ge=0, description="the optimizer's weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this norm")
    optimizer: str = Field("adamw_torch", description="transformers' optimizer name")
    epochs: float = Field(3.0, gt=0, description="passes over the train data")
    max_steps: int = Field(-1, ge=-1, description="> 0 overrides epochs")
    batch_size: int = Field(8, ge=1, description="examples per step and per process")
    grad_accum: int = Field(1, ge=1, description="steps whose gradients add up to one update")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass: less memory, slower"
    )
    seed: int = Field(42, description="seed of the data order, the eval split and the init")
    logging_steps: int = Field(5, ge=1, description="log the loss every this many steps")
    eval_steps: int = Field(50, ge=1, description="eval loss every this many steps")
    save_steps: int = Field(50, ge=1, description="a checkpoint every this many steps")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept (the newest)")
    report_to: Literal["none", "tensorboard", "mlflow", "wandb"] = Field(
        "none",
        description="experiment tracking: tensorboard (runs/<run>/tensorboard, offline); "
        "mlflow and wandb read their usual environment",
    )


class DpoConfig(Section):
    beta: float = Field(
        0.1, gt=0, description="how far the policy may move from the reference model"
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid (DPO) | ipo | hinge | robust"
    )
    # The reference model is the starting point either way: the SFT adapter or the base.
    from_run: str | None = Field(
        None,
        description="an SFT run folder whose adapter DPO continues (its base must be "
        "model.name_or_path); null: a new adapter on the base",
    )


class PushConfig(Section):
    repo_id: str | None = Field(None, description="user/name; null: give --repo-id")
    private: bool = Field(True, description="create the repo private")
    what: Literal["adapter", "merged", "both"] = Field("adapter", description="what to upload")
    license: str = Field("other", description="the card's license id on the Hub, e.g. apache-2.0")


class OutputConfig(Section):
    dir: str = Field("runs", description="the folder that holds the run folders")
    run_name: str | None = Field(None, description="the run's folder; null: a timestamp")


class CostConfig(Section):
    gpu_hourly_usd: float = Field(
        GPU_HOURLY_USD,
        gt=0,
        description="$ per hour of the training machine, for the run's cost.json",
    )


class Config(Section):
    model: ModelConfig = Field(description="the base model and how it loads")
    data: DataConfig = Field(DataConfig(), description="the training data and its tokens")
    lora: LoraConfig = Field(LoraConfig(), description="the adapter (peft's LoraConfig)")
    quantization: QuantizationConfig = Field(
        QuantizationConfig(), description="how the base is loaded for training (bitsandbytes)"
    )
    train: TrainConfig = Field(TrainConfig(), description="the optimizer, schedule and checkpoints")
    output: OutputConfig = Field(OutputConfig(), description="where the run folder goes")
    cost: CostConfig = Field(description="the price of training")
    dpo: DpoConfig = Field(DpoConfig(), description="used when train.method=dpo (TRL's DPOTrainer)")
    push: PushConfig = Field(
        PushConfig(),
        description="`push RUN`: the Hugging Face Hub (the command line overrides these)",
    )

    @model_validator(mode="after")
    def _eval_source(self) -> Config:
        if self.data.eval and self.data.eval_fraction:
            raise ValueError("set data.eval (a file) or data.eval_fraction (a split), not both")
        return self

    @model_validator(mode="after")
    def _lora_init(self) -> Config:
        init, quantized = self.lora.init, self.quantization.mode
        if init == "loftq" and quantized != "4bit":
            raise ValueError(
                f"lora.init=loftq fits the adapter to the 4-bit quantization error, but "
                f"quantization.mode is {quantized}; set quantization.mode=4bit or another lora.init"
            )
        if self.lora.mutates_base and quantized != "none":
            raise ValueError(
                f"lora.init={init} rewrites the base weights, which a {quantized} base cannot "
                "take; use quantization.mode=none or lora.init=loftq (4-bit)"
            )
        return self


def describe_error(
    error: ValidationError, schema: type[BaseModel], source: str, what: str = "config"
) -> str:
    """The one way a validation error reaches the user: each problem on its own line,
    unknown keys with the nearest valid one, bad values with what was given."""
    valid = [doc.key for doc in key_docs(schema)]
    lines = [f"invalid {what} {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{_nearest(key, valid)}")
        else:
            value = item.get("input")
            # A check across keys receives the whole section: its message names the keys.
            got = "" if isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"  {key or '<root>'}: {item['msg']}{got}")
    return "\n".join(lines)


def _nearest(key: str, valid: list[str]) -> str:
    """The valid key nearest an unknown one, and the keys of its section."""
    pattern = re.sub(r"\.\d+\.", "[].", key)  # a list item's key: engines.0.nme -> engines[].nme
    close = difflib.get_close_matches(pattern, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    section = pattern.rpartition(".")[0]
    choices = [v.rpartition(".")[2] for v in valid if v.rpartition(".")[0] == section]
    return f"{hint} (valid here: {', '.join(choices)})"


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`train.max_steps=10 lora.r=8` -> nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise UserError(f"override {override!r} is not KEY=VALUE, e.g. train.max_steps=10")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {override!r} conflicts with an earlier one")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return nested


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as error:
        raise UserError(f"{what} {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what} {path} must hold a mapping of sections")
    return raw


def load_yaml_config(
    schema: type[SchemaT],
    path: str | Path | None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    what: str = "config",
) -> SchemaT:
    """The one way every config loads: the YAML (or the defaults), then `extra` (from CLI
    flags), then KEY=VALUE overrides, validated as a whole; mistakes become a UserError.
    `what` names the kind of file in messages ("config", "price list")."""
    raw = read_yaml(path, f"{what} file") if path is not None else {}
    source = str(path) if path is not None else "(defaults)"
    if extra:
        raw = merge_dicts(raw, extra)
        source += " with command-line options"
    if overrides:
        raw = merge_dicts(raw, parse_overrides(overrides))
        source += " with overrides " + " ".join(overrides)
    try:
        return schema.model_validate(raw)
    except ValidationError as error:
        raise UserError(describe_error(error, schema, source, what)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a training config (or the defaults), apply overrides, validate everything."""
    return load_yaml_config(Config, path, overrides)


def dump_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(), sort_keys=False), encoding="utf-8")
