"""The GPU suite: `nox -s gpu_tests` runs exactly these (`pytest -m gpu`); the CPU suite
deselects them. What each test proves is in the README ("GPU tests").

Without a CUDA device every test here fails with NO_CUDA instead of skipping: a GPU suite
that skips on a machine without one would look green and prove nothing. Figures (device,
tokens/s, peak memory, TTFT) go to reports/gpu_tests.json, rewritten by each session.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import TrainerCallback

from {{ cookiecutter.package_name }}.config import load_config
from {{ cookiecutter.package_name }}.cost.coldstart import free_port
from {{ cookiecutter.package_name }}.info import package_versions
from {{ cookiecutter.package_name }}.training.run import RunResult, run_training
from server_process import Server, serve_command, serve_env, start_server
from tickets import CONFIG, PROJECT, conversations, tiny_config, write_ticket_data

pytestmark = pytest.mark.gpu

NO_CUDA = "no CUDA device visible; gpu_tests need one"
REPORT = PROJECT / "reports" / "gpu_tests.json"
KEY = "gpu-test-key"
# A local model folder to use as the base instead of the configured one, such as the
# random-weight stand-in that tools/stand_in_base.py writes (it holds STAND_IN_MARK).
BASE_MODEL_ENV = "GPU_TESTS_BASE_MODEL"
STAND_IN_MARK = "stand_in.json"
MIB = 2**20
# Tiny-model QLoRA peak memory budget. Its weights and LoRA optimizer state take well under
# 10 MiB; the largest activations are the logits, 16 rows x <= 512 tokens x 512 vocab x 4 B
# = 16 MiB, held a few times over by the loss and backward. 512 MiB is ten times what the run
# needs and catches anything that puts a real-sized tensor or a second model on the device.
TINY_PEAK_BUDGET = 512 * MIB
# Base-model QLoRA peak memory budget: the base's bf16 weight size plus 4 GiB. QLoRA holds
# the linear weights in 4 bits, so weights + LoRA + optimizer state stay below the bf16 size
# (asserted separately); 4 GiB covers the activations of 8 sequences of <= 256 tokens,
# logits included (8 x 256 x a 150k vocab x 4 B = 1.2 GiB, held about three times).
BASE_ACTIVATION_ALLOWANCE = 4 * 2**30
# bitsandbytes quantizes each weight row in blocks of 64 values; rows that are whole blocks
# keep the tiny model on the same 4-bit kernels a real model uses.
BNB_BLOCKSIZE = 64
# Prompts that ask for long answers, for throughput (a real model stops early otherwise).
LONG_PROMPTS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe a walk through a busy market, with every sound and smell.",
    "Write a long letter to a friend about a trip to the mountains.",
]


# --- the guard and the report ---------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def cuda() -> str:
    """Fail, never skip, without a GPU: see the module docstring."""
    if not torch.cuda.is_available():
        pytest.fail(NO_CUDA, pytrace=False)
    return torch.cuda.get_device_name(0)


class GpuReport:
    """reports/gpu_tests.json: the machine, the versions, then one entry per test."""

    def __init__(self, path: Path, device: str) -> None:
        self.path = path
        props = torch.cuda.get_device_properties(0)
        self.data: dict[str, Any] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "device": device,
            "device_count": torch.cuda.device_count(),
            "device_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "bf16": torch.cuda.get_device_capability(0) >= (8, 0),
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "versions": package_versions(
                ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "vllm")
            ),
            "tests": {},
        }
        self._write()

    def record(self, test: str, **figures: Any) -> None:
        self.data["tests"].setdefault(test, {}).update(figures)
        self._write()

    def note(self, key: str, value: Any) -> None:
        """A fact about the whole run, beside the machine and the versions."""
        self.data[key] = value
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.data, indent=2) + "\n", encoding="utf-8")
        partial.replace(self.path)


@pytest.fixture(scope="session")
def report(cuda: str) -> GpuReport:
    return GpuReport(REPORT, cuda)


@pytest.fixture
def record(report: GpuReport, request: pytest.FixtureRequest):
    """record(key=value, ...) files figures under this test's name."""
    return lambda **figures: report.record(request.node.name, **figures)


