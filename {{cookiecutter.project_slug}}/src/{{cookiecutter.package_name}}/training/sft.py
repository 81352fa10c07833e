"""Supervised fine-tuning (train.method=sft) with TRL's SFTTrainer."""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..device import Precision, pick_precision
from ..runs import RunFolder
from .model import build_peft_model, check_padding_free, check_quantization_backend, padding_free
from .session import Session, finish_session, trainer_arguments


def sft_config(config: Config, precision: Precision, run: RunFolder, has_eval: bool) -> Any:
    from trl import SFTConfig  # type: ignore[attr-defined]  # trl's lazy module hides it

    padding_free_unpacked = config.data.padding_free and not config.data.packing
    return SFTConfig(
        **trainer_arguments(config, precision, run, has_eval),
        # Examples are already cut to data.max_length (data.overlong); unpacked padding-free
        # rows have no length of their own to enforce, and TRL refuses one.
        max_length=None if padding_free_unpacked else config.data.max_length,
        packing=config.data.packing,
        packing_strategy=config.data.packing_strategy,
        padding_free=config.data.padding_free,
    )


def _dataset(split: Any) -> Any:
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [example.input_ids for example in split.examples],
            "labels": [example.labels for example in split.examples],
        }
    )


def start_sft_session(config: Config, run: RunFolder, extra_callbacks: tuple[Any, ...]) -> Session:
    """Load the data and the model, and build the SFT trainer around them."""
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer  # type: ignore[attr-defined]  # trl's lazy module hides it

    from ..data import load_splits
    from ..modeling import load_tokenizer
    from .callbacks import Progress, StopOnRequest, StopRequest

    precision = pick_precision(config.model.device, config.model.dtype)
    check_quantization_backend(config.quantization.mode, precision.device)
    tokenizer = load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
    train_split, eval_split = load_splits(config.data, tokenizer, config.train.seed)
    run.path.mkdir(parents=True, exist_ok=True)
    set_seed(config.train.seed)  # the LoRA init too, so equal configs give equal runs
    model = build_peft_model(config, precision, eva_data=train_split)
    if padding_free(config):
        check_padding_free(model)
    stop = StopRequest()
    trainer = SFTTrainer(
        model=model,
        args=sft_config(config, precision, run, eval_split is not None),
        train_dataset=_dataset(train_split),
        eval_dataset=_dataset(eval_split) if eval_split else None,
        processing_class=tokenizer,
        callbacks=[Progress(), StopOnRequest(stop), *extra_callbacks],
    )
    trainer.remove_callback(PrinterCallback)  # the bar shows the logs instead
    return finish_session(config, run, trainer, model, train_split, precision, stop)
