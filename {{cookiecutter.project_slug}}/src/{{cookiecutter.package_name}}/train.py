"""LoRA / QLoRA fine-tuning with TRL's SFTTrainer, driven by one config.

Everything the run leaves (config, checkpoints, adapter, metrics, loss plot, cost) goes
into its run folder; runs.py names each file and types its contents.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, load_config
from .device import Precision, pick_precision
from .errors import UserError
from .quantized_base import QuantizedBase
from .runs import (
    RunFolder,
    StepLog,
    TrainingCost,
    TrainingMetrics,
    new_run_name,
    replace_atomically,
)

if TYPE_CHECKING:
    from .callbacks import StopRequest
    from .data import EncodedSplit, PreferenceSplit

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run: RunFolder
    completed: bool  # False when interrupted: the last checkpoint is kept, no adapter

    @property
    def run_dir(self) -> Path:
        return self.run.path


def quantization_config(config: Config, precision: Precision) -> Any:
    mode = config.quantization.mode
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    # BitsAndBytesConfig's __init__ is unannotated (no-untyped-call below).
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    # FSDP can only shard 4-bit weights stored in a float dtype (QLoRA + FSDP).
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quantization.quant_type,
        bnb_4bit_use_double_quant=config.quantization.double_quant,
        bnb_4bit_compute_dtype=precision.dtype,
        bnb_4bit_quant_storage=precision.dtype if fsdp else "uint8",
    )


def check_quantization_backend(mode: str, device: str) -> None:
    """A quantized base needs bitsandbytes, and on a GPU its CUDA library, which bitsandbytes
    otherwise reports only at the first 4-bit matmul: say so before the run starts."""
    if mode == "none":
        return
    try:
        from bitsandbytes import cextension
    except ImportError:
        raise UserError(
            f"quantization.mode={mode} needs bitsandbytes: pip install -e '.[qlora]' (it is in "
            "the dev lock), or train with quantization.mode=none"
        ) from None
    if device.startswith("cuda") and isinstance(
        cextension.lib, cextension.ErrorHandlerMockBNBNativeLibrary
    ):
        import torch

        reason = cextension.lib.error_msg.strip().splitlines()[0]
        raise UserError(
            f"quantization.mode={mode} on {device} needs bitsandbytes' CUDA library, which did "
            f"not load ({reason}). Install a bitsandbytes release built for CUDA "
            f"{torch.version.cuda}, or train with quantization.mode=none"
        )


def peft_lora_config(config: Config) -> Any:
    from peft import EvaConfig, LoraConfig

    lora = config.lora
    # loftq starts from peft's default init; replace_lora_weights_loftq then refits it.
    init = True if lora.init in ("default", "loftq") else lora.init
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft says int; any number scales
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=init,  # type: ignore[arg-type]  # config checked it is peft's name
        bias=lora.bias,
        modules_to_save=lora.modules_to_save,
        eva_config=EvaConfig() if lora.init == "eva" else None,  # peft's defaults, said outright
        task_type="CAUSAL_LM",
    )


def build_peft_model(config: Config, precision: Precision, eva_data: Any = None) -> Any:
    """The base with LoRA layers; `eva_data` (the encoded train split) feeds lora.init=eva."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from .modeling import load_model, resolve_model

    if config.lora.init == "loftq" and not precision.device.startswith("cuda"):
        raise UserError(
            f"lora.init=loftq runs peft's LoftQ, which computes on a CUDA GPU; the device is "
            f"{precision.device}. Train on a GPU, or use lora.init=default with QLoRA here"
        )
    model = load_model(
        config.model.name_or_path,
        dtype=precision.dtype,
        device=precision.device,
        quantization_config=quantization_config(config, precision),
        trust_remote_code=config.model.trust_remote_code,
        attn_implementation=config.model.attn_implementation,
    )
    if config.quantization.mode != "none":
        # peft leaves prepare_model_for_kbit_training unannotated.
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=config.train.gradient_checkpointing
        )
    model = get_peft_model(model, peft_lora_config(config))
    if config.lora.init == "eva":
        from peft import initialize_lora_eva_weights

        batches = eva_batches(eva_data, config.train.batch_size, model.device)
        initialize_lora_eva_weights(
            model, dataloader=batches, forward_fn=_bounded_forward(len(batches) * EVA_PASSES),
            show_progress_bar=False,
        )  # fmt: skip
    if config.lora.init == "loftq":
        from peft import replace_lora_weights_loftq

        # Reads the unquantized weights from the base model's safetensors.
        replace_lora_weights_loftq(model, model_path=_safetensors_file(resolve_model(
            config.model.name_or_path)))  # fmt: skip
    return model


EVA_PASSES = 4  # passes over the train split before EVA gives up converging


