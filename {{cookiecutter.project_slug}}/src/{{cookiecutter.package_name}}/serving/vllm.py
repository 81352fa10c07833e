"""The optional vllm engine: vLLM's own OpenAI server with LoRA enabled, for GPU scale.

vLLM batches requests for different adapters in one forward pass (multi-LoRA kernels),
which the transformers engine cannot. The command line is built from the same
configs/serve.yaml; the process is replaced by vLLM (exec), so signals such as SIGTERM go
straight to it, and its /metrics, /health and /v1/* replace ours.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from ..errors import UserError
from ..inference import check_adapter_dir
from .config import ServeConfig

VLLM_DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def vllm_command(config: ServeConfig) -> list[str]:
    """`vllm serve ...` for the config (vLLM >= 0.6 flags)."""
    model = config.model
    command = [
        "vllm",
        "serve",
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
    ]
    if model.max_context is not None:
        command += ["--max-model-len", str(model.max_context)]
    if model.trust_remote_code:
        command.append("--trust-remote-code")
    if config.adapters:
        ranks = [int(check_adapter_dir(path).get("r", 16)) for path in config.adapters.values()]
        command += ["--enable-lora", "--max-loras", str(len(config.adapters))]
        command += ["--max-lora-rank", str(_supported_rank(max(ranks)))]
        command.append("--lora-modules")
        command += [f"{name}={Path(path).expanduser()}" for name, path in config.adapters.items()]
    command += list(config.engine.vllm_args)
    return command


def _supported_rank(rank: int) -> int:
    """vLLM accepts a fixed set of maximum ranks: the smallest that holds `rank`."""
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    raise UserError(f"LoRA rank {rank} is above the largest rank vLLM serves (512)")


def vllm_environment(config: ServeConfig, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for vLLM: the API key under the name vLLM reads, the chosen GPU."""
    env = dict(os.environ if environ is None else environ)
    key = env.get(config.server.api_key_env)
    if key:
        env["VLLM_API_KEY"] = key  # kept off the command line, where `ps` would show it
    device = config.model.device
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2]
    return env


def run_vllm(config: ServeConfig) -> int:
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "engine.kind=vllm needs vLLM, which is not installed in this environment: "
            "`pip install vllm` (Linux with a CUDA GPU), or use engine.kind=transformers"
        )
    command = vllm_command(config)
    executable = shutil.which("vllm")
    if executable is None:  # installed as a package without the console script
        command = [sys.executable, "-m", "vllm.entrypoints.cli.main", *command[1:]]
        executable = sys.executable
    print("exec:", " ".join(command), file=sys.stderr, flush=True)
    os.execvpe(executable, command, vllm_environment(config))
    return 0  # not reached
