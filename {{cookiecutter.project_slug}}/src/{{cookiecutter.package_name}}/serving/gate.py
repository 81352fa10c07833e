"""The door of /v1/*: API key, then body size, before any parsing (pure ASGI middleware).

Pure ASGI rather than a FastAPI dependency, because the body limit must hold while the
body is still arriving (a chunked upload has no Content-Length to check up front), and a
refused request should cost nothing past its headers.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .protocol import error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def reject(send: Send, status: int, message: str, type_: str) -> None:
    body = error_response(message, type_, None, status).model_dump_json().encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """Stamps each /v1 request with the time it arrived (request.state.received, where
    TTFT and latency start), checks the key, and refuses a body over the limit (413)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, api_key: str | None) -> None:
        self.app, self.max_body_bytes, self.api_key = app, max_body_bytes, api_key

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["received"] = time.perf_counter()
        headers = dict(scope["headers"])
        if not self._authorized(headers):
            message = "missing or wrong API key (Authorization: Bearer <key>)"
            await reject(send, 401, message, "authentication_error")
            return
        declared = headers.get(b"content-length")
        if declared is not None and not declared.isdigit():
            await reject(send, 400, "invalid Content-Length", "invalid_request_error")
            return
        if declared is not None and int(declared) > self.max_body_bytes:
            await self._too_large(send)
            return
        await self._limited(scope, receive, send)

    async def _too_large(self, send: Send) -> None:
        message = f"request body over the {self.max_body_bytes}-byte limit"
        await reject(send, 413, message, "invalid_request_error")

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the body here, up to the limit, then hand it on in one piece. (Counting it
        while the app reads it would not do: FastAPI turns any error raised while it reads
        a body into its own 400.)"""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before its body arrived
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._too_large(send)
                return
            more = message.get("more_body", False)
        handed_on = False

        async def replay() -> Message:
            nonlocal handed_on
            if handed_on:
                return await receive()  # what follows the body: the disconnect
            handed_on = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)
