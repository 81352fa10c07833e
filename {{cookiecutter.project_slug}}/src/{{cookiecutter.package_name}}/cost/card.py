"""The cost card: JSON (every number, typed by schema.py), Markdown, PNG.

A card is written into reports/<UTC timestamp>-<kind>/ as cost_card.json, cost_card.md and
cost_card.png. A card built from an interrupted measurement says `"partial": true` with
the reasons, at the top of the JSON and of the Markdown.
"""

from __future__ import annotations

import hashlib
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..info import PACKAGES, package_versions
from .schema import (
    ColdStart,
    ComparisonRow,
    CostCard,
    Crossover,
    EngineComparison,
    Environment,
    LevelSummary,
    LockFile,
    LockInfo,
    MetricDefinitions,
    Percentiles,
    Quality,
    ServingSection,
    TrainingSection,
    find_level,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

EXTRA_PACKAGES = ("fastapi", "uvicorn", "httpx", "vllm")
NOT_INSTALLED = "not installed"  # package_versions' word for a package it cannot find
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", re.MULTILINE)
INPUT_HASH = re.compile(r"^# input-hash: (\S+)$", re.MULTILINE)


def _lock_file(path: Path) -> LockFile:
    """One lock's sha256 and input hash, and whether the running environment matches its
    pins (local version tags ignored)."""
    text = path.read_text(encoding="utf-8")
    found = INPUT_HASH.search(text)
    pins = dict(PIN.findall(text))
    installed = package_versions(tuple(pins))
    missing = [package for package, have in installed.items() if have == NOT_INSTALLED]
    mismatches = [
        f"{package}: lock {pins[package]}, installed {have}"
        for package, have in installed.items()
        if have != NOT_INSTALLED and have.split("+")[0] != pins[package].split("+")[0]
    ]
    return LockFile(
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        input_hash=found.group(1) if found else None,
        installed_matches=not mismatches and not missing,
        mismatches=mismatches[:20],
        missing=missing[:20],
    )


def lock_info(root: Path) -> LockInfo | None:
    """Each lock file's hashes, and which lock the running environment matches."""
    files = {
        f"requirements/{name}.txt": _lock_file(root / "requirements" / f"{name}.txt")
        for name in ("dev", "serve")
        if (root / "requirements" / f"{name}.txt").is_file()
    }
    if not files:
        return None
    matching = [name for name, info in files.items() if info.installed_matches]
    return LockInfo(files=files, environment_matches=matching[0] if matching else None)


def environment(root: Path, device: str, dtype: str) -> Environment:
    return Environment(
        python=platform.python_version(),
        platform=platform.platform(),
        project_version=__version__,
        packages=package_versions((*PACKAGES, *EXTRA_PACKAGES)),
        device=device,
        dtype=dtype,
        lock=lock_info(root),
    )


def report_dir(base: Path, kind: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = base / f"{stamp}-{kind}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = base / f"{stamp}-{kind}-{suffix}"
    path.mkdir(parents=True)
    return path


def write_card(card: CostCard, folder: Path) -> dict[str, Path]:
    """Write the three files (the card is valid by construction); returns their paths."""
    paths = {
        "json": folder / "cost_card.json",
        "markdown": folder / "cost_card.md",
        "plot": folder / "cost_card.png",
    }
    paths["json"].write_text(card.to_json(), encoding="utf-8")
    paths["markdown"].write_text(markdown(card), encoding="utf-8")
    plot(card, paths["plot"])
    return paths


# ---------------------------------------------------------------------------- Markdown
def _f(value: int | float | None, digits: int = 3, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}{unit}"
        return f"{value:.{digits}g}{unit}"
    return f"{value}{unit}"


def _usd(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"${value:,.0f}"
    return f"${value:.3g}" if value < 1 else f"${value:.2f}"


def _table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A Markdown table and the blank line after it; `align` has one letter per column:
    l (text, left) or r (numbers, right)."""
    rule = ["---:" if a == "r" else "---" for a in align]
    return [f"| {' | '.join(cells)} |" for cells in (header, rule, *rows)] + [""]


def _paragraphs(*texts: str) -> list[str]:
    """Each text (a heading, a paragraph) and the blank line after it."""
    return [line for text in texts for line in (text, "")]


def markdown(card: CostCard) -> str:
    created = card.created.strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [f"# Cost card: {card.kind} ({created})", ""]
    if card.partial:
        lines += [
            "> **PARTIAL RESULT**: the measurement was interrupted; the numbers below cover "
            "only what was measured before:",
            *[f"> - {reason}" for reason in card.partial_reasons],
            "",
        ]
    prices, env = card.prices, card.environment
    lines += [
        f"- GPU price: **{_usd(prices.gpu_hourly_usd)}/hour** ({prices.gpu_hourly_usd_source})",
        f"- Split of cost between input and output tokens: {prices.split.description}",
        f"- Device: {env.device} ({env.dtype}); "
        + ", ".join(f"{k} {v}" for k, v in env.packages.items() if v != NOT_INSTALLED),
    ]
    if env.lock:
        name, first = next(iter(env.lock.files.items()))
        lines.append(
            f"- Lock: `{name}` sha256 `{first.sha256[:16]}`; "
            f"environment matches: {env.lock.environment_matches or 'no lock (drifted)'}"
        )
    lines.append("")
    if card.engines:
        lines += _engines_markdown(card.engines)
    for name, serving in _servings(card):
        lines += _serving_markdown(serving, f"Serving: {name}" if name else "Serving")
    if card.training:
        lines += _training_markdown(card.training)
    return "\n".join(lines) + "\n"


def _training_markdown(training: TrainingSection) -> list[str]:
    rows = []
    for run in training.runs:
        mfu = run.mfu
        mfu_text = (
            f"{mfu.value:.1%} of {mfu.gpu} {mfu.dtype}"
            if mfu.value is not None
            else (mfu.note or "unknown")
        )
        rows.append([run.run, f"{run.trained_tokens:,}", _f(run.tokens_per_second),
                     _usd(run.usd), _usd(run.usd_per_1m_tokens), mfu_text])  # fmt: skip
    header = ["run", "tokens", "tokens/s", "$", "$/1M tokens", "MFU"]
    return [*_paragraphs("## Training"), *_table(header, "lrrrrl", rows)]


def _engines_markdown(engines: EngineComparison) -> list[str]:
    names = [arm.name for arm in engines.arms]
    described = "; ".join(
        f"**{arm.name}**: {arm.device}, {arm.dtype}" if arm.measured
        else f"**{arm.name}**: not measured ({(arm.error or '').splitlines()[0]})"
        for arm in engines.arms
    )  # fmt: skip
    lines = _paragraphs(
        "## Which engine gives the cheaper token",
        f"Measured one after another, one server at a time, on the same prompts and load. "
        f"{described}.",
    )
    if not engines.fair:
        lines += ["> **Not a like-for-like comparison:**", *[f"> - {u}" for u in engines.unfair]]
        lines += ["> - some cells have no comparison (below)"] if not engines.unfair else []
        lines.append("")
    rows = []
    for choice in engines.choices:
        prices = [_usd(choice.usd_per_1m_output_tokens.get(n)) for n in names]
        cheaper = f"**{choice.cheaper}**" if choice.cheaper else "n/a"
        ratio = f"{choice.ratio:.2f}x" if choice.ratio else "n/a"
        why = choice.reason or choice.note or ""
        kind = "steady (dedicated)" if choice.traffic == "steady" else "bursty (scale to zero)"
        rows.append([kind, choice.cell, *prices, cheaper, ratio, why])
    header = ["traffic", "cell", *[f"{n} $/1M out" for n in names], "cheaper", "by", "why"]
    lines += _table(header, "ll" + "r" * len(names) + "lrl", rows)
    if engines.crossovers:
        lines += [f"- **Crossover** ({c.traffic}): {c.reason}." for c in engines.crossovers]
        lines.append("")
    rows = []
    for arm in engines.arms:
        cold = arm.serving.cold_start if arm.serving else None
        if cold is None:
            rows.append([arm.name, "n/a", "n/a", "not measured"])
            continue
        phases = ", ".join(f"{k} {v:.2f}" for k, v in cold.server_phases_s.items()) or "n/a"
        rows.append([arm.name, _f(cold.ready_s), _f(cold.first_token_s), phases])
    header = ["engine", "spawn to ready s", "to first token s", "phases (s)"]
    return [*lines, *_table(header, "lrrl", rows)]


def _serving_markdown(serving: ServingSection, title: str) -> list[str]:
    endpoint, slo = serving.endpoint, serving.slo
    who = "our server, started by the meter" if endpoint.own_server else "external"
    tpot = f" and TPOT <= {slo.tpot_s:g} s" if slo.tpot_s else ""
    lines = [
        *_paragraphs(
            f"## {title}",
            f"Endpoint {endpoint.url} ({who}), model `{endpoint.model}`; prompts: "
            f"{serving.load.prompts.description}; SLO: TTFT <= {slo.ttft_s:g} s and e2e <= "
            f"{slo.e2e_s:g} s{tpot} for {slo.attainment:.0%} of requests.",
        ),
        *_table(
            ["level", "status", "ok/err", "req/s", "in tok/s", "out tok/s", "TTFT p50/p90/p99 s",
             "ITL p50 s", "e2e p50/p90/p99 s", "goodput req/s", "SLO", "$/1M in", "$/1M out"],
            "lllrrrlrlrlrr",
            [_level_row(level) for level in serving.levels],
        ),
    ]  # fmt: skip
    lines += _best_markdown(serving)
    lines += _mix_markdown(serving)
    lines += _quality_markdown(serving)
    lines += _tokens_markdown(serving.levels)
    lines += _metrics_markdown(serving.levels, serving.metric_definitions)
    lines += _cold_start_markdown(serving)
    lines += _serverless_markdown(serving)
    lines += _comparison_markdown(serving)
    return lines


def _level_row(level: LevelSummary) -> list[str]:
    money = level.money
    return [
        level.label, level.status, f"{level.requests.ok}/{level.requests.errors}",
        _f(level.request_rate), _f(level.input_tokens_per_s), _f(level.output_tokens_per_s),
        _points(level.ttft_s), _f(level.itl_s.p50), _points(level.e2e_s),
        _f(level.goodput.requests_per_s), "yes" if level.goodput.meets_slo else "no",
        _usd(money.usd_per_1m_input_tokens), _usd(money.usd_per_1m_output_tokens),
    ]  # fmt: skip


def _points(stats: Percentiles, points: tuple[str, ...] = ("p50", "p90", "p99")) -> str:
    """Percentiles as "p50/p90/p99"."""
    return "/".join(_f(getattr(stats, point)) for point in points)


def _best_markdown(serving: ServingSection) -> list[str]:
    best, level = serving.best, serving.best_level()
    if level is None:
        return [f"No best level: {best.reason}.", ""]
    money = level.money
    return [
        f"**Best level: {best.label}** ({best.reason}): "
        f"**{_usd(money.usd_per_1m_input_tokens)} per 1M input tokens, "
        f"{_usd(money.usd_per_1m_output_tokens)} per 1M output tokens**, "
        f"{_usd(money.usd_per_1k_requests)} per 1000 requests "
        f"({_f(level.output_tokens_per_s)} output tokens/s).",
        "",
        "To count dollars per served model on the server (the `llm_cost_usd` counter), put "
        "these prices in configs/serve.yaml:",
        "",
        "```yaml",
        "price:",
        f"  usd_per_1m_input_tokens: {_price(money.usd_per_1m_input_tokens)}",
        f"  usd_per_1m_output_tokens: {_price(money.usd_per_1m_output_tokens)}",
        "```",
        "",
    ]


def _price(value: float | None) -> str:
    return "null" if value is None else f"{value:.6g}"


def _mix_markdown(serving: ServingSection) -> list[str]:
    """Per model at the best level of mixed traffic, beside each model measured alone."""
    level = serving.best_level()
    if level is None or not level.models:
        return []
    alone = {entry.model: find_level(entry.levels, entry.best) for entry in serving.alone}
    rows = []
    for share in level.models:
        own = alone.get(share.model)
        alone_cell = (
            f"{_usd(own.money.usd_per_1m_output_tokens)} ({own.label})" if own else "not measured"
        )
        counters = share.server_counters
        agree = "n/a" if counters is None else ("equal" if counters.match else "**DIFFER**")
        rows.append([
            share.model, f"{share.weight:.0%}", str(share.requests), str(share.input_tokens),
            str(share.output_tokens), _usd(share.usd), _usd(share.usd_per_1m_input_tokens),
            _usd(share.usd_per_1m_output_tokens), alone_cell, agree,
        ])  # fmt: skip
    header = ["model", "share", "requests", "in tokens", "out tokens", "$", "$/1M in",
              "$/1M out", "alone: $/1M out", "server counters"]  # fmt: skip
    return [
        *_paragraphs(f"### Per model under the mix ({level.label})"),
        *_table(header, "lrrrrrrrrl", rows),
        *_paragraphs(
            "Under the mix every model's tokens are priced alike (one machine, one bill, split "
            "by tokens); the alone column is what a model costs on a machine of its own."
        ),
    ]


def _quality_markdown(serving: ServingSection) -> list[str]:
    quality = serving.quality
    if quality is None:
        return []
    rows = [
        [entry.model, f"{entry.accuracy:.1%}", str(entry.output_tokens), _usd(entry.usd),
         _usd(entry.usd_per_1k_correct), entry.prices_from]
        for entry in quality.models
    ]  # fmt: skip
    header = ["model", "accuracy", "out tokens", "$ for the set", "$ per 1000 correct", "priced at"]
    return [
        *_paragraphs(
            f"### Quality per dollar ({quality.examples} records of {quality.dataset}, "
            f"scorer {quality.scorer}, greedy, max_tokens {quality.max_tokens})"
        ),
        *_table(header, "lrrrrl", rows),
        *_paragraphs(f"Every answer and its score: `{quality.answers_file}`."),
    ]


def _tokens_markdown(levels: list[LevelSummary]) -> list[str]:
    checks = [level.tokens for level in levels]
    against = ["the stream"]
    if any(check.prompt_tokens_checked for check in checks):
        against.append("the expected prompt lengths")
    if any(check.server_counters for check in checks):
        against.append("the server's own counters")
    consistent = all(check.consistent for check in checks)
    verdict = "consistent" if consistent else "**INCONSISTENT, see the JSON**"
    return _paragraphs(
        f"Token counts: server `usage`, checked against {', '.join(against)}: {verdict}."
    )


def _cold_start_markdown(serving: ServingSection) -> list[str]:
    cold = serving.cold_start
    if not cold or not cold.measured:
        return []
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in cold.server_phases_s.items())
    lines = _paragraphs(
        "### Cold start",
        f"Spawn to listening {_f(cold.listening_s)} s, to ready **{_f(cold.ready_s)} s**, "
        f"to first token {_f(cold.first_token_s)} s. Server phases: {phases or 'n/a'}.",
    )
    if cold.first_request_ttft_s is not None and cold.warm_request_ttft_s is not None:
        lines += _paragraphs(
            f"First request's time to first token {cold.first_request_ttft_s:.3f} s; the next, "
            f"with a prompt of about its length: {cold.warm_request_ttft_s:.3f} s."
        )
    if cold.floors:
        rows = [
            [row.phase, f"{row.measured_s:.3f}", f"{row.floor_s:.3f}", _f(row.ratio, 3, "x"),
             row.floor]
            for row in cold.floors
        ]  # fmt: skip
        header = ["phase", "measured s", "floor s", "measured / floor", "the floor"]
        lines += _table(header, "lrrrl", rows)
    return lines


def _serverless_markdown(serving: ServingSection) -> list[str]:
    serverless = serving.serverless
    if not serverless:
        return []
    lines = _paragraphs(
        "### Serverless (per-second billing, scale to zero)",
        f"Cold start billed {serverless.cold_start_s:.2f} s, the "
        f"**{serverless.cold_start_kind}** one ({serverless.cold_start_source}), "
        f"idle timeout {serverless.idle_timeout_s:g} s, service time "
        f"{serverless.service_s:.3g} s per request.",
    )
    rows = [
        [f"{row.requests_per_hour:g}", row.regime, f"{row.billed_seconds_per_hour:.0f}",
         f"{row.cold_starts_per_hour:.2f}", _usd(row.usd_per_hour),
         _usd(row.usd_per_1k_requests), _usd(row.usd_per_1m_input_tokens),
         _usd(row.usd_per_1m_output_tokens), _usd(row.always_on_usd_per_1m_output_tokens)]
        for row in serverless.profiles
    ]  # fmt: skip
    header = ["requests/hour", "regime", "billed s/hour", "cold starts/hour", "$/hour",
              "$/1k req", "$/1M in", "$/1M out", "always-on $/1M out"]  # fmt: skip
    return [*lines, *_table(header, "rlrrrrrrr", rows)]


def _comparison_markdown(serving: ServingSection) -> list[str]:
    comparison = serving.comparison
    if not comparison or not comparison.rows:
        return []
    lines = _paragraphs(
        f"### Against API list prices (taken {comparison.taken}, {comparison.source})",
        "Same request shape as measured at the best level "
        f"({_f(comparison.input_tokens_per_request)} input, "
        f"{_f(comparison.output_tokens_per_request)} output tokens per request).",
    )
    rows = [
        [row.provider, row.model, _usd(row.usd_per_1m_input), _usd(row.usd_per_1m_output),
         _usd(row.usd_per_1k_requests), _usd(row.ours_usd_per_1k_requests),
         _f(row.ours_over_theirs)]
        for row in comparison.rows
    ]  # fmt: skip
    header = ["provider", "model", "$/1M in", "$/1M out", "$/1k req", "ours $/1k req",
              "ours / theirs"]  # fmt: skip
    return [*lines, *_table(header, "llrrrrr", rows), *_price_sources_markdown(comparison.rows)]


def _price_sources_markdown(rows: list[ComparisonRow]) -> list[str]:
    """Where each list price was read and when; unverified ones said so."""
    lines = []
    for row in rows:
        check = "" if row.verified else " (**unverified**: not read on the provider's page)"
        lines.append(f"- {row.model}: as of {row.as_of.isoformat()}, {row.source}{check}")
    return [*lines, ""]


def _metrics_markdown(levels: list[LevelSummary], definitions: MetricDefinitions) -> list[str]:
    """TPOT per level and what every metric means; the JSON has each level under
    `vllm bench serve`'s names too (levels[].vllm_bench)."""
    rows = [
        [level.label, _points(level.tpot_s), _points(level.itl_s, ("p50", "p99")),
         _f(level.ttft_s.mean), _f(level.e2e_s.mean)]
        for level in levels
    ]  # fmt: skip
    header = ["level", "TPOT p50/p90/p99 s", "ITL p50/p99 s", "TTFT mean s", "e2e mean s"]
    lines = [*_paragraphs("### Metrics as defined here"), *_table(header, "lllrr", rows)]
    lines += [f"- **{name}**: {text}" for name, text in definitions]
    lines += [
        "- The JSON repeats each level under the field names of `vllm bench serve` "
        "(`levels[].vllm_bench`: mean_ttft_ms, median_tpot_ms, p99_itl_ms, "
        "output_throughput, request_goodput, ...).",
        "",
    ]
    return lines


# ---------------------------------------------------------------------------- plot
def plot(card: CostCard, path: Path) -> None:
    """One panel per part of the card: the steady cost and the latency of every engine (or
    the one server), the bursty cost, the cold starts, quality per dollar, training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servings, split = _servings(card), card.prices.split.method
    starts = {
        name or "server": serving.cold_start
        for name, serving in servings
        if serving.cold_start and serving.cold_start.measured and serving.cold_start.server_phases_s
    }
    crossovers = card.engines.crossovers if card.engines else []
    quality = card.serving.quality if card.serving and not card.engines else None
    training = card.training
    panels: list[Callable[[Axes], None]] = []
    if servings:
        panels.append(lambda ax: _cost_panel(ax, servings, split))
        panels.append(lambda ax: _latency_panel(ax, servings))
    if any(serving.serverless for _, serving in servings):
        panels.append(lambda ax: _bursty_panel(ax, servings, split, crossovers))
    if starts:
        panels.append(lambda ax: _cold_start_panel(ax, starts))
    if quality:
        panels.append(lambda ax: _quality_panel(ax, quality))
    if training:
        panels.append(lambda ax: _training_panel(ax, training))
    count = max(len(panels), 1)
    figure, axes = plt.subplots(1, count, figsize=(5.5 * count, 4.2), squeeze=False)
    figure.suptitle(f"Cost card: {card.kind}" + (" (PARTIAL)" if card.partial else ""))
    for draw, ax in zip(panels, axes[0], strict=False):
        draw(ax)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _servings(card: CostCard) -> list[tuple[str, ServingSection]]:
    """Each measured engine by name, or the one server (named "")."""
    if card.engines:
        return [(arm.name, arm.serving) for arm in card.engines.arms if arm.serving]
    return [("", card.serving)] if card.serving else []


def _line(
    ax: Axes, pairs: list[tuple[float, float]], label: str, color: Any = None, style: str = "-"
) -> Any:
    """The points as one line (none when there are none); returns its color."""
    if not pairs:
        return color
    lines = ax.plot(*zip(*pairs, strict=True), style, marker="o", color=color, label=label.strip())
    return lines[0].get_color()


def _finish(ax: Axes, title: str, ylabel: str, log_y: bool = True) -> None:
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if log_y and ax.lines:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize=8)


def _cost_panel(ax: Axes, servings: list[tuple[str, ServingSection]], split: str) -> None:
    """$ per 1M output (solid) and input (dashed) tokens at each load level."""
    for name, serving in servings:
        color = None
        for kind, style in (("output", "-"), ("input", "--")):
            pairs = [
                (lv.value, usd)
                for lv in serving.levels
                if (usd := getattr(lv.money, f"usd_per_1m_{kind}_tokens"))
            ]
            color = _line(ax, pairs, f"{name} $/1M {kind}", color, style)
    load = servings[0][1].load
    if load.mode == "concurrency":
        ax.set_xscale("log", base=2)
        ax.set_xticks(load.levels, [f"{v:g}" for v in load.levels])
        ax.minorticks_off()
    ax.set_xlabel("concurrency" if load.mode == "concurrency" else "arrival rate (req/s)")
    _finish(ax, "steady (dedicated)", f"USD per 1M tokens ({split} split)")


def _latency_panel(ax: Axes, servings: list[tuple[str, ServingSection]]) -> None:
    """e2e p50 (solid) and TTFT p90 (dashed) against output tokens/s, levels labelled."""
    for name, serving in servings:
        levels = [lv for lv in serving.levels if lv.output_tokens_per_s is not None]
        color = None
        for label, stats, style in (("e2e p50", "e2e_s", "-"), ("TTFT p90", "ttft_s", "--")):
            point = label.split()[1]
            pairs = [
                (lv.output_tokens_per_s or 0.0, y)
                for lv in levels
                if (y := getattr(getattr(lv, stats), point)) is not None
            ]
            color = _line(ax, pairs, f"{name} {label}", color, style)
        for lv in levels:
            if lv.e2e_s.p50 is not None:
                ax.annotate(lv.label, (lv.output_tokens_per_s or 0.0, lv.e2e_s.p50), fontsize=8)
    ax.axhline(servings[0][1].slo.ttft_s, color="grey", linestyle=":", label="TTFT SLO")
    ax.set_xlabel("output tokens/s")
    _finish(ax, "throughput vs latency", "latency (s)", log_y=False)


def _bursty_panel(
    ax: Axes, servings: list[tuple[str, ServingSection]], split: str, crossovers: list[Crossover]
) -> None:
    """$ per 1M output tokens billed per second with scale to zero, per requests/hour."""
    for name, serving in servings:
        if serving.serverless:
            pairs = [
                (p.requests_per_hour, p.usd_per_1m_output_tokens)
                for p in serving.serverless.profiles
                if p.usd_per_1m_output_tokens
            ]
            _line(ax, pairs, f"{name} (cold start {serving.serverless.cold_start_s:.0f} s)")
    for crossing in crossovers:
        if crossing.traffic == "bursty" and crossing.at:
            ax.axvline(crossing.at, color="grey", linestyle=":", label="crossover")
    ax.set_xscale("log")
    ax.set_xlabel("requests per hour")
    _finish(ax, "bursty (scale to zero)", f"USD per 1M output tokens ({split} split)")


def _cold_start_panel(ax: Axes, starts: dict[str, ColdStart]) -> None:
    """Each cold start's phases stacked in one bar, with its floors' bar beneath."""
    bars: list[tuple[str, list[tuple[str, float]]]] = []
    for name, cold in starts.items():
        if cold.floors:
            bars.append((name, [(row.phase, row.measured_s) for row in cold.floors]))
            bars.append((f"{name}: floors", [(row.phase, row.floor_s) for row in cold.floors]))
        else:
            phases = [(k, v) for k, v in cold.server_phases_s.items() if k != "ready"]
            bars.append((name, phases))
    colors: dict[str, Any] = {}
    palette = iter(_palette())
    for row, (_, phases) in enumerate(bars):
        left = 0.0
        for phase, seconds in phases:
            if phase not in colors:
                colors[phase] = next(palette)
                legend = phase
            else:
                legend = "_nolegend_"
            ax.barh(row, seconds, left=left, color=colors[phase], label=legend)
            left += seconds
        ax.text(left, row, f" {left:.2f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(bars)), [label for label, _ in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds, spawn to ready")
    ax.set_title("cold start by phase")
    ax.legend(fontsize=7, loc="lower right")


def _palette() -> list[Any]:
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"]
    return [tab20(index) for index in range(tab20.N)]


def _quality_panel(ax: Axes, quality: Quality) -> None:
    """$ per 1000 correct answers per model, its accuracy written on its bar."""
    models = quality.models
    values = [m.usd_per_1k_correct or 0.0 for m in models]
    bars = ax.bar([m.model for m in models], values, color=_palette()[: len(models)])
    for bar, model in zip(bars, models, strict=True):
        label = f"{model.accuracy:.0%}" if model.usd_per_1k_correct else "none correct"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_ylabel("USD per 1000 correct answers")
    ax.set_title(f"quality per dollar ({quality.scorer}, accuracy on the bars)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)


def _training_panel(ax: Axes, training: TrainingSection) -> None:
    runs = training.runs
    ax.bar([r.run for r in runs], [r.usd_per_1m_tokens or 0 for r in runs])
    ax.set_ylabel("USD per 1M trained tokens")
    ax.set_title("training")
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
