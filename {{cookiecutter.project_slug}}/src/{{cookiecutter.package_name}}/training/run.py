"""One training run, whatever its method: the run folder, the session, the steps, then the
adapter, metrics, loss plot and cost written into the folder (runs.py names each file
and types its contents).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, load_config
from ..device import Precision
from ..errors import UserError
from ..quantized_base import QuantizedBase
from ..runs import (
    RunFolder,
    StepLog,
    TrainingCost,
    TrainingMetrics,
    new_run_name,
    replace_atomically,
)
from .launch import TrainOptions
from .session import Session, check_tracker

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run: RunFolder
    completed: bool  # False when interrupted: the last checkpoint is kept, no adapter

    @property
    def run_dir(self) -> Path:
        return self.run.path


def prepare_run(config: Config, resume: Path | None) -> tuple[Config, RunFolder]:
    if resume is not None:
        run = RunFolder(resume)
        run.read_config()  # a folder that is not a run fails here, with the fix
        return config, run
    name = config.output.run_name or new_run_name()
    run = RunFolder(Path(config.output.dir) / name)
    # Under DDP every rank gets here; only rank 0 may find the folder new, the others
    # would race with its first writes.
    first_rank = os.environ.get("RANK", "0") == "0"
    if first_rank and run.path.exists() and any(run.path.iterdir()):
        raise UserError(
            f"run folder {run.path} already exists; pick another output.run_name, "
            f"or continue it with --resume {run.path}"
        )
    config = config.model_copy(
        update={"output": config.output.model_copy(update={"run_name": name})}
    )
    return config, run


# train.report_to -> the packages the Trainer's integration imports (any one of them).
def run_training(
    config: Config, resume: Path | None = None, extra_callbacks: tuple[Any, ...] = ()
) -> RunResult:
    """Train, then write the adapter, tokenizer, metrics, plot and cost into the run folder."""
    check_tracker(config.train.report_to)
    config, run = prepare_run(config, resume)
    checkpoint = run.last_checkpoint() if resume else None
    if resume and checkpoint is None:
        raise UserError(f"{run.path} has no checkpoint to resume from; start a new run instead")
    if config.lora.mutates_base and os.environ.get("ACCELERATE_USE_FSDP", "") == "true":
        raise UserError(
            f"lora.init={config.lora.init} is not supported under FSDP: converting the adapter "
            "needs its full weights in one process; use DDP or lora.init=default"
        )
    session = start_session(config, run, extra_callbacks)
    if session.main_process:
        prepare_folder(run, config, session.model, fresh=resume is None)
    tokens_before = session.trainer.state.num_input_tokens_seen
    seconds = train_until_done(session, checkpoint)

    if session.stop.requested:
        if session.main_process:
            write_metrics(run, session)
        return RunResult(run, completed=False)
    # A LoftQ adapter is fitted to the 4-bit base: it records how, for merging and serving.
    fitted_to = QuantizedBase.of_model(session.model) if config.lora.init == "loftq" else None
    save_adapter(run, session.trainer, session.main_process, config.lora.mutates_base, fitted_to)
    if session.main_process:
        write_metrics(run, session)
        tokens = session.trainer.state.num_input_tokens_seen - tokens_before
        write_cost(run, config, session.precision, tokens, seconds)
    return RunResult(run, completed=True)


def start_session(config: Config, run: RunFolder, extra_callbacks: tuple[Any, ...]) -> Session:
    """The trainer of the run's method (train.method) around its data and model."""
    if config.train.method == "dpo":
        from .dpo import start_dpo_session

        return start_dpo_session(config, run, extra_callbacks)
    from .sft import start_sft_session

    return start_sft_session(config, run, extra_callbacks)


def prepare_folder(run: RunFolder, config: Config, model: Any, fresh: bool) -> None:
    """The config (and PiSSA/OLoRA's initial adapter) of a new run; no stale scratch adapter."""
    if fresh:
        run.write_config(config)
    if fresh and config.lora.mutates_base:
        save_initial_adapter(model, run.initial_adapter)
    shutil.rmtree(run.partial_adapter, ignore_errors=True)


