"""What the meter drives: our server (configured here, started by the sweep) or any
OpenAI-compatible endpoint, and what that endpoint says about itself."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from ..errors import UserError
from ..runs import tokenizer_source
from ..serving.protocol import ServerInfo
from .coldstart import OwnServer
from .config import TokenCostConfig
from .schema import MeteredModel


def _v1(url: str) -> str:
    """The API base: a bare host gets /v1, a URL with a path is used as given."""
    url = url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


def root_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _preflight(
    base_url: str, api_key: str | None, key_env: str | None, timeout: float
) -> list[dict[str, Any]]:
    """GET /models: the endpoint answers and accepts the key; returns the model entries."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(
            f"{base_url}/models", headers=headers, timeout=timeout, trust_env=False
        )
    except httpx.TimeoutException:
        raise UserError(f"{base_url}/models did not answer in {timeout:g} s") from None
    except httpx.HTTPError as error:
        raise UserError(
            f"cannot reach {base_url}: {error.__class__.__name__}: {error}\n"
            "  Is the server running, and is --url right (e.g. http://127.0.0.1:8000/v1)?"
        ) from None
    if response.status_code in (401, 403):
        hint = f"set {key_env} to the key" if key_env else "pass --api-key-env VARIABLE"
        raise UserError(f"{base_url} refused the API key (HTTP {response.status_code}): {hint}")
    if response.status_code >= 400:
        return []  # some APIs have no /models; the model must then be given
    try:
        data = response.json().get("data") or []
    except (ValueError, AttributeError):
        return []
    return [entry for entry in data if isinstance(entry, dict)]


def server_info(base_url: str, timeout: float) -> ServerInfo | None:
    """GET /info of our server: what it runs on and how each model is served. None where
    the endpoint has no such answer (vLLM, a hosted API): those fields are then reported as
    not known, never guessed from the meter's own machine."""
    try:
        response = httpx.get(f"{root_url(base_url)}/info", timeout=timeout, trust_env=False)
        return ServerInfo.model_validate_json(response.content) if response.is_success else None
    except (httpx.HTTPError, ValidationError):
        return None


@dataclass
class Target:
    """What the meter drives: the API base, the model, its key, and our server if it starts one."""

    base_url: str  # ".../v1"
    model: str | None
    key_env: str | None
    tokenizer_source: str | None  # for the cross-check; the server's answer replaces it
    served: MeteredModel
    server: OwnServer | None = None
    served_ids: list[str | None] = field(default_factory=list)

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.key_env) if self.key_env else None


def resolve_target(config: TokenCostConfig, folder: Path) -> Target:
    """Our server (configured, not started yet) or the external endpoint of endpoint.url."""
    ep = config.endpoint
    if ep.url is not None:
        served = MeteredModel(
            name_or_path=None, served_name=None, adapters={}, engine=None,
            engine_version=None, tokenizer=None,
        )  # fmt: skip
        return Target(_v1(ep.url), ep.model, ep.api_key_env, ep.tokenizer, served)
    srv = config.server
    server = OwnServer(srv.config, srv.overrides, srv.model, srv.adapters, folder / "server.log")
    serve_config = server.config
    model = ep.model or next(iter(serve_config.adapters), serve_config.base_name)
    # The server's rule: an adapter saved with its tokenizer is served with it.
    tokenizer = tokenizer_source(serve_config.model.name_or_path, serve_config.adapters.get(model))
    served = MeteredModel(
        name_or_path=serve_config.model.name_or_path,
        served_name=serve_config.base_name,
        adapters=dict(serve_config.adapters),
        engine=serve_config.engine.kind,
        engine_version=None,
        tokenizer=None,
    )
    return Target(
        server.url + "/v1",
        model,
        ep.api_key_env or serve_config.server.api_key_env,
        ep.tokenizer or tokenizer,
        served,
        server,
    )


def connect(target: Target, timeout: float) -> str:
    """The endpoint answers and takes the key; returns the model to drive."""
    entries = _preflight(target.base_url, target.api_key, target.key_env, timeout)
    target.served_ids = [m.get("id") for m in entries if isinstance(m, dict)]
    if target.model is None:
        if not entries:
            raise UserError(f"{target.base_url}/models lists no model: pass --model NAME")
        target.model = str(entries[0]["id"])
    if target.server is None:
        entry = next((m for m in entries if m.get("id") == target.model), {})
        target.served.name_or_path = entry.get("root") or target.model
        target.served.served_name = target.model
    return target.model


def apply_server_info(target: Target, info: ServerInfo | None) -> str | None:
    """What the server says about itself goes on the card; returns the tokenizer it serves
    the metered model with (None when it does not say)."""
    if info is None:
        return None
    target.served.engine, target.served.engine_version = info.engine, info.engine_version
    entry = next((m for m in info.models if m.id == target.model), None)
    if entry is None:
        return None
    target.served.tokenizer = entry.tokenizer
    if target.server is None:
        target.served.name_or_path = entry.source
    return entry.tokenizer


def device_of(info: ServerInfo | None, stated: str | None) -> tuple[str, str]:
    """(device, dtype) for the card: the server's own answer, or what endpoint.device says."""
    if info is not None:
        return f"{info.device} ({info.device_name})", info.dtype
    device = stated or "not reported by the server (set endpoint.device to describe it)"
    return device, "not reported by the server"


def check_models(config: TokenCostConfig, target: Target) -> None:
    """Every model the mix and the quality scoring name is one the endpoint serves."""
    served = [str(name) for name in target.served_ids if name]
    if not served:
        return  # an API without /models: its answers will say
    wanted = [("load.mix", name) for name in config.load.mix]
    if config.quality.enabled:
        wanted += [("quality.models", name) for name in config.quality.models]
    for field_name, name in wanted:
        if name not in served:
            raise UserError(
                f"{field_name} names {name!r}, which {target.base_url} does not serve; "
                f"it serves {', '.join(served)}"
            )
