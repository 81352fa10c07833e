"""`token-cost`: measure, price and write a cost card (serving, training, or both).

Serving: without `endpoint.url` our own server is started (so cold start is measured too);
with it, any OpenAI-compatible endpoint is driven (target.py says which, sweep.py measures
it). With `engines`, each engine in turn on the same traffic. A partial measurement makes
a partial card, and the command exits 1.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .config import TokenCostConfig, load_token_cost_config
from .container import ContainerColdStart
from .schema import SCHEMA_VERSION, CardKind, CostCard, EngineArm, Prices, TrainingSection
from .sweep import Hooks, measure_serving, say
from .target import resolve_target

log = logging.getLogger(__name__)
DEFAULT_CONFIG = "configs/token_cost.yaml"
UTC = dt.timezone(dt.timedelta(0))  # dt.UTC is Python 3.11+; the project supports 3.10


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
        say(f"engine {engine.name}: measuring")
        try:
            measured = measure_serving(config.for_engine(engine), folder / engine.name, hooks)
        except UserError as error:
            lines = str(error).splitlines()
            # A server that exits at start says why in its last "error:" line.
            said = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
            reason = said[-1] if said else lines[0]
            partial.append(f"engine {engine.name} was not measured: {reason}")
            say(f"engine {engine.name}: not measured: {reason}")
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


def run_token_cost(
    config: TokenCostConfig,
    *,
    measure: bool = True,
    runs: list[Path] | None = None,
    price_source: str = "config",
    training_price: float | None = None,
    hooks: Hooks | None = None,
) -> tuple[CostCard, dict[str, Path]]:
    """Measure and price into a new report folder; returns the card and its files."""
    from .card import environment, report_dir, write_card
    from .training_cost import training_cost

    runs = runs or []
    kind: CardKind = (
        "serving-training" if measure and runs else "serving" if measure else "training"
    )
    folder = report_dir(Path(config.report.dir), kind)
    partial: list[str] = []
    notes: list[str] = []
    serving = engines = None
    training = (
        TrainingSection(runs=[training_cost(r, training_price) for r in runs]) if runs else None
    )
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
    card = CostCard(
        schema_version=SCHEMA_VERSION,
        kind=kind,
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
    return card, write_card(card, folder)


@dataclass(frozen=True)
class TokenCostOptions:
    """`token-cost`'s command line; each flag is a shorthand of a config key."""

    config: str | None = None  # default: configs/token_cost.yaml if present
    overrides: tuple[str, ...] = ()  # KEY=VALUE
    url: str | None = None  # endpoint.url
    model: str | None = None  # endpoint.model
    api_key_env: str | None = None  # endpoint.api_key_env
    gpu_hourly_usd: float | None = None  # price.gpu_hourly_usd, and the training runs' price
    concurrency: str | None = None  # "1,2,4": load.mode=concurrency, load.concurrency
    rates: str | None = None  # "0.5,2": load.mode=poisson, load.rates
    engines: str | None = None  # "transformers,vllm": our server on each engine.kind
    requests: int | None = None  # load.requests_per_level
    time_limit: float | None = None  # load.level_time_limit_s
    runs: tuple[str, ...] = ()  # training run folders (or "latest") to price
    training_only: bool = False  # the training runs only, no serving
    out: str | None = None  # report.dir


def _flags(args: TokenCostOptions) -> dict[str, Any]:
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


def _price_source(args: TokenCostOptions, path: str | None) -> str:
    if args.gpu_hourly_usd is not None:
        return "--gpu-hourly-usd"
    if any(o.startswith("price.gpu_hourly_usd=") for o in args.overrides):
        return "KEY=VALUE override"
    return str(path) if path else "default"


def token_cost_command(args: TokenCostOptions) -> int:
    """Entry point of `<package> token-cost` (see cli.py for the flags)."""
    from ..runs import RunFolder

    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    config = load_token_cost_config(path, list(args.overrides), _flags(args))
    if config.serverless.container_cold_start:  # a bad report fails now, not after the sweep
        ContainerColdStart.read(config.serverless.container_cold_start)
    runs = [
        RunFolder.latest(Path("runs")).path if run == "latest" else Path(run) for run in args.runs
    ]
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
