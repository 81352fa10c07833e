"""Multi-process training through `accelerate launch` (DDP, FSDP, multi-node)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from ..errors import UserError
from ..runs import PROGRAM, new_run_name


@dataclass(frozen=True)
class TrainOptions:
    """`train`'s command line."""

    config: str | None = "configs/train.yaml"  # the YAML config
    overrides: tuple[str, ...] = ()  # KEY=VALUE
    resume: str | None = None  # a run folder to continue from its last checkpoint
    num_processes: int = 1  # more than 1: through `accelerate launch`
    accelerate_config: str | None = None  # accelerate's config file (DDP, FSDP, multi-node)


def launch_command(args: TrainOptions, cpu: bool) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if args.accelerate_config:
        if not os.path.isfile(args.accelerate_config):
            raise UserError(f"accelerate config {args.accelerate_config} does not exist")
        command += ["--config_file", args.accelerate_config]
    command += ["--num_processes", str(args.num_processes)]
    if cpu and not args.accelerate_config:
        # One process per rank through torchrun; the trainer's use_cpu then makes them a
        # gloo group. (`--cpu` would start a single process whatever --num_processes says.)
        command += ["--multi_gpu"]
    command += ["-m", PROGRAM, "train"]
    if args.config:
        command += ["--config", args.config]
    if args.resume:
        command += ["--resume", args.resume]
    # Every process must write to the same run folder: fix its name here.
    overrides = list(args.overrides)
    if not args.resume and not any(o.startswith("output.run_name=") for o in overrides):
        overrides.append(f"output.run_name={new_run_name()}")
    return command + overrides


def launch_distributed(args: TrainOptions) -> int:
    import torch

    command = launch_command(args, cpu=not torch.cuda.is_available())
    print("launching:", " ".join(command), flush=True)
    return subprocess.call(command)
