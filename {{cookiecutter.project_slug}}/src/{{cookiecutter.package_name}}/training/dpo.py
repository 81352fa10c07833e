"""Preference tuning (train.method=dpo) with TRL's DPOTrainer.

The pairs are tokenized by data.py with chat.py, the prompt format SFT trains and the
server serves, and the run writes the same run folder as SFT: merge, serve, push,
export and the cost card read a DPO run unchanged. The reference model is where the
policy starts: the base, or the SFT run named by dpo.from_run.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..device import Precision, pick_precision
from ..errors import UserError
from ..runs import RunFolder

if TYPE_CHECKING:
    from ..data import PreferenceSplit
    from .session import Session

REFERENCE = "ref"  # the adapter name TRL gives its frozen copy of the starting adapter


def dpo_config(config: Config, precision: Precision, run: RunFolder, has_eval: bool) -> Any:
    from trl import DPOConfig  # type: ignore[attr-defined]  # trl's lazy module hides it

    from .session import trainer_arguments

    return DPOConfig(
        **trainer_arguments(config, precision, run, has_eval),
        beta=config.dpo.beta,
        loss_type=[config.dpo.loss_type],
        max_length=None,  # pairs are already cut to data.max_length (data.overlong)
    )


def starting_adapter(config: Config) -> Path | None:
    """The SFT adapter DPO continues (dpo.from_run), checked against model.name_or_path."""
    if config.dpo.from_run is None:
        return None
    sft = RunFolder(Path(config.dpo.from_run))
    adapter = sft.finished_adapter()
    base = sft.read_config().model.name_or_path
    if base != config.model.name_or_path:
        raise UserError(
            f"dpo.from_run={sft.path} was trained on {base!r}, but model.name_or_path is "
            f"{config.model.name_or_path!r}; set model.name_or_path={base}"
        )
    return adapter


def policy_model(config: Config, precision: Precision) -> Any:
    """A new LoRA on the base, or the SFT run's adapter made trainable again."""
    from .model import build_peft_model

    adapter = starting_adapter(config)
    if adapter is None:
        return build_peft_model(config, precision)
    if config.quantization.mode != "none" or config.lora.init != "default":
        raise UserError(
            "dpo.from_run continues an adapter as it was saved: use quantization.mode=none and "
            "lora.init=default with it"
        )
    from peft import PeftModel

    from ..modeling import load_model

    base = load_model(
        config.model.name_or_path,
        dtype=precision.dtype,
        device=precision.device,
        trust_remote_code=config.model.trust_remote_code,
        attn_implementation=config.model.attn_implementation,
    )
    return PeftModel.from_pretrained(base, adapter, is_trainable=True)


def trainer_class() -> type:
    from trl import DPOTrainer  # type: ignore[attr-defined]  # trl's lazy module hides it

    class ChatDPOTrainer(DPOTrainer):
        """DPOTrainer on pairs that data.py tokenized with chat.py.

        TRL would render the pairs again with the tokenizer's template and its own EOS
        handling; skipping that keeps one prompt format for SFT, DPO and serving.
        """

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            super().save_model(output_dir, _internal_call)
            # The result is the trained adapter alone; checkpoints keep the reference too.
            if output_dir is not None and not _internal_call:
                shutil.rmtree(Path(output_dir) / REFERENCE, ignore_errors=True)

    return ChatDPOTrainer


def pairs_dataset(split: PreferenceSplit) -> Any:
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt_ids": [pair.prompt_ids for pair in split.examples],
            "chosen_ids": [pair.chosen_ids for pair in split.examples],
            "rejected_ids": [pair.rejected_ids for pair in split.examples],
        }
    )


def start_dpo_session(config: Config, run: RunFolder, extra_callbacks: tuple[Any, ...]) -> Session:
    from transformers import PrinterCallback, set_seed

    from ..data import load_preference_splits
    from ..modeling import load_tokenizer
    from .callbacks import Progress, StopOnRequest, StopRequest
    from .model import check_quantization_backend
    from .session import finish_session

    if config.data.packing or config.data.padding_free:
        raise UserError("train.method=dpo trains whole pairs: set data.packing=false and "
                        "data.padding_free=false")  # fmt: skip
    precision = pick_precision(config.model.device, config.model.dtype)
    check_quantization_backend(config.quantization.mode, precision.device)
    tokenizer = load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
    train_split, eval_split = load_preference_splits(config.data, tokenizer, config.train.seed)
    run.path.mkdir(parents=True, exist_ok=True)
    set_seed(config.train.seed)
    model = policy_model(config, precision)
    stop = StopRequest()
    trainer = trainer_class()(
        model=model,
        args=dpo_config(config, precision, run, eval_split is not None),
        train_dataset=pairs_dataset(train_split),
        eval_dataset=pairs_dataset(eval_split) if eval_split else None,
        processing_class=tokenizer,
        callbacks=[Progress(), StopOnRequest(stop), *extra_callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    if REFERENCE in model.peft_config and adds_nothing_yet(model):
        # The new adapter is still a no-op, so the reference is the base itself: without
        # TRL's copy, its forward pass runs with the adapter disabled, without LoRA matmuls.
        model.delete_adapter(REFERENCE)
    return finish_session(config, run, trainer, model, train_split, precision, stop)


def adds_nothing_yet(model: Any) -> bool:
    """Whether the trained adapter leaves the base unchanged: every lora_B is zero (peft's
    default and gaussian inits) and no module is trained in full."""
    import torch

    with torch.no_grad():
        zero = all(
            not parameter.any()
            for name, parameter in model.named_parameters()
            if "lora_B.default" in name
        )
    return zero and not model.peft_config["default"].modules_to_save


def margins(model: Any, split: PreferenceSplit) -> list[float]:
    """Per pair: log p(chosen | prompt) - log p(rejected | prompt), summed over tokens."""
    import torch

    device = next(model.parameters()).device

    def logprob(prompt: list[int], answer: list[int]) -> float:
        ids = torch.tensor([prompt + answer], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        picked = logits.log_softmax(-1).gather(1, ids[0, len(prompt) :, None])
        return float(picked.sum())

    return [
        logprob(pair.prompt_ids, pair.chosen_ids) - logprob(pair.prompt_ids, pair.rejected_ids)
        for pair in split.examples
    ]
