"""Is the token-cost meter right? Its throughput and TTFT against two independent timings.

Runs with the baked project's own interpreter, against its package (see baked.py):

    P=build/bench/lora-chat; PY=$P/.venv/bin/python
    $PY benchmarks/meter_accuracy.py --project $P       # tiny random Llama built in code
    $PY benchmarks/meter_accuracy.py --project $P --model DIR --concurrency 8 --requests 128

Starts the project's server once, runs one untimed level at the benchmark's concurrency (the first
real load after a start is slower: allocations, first batch shapes), then `--repeats` rounds,
alternating which goes first:
  - the meter (token_cost's httpx client) runs a load level; over these very requests two
    observers that share no code or clock with the meter time them too: the server's own
    TTFT histogram (sum / count from /metrics; its clock starts when a request arrives, so
    it reads a little lower than any client), and a thread that polls /metrics every 0.25 s
    on its own clock: its window runs from the first poll that sees a request in flight to
    the first that sees none, and its tokens are the completion-token counter's increase;
  - an independent client (the official `openai` package, its own timing around its own
    stream iterator, no shared code) sends the same requests at the same concurrency.
Compared, on the same requests: the meter's TTFT against the server's, its output tokens/s
against the polling observer's (target: within 10%). Between runs: both against the
independent client, means over the rounds; on a machine shared with other work the load
drifts between runs, which this number includes. Writes the project's
reports/meter_accuracy.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import baked

TARGET = 0.10


def server_ttft(metrics: dict[str, float]) -> tuple[float, float]:
    """Sum and count of the server's TTFT histogram, over every model it serves."""
    name = "llm_time_to_first_token_seconds"
    total = sum(v for k, v in metrics.items() if k.startswith(f"{name}_sum"))
    count = sum(v for k, v in metrics.items() if k.startswith(f"{name}_count"))
    return total, count


