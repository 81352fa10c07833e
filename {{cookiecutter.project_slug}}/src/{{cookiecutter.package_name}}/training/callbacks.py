"""The Trainer callbacks of `train`: one progress bar, and a clean stop on Ctrl-C.

A module of its own because it imports transformers and tqdm at the top; train.py is
also imported by the launcher, which must stay light.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


@dataclass
class StopRequest:
    """Set by the SIGINT handler, read by `StopOnRequest` at the end of each step."""

    requested: bool = False


class Progress(TrainerCallback):
    """One bar for the run: steps, ETA, loss and non-pad tokens/s."""

    def __init__(self) -> None:
        self.bar: tqdm[Any] | None = None
        self.start = (0.0, 0)  # (perf_counter, tokens seen) when training began

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train")
            self.start = (time.perf_counter(), state.num_input_tokens_seen)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.bar is None or not logs:
            return
        seconds = time.perf_counter() - self.start[0]
        tokens = state.num_input_tokens_seen - self.start[1]
        postfix = {"tok/s": f"{tokens / max(seconds, 1e-9):.0f}"}
        for key in ("loss", "eval_loss"):
            if key in logs:
                postfix[key] = f"{logs[key]:.4f}"
        self.bar.set_postfix(postfix)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.bar is not None:
            self.bar.close()


class StopOnRequest(TrainerCallback):
    """Ctrl-C asks for a checkpoint at the end of the current step, then a clean stop."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.stop.requested:
            control.should_save = True
            control.should_training_stop = True
