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

from .errors import UserError

SchemaT = TypeVar("SchemaT", bound=BaseModel)


class Section(BaseModel):
    """The base of every config section (training, serving, token cost): unknown keys are
    errors, and so are bad values assigned later."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str  # hub id or local folder; configs/train.yaml sets it
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    # transformers' attention kernel; auto: the library's choice (sdpa where the model has it)
    attn_implementation: Literal[
        "auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"
    ] = "auto"


class DataConfig(Section):
    train: str = "data/tickets_train.jsonl"
    eval: str | None = "data/tickets_eval.jsonl"
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    split: str = "train"  # split of a Hugging Face dataset id
    format: Literal["auto", "messages", "prompt_completion", "instruction"] = "auto"
    system_prompt: str | None = None  # added to records that have none
    max_length: int = Field(512, ge=16, le=131072)
    overlong: Literal["truncate", "drop"] = "truncate"
    train_on_prompt: bool = False
    packing: bool = False
    # TRL's packing: bfd (best-fit decreasing, overflow truncated), bfd_split (overflow split
    # into more examples), wrapped (one stream cut into rows, examples cut mid-way)
    packing_strategy: Literal["bfd", "bfd_split", "wrapped"] = "bfd"
    # Flatten each batch into one row without pad tokens (bfd packing always does)
    padding_free: bool = False

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
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False  # weight-decomposed LoRA: a magnitude vector per target layer
    init: str = "default"
    bias: Literal["none", "all", "lora_only"] = "none"  # biases trained with the adapter
    modules_to_save: list[str] | None = None  # layers trained in full and saved, e.g. lm_head

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
    mode: Literal["none", "8bit", "4bit"] = "none"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class TrainConfig(Section):
    # sft: supervised on the answers; dpo: preference pairs (chosen over rejected)
    method: Literal["sft", "dpo"] = "sft"
    learning_rate: float = Field(2e-4, gt=0, le=1)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optimizer: str = "adamw_torch"
    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, ge=-1)  # > 0 overrides epochs
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    seed: int = 42
    logging_steps: int = Field(5, ge=1)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    # Experiment tracking through the Trainer's own integrations; tensorboard writes
    # runs/<run>/tensorboard (offline); mlflow and wandb read their usual environment
    report_to: Literal["none", "tensorboard", "mlflow", "wandb"] = "none"


class DpoConfig(Section):
    """train.method=dpo: TRL's DPOTrainer on prompt / chosen / rejected records."""

    beta: float = Field(0.1, gt=0)  # how far the policy may move from the reference
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    # A finished SFT run whose adapter DPO continues (its base must be model.name_or_path);
    # null: a new adapter on the base. The reference model is the starting point either way.
    from_run: str | None = None


class PushConfig(Section):
    """`push`: where a run goes on the Hugging Face Hub (the command line overrides these)."""

    repo_id: str | None = None  # user/name; null: give --repo-id
    private: bool = True
    what: Literal["adapter", "merged", "both"] = "adapter"
    license: str = "other"  # the Hub's license id for the card, e.g. apache-2.0


class OutputConfig(Section):
    dir: str = "runs"
    run_name: str | None = None  # default: a timestamp


class CostConfig(Section):
    gpu_hourly_usd: float = Field(gt=0)  # configs/train.yaml sets it


class Config(Section):
    model: ModelConfig
    data: DataConfig = DataConfig()
    lora: LoraConfig = LoraConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()
    cost: CostConfig
    dpo: DpoConfig = DpoConfig()
    push: PushConfig = PushConfig()

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


def _keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a schema accepts, sections included."""
    names = []
    for name, field in schema.model_fields.items():
        names.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += _keys(annotation, f"{prefix}{name}.")
    return names


def describe_error(
    error: ValidationError, schema: type[BaseModel], source: str, what: str = "config"
) -> str:
    """The one way a validation error reaches the user: each problem on its own line,
    unknown keys with the nearest valid one, bad values with what was given."""
    valid = _keys(schema)
    lines = [f"invalid {what} {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            section = key.rpartition(".")[0]
            choices = [v.rpartition(".")[2] for v in valid if v.rpartition(".")[0] == section]
            lines.append(f"  {key}: unknown key{hint} (valid here: {', '.join(choices)})")
        else:
            value = item.get("input")
            # A check across keys receives the whole section: its message names the keys.
            got = "" if isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"  {key or '<root>'}: {item['msg']}{got}")
    return "\n".join(lines)


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