def _bounded_forward(limit: int) -> Any:
    """peft's EVA cycles the data until every layer's components converge, which may be
    never: stop after `limit` batches with what to change."""
    calls = 0

    def forward(model: Any, inputs: dict[str, Any]) -> Any:
        nonlocal calls
        calls += 1
        if calls > limit:
            raise UserError(
                f"lora.init=eva did not converge in {EVA_PASSES} passes over the training data "
                f"({limit} batches): lower lora.r, raise train.batch_size or add data, or use "
                "lora.init=default"
            )
        return model(**inputs)

    return forward


def eva_batches(split: Any, batch_size: int, device: Any) -> list[dict[str, Any]]:
    """The train split as padded batches for EVA: one pass, in order. EVA takes the SVD of
    each target layer's inputs at the tokens that carry loss (labels != -100)."""
    import torch

    from .chat import IGNORE_INDEX

    batches = []
    examples = split.examples
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        pad = [width - len(e.input_ids) for e in chunk]
        batches.append(
            {
                "input_ids": torch.tensor(
                    [e.input_ids + [0] * n for e, n in zip(chunk, pad, strict=True)], device=device
                ),
                "attention_mask": torch.tensor(
                    [[1] * len(e.input_ids) + [0] * n for e, n in zip(chunk, pad, strict=True)],
                    device=device,
                ),
                "labels": torch.tensor(
                    [e.labels + [IGNORE_INDEX] * n for e, n in zip(chunk, pad, strict=True)],
                    device=device,
                ),
            }
        )
    return batches


def _safetensors_file(source: str) -> str | None:
    """The single safetensors file of a local model folder (what LoftQ reads); None lets
    peft find it for a hub id."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise UserError(
            f"lora.init=loftq reads the base weights from one safetensors file; {folder} has "
            f"{len(files)}. Use lora.init=default with QLoRA instead"
        )
    return str(files[0])


def check_padding_free(model: Any) -> None:
    """Padding-free batches are one row of several examples told apart only by their
    position_ids; an attention implementation that ignores them mixes the examples.
    Two short sequences packed into one row must give the same logits as apart. Without a
    cache, as TRL trains: transformers only looks for packed rows when there is none."""
    import torch

    first, second = [5, 6, 7, 8], [9, 10, 11]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(
                input_ids=torch.tensor([first + second], device=device),
                position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device),
                use_cache=False,
            ).logits[0, len(first) :]
            alone = model(input_ids=torch.tensor([second], device=device), use_cache=False)
            alone = alone.logits[0]
    finally:
        model.train(was_training)
    scale = alone.float().std().item() or 1.0
    error = (packed.float() - alone.float()).abs().max().item() / scale
    if error > 0.05:  # low-precision kernels differ by far less; a mixed row by far more
        implementation = getattr(model.config, "_attn_implementation", "unknown")
        raise UserError(
            f"padding-free training needs attention that separates packed examples by their "
            f"position_ids; with attn_implementation={implementation} this model mixes them "
            f"(logits off by {error:.2f} std). Set data.padding_free=false and "
            "data.packing_strategy=wrapped or data.packing=false, or "
            "model.attn_implementation=flash_attention_2 on a GPU"
        )


def _dataset(split: Any) -> Any:
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [example.input_ids for example in split.examples],
            "labels": [example.labels for example in split.examples],
        }
    )


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


@dataclass
class Session:
    """Everything one training session works with, built before the first step."""

    trainer: Any  # trl.SFTTrainer or trl.DPOTrainer
    model: Any  # the peft model
    train_split: EncodedSplit | PreferenceSplit
    precision: Precision
    stop: StopRequest
    main_process: bool


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
    """Load the data and the model, and build the trainer around them."""
    if config.train.method == "dpo":
        from .dpo import start_dpo_session

        return start_dpo_session(config, run, extra_callbacks)
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer  # type: ignore[attr-defined]  # trl's lazy module hides it

    from .callbacks import Progress, StopOnRequest, StopRequest
    from .data import load_splits
    from .modeling import load_tokenizer

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


def padding_free(config: Config) -> bool:
    """Whether TRL flattens batches into one row: asked for, or implied by bfd packing."""
    data = config.data
    return data.padding_free or (data.packing and data.packing_strategy != "wrapped")


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
    from .info import describe

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


def train_command(config_path: str | None, overrides: list[str], resume: str | None) -> int:
    """Entry point of `<package> train`: load the config, train, report where things are."""
    resume_dir = Path(resume) if resume else None
    if resume_dir is not None:
        config = RunFolder(resume_dir).read_config(overrides)
    else:
        config = load_config(config_path, overrides)
    result = run_training(config, resume_dir)
    if not result.completed:
        print(f"interrupted: checkpoint kept at {result.run.last_checkpoint()}")
        print(f"continue with: train --resume {result.run_dir}")
        return 130
    print(f"run folder: {result.run_dir}")
    print(f"adapter:    {result.run.adapter}")
    return 0
