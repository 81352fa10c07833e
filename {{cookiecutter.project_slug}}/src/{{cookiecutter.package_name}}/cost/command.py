"""`token-cost`: measure, price and write a cost card (serving, training, or both).

Serving: without `endpoint.url` our own server is started (so cold start is measured too);
with it, any OpenAI-compatible endpoint is driven. A warm-up, then one load level after
another; after each, the server's token counters are read back when it has ours. Faults
(the server dies, the endpoint stops answering, Ctrl-C) end the sweep: what was measured
is kept, the interrupted level is marked partial, and so is the card.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..errors import UserError
from .config import TokenCostConfig, load_reference_prices, load_token_cost_config
from .container import ContainerColdStart, serverless_cold_start
from .money import compare_with_apis, serverless_money

log = logging.getLogger(__name__)
DEFAULT_CONFIG = "configs/token_cost.yaml"


@dataclass
class Hooks:
    """Test seams: called with the started server, and with every finished request."""

    on_server_started: Callable[[Any], None] | None = None
    on_result: Callable[[Any], None] | None = None


@dataclass
class Measurement:
    section: dict[str, Any]
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


def _preflight(base_url: str, api_key: str | None, key_env: str | None, timeout: float) -> list:
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
        return list(response.json().get("data") or [])
    except ValueError:
        return []


def _tokenizer(source: str | None) -> Any:
    if not source:
        return None
    try:
        from ..modeling import load_tokenizer

        return load_tokenizer(source)
    except Exception as error:  # optional: only the cross-check needs it
        log.warning("no tokenizer from %s (%s): token counts are checked less", source, error)
        return None


def _prompts(config: TokenCostConfig, tokenizer: Any) -> tuple[list, dict[str, Any]]:
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
    description += f", max_tokens {spec.output_tokens}"
    info = {
        "source": spec.source,
        "dataset": spec.dataset if spec.source == "dataset" else None,
        "count": len(prompts),
        "input_tokens": spec.input_tokens if spec.source == "synthetic" else None,
        "output_tokens": spec.output_tokens,
        "description": description,
    }
    return prompts, info


def _device_of(serve_config: Any) -> tuple[str, str]:
    from ..device import pick_precision

    precision = pick_precision(serve_config.model.device, serve_config.model.dtype)
    device = precision.device
    if device.startswith("cuda"):
        import torch

        device = f"{device} ({torch.cuda.get_device_name(0)})"
    return device, str(precision.dtype).removeprefix("torch.")


def measure_serving(
    config: TokenCostConfig, folder: Path, hooks: Hooks | None = None
) -> Measurement:
    from .card import SCHEMA_VERSION  # noqa: F401  (fail early if the package is broken)
    from .coldstart import OwnServer, cold_start_section, counter_delta, scrape, token_counters
    from .load import Endpoint, LevelRunner, stream_request
    from .summary import METRIC_DEFINITIONS, best_level, summarize_level

    hooks = hooks or Hooks()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per request
    ep = config.endpoint
    server = None
    partial: list[str] = []
    notes: list[str] = []
    if ep.url is None:
        srv = config.server
        log_path = folder / "server.log"
        server = OwnServer(srv.config, srv.overrides, srv.model, srv.adapters, log_path)
        serve_config = server.config
        key_env = ep.api_key_env or serve_config.server.api_key_env
        model = ep.model or next(iter(serve_config.adapters), serve_config.base_name)
        # An adapter saved with its tokenizer is served with it (runtime.py); else the base's.
        adapter = serve_config.adapters.get(model)
        own_tokenizer = adapter and (Path(adapter) / "tokenizer_config.json").is_file()
        tokenizer_source = ep.tokenizer or (adapter if own_tokenizer else None)
        tokenizer_source = tokenizer_source or serve_config.model.name_or_path
        device, dtype = _device_of(serve_config)
        model_info = {
            "name_or_path": serve_config.model.name_or_path,
            "served_name": serve_config.base_name,
            "adapters": dict(serve_config.adapters),
            "engine": serve_config.engine.kind,
        }
    else:
        key_env = ep.api_key_env
        model = ep.model
        tokenizer_source = ep.tokenizer
        device = ep.device or "remote endpoint (not measured; set endpoint.device)"
        dtype = "unknown"
        model_info = {"name_or_path": None, "served_name": None, "adapters": {}, "engine": None}
    api_key = os.environ.get(key_env) if key_env else None
    tokenizer = _tokenizer(tokenizer_source)
    prompts, prompt_info = _prompts(config, tokenizer)
    cold: dict[str, Any] | None = None
    levels: list[dict[str, Any]] = []
    served: list = []
    base_url = server.url + "/v1" if server is not None else _v1(ep.url or "")
    try:
        if server is not None:
            server.start(config.server.ready_timeout_s, _say)
            if hooks.on_server_started:
                hooks.on_server_started(server)
            base_url = server.url + "/v1"
        else:
            base_url = _v1(ep.url)
        served = _preflight(base_url, api_key, key_env, ep.connect_timeout_s)
        if model is None:
            if not served:
                raise UserError(f"{base_url}/models lists no model: pass --model NAME")
            model = served[0]["id"]
        if ep.url is not None:
            entry = next((m for m in served if m.get("id") == model), {})
            model_info["name_or_path"] = entry.get("root") or model
            model_info["served_name"] = model
        endpoint = Endpoint(
            base_url=base_url,
            model=model,
            api=ep.api,
            api_key=api_key,
            max_tokens=config.prompts.output_tokens,
            temperature=config.prompts.temperature,
            ignore_eos=config.prompts.ignore_eos,
            connect_timeout_s=ep.connect_timeout_s,
            request_timeout_s=ep.request_timeout_s,
        )
        metrics_url = _root(base_url)
        if server is not None:

            async def first_request() -> Any:
                timeout = ep.request_timeout_s
                async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
                    return await stream_request(client, endpoint, prompts[0], -1, server.spawned_at)

            first = asyncio.run(first_request())
            if not first.ok:
                raise UserError(f"the first request failed: {first.error}")
            cold = cold_start_section(server, first, scrape(metrics_url))
            _say(
                f"cold start: ready after {cold['ready_s']:.2f} s, first token after "
                f"{cold['first_token_s']:.2f} s"
            )
        else:
            phases = scrape(metrics_url)
            from .coldstart import server_phases

            cold = {
                "measured": False,
                "source": "the endpoint's /metrics (the meter did not start it)"
                if server_phases(phases)
                else "not measured: the meter did not start the endpoint",
                "command": None,
                "listening_s": None,
                "ready_s": None,
                "first_token_s": None,
                "first_request_ttft_s": None,
                "server_phases_s": server_phases(phases),
                "outside_server_s": None,
                "first_request_error": None,
                "note": None,
            }
        runner = LevelRunner(
            endpoint,
            prompts,
            alive=server.alive if server is not None else None,
            abort_after_errors=config.load.abort_after_errors,
            max_concurrency=config.load.max_concurrency,
            on_result=hooks.on_result,
        )
        if config.load.warmup_requests:
            warm = asyncio.run(runner.warmup(config.load.warmup_requests))
            failed = [r for r in warm if not r.ok]
            if len(failed) == len(warm):
                raise UserError(f"every warm-up request failed; the first: {failed[0].error}")
        for index, value in enumerate(config.load.levels()):
            before = token_counters(scrape(metrics_url))
            try:
                run = asyncio.run(
                    runner.run_level(
                        config.load.mode,
                        value,
                        config.load.requests_per_level,
                        config.load.level_time_limit_s,
                        seed=config.load.seed + index,
                    )
                )
            except KeyboardInterrupt:
                partial.append(f"interrupted (Ctrl-C) during level {value:g}, which is left out")
                break
            after = token_counters(scrape(metrics_url)) if not run.aborted else None
            summary = summarize_level(
                run,
                ttft_slo_s=config.slo.ttft_s,
                e2e_slo_s=config.slo.e2e_s,
                attainment=config.slo.attainment,
                gpu_hourly_usd=config.price.gpu_hourly_usd,
                split=config.price.split_rule(),
                tokenizer=tokenizer,
                counters=counter_delta(before, after),
                tpot_slo_s=config.slo.tpot_s,
            )
            levels.append(summary)
            if run.aborted:
                reason = run.stopped_by.removeprefix("abort: ")
                partial.append(
                    f"level {summary['label']} stopped early ({reason}); "
                    f"{summary['requests']['ok']} of its requests finished: kept, marked partial"
                )
                _say(f"error: {reason}")
                break
    except KeyboardInterrupt:
        partial.append("interrupted (Ctrl-C) before the sweep finished")
    except UserError as error:
        if not levels:
            raise
        partial.append(str(error))
    finally:
        if server is not None:
            server.stop()
    code = server.process.returncode if server is not None and server.process else None
    if code not in (0, None) and not any("exited" in reason for reason in partial):
        notes.append(f"the server exited with code {code}")
    best = best_level(levels)
    section = {
        "endpoint": {
            "url": base_url,
            "own_server": server is not None,
            "model": model,
            "api": ep.api,
            "api_key_env": key_env,
            "served_models": [m.get("id") for m in served if isinstance(m, dict)],
        },
        "model": model_info,
        "load": {
            "mode": config.load.mode,
            "levels": config.load.levels(),
            "requests_per_level": config.load.requests_per_level,
            "level_time_limit_s": config.load.level_time_limit_s,
            "warmup_requests": config.load.warmup_requests,
            "max_concurrency": config.load.max_concurrency,
            "max_tokens": config.prompts.output_tokens,
            "temperature": config.prompts.temperature,
            "ignore_eos": config.prompts.ignore_eos,
            "seed": config.load.seed,
            "prompts": prompt_info,
        },
        "slo": config.slo.model_dump(),
        "metric_definitions": METRIC_DEFINITIONS,
        "cold_start": cold,
        "levels": levels,
        "best": best,
        "serverless": _serverless(config, levels, best, cold, notes),
        "comparison": _comparison(config, levels, best, notes),
        "server_log": str(folder / "server.log") if server is not None else None,
    }
    return Measurement(section, device, dtype, partial, notes)


def _serverless(
    config: TokenCostConfig, levels: list, best: dict, cold: dict | None, notes: list[str]
) -> dict[str, Any] | None:
    spec = config.serverless
    if not spec.enabled:
        return None
    usable = [lv for lv in levels if lv["status"] != "partial" and lv["e2e_s"]["mean"] is not None]
    if not usable:
        notes.append("serverless: no complete level to take the service time from")
        return None
    lowest = min(usable, key=lambda lv: lv["value"])
    chosen = serverless_cold_start(spec, cold)
    if chosen is None:
        notes.append("serverless: no cold start measured (external endpoint); set it in serverless")
        return None
    cold_s, source = chosen
    best_level = next((lv for lv in levels if lv["label"] == best["label"]), None)
    capacity = best_level["request_rate"] if best_level and best["meets_slo"] else None
    profiles = [
        serverless_money(
            config.price.gpu_hourly_usd,
            rate,
            lowest["e2e_s"]["mean"],
            cold_s,
            spec.idle_timeout_s,
            lowest["input_tokens_per_request"],
            lowest["output_tokens_per_request"],
            config.price.split_rule(),
            capacity_rps=capacity,
        )
        for rate in spec.requests_per_hour
    ]
    return {
        "cold_start_s": cold_s,
        "cold_start_source": source,
        "idle_timeout_s": spec.idle_timeout_s,
        "service_s": lowest["e2e_s"]["mean"],
        "service_from_level": lowest["label"],
        "capacity_requests_per_s": capacity,
        "input_tokens_per_request": lowest["input_tokens_per_request"],
        "output_tokens_per_request": lowest["output_tokens_per_request"],
        "model": "Poisson arrivals; P(cold) = exp(-rate * idle_timeout); billed per request = "
        "service + (1 - P(cold)) / rate + cold_start * P(cold); always on past the hour",
        "profiles": profiles,
    }


def _comparison(
    config: TokenCostConfig, levels: list, best: dict, notes: list[str]
) -> dict[str, Any] | None:
    path = config.price.reference_prices
    if not path:
        return None
    if not Path(path).is_file():
        notes.append(f"no comparison with API prices: {path} does not exist")
        return None
    prices = load_reference_prices(path)
    level = next((lv for lv in levels if lv["label"] == best["label"]), None)
    if level is None or level["input_tokens_per_request"] is None:
        return None
    rows = compare_with_apis(
        [m.model_dump() for m in prices.models],
        level["money"]["usd_per_1k_requests"],
        level["input_tokens_per_request"],
        level["output_tokens_per_request"],
    )
    return {
        "file": str(path),
        "taken": prices.taken.isoformat(),
        "source": prices.source,
        "note": prices.note,
        "level": level["label"],
        "input_tokens_per_request": level["input_tokens_per_request"],
        "output_tokens_per_request": level["output_tokens_per_request"],
        "rows": rows,
    }


def build_card(
    config: TokenCostConfig,
    *,
    measure: bool,
    runs: list[Path],
    price_source: str,
    training_price: float | None,
    folder: Path,
    hooks: Hooks | None = None,
) -> dict[str, Any]:
    from .card import SCHEMA_VERSION, environment
    from .training import training_cost

    partial: list[str] = []
    notes: list[str] = []
    serving = None
    training = None
    device = dtype = None
    if runs:
        training = {"runs": [training_cost(run, training_price) for run in runs]}
    if measure:
        measured = measure_serving(config, folder, hooks)
        serving, device, dtype = measured.section, measured.device, measured.dtype
        partial += measured.partial_reasons
        notes += measured.notes
    if device is None:
        from ..info import describe

        here = describe()
        device, dtype = here["device"], here["dtype"]
    kind = "-".join(name for name, part in (("serving", serving), ("training", training)) if part)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "partial": bool(partial),
        "partial_reasons": partial,
        "notes": notes,
        "prices": {
            "gpu_hourly_usd": config.price.gpu_hourly_usd,
            "gpu_hourly_usd_source": price_source,
            "split": config.price.split_rule().as_dict(),
        },
        "environment": environment(Path.cwd(), device, dtype),
        "serving": serving,
        "training": training,
    }


def run_token_cost(
    config: TokenCostConfig,
    *,
    measure: bool = True,
    runs: list[Path] | None = None,
    price_source: str = "config",
    training_price: float | None = None,
    hooks: Hooks | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    from .card import report_dir, write_card

    runs = runs or []
    kind = "-".join(name for name, on in (("serving", measure), ("training", bool(runs))) if on)
    folder = report_dir(Path(config.report.dir), kind)
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


def token_cost_command(args: Any) -> int:
    """Entry point of `<package> token-cost` (see cli.py for the flags)."""
    from .training import latest_run

    extra: dict[str, Any] = {}
    flags = {
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
    for (section, key), value in flags.items():
        if value is not None:
            extra.setdefault(section, {})[key] = value
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    config = load_token_cost_config(path, args.overrides, extra)
    if config.serverless.container_cold_start:  # a bad report fails now, not after the sweep
        ContainerColdStart.read(config.serverless.container_cold_start)
    if args.gpu_hourly_usd is not None:
        price_source = "--gpu-hourly-usd"
    elif any(o.startswith("price.gpu_hourly_usd=") for o in args.overrides):
        price_source = "KEY=VALUE override"
    else:
        price_source = str(path) if path else "default"
    runs = [latest_run(Path("runs")) if run == "latest" else Path(run) for run in args.runs or []]
    measure = not args.training_only
    if not measure and not runs:
        raise UserError("--training-only needs at least one --run RUN_DIR (or --run latest)")
    card, paths = run_token_cost(
        config,
        measure=measure,
        runs=runs,
        price_source=price_source,
        training_price=args.gpu_hourly_usd,
    )
    print(paths["markdown"].read_text(encoding="utf-8"))
    for name, file in paths.items():
        print(f"{name:>8}: {file}")
    if card["partial"]:
        print("PARTIAL cost card (see the reasons at the top)", file=sys.stderr)
        return 1
    return 0
