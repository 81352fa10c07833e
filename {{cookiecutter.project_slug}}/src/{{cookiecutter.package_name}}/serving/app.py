"""The OpenAI-compatible HTTP server (FastAPI + uvicorn): wiring only.

POST /v1/chat/completions and /v1/completions (SSE streaming or not), GET /v1/models,
/info (device, precision, models), /health (liveness), /ready (loaded and warm), /metrics
(Prometheus). The handlers are in handlers.py, the wire format in protocol.py, and
/openapi.json is generated from both. Errors use OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServeConfig
from .gate import Gate
from .handlers import (
    ChatHandler,
    CompletionsHandler,
    Generation,
    ModelsHandler,
    ProbesHandler,
    error_json,
)
from .metrics import Metrics
from .protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    ErrorResponse,
    Health,
    ModelList,
    Readiness,
    ServerInfo,
    error_response,
)
from .runtime import Runtime


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    meaning = {
        400: "invalid request: the message names the field",
        401: "missing or wrong API key",
        404: "no such model",
        413: "request body over server.max_body_bytes",
        500: "generation failed",
        503: "loading, draining, or cut off by the shutdown grace; retry",
    }
    return {status: {"model": ErrorResponse, "description": meaning[status]} for status in statuses}


def _sse_events(chunk: type[BaseModel]) -> dict[str, Any]:
    """Each server-sent event (as OpenAPI 3.1 reads a text/event-stream schema): its data
    is a chunk, the error that ended the stream, or the closing [DONE]."""
    json_data = {
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]},
    }
    data = {"type": "string", "oneOf": [{"const": "[DONE]"}, json_data]}
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _answer(model: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    doc = f"the answer; with stream: server-sent events of {chunk.__name__}, then [DONE]"
    return {
        200: {
            "model": model,
            "description": doc,
            "content": {"text/event-stream": _sse_events(chunk)},
        },
        **_errors(400, 401, 404, 413, 500, 503),
    }


CHAT = _answer(ChatCompletion, ChatCompletionChunk)
COMPLETION = _answer(Completion, Completion)
STREAMED = (ChatCompletionChunk,)  # named by the event schemas only: added to the components
PROBE_503: dict[int | str, dict[str, Any]] = {503: {"description": "not ready or not healthy"}}


def _location(loc: tuple[Any, ...]) -> str:
    """The field's dotted path in the body. pydantic puts the tag of a tagged union in the
    path too (response_format.json_schema.json_schema.schema): it is left out."""
    parts = [str(part) for part in loc[1:]]
    if len(parts) > 2 and parts[0] == "response_format":
        del parts[1]
    return ".".join(parts)


def _message(item: dict[str, Any]) -> str:
    if item["type"] == "json_invalid":
        return f"the body is not valid JSON: {item.get('ctx', {}).get('error', item['msg'])}"
    location = _location(item["loc"]) or "body"
    if item["type"] == "model_attributes_type" and location == "body":
        return "the body must be a JSON object"
    return f"{location}: {item['msg']}"


def _invalid_request(error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 becomes OpenAI's 400, naming the first field at fault."""
    items = list(error.errors())[:5]
    param = next((_location(i["loc"]) for i in items if len(i["loc"]) > 1), None)
    message = "; ".join(_message(item) for item in items)
    return error_json(error_response(message, "invalid_request_error", param, 400))


def _openapi(app: FastAPI, api_key: bool) -> dict[str, Any]:
    """The generated document, with the bearer key on /v1/* when the server needs one,
    and without FastAPI's 422 (malformed bodies get 400, as OpenAI answers)."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path, operations in document["paths"].items():
            for operation in operations.values():
                operation["responses"].pop("422", None)
                if api_key and path.startswith("/v1/"):
                    operation["security"] = [{"bearer": []}]
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        for model in STREAMED:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        if api_key:
            document.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
        app.openapi_schema = document
    return app.openapi_schema


def create_app(config: ServeConfig, runtime: Runtime | None = None) -> FastAPI:
    runtime = runtime or Runtime(config, Metrics(config.price.usd))
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
    app.openapi = lambda: _openapi(app, api_key is not None)  # type: ignore[method-assign]
    chat, completions = (
        ChatHandler(runtime, config.limits),
        CompletionsHandler(runtime, config.limits),
    )
    _handle_errors(app, {"/v1/chat/completions": chat, "/v1/completions": completions})
    models, probes = ModelsHandler(runtime), ProbesHandler(runtime)
    app.post("/v1/chat/completions", responses=CHAT)(chat.create)
    app.post("/v1/completions", responses=COMPLETION)(completions.create)
    app.get("/v1/models", response_model=ModelList, responses=_errors(401))(models.list)
    app.get("/health", response_model=Health, responses=PROBE_503)(probes.health)
    app.get("/ready", response_model=Readiness, responses=PROBE_503)(probes.ready)
    app.get("/info", response_model=ServerInfo, responses=_errors(503))(probes.info)
    app.get("/metrics", response_class=PlainTextResponse)(probes.metrics)
    return app


def _handle_errors(app: FastAPI, generation: dict[str, Generation]) -> None:
    """Every error answer is OpenAI's error JSON; a malformed body is counted by the
    handler of its path, as the handler counts the errors it answers itself."""

    async def invalid(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        handler = generation.get(request.url.path)
        if handler is not None:
            handler.record("", 400)
        return _invalid_request(error)

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        type_ = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        body = error_response(str(error.detail), type_, None, error.status_code)
        response = error_json(body)
        response.headers.update(error.headers or {})  # e.g. Allow on a 405
        return response

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
