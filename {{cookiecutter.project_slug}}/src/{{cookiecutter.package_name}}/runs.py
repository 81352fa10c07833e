"""The run folder: the one place that knows what a training run leaves behind.

    runs/<run>/config.yaml          the resolved config (written first, used by --resume)
    runs/<run>/checkpoints/         Trainer checkpoints every train.save_steps
    runs/<run>/adapter/             adapter + tokenizer; renamed into place only when complete
    runs/<run>/adapter_init/        PiSSA / OLoRA only: the adapter before training, to
                                    convert the trained one into a LoRA of the untouched base
    runs/<run>/tensorboard/         train.report_to=tensorboard: the event files
    runs/<run>/metrics.json         loss and eval loss per step, token counts
    runs/<run>/loss.png             the loss curves
    runs/<run>/cost.json            trained tokens, wall time, tokens/s, $ at the GPU-hour price
    runs/<run>/merged/              `merge`: base + adapter as one model folder
    runs/<run>/gguf/                `export gguf`: GGUF files and an Ollama Modelfile
    runs/<run>/eval.json            held-out accuracy when `demo` scored the run (for the card)
    runs/<run>/README.md            `push --dry-run`: the model card it would upload

`train` writes through `RunFolder`; `merge`, `demo` and `token-cost` read through it, as
typed objects. Files are replaced atomically, so a crash never leaves half a JSON file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer

from .config import Config, dump_config, load_config
from .errors import UserError

ModelT = TypeVar("ModelT", bound=BaseModel)

PROGRAM = __name__.partition(".")[0]  # the CLI's name
# What peft saves in an adapter folder
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def has_tokenizer(path: str | Path) -> bool:
    """The folder holds a tokenizer: training saves one beside the adapter."""
    folder = Path(path)
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def tokenizer_source(model: str, adapter: str | Path | None) -> str:
    """Where to load the tokenizer from: the adapter's own if it has one, else the model's."""
    return str(adapter) if adapter is not None and has_tokenizer(adapter) else model


def new_run_name() -> str:
    """The folder name of a new run under output.dir: its start time."""
    return datetime.now().strftime("%Y%m%d-%H%M%S")


class RunFile(BaseModel):
    # Unknown keys are ignored: a run written by a newer version still reads.
    model_config = ConfigDict(extra="ignore", frozen=True)


class StepLog(RunFile):
    """One row of the Trainer's log history: a training loss or an evaluation."""

    step: int
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None


class TrainingMetrics(RunFile):
    """metrics.json. The counts are None in a run that predates them."""

    steps: list[StepLog] = Field(default_factory=list)
    global_step: int
    processes: int = 1
    train_examples: int | None = None
    train_records: int | None = None
    truncated: int | None = None
    dropped: int | None = None
    num_input_tokens_seen: int | None = None
    parameters: int | None = None
    trainable_parameters: int | None = None

    @field_serializer("steps")
    def _steps(self, steps: list[StepLog]) -> list[dict[str, float]]:
        # A row holds only what was logged at that step, as the Trainer writes it.
        return [step.model_dump(exclude_none=True) for step in steps]

    @property
    def eval_losses(self) -> list[float]:
        return [step.eval_loss for step in self.steps if step.eval_loss is not None]


class TrainingCost(RunFile):
    """cost.json: what the training session took, priced at the run's GPU-hour price."""

    trained_tokens: int  # non-pad tokens the model processed in this session
    wall_seconds: float
    tokens_per_second: float | None = None
    gpu_hourly_usd: float
    usd: float | None = None
    usd_per_1m_tokens: float | None = None
    environment: dict[str, str] = Field(default_factory=dict)  # info.describe()
    quantization: str | None = None
    dtype: str | None = None

    @property
    def device(self) -> str:
        return self.environment.get("device", "unknown")


class HeldOutEval(RunFile):
    """eval.json: the adapter's greedy answers scored against held-out reference answers."""

    accuracy: float = Field(ge=0.0, le=1.0)
    examples: int = Field(ge=1)
    data: str | None = None  # the held-out file


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a scratch file next to `path`, which then takes its place in one step."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(scratch)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