# --- training on the GPU ----------------------------------------------------------------------


class MemoryProbe(TrainerCallback):
    """What is on the device when training starts (the model, no optimizer state yet), and
    how the base was quantized."""

    def __init__(self) -> None:
        self.at_start = 0
        self.quantized: list[Any] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.at_start = torch.cuda.memory_allocated()
        if importlib.util.find_spec("bitsandbytes") is not None:
            from bitsandbytes.nn import Linear4bit

            self.quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]


def train_on_gpu(config: Any) -> tuple[RunResult, MemoryProbe, dict[str, Any]]:
    """run_training with the device's peak memory measured around it."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    probe = MemoryProbe()
    result = run_training(config, extra_callbacks=(probe,))
    peak = torch.cuda.max_memory_allocated() - before
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    cost = json.loads((result.run_dir / "cost.json").read_text())
    losses = [s["loss"] for s in metrics["steps"] if "loss" in s]
    figures = {
        "steps": metrics["global_step"],
        "dtype": cost["dtype"],
        "quantization": cost["quantization"],
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "tokens_per_s": cost["tokens_per_second"],
        "wall_s": cost["wall_seconds"],
        "model_memory_at_start_mib": round((probe.at_start - before) / MIB, 1),
        "peak_memory_mib": round(peak / MIB, 1),
    }
    return result, probe, figures


def expected_dtype() -> str:
    """What the project picks: bf16 from compute capability 8.0 (torch's is_bf16_supported
    also counts emulation)."""
    from {{ cookiecutter.package_name }}.device import native_bf16

    return "bfloat16" if native_bf16("cuda") else "float16"


def check_nf4(probe: MemoryProbe) -> None:
    assert probe.quantized, "no bitsandbytes Linear4bit layer: the base was not quantized"
    assert {m.weight.quant_type for m in probe.quantized} == {"nf4"}
    assert {m.compute_dtype for m in probe.quantized} == {getattr(torch, expected_dtype())}


@pytest.fixture(scope="session")
def ticket_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_ticket_data(tmp_path_factory.mktemp("gpu-tickets"))


def test_qlora_nf4_trains_the_tiny_model(tiny_model_dir, ticket_data, tmp_path, record):
    config = tiny_config(
        tiny_model_dir, ticket_data, tmp_path, "quantization.mode=4bit", "train.max_steps=60",
        "train.logging_steps=5", "train.save_steps=1000", "data.eval=null",
        "output.run_name=qlora-tiny",
    )  # fmt: skip
    result, probe, figures = train_on_gpu(config)
    record(**figures, peak_memory_budget_mib=TINY_PEAK_BUDGET // MIB)
    assert result.completed
    check_nf4(probe)
    assert all(m.in_features % BNB_BLOCKSIZE == 0 for m in probe.quantized)
    assert figures["dtype"] == expected_dtype()
    assert figures["last_loss"] < 0.5 * figures["first_loss"], figures
    assert figures["peak_memory_mib"] * MIB < TINY_PEAK_BUDGET, figures


class LoraBAtStart(TrainerCallback):
    """The largest |lora_B| when training starts: zero for peft's default init."""

    largest = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.largest = max(
            p.abs().max().item() for n, p in model.named_parameters() if "lora_B" in n
        )


def test_loftq_init_fits_the_adapter_to_the_4bit_error(
    tiny_model_dir, ticket_data, tmp_path, record
):
    config = tiny_config(
        tiny_model_dir, ticket_data, tmp_path, "quantization.mode=4bit", "lora.init=loftq",
        "train.max_steps=5", "train.logging_steps=1", "data.eval=null", "output.run_name=loftq",
    )  # fmt: skip
    start = LoraBAtStart()
    result = run_training(config, extra_callbacks=(start,))
    assert result.completed
    record(lora_b_max_at_start=start.largest)
    assert start.largest > 0, "LoftQ sets lora_B from the quantization residual; it stayed zero"
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # The adapter records its 4-bit base, and the merge applies it there, as trained.
    from {{ cookiecutter.package_name }}.merge import merge_run
    from {{ cookiecutter.package_name }}.quantized_base import read

    fitted = read(result.run_dir / "adapter")
    assert fitted is not None and fitted.quant_type == "nf4" and fitted.double_quant, fitted
    record(fitted_to=fitted.__dict__)
    assert (merge_run(result.run_dir) / "config.json").is_file()


