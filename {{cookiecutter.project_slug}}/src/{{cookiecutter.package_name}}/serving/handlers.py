"""The endpoint handlers: one class per endpoint family (app.py routes to them).

ChatHandler and CompletionsHandler share `Generation`: find the engine, bound the answer,
then send it whole or as server-sent events. An `Answer` is one request in flight: its
tokens, its text (stop strings held back), and its bookkeeping when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from ..chat import prompt_ids
from ..inference import SamplingParams
from .config import LimitsSection
from .engine import CutOff, Engine, GenerationError
from .metrics import CONTENT_TYPE, Metrics
from .protocol import (
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    EndDelta,
    ErrorResponse,
    FinishReason,
    Health,
    ModelList,
    Readiness,
    RoleDelta,
    SamplingRequest,
    ServerInfo,
    TextDelta,
    Usage,
    error_response,
)
from .runtime import Runtime
from .structured import GrammarError, schema_of
from .text import TextStream

if TYPE_CHECKING:
    from llguidance import LLMatcher

log = logging.getLogger(__name__)
CLIENT_CLOSED = 499  # status recorded in metrics for requests whose client went away
DONE = "data: [DONE]\n\n"


def error_json(error: ErrorResponse) -> JSONResponse:
    status = error.error.code or 500
    return JSONResponse(error.model_dump(), status_code=status)


def failure(error: BaseException) -> ErrorResponse:
    """The OpenAI error body for a request the engine ended with an error."""
    if isinstance(error, CutOff):
        log.warning("request cut off: %s", error)
        return error_response(str(error), "server_error", None, CutOff.status)
    log.error("generation failed: %s", error)
    return error_response(f"generation failed: {error}", "server_error", None, 500)


def sse(event: BaseModel) -> str:
    return f"data: {event.model_dump_json()}\n\n"


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Answer:
    """One generation request in flight, from submission to its metrics."""

    def __init__(
        self, engine: Engine, ids: list[int], params: SamplingParams, stops: list[str],
        endpoint: str, metrics: Metrics, received: float, matcher: LLMatcher | None = None,
    ) -> None:  # fmt: skip
        self.engine, self.ids, self.params = engine, ids, params
        self.endpoint, self.metrics, self.received = endpoint, metrics, received
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.text = TextStream(engine.tokenizer, stops)
        self._first_token: float | None = None
        metrics.in_flight.inc()
        try:
            self.submission = engine.submit(ids, params, matcher)
        except GenerationError as error:
            metrics.in_flight.dec()
            raise ApiError(
                503, f"the engine refused the request: {error}", "server_error"
            ) from None

    def finish_reason(self) -> FinishReason:
        text = self.text
        if text.stopped_by_string:
            return "stop"
        if text.tokens >= self.params.max_tokens and text.last not in self.engine.eos_ids:
            return "length"
        return "stop"

    def usage(self) -> Usage:
        completion = self.text.tokens
        return Usage(
            prompt_tokens=len(self.ids),
            completion_tokens=completion,
            total_tokens=len(self.ids) + completion,
        )

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's text as it can be sent: stop strings never reach the client."""
        async for new_ids in self.submission.chunks():
            if self._first_token is None:
                self._first_token = time.perf_counter()
                self.metrics.ttft.labels(self.engine.name).observe(
                    self._first_token - self.received
                )
            piece = self.text.push(new_ids)
            if piece:
                yield piece
            if self.text.stopped_by_string:
                return
        tail = self.text.finish()
        if tail:
            yield tail

    def close(self, status: int) -> None:
        """Free the request's KV cache (a no-op when it finished) and count it."""
        name, metrics = self.engine.name, self.metrics
        self.engine.cancel(self.submission)
        metrics.in_flight.dec()
        metrics.requests.labels(self.endpoint, name, str(status)).inc()
        metrics.answered(name, len(self.ids), self.text.tokens)
        metrics.e2e.labels(name).observe(time.perf_counter() - self.received)