class RunFolder:
    """A run folder, runs/<run>/: every file in it is named here."""

    def __init__(self, path: Path) -> None:
        self.path, self.name = path, path.name
        self.config_file = path / "config.yaml"
        self.metrics_file = path / "metrics.json"
        self.cost_file = path / "cost.json"
        self.loss_plot = path / "loss.png"
        self.adapter = path / "adapter"
        # Where the adapter is written before it is renamed into place.
        self.partial_adapter = path / ".adapter.partial"
        self.initial_adapter = path / "adapter_init"
        self.checkpoints = path / "checkpoints"
        self.tensorboard = path / "tensorboard"
        self.merged = path / "merged"
        self.gguf = path / "gguf"
        self.eval_file = path / "eval.json"
        self.model_card = path / "README.md"

    def last_checkpoint(self) -> Path | None:
        checkpoints = [
            folder
            for folder in self.checkpoints.glob("checkpoint-*")
            if (folder / "trainer_state.json").exists()
        ]
        return max(checkpoints, key=lambda p: int(p.name.rpartition("-")[2]), default=None)

    def finished_adapter(self) -> Path:
        """The adapter folder, or a UserError when training has not written it yet."""
        if not (self.adapter / ADAPTER_CONFIG).is_file():
            raise UserError(
                f"{self.path} has no finished adapter ({self.adapter / ADAPTER_CONFIG} is "
                f"missing); finish or resume the run first: {PROGRAM} train --resume {self.path}"
            )
        return self.adapter

    def read_config(self, overrides: list[str] | None = None) -> Config:
        if not self.config_file.is_file():
            raise UserError(
                f"{self.path} is not a run folder: {self.config_file} is missing; "
                f"give the folder `{PROGRAM} train` made (runs/<run>)"
            )
        return load_config(self.config_file, overrides)

    def write_config(self, config: Config) -> None:
        replace_atomically(self.config_file, lambda scratch: dump_config(config, scratch))

    def read_metrics(self) -> TrainingMetrics:
        return self._read(self.metrics_file, TrainingMetrics)

    def write_metrics(self, metrics: TrainingMetrics) -> None:
        self._write(self.metrics_file, metrics)

    def read_eval(self) -> HeldOutEval | None:
        return self._read(self.eval_file, HeldOutEval) if self.eval_file.is_file() else None

    def write_eval(self, evaluation: HeldOutEval) -> None:
        self._write(self.eval_file, evaluation)

    def read_cost(self) -> TrainingCost:
        return self._read(self.cost_file, TrainingCost)

    def write_cost(self, cost: TrainingCost) -> None:
        self._write(self.cost_file, cost)

    def _read(self, path: Path, schema: type[ModelT]) -> ModelT:
        fix = f"train it, resume it ({PROGRAM} train --resume {self.path}) or pick another run"
        try:
            return schema.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise UserError(
                f"{path} is missing: {self.path} is not a finished training run; {fix}"
            ) from None
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in item['loc']) or 'the file'}: {item['msg']}"
                for item in error.errors()
            )
            raise UserError(f"{path} is malformed ({problems}); {fix}") from None

    @staticmethod
    def _write(path: Path, content: RunFile) -> None:
        text = json.dumps(content.model_dump(mode="json"), indent=2)

        def write(scratch: Path) -> None:
            scratch.write_text(text, encoding="utf-8")

        replace_atomically(path, write)

    @classmethod
    def latest(cls, runs_dir: Path) -> RunFolder:
        """The most recently finished run under `runs_dir`."""
        finished = [cls(folder) for folder in runs_dir.glob("*") if cls(folder).cost_file.is_file()]
        if not finished:
            raise UserError(
                f"no finished training run in {runs_dir}/ (none has a cost.json); "
                f"train one with `{PROGRAM} train`, or give --run RUN_DIR"
            )
        return sorted(finished, key=lambda run: run.cost_file.stat().st_mtime)[-1]