def cached_model(name: str) -> Path | None:
    """A local folder, or the model's snapshot in the Hugging Face cache; never downloaded."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError: not in the cache
        return None


@pytest.fixture(scope="session")
def base_model_dir(report: GpuReport) -> Path:
    """The configured base model from a local folder or the Hugging Face cache, or the folder
    in $GPU_TESTS_BASE_MODEL. Missing, the base-model tests fail and say how to get one: a
    skip would leave the suite green without its largest tests."""
    name = load_config(CONFIG).model.name_or_path
    override = os.environ.get(BASE_MODEL_ENV)
    folder = Path(override).expanduser().resolve() if override else cached_model(name)
    if folder is None:
        from huggingface_hub.constants import HF_HUB_CACHE

        pytest.fail(
            f"base model {name!r} is not in the Hugging Face cache ({HF_HUB_CACHE}) and the "
            f"GPU tests never download: run `hf download {name}` once, set HF_HOME to a cache "
            f"that holds it, or set {BASE_MODEL_ENV} to a model folder (`python "
            "tools/stand_in_base.py DIR` writes a random-weight stand-in of the default's shape)",
            pytrace=False,
        )
    if not (folder / "config.json").is_file() or not list(folder.glob("*.safetensors")):
        pytest.fail(f"{folder} has no config.json or *.safetensors: not a model", pytrace=False)
    mark = folder / STAND_IN_MARK
    stand_in = json.loads(mark.read_text()) if mark.is_file() else None
    report.note(
        "base_model",
        {"configured": name, "used": str(folder), "stand_in": stand_in is not None}
        | ({"note": stand_in["note"]} if stand_in else {}),
    )
    return folder


def bf16_size(model_dir: Path) -> int:
    """Bytes the model's weights take in bf16, read from the safetensors headers."""
    from safetensors import safe_open

    count = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open is not a dict)
                count += math.prod(weights.get_slice(key).get_shape())
    return 2 * count


@pytest.fixture(scope="session")
def base_qlora_run(base_model_dir, tmp_path_factory) -> tuple[RunResult, MemoryProbe, dict]:
    """configs/train.yaml on the base model and the bundled tickets, 4-bit, 20 steps."""
    config = load_config(
        CONFIG,
        [
            f"model.name_or_path={base_model_dir}",
            f"data.train={PROJECT / 'data' / 'tickets_train.jsonl'}",
            "data.eval=null", "data.max_length=256", "quantization.mode=4bit",
            "train.max_steps=20", "train.batch_size=8", "train.logging_steps=5",
            "train.save_steps=1000", f"output.dir={tmp_path_factory.mktemp('base-runs')}",
            "output.run_name=qlora-base",
        ],
    )  # fmt: skip
    return train_on_gpu(config)


def test_qlora_nf4_trains_the_base_model(base_model_dir, base_qlora_run, record):
    result, probe, figures = base_qlora_run
    bf16_bytes = bf16_size(base_model_dir)
    budget = bf16_bytes + BASE_ACTIVATION_ALLOWANCE
    record(
        model=load_config(CONFIG).model.name_or_path, **figures,
        base_bf16_weights_mib=round(bf16_bytes / MIB, 1), peak_memory_budget_mib=budget // MIB,
    )  # fmt: skip
    assert result.completed
    check_nf4(probe)
    assert figures["dtype"] == expected_dtype()
    assert figures["last_loss"] < figures["first_loss"], figures
    # The memory saving QLoRA is for: the quantized base, its fp32 norms and embeddings
    # (as peft prepares them) and the LoRA weights take less than the bf16 weights alone.
    assert figures["model_memory_at_start_mib"] * MIB < bf16_bytes, figures
    assert figures["peak_memory_mib"] * MIB < budget, figures


