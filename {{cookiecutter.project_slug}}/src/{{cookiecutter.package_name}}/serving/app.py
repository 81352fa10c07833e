"""The OpenAI-compatible HTTP server (FastAPI + uvicorn).

POST /v1/chat/completions and /v1/completions (SSE streaming or not), GET /v1/models,
/info (device, precision, models), /health (liveness), /ready (loaded and warm), /metrics
(Prometheus). Errors use OpenAI's error JSON. Generation and batching are in engine.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import prompt_ids
from .config import ServeConfig
from .metrics import CONTENT_TYPE, Metrics
from .protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    error_body,
)
from .runtime import Runtime
from .text import TextStream

log = logging.getLogger(__name__)
CLIENT_CLOSED = 499  # status recorded in metrics for requests whose client went away


class Gate:
    """Pure ASGI middleware for /v1/*: API key, then body size (413), before any parsing."""

    def __init__(self, app: Any, max_body_bytes: int, api_key: str | None) -> None:
        self.app, self.max_body_bytes, self.api_key = app, max_body_bytes, api_key

    async def _reject(self, send: Any, status: int, message: str, type_: str) -> None:
        body = json.dumps(error_body(message, type_, None, status)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key is not None:
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                await self._reject(
                    send, 401, "missing or wrong API key (Authorization: Bearer <key>)",
                    "authentication_error",
                )  # fmt: skip
                return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            status = 413 if declared.isdigit() else 400
            await self._reject(
                send, status, f"request body over the {self.max_body_bytes}-byte limit"
                if status == 413 else "invalid Content-Length", "invalid_request_error",
            )  # fmt: skip
            return
        received = 0
        started = False

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(
                    send, 413, f"request body over the {self.max_body_bytes}-byte limit",
                    "invalid_request_error",
                )  # fmt: skip


class _BodyTooLarge(Exception):
    pass


def _validation_message(error: ValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for item in error.errors()[:5]:
        location = ".".join(str(p) for p in item["loc"]) or "body"
        param = param or location
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts), param


async def _parse(request: Request, model: type[SamplingRequest]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        message, param = _validation_message(error)
        raise ApiError(400, message, param=param) from None


def _failure(error: BaseException) -> tuple[int, dict[str, Any]]:
    """Status and OpenAI error body for a request the engine ended with an error."""
    from .engine import CutOff

    if isinstance(error, CutOff):
        log.warning("request cut off: %s", error)
        return CutOff.status, error_body(str(error), "server_error", None, CutOff.status)
    log.error("generation failed: %s", error)
    return 500, error_body(f"generation failed: {error}", "server_error", None, 500)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(config: ServeConfig, runtime: Runtime | None = None) -> FastAPI:
    metrics = runtime.metrics if runtime is not None else Metrics()
    runtime = runtime or Runtime(config, metrics)
    api_key = os.environ.get(config.server.api_key_env) or None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start_loading()
        yield
        await asyncio.to_thread(runtime.shutdown)

    app = FastAPI(
        title="{{ cookiecutter.package_name }} OpenAI-compatible server",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.add_middleware(Gate, max_body_bytes=config.server.max_body_bytes, api_key=api_key)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        body = error_body(str(error.detail), type_, None, error.status_code)
        return JSONResponse(body, status_code=error.status_code)

    def record(endpoint: str, model: str, status: int) -> None:
        label = model if model in runtime.engines else "unknown"
        metrics.requests.labels(endpoint, label, str(status)).inc()

    def engine_for(req: SamplingRequest) -> Any:
        if runtime.draining or not runtime.ready:
            state = "shutting down" if runtime.draining else f"loading ({runtime.phase})"
            raise ApiError(503, f"the server is {state}; retry shortly", "server_error")
        engine = runtime.engine(req.model)
        if engine is None:
            served = ", ".join(runtime.engines)
            raise ApiError(
                404,
                f"the model {req.model!r} does not exist; served models: {served}",
                "not_found_error",
                param="model",
            )
        return engine

    def sampling(engine: Any, req: Any, prompt_len: int) -> Any:
        from .engine import SamplingParams

        room = engine.context_len - prompt_len
        if room < 1:
            raise ApiError(
                400,
                f"the prompt is {prompt_len} tokens, and the context window of {engine.name!r} "
                f"is {engine.context_len} tokens: shorten the prompt by at least "
                f"{prompt_len - engine.context_len + 1} tokens to leave room to generate",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            )
        if len(req.stop_list()) > config.limits.max_stop_sequences:
            raise ApiError(
                400, f"at most {config.limits.max_stop_sequences} stop sequences", param="stop"
            )
        asked = req.token_limit() or config.limits.max_tokens_default
        return SamplingParams(
            max_tokens=min(asked, config.limits.max_tokens_cap, room),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
        )

    async def generate(
        request: Request, endpoint: str, req: Any, engine: Any, ids: list[int], received: float
    ) -> Response:
        params = sampling(engine, req, len(ids))
        chat = endpoint == "chat"
        response_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        stream_text = TextStream(engine.tokenizer, req.stop_list())
        metrics.in_flight.inc()
        try:
            submission = engine.submit(ids, params)
        except Exception as error:
            metrics.in_flight.dec()
            raise ApiError(
                503, f"the engine refused the request: {error}", "server_error"
            ) from None
        state = {"first": None, "status": 200}

        def finish_reason() -> str:
            if stream_text.stopped_by_string:
                return "stop"
            if stream_text.tokens >= params.max_tokens and stream_text.last not in engine.eos_ids:
                return "length"
            return "stop"

        def usage() -> dict[str, int]:
            return {
                "prompt_tokens": len(ids),
                "completion_tokens": stream_text.tokens,
                "total_tokens": len(ids) + stream_text.tokens,
            }

        def done(status: int) -> None:
            engine.cancel(submission)  # frees the KV cache at once; no-op when finished
            metrics.in_flight.dec()
            record(endpoint, engine.name, status)
            metrics.prompt_tokens.labels(engine.name).inc(len(ids))
            metrics.completion_tokens.labels(engine.name).inc(stream_text.tokens)
            metrics.e2e.labels(engine.name).observe(time.perf_counter() - received)

        async def pieces() -> AsyncIterator[str]:
            async for new_ids in submission.chunks():
                if state["first"] is None:
                    state["first"] = time.perf_counter()
                    metrics.ttft.labels(engine.name).observe(state["first"] - received)
                piece = stream_text.push(new_ids)
                if piece:
                    yield piece
                if stream_text.stopped_by_string:
                    return
            tail = stream_text.finish()
            if tail:
                yield tail

        def choice(text: str | None, reason: str | None, delta: bool) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            if delta:
                return {
                    "index": 0,
                    "delta": {} if text is None else {"content": text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
            return {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reason,
            }

        obj = "chat.completion" if chat else "text_completion"
        if not req.stream:

            async def collect() -> str:
                return "".join([piece async for piece in pieces()])

            worker = asyncio.ensure_future(collect())
            watcher = asyncio.ensure_future(_client_gone(request))
            status = 500
            try:
                await asyncio.wait({worker, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not worker.done():
                    status = CLIENT_CLOSED
                    worker.cancel()
                    return Response(status_code=CLIENT_CLOSED)
                error = worker.exception()
                if error is not None:
                    status, body = _failure(error)
                    return JSONResponse(body, status_code=status)
                text = worker.result()
                status = 200
                return JSONResponse(
                    {
                        "id": response_id,
                        "object": obj,
                        "created": created,
                        "model": engine.name,
                        "choices": [choice(text, finish_reason(), delta=False)],
                        "usage": usage(),
                    }
                )
            finally:
                watcher.cancel()
                done(status)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict[str, Any]], usage_value: Any = None) -> str:
            body: dict[str, Any] = {
                "id": response_id,
                "object": chunk_obj,
                "created": created,
                "model": engine.name,
                "choices": choices,
            }
            if include_usage:
                body["usage"] = usage_value
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            status = CLIENT_CLOSED  # unless the stream ends normally
            try:
                if chat:
                    first = choice("", None, delta=True)
                    first["delta"] = {"role": "assistant", "content": ""}
                    yield event([first])
                try:
                    async for piece in pieces():
                        yield event([choice(piece, None, delta=True)])
                except Exception as error:
                    status, body = _failure(error)
                    yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                yield event([choice(None if chat else "", finish_reason(), delta=True)])
                if include_usage:
                    yield event([], usage())
                yield "data: [DONE]\n\n"
                status = 200
            finally:
                done(status)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def handle(request: Request, endpoint: str, schema: type[SamplingRequest]) -> Response:
        received = time.perf_counter()
        model = ""
        try:
            req = await _parse(request, schema)
            model = req.model
            engine = engine_for(req)
            if isinstance(req, ChatCompletionRequest):
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                try:
                    ids = prompt_ids(engine.tokenizer, messages)
                except Exception as error:  # no template, or the template refused the turns
                    message = f"cannot format the messages: {error}"
                    raise ApiError(400, message, param="messages") from None
            elif isinstance(req.prompt, str):
                ids = engine.tokenizer(req.prompt)["input_ids"]
            else:
                ids = list(req.prompt)
                vocab = len(engine.tokenizer)
                if any(not 0 <= i < vocab for i in ids):
                    raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            return await generate(request, endpoint, req, engine, ids, received)
        except ApiError as error:
            record(endpoint, model, error.status)
            return JSONResponse(error.body(), status_code=error.status)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, "chat", ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, "completions", CompletionRequest)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": runtime.models()}

    @app.get("/health")
    async def health() -> JSONResponse:
        problem = runtime.error or "; ".join(f"{k}: {v}" for k, v in runtime.dead_engines().items())
        if problem:
            return JSONResponse({"status": "error", "error": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if runtime.ready and not runtime.draining:
            return JSONResponse({"ready": True, "models": list(runtime.engines)})
        phase = "draining" if runtime.draining else runtime.phase
        return JSONResponse({"ready": False, "phase": phase}, status_code=503)

    @app.get("/info")
    async def info() -> JSONResponse:
        described = runtime.info()
        if described is None:
            message = f"the server is {'draining' if runtime.draining else runtime.phase}"
            return JSONResponse(error_body(message, "server_error", None, 503), status_code=503)
        return JSONResponse(described.model_dump())

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
