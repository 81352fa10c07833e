"""`token-cost`: measure, price and write a cost card (serving, training, or both).

Serving: without `endpoint.url` our own server is started (so cold start is measured too);
with it, any OpenAI-compatible endpoint is driven. A warm-up, then one load level after
another; after each, the server's token counters are read back when it has ours. Faults
(the server dies, the endpoint stops answering, Ctrl-C) end the sweep: what was measured
is kept, the interrupted level is marked partial, and so is the card.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from ..errors import UserError
from ..inference import has_tokenizer
from ..scoring import resolve_scorer
from ..serving.protocol import ServerInfo
from .coldstart import (
    OwnServer,
    cold_start_section,
    counter_delta,
    reported_cold_start,
    scrape,
    token_counters,
)
from .config import TokenCostConfig, load_reference_prices, load_token_cost_config
from .container import ContainerColdStart, serverless_cold_start
from .floors import measure_floors
from .load import Endpoint, LevelRunner, Prompt, RequestResult, stream_request, warm_prompt
from .money import compare_with_apis, serverless_money
from .quality import Prices as QualityPrices
from .quality import eval_items
from .quality import score as score_quality
from .schema import (
    SCHEMA_VERSION,
    CardKind,
    ColdStart,
    Comparison,
    CostCard,
    EndpointInfo,
    EngineArm,
    LevelSummary,
    LoadPlan,
    MeteredModel,
    ModelAlone,
    Prices,
    PromptSet,
    Quality,
    Serverless,
    ServingSection,
    Slo,
    TrainingSection,
    find_level,
)
from .summary import METRIC_DEFINITIONS, best_level, summarize_level

log = logging.getLogger(__name__)
DEFAULT_CONFIG = "configs/token_cost.yaml"
UTC = dt.timezone(dt.timedelta(0))  # dt.UTC is Python 3.11+; the project supports 3.10


@dataclass
class Hooks:
    """Test seams: called with the started server, and with every finished request."""

    on_server_started: Callable[[OwnServer], None] | None = None
    on_result: Callable[[RequestResult], None] | None = None


@dataclass
class Measurement:
    section: ServingSection
    device: str
    dtype: str
    partial_reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _v1(url: str) -> str:
    """The API base: a bare host gets /v1, a URL with a path is used as given."""
    url = url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


def _root(url: str) -> str:
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
        response = httpx.get(f"{_root(base_url)}/info", timeout=timeout, trust_env=False)
        return ServerInfo.model_validate_json(response.content) if response.is_success else None
    except (httpx.HTTPError, ValidationError):
        return None


def _tokenizer(source: str | None) -> Any:
    if not source:
        return None
    try:
        from ..modeling import load_tokenizer

        return load_tokenizer(source)
    except Exception as error:  # optional: only the cross-check needs it
        log.warning("no tokenizer from %s (%s): token counts are checked less", source, error)
        return None


def _prompts(config: TokenCostConfig, tokenizer: Any) -> tuple[list[Prompt], PromptSet]:
    from ..config import DataConfig
    from ..data import load_records
    from .load import dataset_prompts, synthetic_prompts

    spec = config.prompts
    api = config.endpoint.api
    if spec.source == "dataset":
        records = load_records(spec.dataset, DataConfig(train=spec.dataset, eval=None))
        prompts = dataset_prompts([r.messages for r in records], api, tokenizer)
        if not prompts:
            raise UserError(f"{spec.dataset} holds no prompt (every record is answers only)")
        description = f"{len(prompts)} conversations from {spec.dataset} (answers dropped)"
    else:
        count = max(config.load.requests_per_level, 64)
        prompts = synthetic_prompts(count, spec.input_tokens, api, tokenizer, config.load.seed)
        exact = "exactly" if tokenizer is not None else "about"
        description = f"{count} synthetic prompts of {exact} {spec.input_tokens} user tokens"
    sent = [prompt.messages if prompt.messages is not None else prompt.text for prompt in prompts]
    digest = hashlib.sha256(json.dumps(sent, sort_keys=True).encode()).hexdigest()
    info = PromptSet(
        source=spec.source,
        dataset=spec.dataset if spec.source == "dataset" else None,
        count=len(prompts),
        input_tokens=spec.input_tokens if spec.source == "synthetic" else None,
        output_tokens=spec.output_tokens,
        description=description + f", max_tokens {spec.output_tokens}",
        sha256=digest,
    )
    return prompts, info


# ---------------------------------------------------------------------------- target resolution
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
    # The server's rule (runtime.py): an adapter saved with its tokenizer is served with it.
    adapter = serve_config.adapters.get(model)
    own = adapter if adapter and has_tokenizer(adapter) else None
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
        ep.tokenizer or own or serve_config.model.name_or_path,
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


# ---------------------------------------------------------------------------- the measurement
@dataclass
class Sweep:
    """One measurement: the cold start (our server), the warm-up, then level after level."""

    config: TokenCostConfig
    target: Target
    hooks: Hooks
    tokenizer: Any = None
    prompts: list[Prompt] = field(default_factory=list)
    prompt_set: PromptSet | None = None
    info: ServerInfo | None = None
    cold: ColdStart | None = None
    levels: list[LevelSummary] = field(default_factory=list)
    alone: list[ModelAlone] = field(default_factory=list)
    quality: Quality | None = None
    partial: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    folder: Path = Path()

    def use_tokenizer(self, source: str | None) -> None:
        self.target.tokenizer_source = source
        self.tokenizer = _tokenizer(source)
        self.prompts, self.prompt_set = _prompts(self.config, self.tokenizer)

    def run(self) -> None:
        ep, target = self.config.endpoint, self.target
        if self.config.quality.enabled:  # a bad scorer or eval set fails before any start
            resolve_scorer(self.config.quality.scorer)
            eval_items(self.config.quality)
        if target.server is not None:
            # Prompts first: the first request goes out the moment the server is ready.
            self.use_tokenizer(target.tokenizer_source)
            target.server.start(self.config.server.ready_timeout_s, _say)
            if self.hooks.on_server_started:
                self.hooks.on_server_started(target.server)
        model = connect(target, ep.connect_timeout_s)
        check_models(self.config, target)
        endpoint = self.endpoint(model)
        if target.server is not None:
            self.cold = self.cold_start(endpoint, target.server)
        self.info = server_info(target.base_url, ep.connect_timeout_s)
        served_tokenizer = apply_server_info(target, self.info)
        wanted = ep.tokenizer or served_tokenizer or target.tokenizer_source
        if not self.prompts or wanted != target.tokenizer_source:
            if self.prompts:
                self.notes.append(f"token counts checked with {wanted}, the server's tokenizer")
            self.use_tokenizer(wanted)
        if target.server is None:
            self.cold = reported_cold_start(scrape(_root(target.base_url)))
        self.sweep(endpoint)
        self.per_model(endpoint)

    def per_model(self, endpoint: Endpoint) -> None:
        """After the sweep: each model of the mix alone, then the quality scoring."""
        mix = self.config.load.mix
        if mix and self.config.load.alone:
            for name in mix:
                _say(f"the mix's {name!r} alone")
                self.alone.append(self.measure_alone(replace(endpoint, model=name)))
        if self.config.quality.enabled:
            _say("quality: the eval set through the endpoint")
            self.quality = score_quality(
                self.config.quality, endpoint, self.quality_models(), self.prices(), self.folder
            )

    def quality_models(self) -> list[str]:
        spec = self.config.quality
        return spec.models or list(self.config.load.mix) or [str(self.target.model)]

    def prices(self) -> dict[str, QualityPrices]:
        """Each model's $ per 1M tokens: its own best level when measured alone, else the
        sweep's best level (a mix prices every model's token alike)."""
        chosen = find_level(self.levels, best_level(self.levels))
        shared = QualityPrices(chosen.label if chosen else "none", chosen.money if chosen else None)
        prices = dict.fromkeys(self.quality_models(), shared)
        for alone in self.alone:
            level = find_level(alone.levels, alone.best)
            if level is not None:
                prices[alone.model] = QualityPrices(f"{level.label}, alone", level.money)
        return prices

    def measure_alone(self, endpoint: Endpoint) -> ModelAlone:
        levels: list[LevelSummary] = []
        self.sweep(endpoint, levels, mix={})
        return ModelAlone(model=endpoint.model, levels=levels, best=best_level(levels))

    def endpoint(self, model: str) -> Endpoint:
        ep, prompts = self.config.endpoint, self.config.prompts
        return Endpoint(
            base_url=self.target.base_url,
            model=model,
            api=ep.api,
            api_key=self.target.api_key,
            max_tokens=prompts.output_tokens,
            temperature=prompts.temperature,
            ignore_eos=prompts.ignore_eos,
            connect_timeout_s=ep.connect_timeout_s,
            request_timeout_s=ep.request_timeout_s,
        )

    def cold_start(self, endpoint: Endpoint, server: OwnServer) -> ColdStart:
        """The first request, sent the moment the server is ready, timed from the spawn."""

        async def first_requests() -> tuple[RequestResult, RequestResult]:
            timeout = self.config.endpoint.request_timeout_s
            async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
                prompt = self.prompts[0]
                first = await stream_request(client, endpoint, prompt, -1, server.spawned_at)
                # A request like it once more: what the first would cost on a warm server.
                again = warm_prompt(self.prompts)
                warm = await stream_request(client, endpoint, again, -1, time.perf_counter())
                return first, warm

        first, warm = asyncio.run(first_requests())
        if not first.ok:
            raise UserError(f"the first request failed: {first.error}")
        cold = cold_start_section(server, first, scrape(server.url), warm)
        if server.config.engine.kind == "transformers":
            _say("cold start: timing each phase's floor (a bare process, the page cache)")
            floors, note = measure_floors(
                cold,
                server.config.model.name_or_path,
                [str(path) for path in server.config.adapters.values()],
                cold.warm_request_ttft_s,
            )
            notes = [n for n in (cold.note, note) if n]
            cold = cold.model_copy(update={"floors": floors, "note": "; ".join(notes) or None})
        _say(
            f"cold start: ready after {_f(cold.ready_s)} s, "
            f"first token after {_f(cold.first_token_s)} s"
        )
        return cold

    def sweep(
        self,
        endpoint: Endpoint,
        into: list[LevelSummary] | None = None,
        mix: dict[str, float] | None = None,
    ) -> None:
        """The warm-up, then every level, into `into` (the card's levels by default)."""
        load = self.config.load
        server = self.target.server
        mix = load.mix if mix is None else mix
        runner = LevelRunner(
            endpoint,
            self.prompts,
            alive=server.alive if server is not None else None,
            abort_after_errors=load.abort_after_errors,
            max_concurrency=load.max_concurrency,
            on_result=self.hooks.on_result,
            mix=mix,
        )
        if load.warmup_requests:
            warm = asyncio.run(runner.warmup(load.warmup_requests))
            failed = [r for r in warm if not r.ok]
            if len(failed) == len(warm):
                raise UserError(f"every warm-up request failed; the first: {failed[0].error}")
        levels = self.levels if into is None else into
        for index, value in enumerate(load.levels()):
            if not self.level(runner, index, value, levels, mix):
                break

    def level(
        self,
        runner: LevelRunner,
        index: int,
        value: float,
        levels: list[LevelSummary],
        mix: dict[str, float],
    ) -> bool:
        """One level, summarized into `levels`; False when the sweep must stop."""
        load, slo, price = self.config.load, self.config.slo, self.config.price
        metrics_url = _root(self.target.base_url)
        before = token_counters(scrape(metrics_url))
        try:
            run = asyncio.run(
                runner.run_level(
                    load.mode, value, load.requests_per_level, load.level_time_limit_s,
                    seed=load.seed + index,
                )
            )  # fmt: skip
        except KeyboardInterrupt:
            self.partial.append(f"interrupted (Ctrl-C) during level {value:g}, which is left out")
            return False
        after = token_counters(scrape(metrics_url)) if not run.aborted else None
        summary = summarize_level(
            run,
            ttft_slo_s=slo.ttft_s,
            e2e_slo_s=slo.e2e_s,
            tpot_slo_s=slo.tpot_s,
            attainment=slo.attainment,
            gpu_hourly_usd=price.gpu_hourly_usd,
            split=price.split_rule(),
            tokenizer=self.tokenizer,
            counters=counter_delta(before, after),
            mix=mix,
        )
        levels.append(summary)
        if not run.aborted:
            return True
        reason = run.stopped_by.removeprefix("abort: ")
        self.partial.append(
            f"level {summary.label} stopped early ({reason}); "
            f"{summary.requests.ok} of its requests finished: kept, marked partial"
        )
        _say(f"error: {reason}")
        return False


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


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def measure_serving(
    config: TokenCostConfig, folder: Path, hooks: Hooks | None = None
) -> Measurement:
    """Resolve the target, then cold start and sweep; whatever was measured is kept when
    a fault ends it early."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per request
    target = resolve_target(config, folder)
    sweep = Sweep(config, target, hooks or Hooks(), folder=folder)
    try:
        sweep.run()
    except KeyboardInterrupt:
        sweep.partial.append("interrupted (Ctrl-C) before the sweep finished")
    except UserError as error:
        if not sweep.levels:
            raise
        sweep.partial.append(str(error))
    finally:
        if target.server is not None:
            target.server.stop()
    return assemble(sweep, folder)


# ---------------------------------------------------------------------------- assembly
def assemble(sweep: Sweep, folder: Path) -> Measurement:
    """The card's serving section from what the sweep measured."""
    config, target, levels = sweep.config, sweep.target, sweep.levels
    server = target.server
    code = server.process.returncode if server is not None and server.process else None
    if code not in (0, None) and not any("exited" in reason for reason in sweep.partial):
        sweep.notes.append(f"the server exited with code {code}")
    best = best_level(levels)
    chosen = find_level(levels, best)
    load = config.load
    section = ServingSection(
        endpoint=EndpointInfo(
            url=target.base_url,
            own_server=server is not None,
            model=target.model,
            api=config.endpoint.api,
            api_key_env=target.key_env,
            served_models=target.served_ids,
        ),
        model=target.served,
        load=LoadPlan(
            mode=load.mode,
            levels=load.levels(),
            requests_per_level=load.requests_per_level,
            level_time_limit_s=load.level_time_limit_s,
            warmup_requests=load.warmup_requests,
            max_concurrency=load.max_concurrency,
            max_tokens=config.prompts.output_tokens,
            temperature=config.prompts.temperature,
            ignore_eos=config.prompts.ignore_eos,
            seed=load.seed,
            prompts=sweep.prompt_set or _prompts(config, None)[1],
        ),
        slo=Slo.model_validate(config.slo.model_dump()),
        metric_definitions=METRIC_DEFINITIONS,
        cold_start=sweep.cold,
        levels=levels,
        best=best,
        serverless=_serverless(config, levels, chosen, best.meets_slo, sweep),
        comparison=_comparison(config, chosen, sweep.notes),
        server_log=str(folder / "server.log") if server is not None else None,
        alone=sweep.alone,
        quality=sweep.quality,
    )
    device, dtype = device_of(sweep.info, config.endpoint.device)
    if sweep.info is None and server is not None and server.config.engine.kind == "vllm":
        # vLLM has no /info: what it runs on and in which dtype is in its log.
        facts = server.vllm_log()
        device = f"{facts.device or 'device not logged'} (vLLM {facts.version or ''}, its log)"
        dtype = facts.dtype or dtype
        section.model.engine_version = facts.version
    return Measurement(section, device, dtype, sweep.partial, sweep.notes)


def _serverless(
    config: TokenCostConfig,
    levels: list[LevelSummary],
    best: LevelSummary | None,
    meets_slo: bool,
    sweep: Sweep,
) -> Serverless | None:
    """Per-second billing with scale to zero; the best level caps one instance."""
    spec = config.serverless
    if not spec.enabled:
        return None
    usable = [lv for lv in levels if lv.status != "partial" and lv.e2e_s.mean is not None]
    if not usable:
        sweep.notes.append("serverless: no complete level to take the service time from")
        return None
    lowest = min(usable, key=lambda lv: lv.value)
    chosen = serverless_cold_start(spec, sweep.cold.ready_s if sweep.cold else None)
    if chosen is None:
        sweep.notes.append(
            "serverless: no cold start measured (external endpoint); set it in serverless"
        )
        return None
    cold_s, source, kind = chosen
    service_s = lowest.e2e_s.mean or 0.0
    tokens_in = lowest.input_tokens_per_request or 0.0
    tokens_out = lowest.output_tokens_per_request or 0.0
    capacity = best.request_rate if best else None
    if best and not meets_slo:
        sweep.notes.append(
            f"serverless: no level met the SLO; one instance serves at most {best.label}'s "
            "request rate (SLO ignored)"
        )
    profiles = [
        serverless_money(
            config.price.gpu_hourly_usd, rate, service_s, cold_s, spec.idle_timeout_s,
            tokens_in, tokens_out, config.price.split_rule(), capacity_rps=capacity,
        )
        for rate in spec.requests_per_hour
    ]  # fmt: skip
    return Serverless(
        cold_start_s=cold_s,
        cold_start_kind=kind,
        cold_start_source=source,
        idle_timeout_s=spec.idle_timeout_s,
        service_s=service_s,
        service_from_level=lowest.label,
        capacity_requests_per_s=capacity,
        input_tokens_per_request=lowest.input_tokens_per_request,
        output_tokens_per_request=lowest.output_tokens_per_request,
        model="Poisson arrivals; P(cold) = exp(-rate * idle_timeout); billed per request = "
        "service + (1 - P(cold)) / rate + cold_start * P(cold); always on past the hour",
        profiles=profiles,
    )


def _comparison(
    config: TokenCostConfig, level: LevelSummary | None, notes: list[str]
) -> Comparison | None:
    """API list prices for the request shape of the best level."""
    path = config.price.reference_prices
    if not path:
        return None
    if not Path(path).is_file():
        notes.append(f"no comparison with API prices: {path} does not exist")
        return None
    prices = load_reference_prices(path)
    if level is None or level.input_tokens_per_request is None:
        return None
    tokens_in, tokens_out = level.input_tokens_per_request, level.output_tokens_per_request
    return Comparison(
        file=str(path),
        taken=prices.taken,
        source=prices.source,
        note=prices.note,
        level=level.label,
        input_tokens_per_request=tokens_in,
        output_tokens_per_request=tokens_out,
        rows=compare_with_apis(
            prices.models, level.money.usd_per_1k_requests, tokens_in, tokens_out or 0.0
        ),
    )


def measure_engines(
    config: TokenCostConfig,
    folder: Path,
    hooks: Hooks | None,
    partial: list[str],
    notes: list[str],
) -> list[EngineArm]:
    """Each engine in turn, one server at a time, on the same prompts and load. An engine
    that cannot start or be reached is recorded with its error; the others are measured."""
    for engine in config.engines:  # a config mistake in any engine stops before the first
        resolve_target(config.for_engine(engine), folder / engine.name)
    arms = []
    for engine in config.engines:
        _say(f"engine {engine.name}: measuring")
        try:
            measured = measure_serving(config.for_engine(engine), folder / engine.name, hooks)
        except UserError as error:
            lines = str(error).splitlines()
            # A server that exits at start says why in its last "error:" line.
            said = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
            reason = said[-1] if said else lines[0]
            partial.append(f"engine {engine.name} was not measured: {reason}")
            _say(f"engine {engine.name}: not measured: {reason}")
            arms.append(EngineArm(
                name=engine.name, measured=False, error=str(error), device="not measured",
                dtype="not measured", serving=None,
            ))  # fmt: skip
            continue
        partial += [f"engine {engine.name}: {reason}" for reason in measured.partial_reasons]
        interrupted = any("Ctrl-C" in reason for reason in measured.partial_reasons)
        notes += [f"engine {engine.name}: {note}" for note in measured.notes]
        arms.append(EngineArm(
            name=engine.name, measured=True, error=None, device=measured.device,
            dtype=measured.dtype, serving=measured.section,
        ))  # fmt: skip
        if interrupted:
            break
    if not any(arm.measured for arm in arms):
        raise UserError("no engine could be measured:\n" + "\n".join(partial))
    return arms


def card_kind(serving: bool, training: bool) -> CardKind:
    if serving and training:
        return "serving-training"
    return "serving" if serving else "training"


def build_card(
    config: TokenCostConfig,
    *,
    measure: bool,
    runs: list[Path],
    price_source: str,
    training_price: float | None,
    folder: Path,
    hooks: Hooks | None = None,
) -> CostCard:
    from .card import environment
    from .training import training_cost

    partial: list[str] = []
    notes: list[str] = []
    serving = None
    training = None
    if runs:
        training = TrainingSection(runs=[training_cost(run, training_price) for run in runs])
    engines = None
    if measure and config.engines:
        from .engines import compare_engines

        arms = measure_engines(config, folder, hooks, partial, notes)
        engines = compare_engines(arms, config)
        first = next(arm for arm in arms if arm.measured)  # measure_engines made sure of one
        serving, device, dtype = first.serving, first.device, first.dtype
    elif measure:
        measured = measure_serving(config, folder, hooks)
        serving, device, dtype = measured.section, measured.device, measured.dtype
        partial += measured.partial_reasons
        notes += measured.notes
    else:
        from ..info import describe  # training only: the machine this runs on (needs torch)

        here = describe()
        device, dtype = here["device"], here["dtype"]
    return CostCard(
        schema_version=SCHEMA_VERSION,
        kind=card_kind(measure, bool(runs)),
        created=dt.datetime.now(UTC).replace(microsecond=0),
        partial=bool(partial),
        partial_reasons=partial,
        notes=notes,
        prices=Prices(
            gpu_hourly_usd=config.price.gpu_hourly_usd,
            gpu_hourly_usd_source=price_source,
            split=config.price.split_rule().record(),
        ),
        environment=environment(Path.cwd(), device, dtype),
        serving=serving,
        engines=engines,
        training=training,
    )


def run_token_cost(
    config: TokenCostConfig,
    *,
    measure: bool = True,
    runs: list[Path] | None = None,
    price_source: str = "config",
    training_price: float | None = None,
    hooks: Hooks | None = None,
) -> tuple[CostCard, dict[str, Path]]:
    from .card import report_dir, write_card

    runs = runs or []
    folder = report_dir(Path(config.report.dir), card_kind(measure, bool(runs)))
    card = build_card(
        config,
        measure=measure,
        runs=runs,
        price_source=price_source,
        training_price=training_price,
        folder=folder,
        hooks=hooks,
    )
    return card, write_card(card, folder)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line options as config sections (those given)."""
    flags: dict[tuple[str, str], Any] = {
        ("endpoint", "url"): args.url,
        ("endpoint", "model"): args.model,
        ("endpoint", "api_key_env"): args.api_key_env,
        ("price", "gpu_hourly_usd"): args.gpu_hourly_usd,
        ("load", "requests_per_level"): args.requests,
        ("load", "level_time_limit_s"): args.time_limit,
        ("report", "dir"): args.out,
    }
    if args.concurrency:
        flags[("load", "mode")] = "concurrency"
        flags[("load", "concurrency")] = [int(x) for x in args.concurrency.split(",")]
    if args.rates:
        flags[("load", "mode")] = "poisson"
        flags[("load", "rates")] = [float(x) for x in args.rates.split(",")]
    extra: dict[str, Any] = {}
    for (section, key), value in flags.items():
        if value is not None:
            extra.setdefault(section, {})[key] = value
    if args.engines:
        kinds = [kind.strip() for kind in args.engines.split(",") if kind.strip()]
        extra["engines"] = [{"name": kind, "serve": [f"engine.kind={kind}"]} for kind in kinds]
    return extra


def _price_source(args: argparse.Namespace, path: str | None) -> str:
    if args.gpu_hourly_usd is not None:
        return "--gpu-hourly-usd"
    if any(o.startswith("price.gpu_hourly_usd=") for o in args.overrides):
        return "KEY=VALUE override"
    return str(path) if path else "default"


def token_cost_command(args: argparse.Namespace) -> int:
    """Entry point of `<package> token-cost` (see cli.py for the flags)."""
    from .training import latest_run

    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    config = load_token_cost_config(path, args.overrides, _flags(args))
    if config.serverless.container_cold_start:  # a bad report fails now, not after the sweep
        ContainerColdStart.read(config.serverless.container_cold_start)
    runs = [latest_run(Path("runs")) if run == "latest" else Path(run) for run in args.runs or []]
    measure = not args.training_only
    if not measure and not runs:
        raise UserError("--training-only needs at least one --run RUN_DIR (or --run latest)")
    card, paths = run_token_cost(
        config,
        measure=measure,
        runs=runs,
        price_source=_price_source(args, path),
        training_price=args.gpu_hourly_usd,
    )
    print(paths["markdown"].read_text(encoding="utf-8"))
    for name, file in paths.items():
        print(f"{name:>8}: {file}")
    if card.partial:
        print("PARTIAL cost card (see the reasons at the top)", file=sys.stderr)
        return 1
    return 0