def train_until_done(session: Session, checkpoint: Path | None) -> float:
    """Train (from `checkpoint` if given); Ctrl-C stops after the step. Returns the seconds."""

    def request_stop(signum: int, frame: Any) -> None:
        if session.stop.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        session.stop.requested = True
        log.warning("stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, request_stop)
    started = time.perf_counter()
    try:
        session.trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        signal.signal(signal.SIGINT, previous)
    return time.perf_counter() - started


def save_initial_adapter(model: Any, folder: Path) -> None:
    """The PiSSA/OLoRA adapter before training, saved as peft's conversion expects it: with
    init_lora_weights=True, so that loading it does not rewrite the base weights again."""
    lora = model.peft_config["default"]
    init, lora.init_lora_weights = lora.init_lora_weights, True
    try:
        model.save_pretrained(str(folder))
    finally:
        lora.init_lora_weights = init


def save_adapter(
    run: RunFolder,
    trainer: Any,
    main_process: bool,
    convert: bool = False,
    fitted_to: QuantizedBase | None = None,
) -> None:
    """Write into a scratch folder and rename it: a crash never leaves a half adapter.

    Every process calls this: under FSDP `save_model` gathers the sharded weights.
    With `convert` (PiSSA, OLoRA) the weights are rewritten as the difference from the
    initial adapter: a plain LoRA (rank 2r) of the original base, which merging, vLLM and
    any peft user can load without rewriting the base.
    """
    partial = run.partial_adapter
    trainer.save_model(str(partial))  # adapter files and the tokenizer (processing_class)
    trainer.accelerator.wait_for_everyone()
    if not main_process:
        return
    if convert:
        trainer.model.save_pretrained(
            str(partial), path_initial_model_for_weight_conversion=str(run.initial_adapter)
        )
    (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle; nothing loads it
    if fitted_to is not None:
        fitted_to.write(partial)
    shutil.rmtree(run.adapter, ignore_errors=True)
    partial.rename(run.adapter)


LOGGED = ("step", "epoch", "loss", "eval_loss", "learning_rate")


def write_metrics(run: RunFolder, session: Session) -> None:
    state, split, model = session.trainer.state, session.train_split, session.model
    metrics = TrainingMetrics(
        steps=[
            StepLog.model_validate({key: entry[key] for key in LOGGED if key in entry})
            for entry in state.log_history
            if "loss" in entry or "eval_loss" in entry
        ],
        global_step=state.global_step,
        processes=session.trainer.args.world_size,
        train_examples=len(split.examples),
        train_records=split.records,
        truncated=split.truncated,
        dropped=split.dropped,
        num_input_tokens_seen=state.num_input_tokens_seen,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    run.write_metrics(metrics)
    plot_losses(metrics.steps, run.loss_plot)


def plot_losses(steps: list[StepLog], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(s.step, getattr(s, key)) for s in steps if getattr(s, key) is not None]
        if points:
            axes.plot(
                *zip(*points, strict=True), marker="o" if key == "eval_loss" else None, label=label
            )
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("LoRA fine-tuning")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    figure.tight_layout()
    replace_atomically(path, lambda scratch: figure.savefig(scratch, format="png", dpi=100))
    plt.close(figure)


def write_cost(
    run: RunFolder, config: Config, precision: Precision, tokens: int, seconds: float
) -> None:
    from ..info import describe

    price = config.cost.gpu_hourly_usd
    usd = seconds / 3600 * price
    cost = TrainingCost(
        trained_tokens=tokens,
        wall_seconds=round(seconds, 3),
        tokens_per_second=round(tokens / seconds, 2) if seconds else None,
        gpu_hourly_usd=price,
        usd=round(usd, 6),
        usd_per_1m_tokens=round(usd / tokens * 1e6, 6) if tokens else None,
        environment=describe(),
        quantization=config.quantization.mode,
        dtype=precision.dtype_name,
    )
    run.write_cost(cost)


def train_command(options: TrainOptions) -> int:
    """Entry point of `<package> train`: load the config, train, report where things are."""
    if options.num_processes > 1:
        from .launch import launch_distributed

        return launch_distributed(options)
    overrides = list(options.overrides)
    resume_dir = Path(options.resume) if options.resume else None
    if resume_dir is not None:
        config = RunFolder(resume_dir).read_config(overrides)
    else:
        config = load_config(options.config, overrides)
    result = run_training(config, resume_dir)
    if not result.completed:
        print(f"interrupted: checkpoint kept at {result.run.last_checkpoint()}")
        print(f"continue with: train --resume {result.run_dir}")
        return 130
    print(f"run folder: {result.run_dir}")
    print(f"adapter:    {result.run.adapter}")
    return 0
