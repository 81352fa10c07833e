"""The cost card: JSON (every number, checked against cost_card.schema.json), Markdown, PNG.

A card is written into reports/<UTC timestamp>-<kind>/ as cost_card.json, cost_card.md and
cost_card.png. A card built from an interrupted measurement says `"partial": true` with
the reasons, at the top of the JSON and of the Markdown.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .. import __version__
from ..info import PACKAGES, package_versions

log = logging.getLogger(__name__)
SCHEMA_PATH = Path(__file__).with_name("cost_card.schema.json")
SCHEMA_VERSION = 1
EXTRA_PACKAGES = ("fastapi", "uvicorn", "httpx", "vllm")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", re.MULTILINE)
INPUT_HASH = re.compile(r"^# input-hash: (\S+)$", re.MULTILINE)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_info(root: Path) -> dict[str, Any] | None:
    """sha256 of each lock file's content, its input hash, and which lock the running
    environment matches (pins compared with the installed versions, local tags ignored)."""
    files = {}
    for name in ("dev", "serve"):
        path = root / "requirements" / f"{name}.txt"
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        found = INPUT_HASH.search(text)
        mismatches, missing = [], []
        for package, pinned in PIN.findall(text):
            try:
                installed = version(package)
            except PackageNotFoundError:
                missing.append(package)
                continue
            if installed.split("+")[0] != pinned.split("+")[0]:
                mismatches.append(f"{package}: lock {pinned}, installed {installed}")
        files[f"requirements/{name}.txt"] = {
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "input_hash": found.group(1) if found else None,
            "installed_matches": not mismatches and not missing,
            "mismatches": mismatches[:20],
            "missing": missing[:20],
        }
    if not files:
        return None
    matching = [name for name, info in files.items() if info["installed_matches"]]
    return {"files": files, "environment_matches": matching[0] if matching else None}


def environment(root: Path, device: str, dtype: str) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "project_version": __version__,
        "packages": package_versions((*PACKAGES, *EXTRA_PACKAGES)),
        "device": device,
        "dtype": dtype,
        "lock": lock_info(root),
    }


def report_dir(base: Path, kind: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = base / f"{stamp}-{kind}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = base / f"{stamp}-{kind}-{suffix}"
    path.mkdir(parents=True)
    return path


def validate(card: dict[str, Any]) -> None:
    """Raise ValueError naming every place where the card breaks its schema."""
    try:
        import jsonschema
    except ImportError:
        log.warning("jsonschema is not installed: the cost card is written unchecked")
        return
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(card), key=lambda e: list(e.absolute_path))
    if errors:
        where = ["/".join(map(str, e.absolute_path)) or "<root>" for e in errors]
        lines = [f"  {w}: {e.message}" for w, e in zip(where, errors, strict=True)]
        raise ValueError("the cost card does not match its schema:\n" + "\n".join(lines[:20]))


def write_card(card: dict[str, Any], folder: Path) -> dict[str, Path]:
    """Validate, then write the three files; returns their paths."""
    validate(card)
    paths = {
        "json": folder / "cost_card.json",
        "markdown": folder / "cost_card.md",
        "plot": folder / "cost_card.png",
    }
    text = json.dumps(card, indent=2, allow_nan=False)
    paths["json"].write_text(text + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(card), encoding="utf-8")
    plot(card, paths["plot"])
    return paths


# ---------------------------------------------------------------------------- Markdown
def _f(value: Any, digits: int = 3, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}{unit}"
        return f"{value:.{digits}g}{unit}"
    return f"{value}{unit}"


def _usd(value: Any) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"${value:,.0f}"
    return f"${value:.3g}" if value < 1 else f"${value:.2f}"


def markdown(card: dict[str, Any]) -> str:
    lines = [f"# Cost card: {card['kind']} ({card['created']})", ""]
    if card["partial"]:
        lines += [
            "> **PARTIAL RESULT**: the measurement was interrupted; the numbers below cover "
            "only what was measured before:",
            *[f"> - {reason}" for reason in card["partial_reasons"]],
            "",
        ]
    prices = card["prices"]
    env = card["environment"]
    lines += [
        f"- GPU price: **{_usd(prices['gpu_hourly_usd'])}/hour** "
        f"({prices['gpu_hourly_usd_source']})",
        f"- Split of cost between input and output tokens: {prices['split']['description']}",
        f"- Device: {env['device']} ({env['dtype']}); "
        + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v != "not installed"),
    ]
    lock = env["lock"]
    if lock:
        dev = next(iter(lock["files"].values()))
        lines.append(
            f"- Lock: `{next(iter(lock['files']))}` sha256 `{dev['sha256'][:16]}`; "
            f"environment matches: {lock['environment_matches'] or 'no lock (drifted)'}"
        )
    lines.append("")
    serving = card.get("serving")
    if serving:
        lines += _serving_markdown(serving, card)
    training = card.get("training")
    if training:
        lines += ["## Training", "", "| run | tokens | tokens/s | $ | $/1M tokens | MFU |"]
        lines.append("| --- | ---: | ---: | ---: | ---: | --- |")
        for run in training["runs"]:
            mfu = run["mfu"]
            mfu_text = (
                f"{mfu['value']:.1%} of {mfu['gpu']} {mfu['dtype']}"
                if mfu["value"] is not None
                else (mfu["note"] or "unknown")
            )
            lines.append(
                f"| {run['run']} | {run['trained_tokens']:,} | {_f(run['tokens_per_second'])} | "
                f"{_usd(run['usd'])} | {_usd(run['usd_per_1m_tokens'])} | {mfu_text} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def _serving_markdown(serving: dict[str, Any], card: dict[str, Any]) -> list[str]:
    endpoint = serving["endpoint"]
    slo = serving["slo"]
    who = "our server, started by the meter" if endpoint["own_server"] else "external"
    lines = [
        "## Serving",
        "",
        f"Endpoint {endpoint['url']} ({who}), "
        f"model `{endpoint['model']}`; prompts: {serving['load']['prompts']['description']}; "
        f"SLO: TTFT <= {slo['ttft_s']:g} s and e2e <= {slo['e2e_s']:g} s"
        + (f" and TPOT <= {slo['tpot_s']:g} s" if slo.get("tpot_s") else "")
        + " for "
        f"{slo['attainment']:.0%} of requests.",
        "",
        "| level | status | ok/err | req/s | in tok/s | out tok/s | TTFT p50/p90/p99 s | "
        "ITL p50 s | e2e p50/p90/p99 s | goodput req/s | SLO | $/1M in | $/1M out |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- | ---: | --- | ---: | ---: |",
    ]
    for level in serving["levels"]:
        ttft, e2e, money = level["ttft_s"], level["e2e_s"], level["money"]
        lines.append(
            f"| {level['label']} | {level['status']} | "
            f"{level['requests']['ok']}/{level['requests']['errors']} | "
            f"{_f(level['request_rate'])} | {_f(level['input_tokens_per_s'])} | "
            f"{_f(level['output_tokens_per_s'])} | "
            f"{_f(ttft['p50'])}/{_f(ttft['p90'])}/{_f(ttft['p99'])} | "
            f"{_f(level['itl_s']['p50'])} | "
            f"{_f(e2e['p50'])}/{_f(e2e['p90'])}/{_f(e2e['p99'])} | "
            f"{_f(level['goodput']['requests_per_s'])} | "
            f"{'yes' if level['goodput']['meets_slo'] else 'no'} | "
            f"{_usd(money['usd_per_1m_input_tokens'])} | "
            f"{_usd(money['usd_per_1m_output_tokens'])} |"
        )
    lines.append("")
    best = serving["best"]
    if best["label"] is not None:
        level = next(x for x in serving["levels"] if x["label"] == best["label"])
        money = level["money"]
        lines += [
            f"**Best level: {best['label']}** ({best['reason']}): "
            f"**{_usd(money['usd_per_1m_input_tokens'])} per 1M input tokens, "
            f"{_usd(money['usd_per_1m_output_tokens'])} per 1M output tokens**, "
            f"{_usd(money['usd_per_1k_requests'])} per 1000 requests "
            f"({_f(level['output_tokens_per_s'])} output tokens/s).",
            "",
        ]
    else:
        lines += [f"No best level: {best['reason']}.", ""]
    checks = [lv["tokens"] for lv in serving["levels"]]
    consistent = all(c["consistent"] for c in checks)
    against = ["the stream"]
    if any(c["prompt_tokens_checked"] for c in checks):
        against.append("the expected prompt lengths")
    if any(c["server_counters"] for c in checks):
        against.append("the server's own counters")
    verdict = "consistent" if consistent else "**INCONSISTENT, see the JSON**"
    lines += [f"Token counts: server `usage`, checked against {', '.join(against)}: {verdict}.", ""]
    lines += _metrics_markdown(serving)
    cold = serving["cold_start"]
    if cold and cold["measured"]:
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in cold["server_phases_s"].items())
        lines += [
            "### Cold start",
            "",
            f"Spawn to listening {_f(cold['listening_s'])} s, "
            f"to ready **{_f(cold['ready_s'])} s**, "
            f"to first token {_f(cold['first_token_s'])} s. Server phases: {phases or 'n/a'}.",
            "",
        ]
    serverless = serving["serverless"]
    if serverless:
        lines += [
            "### Serverless (per-second billing, scale to zero)",
            "",
            f"Cold start billed {serverless['cold_start_s']:.2f} s "
            f"({serverless['cold_start_source']}), "
            f"idle timeout {serverless['idle_timeout_s']:g} s, service time "
            f"{serverless['service_s']:.3g} s per request.",
            "",
            "| requests/hour | regime | billed s/hour | cold starts/hour | $/hour | $/1k req "
            "| $/1M in | $/1M out | always-on $/1M out |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in serverless["profiles"]:
            lines.append(
                f"| {row['requests_per_hour']:g} | {row['regime']} | "
                f"{row['billed_seconds_per_hour']:.0f} | "
                f"{row['cold_starts_per_hour']:.2f} | {_usd(row['usd_per_hour'])} | "
                f"{_usd(row['usd_per_1k_requests'])} | {_usd(row['usd_per_1m_input_tokens'])} | "
                f"{_usd(row['usd_per_1m_output_tokens'])} | "
                f"{_usd(row['always_on_usd_per_1m_output_tokens'])} |"
            )
        lines.append("")
    comparison = serving["comparison"]
    if comparison and comparison["rows"]:
        lines += [
            f"### Against API list prices (taken {comparison['taken']}, {comparison['source']})",
            "",
            "Same request shape as measured at the best level "
            f"({_f(comparison['input_tokens_per_request'])} input, "
            f"{_f(comparison['output_tokens_per_request'])} output tokens per request).",
            "",
            "| provider | model | $/1M in | $/1M out | $/1k req | ours $/1k req | ours / theirs |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in comparison["rows"]:
            lines.append(
                f"| {row['provider']} | {row['model']} | {_usd(row['usd_per_1m_input'])} | "
                f"{_usd(row['usd_per_1m_output'])} | {_usd(row['usd_per_1k_requests'])} | "
                f"{_usd(row['ours_usd_per_1k_requests'])} | {_f(row['ours_over_theirs'])} |"
            )
        lines.append("")
        lines += _price_sources_markdown(comparison["rows"])
    return lines


def _price_sources_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """Where each list price was read and when; unverified ones said so."""
    lines = []
    for row in rows:
        check = "" if row["verified"] else " (**unverified**: not read on the provider's page)"
        lines.append(f"- {row['model']}: as of {row['as_of']}, {row['source']}{check}")
    return [*lines, ""]


def _metrics_markdown(serving: dict[str, Any]) -> list[str]:
    """TPOT per level and what every metric means; the JSON has each level under
    `vllm bench serve`'s names too (levels[].vllm_bench)."""
    lines = [
        "### Metrics as defined here",
        "",
        "| level | TPOT p50/p90/p99 s | ITL p50/p99 s | TTFT mean s | e2e mean s |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for level in serving["levels"]:
        tpot, itl = level["tpot_s"], level["itl_s"]
        lines.append(
            f"| {level['label']} | {_f(tpot['p50'])}/{_f(tpot['p90'])}/{_f(tpot['p99'])} | "
            f"{_f(itl['p50'])}/{_f(itl['p99'])} | {_f(level['ttft_s']['mean'])} | "
            f"{_f(level['e2e_s']['mean'])} |"
        )
    lines.append("")
    lines += [f"- **{name}**: {text}" for name, text in serving["metric_definitions"].items()]
    lines += [
        "- The JSON repeats each level under the field names of `vllm bench serve` "
        "(`levels[].vllm_bench`: mean_ttft_ms, median_tpot_ms, p99_itl_ms, "
        "output_throughput, request_goodput, ...).",
        "",
    ]
    return lines


# ---------------------------------------------------------------------------- plot
def plot(card: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    serving, training = card.get("serving"), card.get("training")
    panels = (2 if serving else 0) + (1 if training else 0)
    figure, axes = plt.subplots(1, max(panels, 1), figsize=(5.5 * max(panels, 1), 4.2))
    axes = list(axes) if panels > 1 else [axes]
    title = f"Cost card: {card['kind']}" + (" (PARTIAL)" if card["partial"] else "")
    figure.suptitle(title)
    index = 0
    if serving:
        levels = [lv for lv in serving["levels"] if lv["output_tokens_per_s"] is not None]
        ax = axes[0]
        x = [lv["output_tokens_per_s"] for lv in levels]
        for key, label, marker in (("e2e_s", "e2e p50", "o"), ("ttft_s", "TTFT p90", "s")):
            point = "p50" if key == "e2e_s" else "p90"
            y = [lv[key][point] for lv in levels]
            pairs = [(a, b) for a, b in zip(x, y, strict=True) if b is not None]
            if pairs:
                ax.plot(*zip(*pairs, strict=True), marker=marker, label=label)
        for lv in levels:
            if lv["e2e_s"]["p50"] is not None:
                where = (lv["output_tokens_per_s"], lv["e2e_s"]["p50"])
                ax.annotate(lv["label"], where, fontsize=8)
        ax.axhline(serving["slo"]["ttft_s"], color="grey", linestyle=":", label="TTFT SLO")
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel("latency (s)")
        ax.set_title("throughput vs latency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[1]
        values = [lv["value"] for lv in levels]
        for key, label in (
            ("usd_per_1m_output_tokens", "$/1M output"),
            ("usd_per_1m_input_tokens", "$/1M input"),
        ):
            pairs = [(lv["value"], lv["money"][key]) for lv in levels if lv["money"][key]]
            if pairs:
                ax.plot(*zip(*pairs, strict=True), marker="o", label=label)
        mode = serving["load"]["mode"]
        if mode == "concurrency" and values:
            ax.set_xscale("log", base=2)
            ax.set_xticks(values, [f"{v:g}" for v in values])
            ax.minorticks_off()
        if any(lv["money"]["usd_per_1m_output_tokens"] for lv in levels):
            ax.set_yscale("log")
        ax.set_xlabel("concurrency" if mode == "concurrency" else "arrival rate (req/s)")
        ax.set_ylabel("USD per 1M tokens")
        ax.set_title(f"cost ({card['prices']['split']['method']} split)")
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=8)
        index = 2
    if training:
        ax = axes[index]
        runs = training["runs"]
        ax.bar([r["run"] for r in runs], [r["usd_per_1m_tokens"] or 0 for r in runs])
        ax.set_ylabel("USD per 1M trained tokens")
        ax.set_title("training")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
