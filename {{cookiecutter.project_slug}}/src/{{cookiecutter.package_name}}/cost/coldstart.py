"""Start our own server and time its cold start; read its Prometheus /metrics.

Timed by the meter from the moment before the process is spawned:
    listening   the HTTP port answers (/health, any status)
    ready       GET /ready says 200 (models loaded and warm); vLLM: GET /health says 200
    first_token the first text event of the first request, sent once /ready says 200
and, as the server reports them in `llm_cold_start_seconds{phase=...}`: imports, weights,
adapters, warmup, and ready (the server's own process start to ready). vLLM has no such
metric: its phases are read from its log (`vllm_log_facts`).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from ..errors import UserError
from ..serving import metric_names
from .schema import ColdStart

if TYPE_CHECKING:
    from .load import RequestResult

PACKAGE = __package__.rpartition(".")[0]
# Between two GETs of /ready. Each one takes the server's GIL from the thread loading the
# model: polled every 10 ms, a 5 s load took 0.7-1.3 s longer. Every 100 ms
# adds at most that much once it is ready. (A readiness probe polls every few seconds.)
READY_POLL_S = 0.1


def parse_prometheus(text: str) -> dict[str, float]:
    """`name{labels} value` lines -> {"name{labels}": value} (comments skipped)."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


def scrape(base_url: str, timeout: float = 5.0) -> dict[str, float] | None:
    """The server's /metrics, or None when it has none (not our server) or is gone."""
    try:
        response = httpx.get(f"{base_url}/metrics", timeout=timeout, trust_env=False)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse_prometheus(response.text)


def _sum(metrics: dict[str, float], name: str) -> float | None:
    found = [v for k, v in metrics.items() if k == name or k.startswith(name + "{")]
    return sum(found) if found else None


def token_counters(metrics: dict[str, float] | None) -> dict[str, float] | None:
    """Prompt and completion tokens the server has counted: over all models, and per
    model under "prompt_tokens/<model>" and "completion_tokens/<model>"."""
    if not metrics:
        return None
    counters = {}
    for key, metric in (
        ("prompt_tokens", metric_names.PROMPT_TOKENS),
        ("completion_tokens", metric_names.COMPLETION_TOKENS),
    ):
        name = metric_names.counter_sample(metric)
        total = _sum(metrics, name)
        if total is None:
            return None
        counters[key] = total
        for sample, value in metrics.items():
            model = re.search(r'[{,]model="((?:[^"\\]|\\.)*)"', sample)
            if sample.startswith(name + "{") and model:
                counters[f"{key}/{model.group(1)}"] = value
    return counters