class Observer(threading.Thread):
    """Polls /metrics on its own clock: requests in flight and completion tokens."""

    def __init__(self, url: str, scrape, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.url, self.scrape, self.interval = url, scrape, interval
        self.samples: list[tuple[float, float, float]] = []  # (time, in flight, tokens)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            metrics = self.scrape(self.url) or {}
            tokens = sum(
                v for k, v in metrics.items() if k.startswith("llm_completion_tokens_total")
            )
            self.samples.append(
                (time.monotonic(), metrics.get("llm_requests_in_flight", 0), tokens)
            )
            self.done.wait(self.interval)

    def tokens_per_s(self) -> float:
        busy = [i for i, (_, flight, _) in enumerate(self.samples) if flight > 0]
        if not busy:
            raise ValueError(
                f"no poll of /metrics (every {self.interval:g} s) saw a request in flight: the "
                "level ran between two polls; send more --requests"
            )
        times = [at for at, _, _ in self.samples]
        first, last = busy[0], busy[-1] + 1  # last: the first poll that sees none in flight
        # Each edge happened between two polls: take the midpoints. A level already running
        # at the first poll, or still running at the last, has that poll for its edge.
        start = (times[max(first - 1, 0)] + times[first]) / 2
        end = (times[last - 1] + times[min(last, len(times) - 1)]) / 2
        return (self.samples[-1][2] - self.samples[0][2]) / (end - start)


async def independent(base_url, api_key, model, prompts, concurrency, max_tokens):
    """The same requests through the openai client, timed around its own stream."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0)
    queue = list(enumerate(prompts))
    ttfts, tokens = [], 0

    async def worker():
        nonlocal tokens
        while queue:
            _, prompt = queue.pop(0)
            start = time.perf_counter()
            first = None
            stream = await client.chat.completions.create(
                model=model,
                messages=prompt.messages,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
                if chunk.usage:
                    tokens += chunk.usage.completion_tokens
            if first is not None:
                ttfts.append(first)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    await client.close()
    return {"ttft_mean_s": statistics.mean(ttfts), "output_tokens_per_s": tokens / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    baked.add_project_argument(parser)
    parser.add_argument("--model", help="model folder or hub id (default: a tiny random Llama)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument(
        "--out", help="the JSON report (default: reports/meter_accuracy.json of the project)"
    )
    args = parser.parse_args()
    project = args.project
    out = Path(args.out or project / "reports" / "meter_accuracy.json")
    baked.check_installed(project)

    # The project's own server, load client and data pipeline.
    config, data_module = baked.module(project, "config"), baked.module(project, "data")
    modeling, money = baked.module(project, "modeling"), baked.module(project, "cost.money")
    coldstart, load = baked.module(project, "cost.coldstart"), baked.module(project, "cost.load")
    scrape = coldstart.scrape

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or str(baked.tiny_model(project, Path(scratch) / "tiny"))
        server = coldstart.OwnServer(None, [], model, {}, Path(scratch) / "server.log")
        server.start(900, print)
        try:
            base_url = server.url + "/v1"
            data = str(project / "data" / "tickets_eval.jsonl")
            records = data_module.load_records(data, config.DataConfig(train=data, eval=None))
            tokenizer = modeling.load_tokenizer(model)
            prompts = load.dataset_prompts([r.messages for r in records], "chat", tokenizer)
            prompts = (prompts * (args.requests // len(prompts) + 1))[: args.requests]
            endpoint = load.Endpoint(base_url, server.config.base_name, max_tokens=args.max_tokens)
            runner = load.LevelRunner(endpoint, prompts, progress=False)
            asyncio.run(runner.warmup(2))
            asyncio.run(runner.run_level("concurrency", args.concurrency, args.requests, 600.0))
            same = (base_url, None, endpoint.model, prompts, args.concurrency, args.max_tokens)
            rounds = []
            for repeat in range(args.repeats):
                other_first = repeat % 2 == 1
                if other_first:
                    other = asyncio.run(independent(*same))
                before = scrape(server.url)
                observer = Observer(server.url, scrape)
                observer.start()
                time.sleep(0.6)
                run = asyncio.run(
                    runner.run_level("concurrency", args.concurrency, args.requests, 600.0)
                )
                time.sleep(0.6)
                observer.done.set()
                observer.join()
                after = scrape(server.url)
                ok = [r for r in run.results if r.ok]
                ttft = money.percentiles([r.first_token for r in ok if r.first_token is not None])
                (s0, c0), (s1, c1) = server_ttft(before), server_ttft(after)
                meter = {
                    "ttft_mean_s": ttft.mean,
                    "output_tokens_per_s": sum(r.completion_tokens for r in ok) / run.duration_s,
                    "server_ttft_mean_s": (s1 - s0) / (c1 - c0),
                    "observer_output_tokens_per_s": observer.tokens_per_s(),
                    "requests_ok": len(ok),
                }
                if not other_first:
                    other = asyncio.run(independent(*same))
                rounds.append(
                    {"repeat": repeat, "first": "independent" if other_first else "meter"}
                    | {"meter": meter, "independent": other}
                )
                print(json.dumps(rounds[-1]), flush=True)
        finally:
            server.stop()

    def rel(a: float, b: float) -> float:
        return abs(a - b) / b

    def mean(path: tuple[str, str]) -> float:
        return statistics.mean(r[path[0]][path[1]] for r in rounds)

    result = {
        "model": args.model or baked.TINY_MODEL,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": rounds,
        "throughput_rel_diff_vs_independent": rel(
            mean(("meter", "output_tokens_per_s")), mean(("independent", "output_tokens_per_s"))
        ),
        "ttft_rel_diff_vs_independent": rel(
            mean(("meter", "ttft_mean_s")), mean(("independent", "ttft_mean_s"))
        ),
        "ttft_rel_diff_vs_server_same_requests": rel(
            mean(("meter", "ttft_mean_s")), mean(("meter", "server_ttft_mean_s"))
        ),
        "throughput_rel_diff_vs_observer_same_requests": rel(
            mean(("meter", "output_tokens_per_s")), mean(("meter", "observer_output_tokens_per_s"))
        ),
        "target": TARGET,
    }
    keys = [k for k in result if "rel_diff" in k]
    same_run = [k for k in keys if k.endswith("same_requests")]
    result["within_target"] = all(result[k] <= TARGET for k in same_run)
    result["between_runs_within_target"] = all(result[k] <= TARGET for k in keys)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for key in keys:
        print(f"{key}: {result[key]:.1%}")
    print(f"same requests within {TARGET:.0%}: {result['within_target']} -> {out}")
    return 0 if result["within_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
