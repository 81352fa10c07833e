"""Serving figures from a GPU that the GPU suite does not assert: reports/gpu_probes.json.

    python -m tools.gpu_probes [--out reports/gpu_probes.json]

1. The transformers engine with CUDA graphs and async batching forced on
   (`engine.cuda_graphs=true engine.async_batching=true`) against the default, on the tiny
   model: the greedy answers alone and in a batch of 8, a seeded answer alone and batched,
   and whether greedy answers agree between the two engines.
2. The dtypes of an adapter engine in the GPU's serving dtype: the base's and the adapter
   clone's rotary `inv_freq` buffer, and the adapter's LoRA weights.

Each probe records an error instead of stopping the others. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KEY = "probe-key"
PROMPTS = [f"Ticket {i}: my order {i * 7} has not arrived." for i in range(8)]
NO_CUDA = "no CUDA device visible; the GPU probes need one"


async def ask(url: str, prompt: str, seed: int | None = None) -> str:
    import openai

    async with openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120
    ) as client:
        reply = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=32,
            temperature=0 if seed is None else 0.8, seed=seed,
        )  # fmt: skip
        return reply.choices[0].message.content or ""


async def together(url: str, seed: int | None = None) -> list[str]:
    return list(await asyncio.gather(*(ask(url, prompt, seed) for prompt in PROMPTS)))


def serve_and_ask(model_dir: Path, work: Path, *overrides: str) -> dict[str, Any]:
    from tests.server_process import free_port, serve_command, serve_env, start_server

    port = free_port()
    command = serve_command(model_dir, {}, "model.served_name=tiny", f"server.port={port}")
    command += overrides
    server = start_server(command, port, work / f"server-{port}.log", serve_env(KEY), timeout=300)
    try:
        alone = [asyncio.run(ask(server.url, prompt)) for prompt in PROMPTS[:2]]
        batch = asyncio.run(together(server.url))
        seeded_alone = asyncio.run(ask(server.url, PROMPTS[0], seed=7))
        seeded_batch = asyncio.run(together(server.url, seed=7))[0]
    finally:
        server.stop()
    log = server.log.read_text().splitlines()
    return {
        "greedy_batch": batch,
        "greedy_alone_equals_batched": alone == batch[:2],
        "seeded_alone_equals_batched": seeded_alone == seeded_batch,
        "ready_s": round(server.ready_seconds, 2),
        "log": [line for line in log if "cuda graph" in line.lower() or "async" in line.lower()],
    }


def engines_probe(model_dir: Path, work: Path) -> dict[str, Any]:
    runs = {}
    for name, overrides in (
        ("default", ()),
        ("graphs_and_async", ("engine.cuda_graphs=true", "engine.async_batching=true")),
    ):
        try:
            runs[name] = serve_and_ask(model_dir, work, *overrides)
        except BaseException as error:  # start_server fails with pytest's Failed
            runs[name] = {"error": f"{type(error).__name__}: {str(error)[-2000:]}"}
    answers = [run.pop("greedy_batch", None) for run in runs.values()]
    same = None if None in answers else answers[0] == answers[1]
    return {**runs, "greedy_same_with_and_without": same}


def dtypes_probe(model_dir: Path, work: Path) -> dict[str, Any]:
    from {{ cookiecutter.package_name }}.device import pick_precision
    from {{ cookiecutter.package_name }}.inference import attach_adapter
    from {{ cookiecutter.package_name }}.modeling import load_model

    from tests.lora_adapters import random_adapter

    precision = pick_precision("cuda")  # bf16 where the GPU has it, else fp16
    dtype = precision.dtype
    base = load_model(str(model_dir), dtype=dtype, device=precision.device)
    adapter = random_adapter(model_dir, work / "adapter")
    adapted = attach_adapter(base, adapter, "probe", share_base=True)
    lora = {str(p.dtype) for n, p in adapted.named_parameters() if "lora_" in n}
    return {
        "serving_dtype": str(dtype),
        "base_inv_freq": str(base.model.rotary_emb.inv_freq.dtype),
        "adapter_inv_freq": str(adapted.model.rotary_emb.inv_freq.dtype),
        "adapter_lora_weights": sorted(lora),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "gpu_probes.json")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"error: {NO_CUDA}", file=sys.stderr)
        return 1
    from {{ cookiecutter.package_name }}.info import package_versions

    from tests.conftest import build_tiny_model, build_tiny_tokenizer

    work = Path(tempfile.mkdtemp(prefix="gpu-probes-"))
    model_dir = work / "tiny"
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(model_dir)
    build_tiny_model(tokenizer).save_pretrained(model_dir, safe_serialization=True)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "versions": package_versions(("torch", "transformers", "peft")),
        "engines": engines_probe(model_dir, work),
    }
    try:
        report["dtypes"] = dtypes_probe(model_dir, work)
    except Exception as error:
        report["dtypes"] = {"error": f"{type(error).__name__}: {error}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