def counter_delta(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> dict[str, float] | None:
    """What the counters grew by; a series born in between grew from 0."""
    if before is None or after is None:
        return None
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def server_phases(metrics: dict[str, float] | None) -> dict[str, float]:
    """The phases the server reports of its own cold start, in their order."""
    metrics = metrics or {}
    prefix = metric_names.COLD_START + '{phase="'
    samples = {phase: prefix + phase + '"}' for phase in metric_names.COLD_START_PHASES}
    return {phase: metrics[sample] for phase, sample in samples.items() if sample in metrics}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# What says a server is ready: ours loads and warms its models before /ready answers 200;
# vLLM's /health answers once its engine is up.
READY_PROBE = {"transformers": "/ready", "vllm": "/health"}


class NotReady(Exception):
    """The server went away, or was not ready in time."""


def wait_ready(
    url: str, t0: float, timeout_s: float, gone: Callable[[], str | None]
) -> dict[str, float]:
    """Poll `url` until it answers 200: {"listening_s", "ready_s"}, seconds after t0 (the
    spawn). `gone` says why the server is no more (None while it runs)."""
    timings: dict[str, float] = {}
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.perf_counter() < t0 + timeout_s:
            reason = gone()
            if reason:
                raise NotReady(f"{reason} before it was ready")
            try:
                response = client.get(url)
            except httpx.TransportError:
                time.sleep(0.01)
                continue
            timings.setdefault("listening_s", time.perf_counter() - t0)
            if response.status_code == 200:
                timings["ready_s"] = time.perf_counter() - t0
                return timings
            time.sleep(READY_POLL_S)
    raise NotReady(f"the server was not ready after {timeout_s:.0f} s")


class OwnServer:
    """Our `serve` command in a child process on a free loopback port."""

    def __init__(
        self,
        serve_config: str | None,
        overrides: list[str],
        model: str | None,
        adapters: dict[str, str],
        log_path: Path,
    ) -> None:
        from ..serving.config import load_serve_config

        adapter_args = [f"{name}={path}" for name, path in adapters.items()]
        self.port = free_port()
        placement = ["server.host=127.0.0.1", f"server.port={self.port}"]
        # Checked here, so a bad config is a clear error before anything starts.
        self.config = load_serve_config(serve_config, [*overrides, *placement], model, adapter_args)
        self.command = [sys.executable, "-m", PACKAGE, "serve"]
        if serve_config:
            self.command += ["--config", serve_config]
        if model:
            self.command += ["--model", model]
        self.command += [f"--adapter={item}" for item in adapter_args]
        self.command += [*overrides, *placement]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.spawned_wall: dt.datetime | None = None
        self._vllm_log: VllmLog | None = None
        self.timings: dict[str, float] = {}

    def alive(self) -> str | None:
        """None while the process runs, else why it is gone."""
        if self.process is None or self.process.poll() is None:
            return None
        code = self.process.returncode
        return f"the server process exited with code {code} (log: {self.log_path})"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def vllm_log(self) -> VllmLog:
        """What vLLM's log says of its start; read once, after it is ready."""
        if self._vllm_log is None:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
            self._vllm_log = vllm_log_facts(text, self.spawned_wall)
        return self._vllm_log

    def start(self, ready_timeout_s: float, progress: Callable[[str], None] = print) -> None:
        """Spawn, then poll until ready; fills `timings` (seconds after the spawn)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        progress(f"starting the server: {' '.join(self.command)}")
        with self.log_path.open("w") as sink:
            self.spawned_wall = dt.datetime.now()
            t0 = time.perf_counter()
            self.spawned_at = t0
            self.process = subprocess.Popen(
                self.command, stdout=sink, stderr=subprocess.STDOUT, env=env
            )
        try:
            self.timings = wait_ready(
                self.url + READY_PROBE[self.config.engine.kind], t0, ready_timeout_s, self.alive
            )
        except NotReady as error:
            self.stop()
            raise UserError(f"{error} (server.ready_timeout_s):\n{self.log_tail()}") from None

    def stop(self, grace_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# vLLM's log lines: "(EngineCore pid=12) INFO 12-07 06:39:33 [core.py:133] message"
VLLM_LINE = re.compile(
    r"^\((?P<process>[A-Za-z]+)[^)]*\) +[A-Z]+ +"
    r"(?P<stamp>\d\d-\d\d \d\d:\d\d:\d\d) +\[[^\]]*\] (?P<text>.*)$"
)
# What vLLM times itself, as it words it, and the phase name on the card.
VLLM_TIMED = {
    "Initializing model took": "model_init",
    "Loading weights took": "weights",
    "init engine (profile, create kv cache, warmup model) took": "engine_init",
}
# The first line of each process: when it had started and imported vLLM.
VLLM_PROCESSES = {"APIServer": "api_server_start", "EngineCore": "engine_core_start",
                  "Worker": "worker_start"}  # fmt: skip
# torch.compile (engine.vllm_compile), timed from the log's clock: it starts with the first
# line and ends with the second, whether the graph was compiled or loaded from the cache.
COMPILE_START, COMPILE_END = "Warming up model for the compilation", "AOT compiled function"
CACHE_MISSED = "Compiling model again due to a load failure"


@dataclass
class VllmLog:
    """What a vLLM server's log says about its start and what it runs."""

    phases: dict[str, float] = field(default_factory=dict)
    version: str | None = None
    device: str | None = None
    dtype: str | None = None
    notes: list[str] = field(default_factory=list)


def vllm_log_facts(text: str, spawned: dt.datetime | None) -> VllmLog:
    """Phases of a vLLM start from its log: each process's start and the compile (to the
    second, the log's clock), and what vLLM times itself (weights, KV cache and warm-up)."""
    facts = VllmLog()
    year = (spawned or dt.datetime.now()).year
    previous = spawned.replace(microsecond=0) if spawned else None
    compiling = None
    for line in text.splitlines():
        match = VLLM_LINE.match(line.strip())
        if not match:
            continue
        message = match["text"]
        stamp = dt.datetime.strptime(f"{year}-{match['stamp']}", "%Y-%m-%d %H:%M:%S")
        phase = VLLM_PROCESSES.get(match["process"])
        if phase and phase not in facts.phases and previous is not None:
            facts.phases[phase] = max((stamp - previous).total_seconds(), 0.0)
            previous = stamp
        for words, name in VLLM_TIMED.items():
            if words in message and (seconds := re.search(r"took ([0-9.]+) s", message)):
                facts.phases[name] = facts.phases.get(name, 0.0) + float(seconds[1])
        if COMPILE_START in message:
            compiling = stamp
        elif COMPILE_END in message and compiling is not None:
            facts.phases["compile"] = (stamp - compiling).total_seconds()
        if CACHE_MISSED in message:
            reason = message.partition("reason: ")[2] or "not logged"
            facts.notes.append(f"vLLM's compile cache did not load ({reason}): it compiled again")
        if "LLM engine (v" in message:  # its config line: version, dtype and device
            _engine_config(facts, message)
    return facts


def _engine_config(facts: VllmLog, message: str) -> None:
    for name, pattern in (
        ("version", r"LLM engine \(v([^)]+)\)"),
        ("dtype", r"dtype=torch\.(\w+)"),
        ("device", r"device_config=(\w+)"),
    ):
        if getattr(facts, name) is None and (found := re.search(pattern, message)):
            setattr(facts, name, found[1])


# The cold start's timings, seconds after the spawn (first_request_ttft_s, warm_request_ttft_s:
# after their own sending).
TIMINGS = ("listening_s", "ready_s", "first_token_s", "first_request_ttft_s", "warm_request_ttft_s")


def cold_start_section(
    server: OwnServer,
    first: RequestResult | None,
    metrics: dict[str, float] | None,
    warm: RequestResult | None = None,
) -> ColdStart:
    """The card's cold-start numbers: ours (spawn to ...) and the server's own phases.

    `first` is the first request, sent the moment the server was ready, timed from the
    spawn (its `start` is seconds after the spawn).
    """
    timings = dict(server.timings)
    if first is not None and first.ok:
        reference = first.first_token if first.first_token is not None else first.end
        if reference is not None:
            timings["first_token_s"] = first.start + reference
            timings["first_request_ttft_s"] = reference
    if warm is not None and warm.ok and warm.first_token is not None:
        timings["warm_request_ttft_s"] = warm.first_token
    phases = server_phases(metrics)
    outside = None
    note = None
    if server.config.engine.kind == "vllm":
        logged = server.vllm_log()
        phases = logged.phases
        note = "; ".join([
            "phases from vLLM's log: each process's start and the compile to the second (its "
            "log's clock), the rest as vLLM times them", *logged.notes,
        ])  # fmt: skip
    if "ready" in phases and "ready_s" in timings:
        outside = timings["ready_s"] - phases["ready"]
        if outside < 0:
            # Without /proc the server dates its own start from psutil's process create
            # time, which can be up to 1 s early (serving/runtime.py process_start_time).
            note = (
                f"the server's own ready time ({phases['ready']:.2f} s) exceeds the measured "
                f"{timings['ready_s']:.2f} s: its process-start clock is coarse; trust ready_s"
            )
            outside = None
    return ColdStart(
        measured=True,
        source="own server process started by the meter",
        command=server.command,
        **{key: timings.get(key) for key in TIMINGS},
        server_phases_s=phases,
        floors=[],
        # Before the server's clock starts: interpreter start until the process exists.
        outside_server_s=outside,
        first_request_error=None if first is None or first.ok else first.error,
        note=note,
    )


def reported_cold_start(metrics: dict[str, float] | None) -> ColdStart:
    """An endpoint the meter did not start: only the phases its /metrics reports, if any."""
    phases = server_phases(metrics)
    unknown = ColdStart.model_fields.keys() - {"measured", "source", "server_phases_s", "floors"}
    return ColdStart(
        measured=False,
        source="the endpoint's /metrics (the meter did not start it)"
        if phases
        else "not measured: the meter did not start the endpoint",
        server_phases_s=phases,
        floors=[],
        **dict.fromkeys(unknown),  # every timing: null
    )