# --- merged == adapter on the GPU -------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_lora_run(tiny_model_dir, ticket_data, tmp_path_factory) -> tuple[RunResult, dict]:
    """A LoRA run (no quantization) on the tiny model, on the GPU, in the device's dtype."""
    config = tiny_config(
        tiny_model_dir, ticket_data, tmp_path_factory.mktemp("lora-runs"), "train.max_steps=60",
        "train.logging_steps=5", "train.save_steps=1000", "data.eval=null",
        "output.run_name=lora-tiny",
    )  # fmt: skip
    result, _, figures = train_on_gpu(config)
    assert result.completed
    return result, figures


@contextmanager
def exact_fp32_matmuls() -> Iterator[None]:
    """float32 CUDA matmuls in full float32 (no TF32) inside, the setting restored after.
    Through `fp32_precision`: once anything in the process has used that API, torch raises
    on reading the older `allow_tf32` flag."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def logits_of(model_dir: Path, adapter: Path | None, ids: torch.Tensor, dtype) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(ids.to("cuda")).logits.float()


def test_merged_model_equals_adapter_model_on_gpu(tiny_model_dir, tiny_lora_run, record):
    from transformers import AutoTokenizer

    from {{ cookiecutter.package_name }}.chat import prompt_ids
    from {{ cookiecutter.package_name }}.merge import merge_run

    run, training = tiny_lora_run
    record(training=training)
    merged_dir = merge_run(run.run_dir)
    adapter = run.run_dir / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ticket = conversations(PROJECT / "data" / "tickets_eval.jsonl")[0][1:2]  # one user turn
    ids = torch.tensor([prompt_ids(tokenizer, ticket)])
    # fp32 with TF32 off: merged and adapter differ only by summation order.
    with exact_fp32_matmuls():
        expected = logits_of(tiny_model_dir, adapter, ids, torch.float32)
        got = logits_of(merged_dir, None, ids, torch.float32)
        base = logits_of(tiny_model_dir, None, ids, torch.float32)
    fp32_diff = (got - expected).abs().max().item()
    # In bf16 (8-bit mantissa, steps of 0.4 %) the merged W + BA is rounded once and the
    # adapter's x W + x B A twice: equal within a few per cent of the logit scale, while
    # the adapter itself moves the logits by far more than that.
    low = getattr(torch, expected_dtype())
    expected_low = logits_of(tiny_model_dir, adapter, ids, low)
    got_low = logits_of(merged_dir, None, ids, low)
    scale = expected_low.abs().max().item()
    low_diff = (got_low - expected_low).abs().max().item()
    adapter_effect = (base - expected).abs().max().item()
    record(
        fp32_max_abs_diff=fp32_diff, low_precision=str(low).removeprefix("torch."),
        low_precision_max_abs_diff=low_diff, logit_scale=scale, adapter_effect=adapter_effect,
    )  # fmt: skip
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-3), fp32_diff
    assert low_diff <= 3e-2 * scale, (low_diff, scale)
    assert adapter_effect > 10 * 3e-2 * scale, "the adapter barely changes the model"


# --- serving on the GPU -----------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(server: Server, model: str, concurrency: int, requests: int, max_tokens: int):
    """`requests` streamed chat completions, `concurrency` at a time: client-side TTFT
    (first content token), end-to-end latency, and output tokens per second overall."""
    gate = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300
    ) as client:

        async def one(i: int) -> tuple[float, float, int]:
            async with gate:
                started = time.perf_counter()
                first = None
                tokens = 0
                stream = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": LONG_PROMPTS[i % len(LONG_PROMPTS)]}],
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - started
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                total = time.perf_counter() - started
                return (total if first is None else first), total, tokens

        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - started
    ttfts, latencies, tokens = zip(*results, strict=True)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "max_tokens": max_tokens,
        "output_tokens": sum(tokens),
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(sum(tokens) / wall, 1),
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p90_s": round(percentile(list(ttfts), 0.9), 4),
        "latency_p50_s": round(statistics.median(latencies), 4),
    }


@pytest.mark.parametrize("which", ["tiny", "base"])
def test_server_throughput_and_ttft_on_gpu(which, request, tmp_path, record):
    """Reported, not asserted against the clock: a number that depends on the card is a
    measurement, not a pass/fail condition. Asserted: it runs on CUDA and every request
    gets its tokens."""
    model_dir = request.getfixturevalue("tiny_model_dir" if which == "tiny" else "base_model_dir")
    gc.collect()
    torch.cuda.empty_cache()  # the server sizes its KV cache from the memory still free
    port = free_port()
    command = serve_command(model_dir, {}, "model.served_name=base", f"server.port={port}")
    server = start_server(command, port, tmp_path / "server.log", serve_env(KEY))
    try:
        levels = [measure_level(server, 1, 4), measure_level(server, 16, 32)]
        cold_start = server.metrics().get('llm_cold_start_seconds{phase="ready"}')
    finally:
        server.stop()
    log = server.log.read_text()
    record(model=str(model_dir), cold_start_ready_s=cold_start, levels=levels)
    assert re.search(r"ready after .* on cuda", log), log[-2000:]
    for level in levels:
        assert level["output_tokens"] >= level["requests"], level


def measure_level(server: Server, concurrency: int, requests: int) -> dict[str, Any]:
    return asyncio.run(load(server, "base", concurrency, requests, max_tokens=128))


def test_vllm_engine_serves_the_base_and_an_adapter(
    base_model_dir, base_qlora_run, tmp_path, record
):
    vllm_python = PROJECT / ".venv-vllm" / "bin" / "python"
    if not vllm_python.is_file():
        pytest.skip(f"no vLLM environment at {vllm_python}: `nox -s vllm_env` makes it")
    result = base_qlora_run[0]
    gc.collect()
    torch.cuda.empty_cache()  # vLLM checks that its share of the device memory is free
    port = free_port()
    vllm_args = '["--enforce-eager", "--gpu-memory-utilization", "0.5"]'
    command = serve_command(
        base_model_dir, {"tickets": result.run_dir / "adapter"}, "model.served_name=base",
        f"server.port={port}", "engine.kind=vllm", f"engine.vllm_python={vllm_python}",
        "model.max_context=1024", f"engine.vllm_args={vllm_args}",
    )  # fmt: skip
    log = tmp_path / "vllm.log"
    server = start_server(command, port, log, serve_env(KEY), ready_path="/health", timeout=600)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        ticket = conversations(PROJECT / "data" / "tickets_eval.jsonl")[0][:2]
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model="tickets", messages=ticket, max_tokens=8, temperature=0
        )
        seconds = time.perf_counter() - started
        served = {m.id for m in client.models.list().data}
    finally:
        server.stop()
    record(
        cold_start_ready_s=round(server.ready_seconds, 2), completion_s=round(seconds, 4),
        answer=reply.choices[0].message.content, completion_tokens=reply.usage.completion_tokens,
    )  # fmt: skip
    assert {"base", "tickets"} <= served
    assert reply.model == "tickets"
    assert reply.choices[0].message.content.strip()
    assert reply.usage.completion_tokens >= 1


# --- several GPUs -----------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_ddp_on_two_gpus(quantization, tiny_model_dir, ticket_data, tmp_path, capfd, record):
    """`train --num-processes 2 --accelerate-config configs/accelerate/ddp.yaml`: one process
    per GPU, each on its own device (4-bit weights cannot be moved after loading)."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"DDP needs 2 GPUs; {torch.cuda.device_count()} visible")
    from {{ cookiecutter.package_name }}.cli import main
    from {{ cookiecutter.package_name }}.runs import RunFolder

    code = main(
        [
            "train", "--config", str(CONFIG), "--num-processes", "2",
            "--accelerate-config", str(PROJECT / "configs" / "accelerate" / "ddp.yaml"),
            f"model.name_or_path={tiny_model_dir}", f"data.train={ticket_data['train']}",
            "data.eval=null", f"output.dir={tmp_path}", "output.run_name=ddp",
            "train.max_steps=10", "train.batch_size=8", f"quantization.mode={quantization}",
        ]
    )  # fmt: skip
    assert code == 0, capfd.readouterr().err[-3000:]
    run = tmp_path / "ddp"
    cost = json.loads((run / "cost.json").read_text())
    record(processes=2, tokens_per_s=cost["tokens_per_second"], wall_s=cost["wall_seconds"])
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    state = json.loads((RunFolder(run).last_checkpoint() / "trainer_state.json").read_text())
    assert state["global_step"] == 10
    assert cost["dtype"] == expected_dtype()
