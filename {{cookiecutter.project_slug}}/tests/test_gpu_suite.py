"""CPU checks of the GPU suite and the scale-out path: the suite refuses clearly without a
GPU, the CPU suite deselects it, and the accelerate configs are what `accelerate launch`
accepts. (The GPU tests themselves are in test_gpu.py and run with `nox -s gpu_tests`.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from {{ cookiecutter.package_name }}.device import check_driver, pick_device
from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.launch import launch_command
from server_process import free_port

PROJECT = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device visible; gpu_tests need one"
NO_GPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU this machine has


def run(*command: str, env: dict[str, str] = NO_GPU_ENV) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300
    )


def pytest_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    options = ["-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}"]
    return run(sys.executable, "-m", "pytest", "tests/test_gpu.py", *options, *args)


@pytest.mark.slow
def test_gpu_tests_fail_not_skip_without_cuda(tmp_path):
    result = pytest_run(tmp_path, "-m", "gpu")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert NO_CUDA in output
    summary = output.strip().splitlines()[-1]
    assert re.search(r"\d+ errors?", summary) and "passed" not in summary, summary
    assert "skipped" not in summary, "a GPU suite that skips passes silently"


@pytest.mark.slow
def test_cpu_suite_deselects_every_gpu_test(tmp_path):
    gpu = pytest_run(tmp_path, "--collect-only", "-q", "-m", "gpu")
    cpu = pytest_run(tmp_path, "--collect-only", "-q")  # pyproject's addopts: -m "not gpu"
    assert gpu.returncode == 0, gpu.stdout[-2000:]
    selected = gpu.stdout.count("test_gpu.py::")
    assert selected >= 8
    # Everything in test_gpu.py is deselected, and it is exactly what `-m gpu` selects.
    assert cpu.returncode == 5, cpu.stdout[-2000:]  # 5: nothing left to run
    assert f"{selected} deselected" in cpu.stdout and "test_gpu.py::" not in cpu.stdout


def test_nox_session_refuses_before_installing_anything(tmp_path):
    pytest.importorskip("nox")
    command = [sys.executable, "-m", "nox", "-s", "gpu_tests", "--no-venv"]
    result = run(*command, f"--envdir={tmp_path / 'nox'}")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert NO_CUDA in output
    assert "pip install" not in output


def test_auto_device_is_the_process_own_gpu_under_accelerate(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert pick_device("auto") == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == "cuda:1"
    assert pick_device("cuda:0") == "cuda:0"  # an explicit device wins
    monkeypatch.setenv("LOCAL_RANK", "3")  # each rank sees only its own GPU
    assert pick_device("auto") == "cuda"


# Each process writes its own file: two processes printing at once interleave their lines.
PROBE = """import json, os, pathlib, sys
keys = ["WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "FSDP_SHARDING_STRATEGY",
        "FSDP_USE_ORIG_PARAMS", "FSDP_SYNC_MODULE_STATES", "ACCELERATE_MIXED_PRECISION"]
out = pathlib.Path(sys.argv[1]) / f"probe-{os.environ['LOCAL_RANK']}.json"
out.write_text(json.dumps({k: os.environ.get(k) for k in keys}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_accelerate_launch_accepts_each_config(name, tmp_path):
    """The command launch.py builds, with each config, run for real by `accelerate launch`
    (2 processes of a probe script instead of training): every key is one accelerate
    accepts, and the processes get the distributed settings the config asks for."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config_file = PROJECT / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(config_file))  # unknown top-level keys raise here
    options = {action.dest for action in launch_command_parser()._actions}
    assert all(key in options or f"fsdp_{key}" in options for key in config.fsdp_config)

    args = Namespace(
        accelerate_config=str(config_file), num_processes=2, config="configs/train.yaml",
        resume=None, overrides=["output.run_name=probe"],
    )  # fmt: skip
    command = launch_command(args, cpu=False)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    launcher = command[: command.index("-m", 3)]
    port = str(free_port())
    result = run(*launcher, "--main_process_port", port, str(probe), str(tmp_path))
    reports = sorted(tmp_path.glob("probe-*.json"))
    assert result.returncode == 0 and len(reports) == 2, result.stdout + result.stderr[-3000:]
    seen = [json.loads(report.read_text()) for report in reports]
    assert sorted(s["LOCAL_RANK"] for s in seen) == ["0", "1"]
    assert {s["WORLD_SIZE"] for s in seen} == {"2"}
    assert {s["ACCELERATE_MIXED_PRECISION"] for s in seen} == {"no"}  # the trainer decides
    if name == "fsdp":
        assert seen[0]["ACCELERATE_USE_FSDP"] == "true"
        assert seen[0]["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
        assert seen[0]["FSDP_USE_ORIG_PARAMS"] == "true"
    else:
        assert seen[0]["ACCELERATE_USE_FSDP"] is None


def test_cpu_launch_starts_one_process_per_rank():
    """`--cpu` makes accelerate start a single process whatever --num_processes says; on a
    CPU the launch goes through torchrun (--multi_gpu) and training's use_cpu picks gloo."""
    args = Namespace(
        accelerate_config=None, num_processes=2, config="c.yaml", resume=None, overrides=[]
    )
    command = launch_command(args, cpu=True)
    assert "--multi_gpu" in command and "--cpu" not in command
    assert command[command.index("--num_processes") + 1] == "2"


def test_a_driver_too_old_for_the_cuda_build_is_named_with_both_versions():
    with pytest.raises(UserError) as caught:
        check_driver("12.8", (11, 4))
    message = str(caught.value)
    assert "CUDA 12.8" in message and "supports CUDA 11.4" in message and "driver" in message
    check_driver("12.8", (12, 2))  # minor-version compatibility: runs
    check_driver("12.8", None)  # no NVIDIA driver: the CPU is the device
    check_driver(None, (11, 4))  # a CPU build of torch
