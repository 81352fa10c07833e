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
from typing import Any

from .. import quantized_base
from ..errors import UserError
from ..inference import check_adapter_dir
from ..runs import RunFolder
from .config import ServeConfig

PROGRAM = __package__.partition(".")[0]  # the CLI's name
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
        check_vllm_adapters(config.adapters)
        ranks = [int(check_adapter_dir(path).get("r", 16)) for path in config.adapters.values()]
        command += ["--enable-lora", "--max-loras", str(len(config.adapters))]
        command += ["--max-lora-rank", str(_supported_rank(max(ranks)))]
        command.append("--lora-modules")
        command += [f"{name}={Path(path).expanduser()}" for name, path in config.adapters.items()]
    command += list(config.engine.vllm_args)
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
    command = vllm_command(config)  # checks the adapters first: a wrong one is a config mistake
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "engine.kind=vllm needs vLLM, which is not installed in this environment: "
            "`pip install vllm` (Linux with a CUDA GPU), or use engine.kind=transformers"
        )
    executable = shutil.which("vllm")
    if executable is None:  # installed as a package without the console script
        command = [sys.executable, "-m", "vllm.entrypoints.cli.main", *command[1:]]
        executable = sys.executable
    print("exec:", " ".join(command), file=sys.stderr, flush=True)
    os.execvpe(executable, command, vllm_environment(config))
