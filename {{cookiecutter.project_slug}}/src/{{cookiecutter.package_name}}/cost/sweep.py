"""One serving measurement: the cold start (our server), a warm-up, then one load level
after another; after each, the server's token counters are read back when it has ours.
With a traffic mix, each model's part; then each model alone and the quality scoring.
Faults (the server dies, the endpoint stops answering, Ctrl-C) end the sweep: what was
measured is kept, the interrupted level is marked partial.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..serving.protocol import ServerInfo
from .coldstart import (
    OwnServer,
    cold_start_section,
    counter_delta,
    reported_cold_start,
    scrape,
    token_counters,
)
from .config import TokenCostConfig, load_reference_prices
from .container import serverless_cold_start
from .floors import measure_floors
from .load import Endpoint, LevelRunner, Prompt, RequestResult, stream_request, warm_prompt
from .money import compare_with_apis, serverless_money
from .quality import EvalSet, load_eval_set
from .quality import Prices as QualityPrices
from .quality import score as score_quality
from .schema import (
    ColdStart,
    Comparison,
    EndpointInfo,
    LevelSummary,
    LoadPlan,
    ModelAlone,
    PromptSet,
    Quality,
    Serverless,
    ServingSection,
    Slo,
    find_level,
    sha256_json,
)
from .summary import METRIC_DEFINITIONS, best_level, summarize_level
from .target import (
    Target,
    apply_server_info,
    check_models,
    connect,
    device_of,
    resolve_target,
    root_url,
    server_info,
)

log = logging.getLogger(__name__)


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


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    info = PromptSet(
        source=spec.source,
        dataset=spec.dataset if spec.source == "dataset" else None,
        count=len(prompts),
        input_tokens=spec.input_tokens if spec.source == "synthetic" else None,
        output_tokens=spec.output_tokens,
        description=description + f", max_tokens {spec.output_tokens}",
        sha256=sha256_json(sent),
    )
    return prompts, info


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
    eval_set: EvalSet | None = None
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
            self.eval_set = load_eval_set(self.config.quality)
        if target.server is not None:
            # Prompts first: the first request goes out the moment the server is ready.
            self.use_tokenizer(target.tokenizer_source)
            target.server.start(self.config.server.ready_timeout_s, say)
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
            self.cold = reported_cold_start(scrape(root_url(target.base_url)))
        self.sweep(endpoint, self.levels, self.config.load.mix)
        self.per_model(endpoint)

    def per_model(self, endpoint: Endpoint) -> None:
        """After the sweep: each model of the mix alone, then the quality scoring."""
        mix = self.config.load.mix
        if mix and self.config.load.alone:
            for name in mix:
                say(f"the mix's {name!r} alone")
                self.alone.append(self.measure_alone(replace(endpoint, model=name)))
        if self.eval_set is not None:
            say("quality: the eval set through the endpoint")
            self.quality = score_quality(
                self.config.quality,
                self.eval_set,
                endpoint,
                self.quality_models(),
                self.prices(),
                self.folder,
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
            self.target.base_url,
            model,
            api_key=self.target.api_key,
            max_tokens=prompts.output_tokens,
            **ep.model_dump(include={"api", "connect_timeout_s", "request_timeout_s"}),
            **prompts.model_dump(include={"temperature", "ignore_eos"}),
        )

    def cold_start(self, endpoint: Endpoint, server: OwnServer) -> ColdStart:
        """The first request, sent the moment the server is ready, timed from the spawn."""

        async def first_requests() -> tuple[RequestResult, RequestResult]:
            async with endpoint.client(1) as client:
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
            say("cold start: timing each phase's floor (a bare process, the page cache)")
            floors, note = measure_floors(
                cold,
                server.config.model.name_or_path,
                [str(path) for path in server.config.adapters.values()],
                cold.warm_request_ttft_s,
            )
            notes = [n for n in (cold.note, note) if n]
            cold = cold.model_copy(update={"floors": floors, "note": "; ".join(notes) or None})
        say(
            f"cold start: ready after {_f(cold.ready_s)} s, "
            f"first token after {_f(cold.first_token_s)} s"
        )
        return cold

    def sweep(self, endpoint: Endpoint, into: list[LevelSummary], mix: dict[str, float]) -> None:
        """The warm-up, then every level, into `into` as each one ends."""
        load = self.config.load
        server = self.target.server
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
        for index, value in enumerate(load.levels()):
            if not self.level(runner, index, value, into, mix):
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
        load = self.config.load
        metrics_url = root_url(self.target.base_url)
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
            self.config.slo,
            self.config.price,
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
        say(f"error: {reason}")
        return False


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
            **load.model_dump(include=set(LoadPlan.model_fields)),  # the keys of the same name
            **config.prompts.model_dump(include={"temperature", "ignore_eos"}),
            levels=load.levels(),
            max_tokens=config.prompts.output_tokens,
            prompts=sweep.prompt_set or _prompts(config, None)[1],
        ),
        slo=Slo.model_validate(config.slo.model_dump()),
        metric_definitions=METRIC_DEFINITIONS,
        cold_start=sweep.cold,
        levels=levels,
        best=best,
        serverless=_serverless(sweep, chosen, best.meets_slo),
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


def _serverless(sweep: Sweep, best: LevelSummary | None, meets_slo: bool) -> Serverless | None:
    """Per-second billing with scale to zero; the best level caps one instance."""
    config, spec = sweep.config, sweep.config.serverless
    if not spec.enabled:
        return None
    usable = [lv for lv in sweep.levels if lv.status != "partial" and lv.e2e_s.mean is not None]
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
