"""What every training method shares once its trainer exists: the session it runs in, the
Trainer arguments taken from the config, and the last touches before the first step.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..device import Precision
from ..errors import UserError
from ..runs import RunFolder

if TYPE_CHECKING:
    from ..data import EncodedSplit, PreferenceSplit
    from .callbacks import StopRequest


@dataclass
class Session:
    """Everything one training session works with, built before the first step."""

    trainer: Any  # trl.SFTTrainer or trl.DPOTrainer
    model: Any  # the peft model
    train_split: EncodedSplit | PreferenceSplit
    precision: Precision
    stop: StopRequest
    main_process: bool


def trainer_arguments(
    config: Config, precision: Precision, run: RunFolder, has_eval: bool
) -> dict[str, Any]:
    """The Trainer's arguments that SFT and DPO share, from the config and the device."""
    train = config.train
    return dict(
        output_dir=str(run.checkpoints),
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optimizer,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        gradient_checkpointing=train.gradient_checkpointing,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_on_start=has_eval,  # the first eval loss is the base model's: "before"
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        # The precision comes from the device, never from the Trainer's default.
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=precision.device == "cpu",
        include_num_input_tokens_seen="non_padding",
        report_to=train.report_to,
        disable_tqdm=True,  # our own bar shows loss and tokens/s
        dataloader_num_workers=0,
    )


TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "mlflow": ("mlflow",),
    "wandb": ("wandb",),
}


def check_tracker(report_to: str) -> None:
    """A missing tracker is a setup mistake: say which extra installs it, before loading."""
    packages = TRACKERS.get(report_to, ())
    if packages and not any(importlib.util.find_spec(name) for name in packages):
        raise UserError(
            f"train.report_to={report_to} needs the {packages[0]} package, which is not "
            f"installed: pip install -e '.[{report_to}]' (or train.report_to=none)"
        )


def finish_session(
    config: Config,
    run: RunFolder,
    trainer: Any,
    model: Any,
    train_split: EncodedSplit | PreferenceSplit,
    precision: Precision,
    stop: StopRequest,
) -> Session:
    """What every method's trainer gets before the first step."""
    if config.quantization.mode != "none":
        # TRL casts a quantized model's trainable weights to bf16, while a resumed run gets
        # them back from its checkpoint in float32, so an interrupted run would not end where
        # an uninterrupted one does. float32 master weights with the compute dtype through
        # the Trainer's autocast is the usual mixed precision, and on a CPU or a GPU without
        # bf16 it avoids emulated bf16 arithmetic.
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    if config.train.report_to == "tensorboard":
        _log_tensorboard_to(trainer, run.tensorboard)
    main_process = bool(trainer.is_world_process_zero())
    return Session(trainer, model, train_split, precision, stop, main_process)


def _log_tensorboard_to(trainer: Any, folder: Path) -> None:
    # transformers.integrations exports it lazily, which the type checker cannot see.
    from transformers.integrations import TensorBoardCallback  # type: ignore[attr-defined]

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(folder)  # not under checkpoints/