class Generation:
    """What chat and completions share; subclasses say how a prompt and an answer look."""

    endpoint: ClassVar[str]
    prompt_param: ClassVar[str]

    def __init__(self, runtime: Runtime, limits: LimitsSection) -> None:
        self.runtime, self.limits, self.metrics = runtime, limits, runtime.metrics

    def record(self, model: str, status: int) -> None:
        label = model if model in self.runtime.engines else "unknown"
        self.metrics.requests.labels(self.endpoint, label, str(status)).inc()

    async def respond(self, request: Request, body: SamplingRequest) -> Response:
        received: float = getattr(request.state, "received", time.perf_counter())
        try:
            engine = self._engine(body.model)
            ids = self.prompt_ids(engine, body)
            params = self._sampling(engine, body, len(ids))
            matcher = await self._matcher(engine, body)
            answer = Answer(
                engine, ids, params, body.stop_list(), self.endpoint, self.metrics, received,
                matcher,
            )  # fmt: skip
        except ApiError as error:
            self.record(body.model, error.status)
            return error_json(error.body())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._events(answer, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self._whole(request, answer)

    def _engine(self, model: str) -> Engine:
        runtime = self.runtime
        if runtime.draining or not runtime.ready:
            state = "shutting down" if runtime.draining else f"loading ({runtime.phase})"
            raise ApiError(503, f"the server is {state}; retry shortly", "server_error")
        engine = runtime.engine(model)
        if engine is None:
            served = ", ".join(runtime.engines)
            message = f"the model {model!r} does not exist; served models: {served}"
            raise ApiError(404, message, "not_found_error", param="model")
        return engine

    async def _matcher(self, engine: Engine, body: SamplingRequest) -> LLMatcher | None:
        """The grammar of the answer's response_format, compiled off the event loop (a large
        schema takes a while); None for free text."""
        wanted = schema_of(body.response_format)
        if wanted is None:
            return None
        blocker = engine.constraint_blocker()
        if blocker is not None:
            raise ApiError(400, f"response_format cannot be honoured: {blocker}",
                           param="response_format")  # fmt: skip
        try:
            return await asyncio.to_thread(engine.grammars.matcher, *wanted)
        except GrammarError as error:
            raise ApiError(400, str(error), param=error.param) from None

    def _sampling(self, engine: Engine, body: SamplingRequest, prompt_len: int) -> SamplingParams:
        room = engine.context_len - prompt_len
        if room < 1:
            raise ApiError(
                400,
                f"the prompt is {prompt_len} tokens, and the context window of {engine.name!r} "
                f"is {engine.context_len} tokens: shorten the prompt by at least "
                f"{prompt_len - engine.context_len + 1} tokens to leave room to generate",
                param=self.prompt_param,
            )
        if len(body.stop_list()) > self.limits.max_stop_sequences:
            message = f"at most {self.limits.max_stop_sequences} stop sequences"
            raise ApiError(400, message, param="stop")
        asked = body.token_limit() or self.limits.max_tokens_default
        return SamplingParams(
            max_tokens=min(asked, self.limits.max_tokens_cap, room),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
        )

    async def _whole(self, request: Request, answer: Answer) -> Response:
        """Collect the answer, unless the client hangs up first (then cancel it)."""

        async def collect() -> str:
            return "".join([piece async for piece in answer.pieces()])

        worker = asyncio.ensure_future(collect())
        watcher = asyncio.ensure_future(client_gone(request))
        status = 500
        try:
            await asyncio.wait({worker, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not worker.done():
                status = CLIENT_CLOSED
                worker.cancel()
                return Response(status_code=CLIENT_CLOSED)
            error = worker.exception()
            if error is not None:
                body = failure(error)
                status = body.error.code or 500
                return error_json(body)
            status = 200
            return JSONResponse(self.whole(answer, worker.result()).model_dump())
        finally:
            watcher.cancel()
            answer.close(status)

    async def _events(self, answer: Answer, include_usage: bool) -> AsyncIterator[str]:
        status = CLIENT_CLOSED  # unless the stream ends normally
        try:
            for opening in self.opening(answer):
                yield sse(opening)
            try:
                async for piece in answer.pieces():
                    yield sse(self.chunk(answer, piece, None))
            except Exception as error:
                body = failure(error)
                status = body.error.code or 500
                yield sse(body)
                yield DONE
                return
            yield sse(self.chunk(answer, None, answer.finish_reason()))
            if include_usage:
                yield sse(self.usage_chunk(answer))
            yield DONE
            status = 200
        finally:
            answer.close(status)

    # What the subclasses define
    def prompt_ids(self, engine: Engine, body: SamplingRequest) -> list[int]:
        raise NotImplementedError

    def whole(self, answer: Answer, text: str) -> BaseModel:
        raise NotImplementedError

    def opening(self, answer: Answer) -> list[BaseModel]:
        return []

    def chunk(self, answer: Answer, text: str | None, reason: FinishReason | None) -> BaseModel:
        raise NotImplementedError

    def usage_chunk(self, answer: Answer) -> BaseModel:
        raise NotImplementedError


class ChatHandler(Generation):
    """POST /v1/chat/completions"""

    endpoint, prompt_param = "chat", "messages"

    async def create(self, request: Request, body: ChatCompletionRequest) -> Response:
        return await self.respond(request, body)

    def prompt_ids(self, engine: Engine, body: SamplingRequest) -> list[int]:
        assert isinstance(body, ChatCompletionRequest)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            return prompt_ids(engine.tokenizer, messages)
        except Exception as error:  # no template, or the template refused the turns
            raise ApiError(400, f"cannot format the messages: {error}", param="messages") from None

    def whole(self, answer: Answer, text: str) -> ChatCompletion:
        choice = ChatChoice(
            message=AssistantMessage(content=text), finish_reason=answer.finish_reason()
        )
        return ChatCompletion(
            id=f"chatcmpl-{answer.id}", created=answer.created, model=answer.engine.name,
            choices=[choice], usage=answer.usage(),
        )  # fmt: skip

    def _event(self, answer: Answer, choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=f"chatcmpl-{answer.id}", created=answer.created, model=answer.engine.name,
            choices=choices,
        )  # fmt: skip

    def opening(self, answer: Answer) -> list[BaseModel]:
        return [self._event(answer, [ChatChunkChoice(delta=RoleDelta())])]

    def chunk(self, answer: Answer, text: str | None, reason: FinishReason | None) -> BaseModel:
        delta = EndDelta() if text is None else TextDelta(content=text)
        return self._event(answer, [ChatChunkChoice(delta=delta, finish_reason=reason)])

    def usage_chunk(self, answer: Answer) -> BaseModel:
        event = self._event(answer, [])
        event.usage = answer.usage()
        return event


class CompletionsHandler(Generation):
    """POST /v1/completions"""

    endpoint, prompt_param = "completions", "prompt"

    async def create(self, request: Request, body: CompletionRequest) -> Response:
        return await self.respond(request, body)

    def prompt_ids(self, engine: Engine, body: SamplingRequest) -> list[int]:
        assert isinstance(body, CompletionRequest)
        if isinstance(body.prompt, str):
            ids: list[int] = engine.tokenizer(body.prompt)["input_ids"]
            return ids
        ids = [int(i) for i in body.prompt]  # the validator left a text or token ids
        vocab = len(engine.tokenizer)
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return ids

    def _event(
        self, answer: Answer, text: str, reason: FinishReason | None, usage: Usage | None
    ) -> Completion:
        return Completion(
            id=f"cmpl-{answer.id}", created=answer.created, model=answer.engine.name,
            choices=[CompletionChoice(text=text, finish_reason=reason)], usage=usage,
        )  # fmt: skip

    def whole(self, answer: Answer, text: str) -> Completion:
        return self._event(answer, text, answer.finish_reason(), answer.usage())

    def chunk(self, answer: Answer, text: str | None, reason: FinishReason | None) -> BaseModel:
        return self._event(answer, text or "", reason, None)

    def usage_chunk(self, answer: Answer) -> BaseModel:
        event = self._event(answer, "", None, answer.usage())
        event.choices = []
        return event


class ModelsHandler:
    """GET /v1/models"""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def list(self) -> ModelList:
        return ModelList(data=self.runtime.models())


class ProbesHandler:
    """GET /health (liveness), /ready (loaded and warm), /info, /metrics: no API key."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def health(self) -> JSONResponse:
        runtime = self.runtime
        problem = runtime.error or "; ".join(f"{k}: {v}" for k, v in runtime.dead_engines().items())
        if problem:
            return JSONResponse(
                Health(status="error", error=problem).model_dump(exclude_none=True), 503
            )
        return JSONResponse(Health(status="ok").model_dump(exclude_none=True))

    async def ready(self) -> JSONResponse:
        runtime = self.runtime
        if runtime.ready and not runtime.draining:
            return JSONResponse(
                Readiness(ready=True, models=list(runtime.engines)).model_dump(exclude_none=True)
            )
        phase = "draining" if runtime.draining else runtime.phase
        return JSONResponse(Readiness(ready=False, phase=phase).model_dump(exclude_none=True), 503)

    async def info(self) -> Response:
        described: ServerInfo | None = self.runtime.info()
        if described is None:
            phase = "draining" if self.runtime.draining else self.runtime.phase
            return error_json(error_response(f"the server is {phase}", "server_error", None, 503))
        return JSONResponse(described.model_dump())

    async def metrics(self) -> Response:
        return Response(self.runtime.metrics.render(), media_type=CONTENT_TYPE)
