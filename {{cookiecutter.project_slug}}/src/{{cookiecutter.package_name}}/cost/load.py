"""The load client: streamed OpenAI-compatible requests, timed on arrival, at a load level.

Why raw httpx and not the `openai` package: the meter must time each server-sent event
when its bytes arrive, see the HTTP status and error body of a failed request as they are,
and never retry (a retry with back-off would hide an error inside a latency). The openai
client retries by default, parses every chunk into pydantic objects before handing it
over, and wraps transport errors; here each `data:` line is timestamped the moment httpx
yields it and parsed after. Its timings are checked against the openai client timing the
same requests, so the check and the meter share no code path.

A level is one concurrency (N requests in flight, each replaced when it finishes) or one
Poisson arrival rate (exponential gaps from a seeded generator). Every level stops at its
request count or its time limit, whichever comes first; requests still running at the time
limit are cancelled and reported as such, never counted as served.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx


@dataclass
class Prompt:
    messages: list[dict[str, str]] | None = None  # chat API
    text: str | None = None  # completions API
    expected_prompt_tokens: int | None = None  # known when we hold the server's tokenizer


def warm_prompt(prompts: list[Prompt]) -> Prompt:
    """The prompt to time a warm request with after the first (prompts[0]): another one of
    the nearest length. The first again would find its whole prompt in the server's prefix
    cache and seem faster than any new request is."""
    first, others = prompts[0], prompts[1:]
    length = first.expected_prompt_tokens
    if not others or length is None:
        return others[0] if others else first
    return min(others, key=lambda p: abs((p.expected_prompt_tokens or 0) - length))


@dataclass
class Endpoint:
    base_url: str  # ".../v1"
    model: str
    api: str = "chat"  # chat | completions
    api_key: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    ignore_eos: bool = False
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 300.0

    @property
    def path(self) -> str:
        return "/chat/completions" if self.api == "chat" else "/completions"

    def client(
        self, connections: int, transport: httpx.AsyncBaseTransport | None = None
    ) -> httpx.AsyncClient:
        """A pool of `connections` to the endpoint, with its timeouts (and no proxy taken
        from the environment). `transport`: tests pass an httpx.MockTransport."""
        timeout = httpx.Timeout(self.request_timeout_s, connect=self.connect_timeout_s)
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(
            timeout=timeout, limits=limits, trust_env=False, transport=transport
        )

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def body(self, prompt: Prompt) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.api == "chat":
            body["messages"] = prompt.messages
        else:
            body["prompt"] = prompt.text
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension; other servers ignore unknown fields
        return body


class MixSchedule:
    """The model of each next request, in the mix's shares: interleaved, with no random
    draw, so after n requests each model has had n * share of them, give or take one, and
    two runs send the same sequence."""

    def __init__(self, shares: dict[str, float]) -> None:
        self.shares = dict(shares)
        self.sent = dict.fromkeys(shares, 0)

    def next(self) -> str:
        count = sum(self.sent.values()) + 1
        model = max(self.shares, key=lambda m: self.shares[m] * count - self.sent[m])
        self.sent[model] += 1
        return model


@dataclass
class RequestResult:
    index: int
    start: float  # seconds after the level started
    ok: bool = False
    status: int | None = None
    error: str | None = None
    error_kind: str | None = None  # http_4xx http_5xx timeout connect stream cancelled
    first_token: float | None = None  # seconds after start: first chunk with text
    end: float | None = None  # seconds after start: [DONE] (or the failure)
    chunk_times: list[float] = field(default_factory=list)  # seconds after start
    prompt_tokens: int | None = None  # from the server's usage
    completion_tokens: int | None = None
    content_chunks: int = 0
    text: str = ""
    finish_reason: str | None = None
    expected_prompt_tokens: int | None = None
    model: str = ""  # the `model` it was sent to

    @property
    def cancelled(self) -> bool:
        return self.error_kind == "cancelled"


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
        error = data.get("error", data)
        return str(error.get("message") or error if isinstance(error, dict) else error)[:300]
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace").strip()[:300] or "(empty body)"


async def stream_request(
    client: httpx.AsyncClient, endpoint: Endpoint, prompt: Prompt, index: int, t0: float
) -> RequestResult:
    """One streamed request. Never raises for a failed request: the result says what failed.

    Cancellation (the level's time limit) is recorded on the result, then re-raised.
    """
    start = time.perf_counter()
    result = RequestResult(
        index=index,
        start=start - t0,
        expected_prompt_tokens=prompt.expected_prompt_tokens,
        model=endpoint.model,
    )

    def since() -> float:
        return time.perf_counter() - start

    done = False
    try:
        async with client.stream(
            "POST", endpoint.base_url + endpoint.path, json=endpoint.body(prompt),
            headers=endpoint.headers(),
        ) as response:  # fmt: skip
            result.status = response.status_code
            if response.status_code >= 400:
                body = await response.aread()
                result.error_kind = "http_4xx" if response.status_code < 500 else "http_5xx"
                result.error = f"HTTP {response.status_code}: {_error_message(body)}"
                result.end = since()
                return result
            done = await _read_stream(response, endpoint.api, result, since)
    except asyncio.CancelledError:
        result.error_kind, result.error = "cancelled", "cancelled at the level's time limit"
        result.end = since()
        raise
    except httpx.HTTPError as error:
        result.error_kind, result.error = _transport_error(error, result.status is not None)
    finally:
        if result.end is None:
            result.end = since()
    # `transformers serve` (5.x) closes the stream after its last chunk (finish_reason and
    # usage) without `data: [DONE]`: that is a complete answer; a stream cut short is not.
    finished = result.finish_reason is not None and result.completion_tokens is not None
    if result.error is None and not done and not finished:
        result.error_kind, result.error = "stream", "the stream ended without data: [DONE]"
    result.ok = result.error is None
    return result


async def _read_stream(
    response: httpx.Response, api: str, result: RequestResult, since: Callable[[], float]
) -> bool:
    """Each `data:` event, timed when its line arrived; True when the stream said [DONE]."""
    async for line in response.aiter_lines():
        arrived = since()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return True
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            result.error_kind, result.error = "stream", f"bad event: {payload[:200]}"
            return False
        if "error" in event:
            result.error_kind = "stream"
            result.error = f"error event: {_error_message(payload.encode())}"
            return False
        _take_event(event, api, result, arrived)
    return False


def _take_event(event: dict[str, Any], api: str, result: RequestResult, arrived: float) -> None:
    usage = event.get("usage")
    if usage:
        result.prompt_tokens = usage.get("prompt_tokens")
        result.completion_tokens = usage.get("completion_tokens")
    for choice in event.get("choices") or []:
        if api == "chat":
            piece = (choice.get("delta") or {}).get("content") or ""
        else:
            piece = choice.get("text") or ""
        if piece:
            result.content_chunks += 1
            result.chunk_times.append(arrived)
            result.text += piece
            if result.first_token is None:
                result.first_token = arrived
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]


def _transport_error(error: httpx.HTTPError, started: bool) -> tuple[str, str]:
    """(error_kind, message) of a request that failed below HTTP."""
    if isinstance(error, httpx.TimeoutException):
        return "timeout", f"timed out ({error.__class__.__name__})"
    if isinstance(error, httpx.ConnectError | httpx.RemoteProtocolError | httpx.ReadError):
        what = "connection lost mid-stream" if started else "cannot connect"
        return ("stream" if started else "connect"), f"{what}: {error.__class__.__name__}: {error}"
    return "connect", f"{error.__class__.__name__}: {error}"


@dataclass
class LevelRun:
    level: float
    mode: str
    results: list[RequestResult]
    duration_s: float
    stopped_by: str  # "request count" | "time limit" | "abort: ..."

    @property
    def aborted(self) -> bool:
        return self.stopped_by.startswith("abort")


class LevelRunner:
    """Runs load levels against one endpoint with one HTTP connection pool."""

    def __init__(
        self,
        endpoint: Endpoint,
        prompts: Sequence[Prompt],
        *,
        alive: Callable[[], str | None] | None = None,
        abort_after_errors: int = 20,
        progress: bool = True,
        max_concurrency: int | None = None,
        on_result: Callable[[RequestResult], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        mix: dict[str, float] | None = None,
    ) -> None:
        if not prompts:
            raise ValueError("no prompts")
        self.endpoint, self.prompts = endpoint, list(prompts)
        self.alive = alive or (lambda: None)
        self.watches_server = alive is not None
        self.abort_after_errors = abort_after_errors
        self.progress = progress
        self.max_concurrency = max_concurrency  # Poisson: later arrivals wait for a slot
        self.on_result = on_result
        self.transport = transport  # tests: httpx.MockTransport
        self.mix = MixSchedule(mix) if mix else None
        self._next_prompt = 0
        self._consecutive_failures = 0
        self._abort: str | None = None

    def _prompt(self) -> Prompt:
        prompt = self.prompts[self._next_prompt % len(self.prompts)]
        self._next_prompt += 1
        return prompt

    def _seen(self, result: RequestResult) -> None:
        if result.cancelled:
            return
        if result.ok:
            self._consecutive_failures = 0
            return
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.abort_after_errors:
            self._abort = (
                f"{self._consecutive_failures} requests in a row failed (last: {result.error})"
            )

    async def _one(self, client: httpx.AsyncClient, index: int, t0: float) -> RequestResult:
        endpoint = self.endpoint
        if self.mix is not None:
            endpoint = replace(endpoint, model=self.mix.next())
        return await asyncio.wait_for(
            stream_request(client, endpoint, self._prompt(), index, t0),
            timeout=self.endpoint.request_timeout_s + self.endpoint.connect_timeout_s,
        )

    async def warmup(self, count: int) -> list[RequestResult]:
        """Requests before the sweep, one at a time, not counted in any level."""
        results = []
        async with self.endpoint.client(2, self.transport) as client:
            t0 = time.perf_counter()
            for index in range(count):
                try:
                    results.append(await self._one(client, index, t0))
                except TimeoutError:
                    results.append(
                        RequestResult(index, 0.0, error_kind="timeout", error="timed out")
                    )
        return results

    async def run_level(
        self, mode: str, level: float, requests: int, time_limit_s: float, seed: int = 0
    ) -> LevelRun:
        concurrency = int(level) if mode == "concurrency" else None
        pool = concurrency or self.max_concurrency or 1024
        if self.mix is not None:  # each level starts the mix afresh: its shares are its own
            self.mix = MixSchedule(self.mix.shares)
        async with self.endpoint.client(pool, self.transport) as client:
            label = f"concurrency {concurrency}" if concurrency else f"{level:g} req/s (Poisson)"
            active = _ActiveLevel(self, client, requests, concurrency, label)
            try:
                await active.drive(level, time_limit_s, random.Random(seed))
            finally:
                await active.cancel_pending()
            duration = active.elapsed()
        await active.confirm_server()
        return LevelRun(level, mode, active.results, duration, active.stopped_by)


class _ActiveLevel:
    """One running level: its requests in flight, its results and its progress bar."""

    def __init__(
        self,
        runner: LevelRunner,
        client: httpx.AsyncClient,
        requests: int,
        concurrency: int | None,
        label: str,
    ) -> None:
        from tqdm.auto import tqdm

        self.runner, self.client = runner, client
        self.requests, self.concurrency = requests, concurrency
        self.results: list[RequestResult] = []
        self.tasks: set[asyncio.Task[RequestResult]] = set()
        self.launched = 0
        self.output_tokens = 0
        self.stopped_by = "request count"
        self.bar = tqdm(
            total=requests, desc=label, unit="req", disable=not runner.progress, leave=True
        )
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _finished(self, task: asyncio.Task[RequestResult]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:  # asyncio.TimeoutError from wait_for
            result = RequestResult(
                len(self.results), 0.0, error_kind="timeout", error=f"timed out: {error!r}"
            )
        else:
            result = task.result()
        self.results.append(result)
        self.runner._seen(result)
        if self.runner.on_result is not None:
            self.runner.on_result(result)
        self.output_tokens += result.completion_tokens or 0
        self.bar.update(1)
        failed = sum(not r.ok for r in self.results)
        rate = self.output_tokens / max(self.elapsed(), 1e-9)
        self.bar.set_postfix(errors=failed, out_tok_s=f"{rate:.0f}")

    def _launch(self) -> None:
        task = asyncio.ensure_future(self.runner._one(self.client, self.launched, self.t0))
        self.tasks.add(task)
        task.add_done_callback(self._finished)
        self.launched += 1

    def _stop(self, deadline: float, now: float) -> str | None:
        """Why the level stops now, or None while it goes on."""
        reason = self.runner._abort or self.runner.alive()
        if reason:
            return f"abort: {reason}"
        if now >= deadline:
            return "time limit"
        if self.launched >= self.requests and not self.tasks:
            return "request count"
        return None

    async def drive(self, level: float, time_limit_s: float, rng: random.Random) -> None:
        """Keep the level's load on until its requests are done, its time is up or it
        must abort (`stopped_by` says which)."""
        deadline = self.t0 + time_limit_s
        next_arrival = self.t0
        cap = self.runner.max_concurrency or math.inf
        while True:
            now = time.perf_counter()
            stop = self._stop(deadline, now)
            if stop:
                self.stopped_by = stop
                return
            if self.concurrency is not None:
                while self.launched < self.requests and len(self.tasks) < self.concurrency:
                    self._launch()
            else:
                while (
                    self.launched < self.requests
                    and time.perf_counter() >= next_arrival
                    and len(self.tasks) < cap
                ):
                    self._launch()
                    next_arrival += rng.expovariate(level)
            wait = min(0.05, max(deadline - now, 0.0))
            if self.concurrency is None and self.launched < self.requests:
                wait = min(wait, max(next_arrival - time.perf_counter(), 0.0))
            await self._wait(wait)

    async def confirm_server(self, grace_s: float = 1.0) -> None:
        """A server killed at the end of a level closes its connections a moment before
        its process is seen to exit: after transport failures, give it `grace_s` to show
        it is gone, so such a level is marked partial, not complete."""
        if self.stopped_by.startswith("abort") or not self.runner.watches_server:
            return
        if not any(r.error_kind in ("connect", "stream") for r in self.results):
            return
        deadline = time.perf_counter() + grace_s
        while time.perf_counter() < deadline:
            reason = self.runner.alive()
            if reason:
                self.stopped_by = f"abort: {reason}"
                return
            await asyncio.sleep(0.05)

    async def _wait(self, seconds: float) -> None:
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(seconds)

    async def cancel_pending(self) -> None:
        """Requests cut off by the time limit or an abort: listed, never counted."""
        pending = list(self.tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            now = self.elapsed()
            for _ in pending:
                self.results.append(
                    RequestResult(
                        len(self.results), now, error_kind="cancelled",
                        error=f"cancelled ({self.stopped_by})", end=now,
                    )
                )  # fmt: skip
        self.bar.close()


def dataset_prompts(
    records: Sequence[list[dict[str, str]]], api: str, tokenizer: Any = None
) -> list[Prompt]:
    """Prompts from conversations: every turn up to the last assistant answer (dropped)."""
    prompts = []
    for messages in records:
        turns = list(messages)
        while turns and turns[-1]["role"] == "assistant":
            turns.pop()
        if not turns:
            continue
        prompts.append(_prompt(turns, api, tokenizer))
    return prompts


WORDS = [
    *("order", "invoice", "parcel", "refund", "account", "password", "delivery", "billing"),
    *("error", "screen", "login", "update", "payment", "address", "tracking", "export"),
    *("report", "crash", "browser", "mobile", "settings", "email", "support", "courier"),
]


def synthetic_prompts(
    count: int, input_tokens: int, api: str, tokenizer: Any = None, seed: int = 0
) -> list[Prompt]:
    """`count` distinct prompts whose user text is `input_tokens` tokens long.

    With the server's tokenizer the text is cut to exactly that many tokens (the chat
    template adds its own few); without one, words stand in at about 1.3 tokens each.
    Each prompt starts with a distinct number so no prefix cache can serve it for free.
    """
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        words = [str(index)] + [rng.choice(WORDS) for _ in range(input_tokens * 2)]
        text = " ".join(words)
        if tokenizer is not None:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:input_tokens]
            text = tokenizer.decode(ids)
        else:
            text = " ".join(words[: max(1, round(input_tokens / 1.3))])
        prompts.append(_prompt([{"role": "user", "content": text}], api, tokenizer))
    return prompts


def _prompt(messages: list[dict[str, str]], api: str, tokenizer: Any) -> Prompt:
    if api == "chat":
        expected = None
        if tokenizer is not None:
            from ..chat import prompt_ids

            expected = len(prompt_ids(tokenizer, messages))
        return Prompt(messages=messages, expected_prompt_tokens=expected)
    text = "\n\n".join(m["content"] for m in messages)
    expected = len(tokenizer(text)["input_ids"]) if tokenizer is not None else None
    return Prompt(text=text, expected_prompt_tokens=expected)
