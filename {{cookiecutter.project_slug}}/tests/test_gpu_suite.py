"""CPU checks of the GPU suite and the scale-out path: the suite refuses clearly without a
GPU, the CPU suite deselects it, its helpers and tools work, and the accelerate configs are
what `accelerate launch` accepts. (The GPU tests themselves are in test_gpu.py and run with
`nox -s gpu_tests`.)"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from {{ cookiecutter.package_name }}.cost.coldstart import free_port
from {{ cookiecutter.package_name }}.device import check_driver, pick_device
from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.training.launch import TrainOptions, launch_command
from test_gpu import cached_model, exact_fp32_matmuls

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


def test_nox_session_without_venv_installs_nothing(tmp_path):
    """`nox -s gpu_tests --no-venv` on a machine that lists a GPU: it goes straight to this
    Python's torch (which here sees none, so it stops there) without installing anything."""
    pytest.importorskip("nox")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Stand-in GPU (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    # Not hidden for nvidia-smi, but an index no machine has: torch sees no device, even
    # where a GPU is present.
    env = {**NO_GPU_ENV, "CUDA_VISIBLE_DEVICES": "99", "PATH": path}
    command = [sys.executable, "-m", "nox", "-s", "gpu_tests", "--no-venv"]
    result = run(*command, f"--envdir={tmp_path / 'nox'}", env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "nothing is installed" in output and "torch sees no CUDA device" in output, output
    assert NO_CUDA in output
    assert "pip install" not in output


def test_exact_fp32_matmuls_after_the_fp32_precision_api_was_used():
    """torch refuses to read the legacy allow_tf32 flag once fp32_precision has been set in
    the process (by a library, or an earlier test): the helper must not read it."""
    matmul = torch.backends.cuda.matmul
    outer = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        with exact_fp32_matmuls():
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = outer


def test_base_model_is_found_only_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    assert cached_model("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert cached_model(str(tmp_path)) == tmp_path.resolve()


@pytest.mark.slow
def test_stand_in_base_has_the_default_base_shape(tmp_path):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    out = tmp_path / "stand-in"
    result = run(sys.executable, "-m", "tools.stand_in_base", str(out))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    config = AutoConfig.from_pretrained(out)
    shape = (config.hidden_size, config.intermediate_size, config.num_hidden_layers)
    assert shape == (576, 1536, 30) and config.vocab_size == 49152
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        shapes = [weights.get_slice(key).get_shape() for key in weights.keys()]  # noqa: SIM118
    count = sum(math.prod(shape) for shape in shapes)
    mark = json.loads((out / "stand_in.json").read_text())
    assert mark["parameters"] == count and 134e6 < count < 135e6, count
    assert "random weights" in mark["note"]
    assert AutoTokenizer.from_pretrained(out).chat_template
    again = run(sys.executable, "-m", "tools.stand_in_base", str(tmp_path))  # not empty, no mark
    assert again.returncode == 2 and "holds no stand-in" in again.stderr


def test_gpu_probes_refuse_without_cuda(tmp_path):
    out = tmp_path / "probes.json"
    result = run(sys.executable, "-m", "tools.gpu_probes", "--out", str(out))
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: no CUDA device visible; the GPU probes need one"
    )
    assert not out.exists()


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

    args = TrainOptions(
        accelerate_config=str(config_file), num_processes=2, config="configs/train.yaml",
        overrides=("output.run_name=probe",),
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
    args = TrainOptions(num_processes=2, config="c.yaml")
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
