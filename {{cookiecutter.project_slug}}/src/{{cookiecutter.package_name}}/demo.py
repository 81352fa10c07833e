"""The whole journey on one model: held-out accuracy before, LoRA training, accuracy
after, merge, then a short token-cost measurement of the base and the adapter served side
by side, cold start included: $ per token, and accuracy and $ per correct answer before
and after fine-tuning, measured through the server. Everything lands in one folder with a
summary a person can read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .chat import Message
    from .config import Config
    from .device import Precision
    from .runs import RunFolder
    from .training.evaluate import HeldOutAnswer

TRAIN_CONFIG = Path("configs/train.yaml")
TOKEN_COST_CONFIG = Path("configs/token_cost.yaml")
BASE, TUNED = "base", "tuned"  # the served names of the base model and of the adapter


@dataclass
class DemoOptions:
    model: str | None = None  # default: model.name_or_path of configs/train.yaml
    steps: int = 60
    eval_limit: int = 48  # held-out tickets scored before and after
    samples: int = 2  # held-out answers shown before and after
    out: Path = Path("reports/demo")
    concurrency: tuple[int, ...] = (1, 4)
    requests: int = 8  # per concurrency level
    token_cost: bool = True
    gguf: bool = False  # export the merged run to GGUF f16 and score it like the adapter


@dataclass
class Baseline:
    """The base model and its answers to the held-out tickets, before any training."""

    source: str  # where the weights came from (modeling.resolve_model)
    precision: Precision
    model: Any
    tokenizer: Any
    held_out: list[list[Message]]
    answers: list[HeldOutAnswer]


@dataclass
class ServingCost:
    """What the token-cost stage adds to the summary (None when it was skipped)."""

    summary: dict[str, Any] | None = None
    card_paths: dict[str, str] = field(default_factory=dict)


def _stage(bar: Any, text: str) -> None:
    bar.set_description(text)
    bar.refresh()


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run every stage, write summary.json and summary.md into ``options.out``."""
    from tqdm.auto import tqdm

    from .config import load_config
    from .merge import merge_run
    from .training.run import run_training

    out = options.out.resolve()
    config = load_config(TRAIN_CONFIG, _overrides(options, out))
    bar = tqdm(total=4 + options.token_cost + options.gguf, desc="demo", unit="stage")

    _stage(bar, "demo: loading the model")
    baseline = score_base(config, options.eval_limit)
    bar.update()

    _stage(bar, "demo: fine-tuning")
    run = run_training(config).run
    bar.update()

    _stage(bar, "demo: scoring the adapter")
    after = score_adapter(run, baseline, config.data.eval)
    bar.update()

    _stage(bar, "demo: merging")
    merged = merge_run(run.path)
    bar.update()

    gguf = None
    if options.gguf:
        _stage(bar, "demo: exporting GGUF")
        gguf = gguf_agreement(run, baseline.tokenizer, baseline.held_out, after)
        bar.update()

    serving = ServingCost()
    if options.token_cost:
        _stage(bar, "demo: measuring $ per token")
        serving = _measure_cost(options, config, run)
        bar.update()
    bar.close()

    summary = summarize(config, baseline, after, run, merged, serving, options.samples)
    summary["gguf"] = gguf
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (out / "summary.md").write_text(render_summary(summary), encoding="utf-8")
    return summary


def score_adapter(
    run: RunFolder, baseline: Baseline, held_out_file: str | None
) -> list[HeldOutAnswer]:
    """The adapter's answers to the held-out tickets; their accuracy goes into eval.json,
    where the model card (`push`) finds it."""
    from peft import PeftModel

    from .runs import HeldOutEval
    from .training.evaluate import accuracy, generate_answers

    tuned = PeftModel.from_pretrained(baseline.model, run.finished_adapter())
    after = generate_answers(tuned, baseline.tokenizer, baseline.held_out)
    run.write_eval(HeldOutEval(accuracy=accuracy(after), examples=len(after), data=held_out_file))
    return after


def gguf_agreement(
    run: RunFolder,
    tokenizer: Any,
    held_out: list[list[Message]],
    expected: list[HeldOutAnswer],
    out: Path | None = None,
) -> dict[str, Any]:
    """The merged run as GGUF f16, read back by transformers' GGUF loader: its greedy
    answers to the held-out tickets against the adapter's (`expected`)."""
    from transformers import AutoModelForCausalLM

    from .export import GgufOptions, export_gguf
    from .training.evaluate import accuracy, generate_answers

    exported = export_gguf(GgufOptions(run=run.path, types=("f16",), out=out))
    file = exported.files["f16"]
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name)
    answers = generate_answers(model, tokenizer, held_out)
    same = sum(a.got == b.got for a, b in zip(answers, expected, strict=True))
    return {
        "file": str(file),
        "same_answers": same,
        "held_out": len(answers),
        "accuracy": accuracy(answers),
    }


def _overrides(options: DemoOptions, out: Path) -> list[str]:
    overrides = [
        f"output.dir={out / 'runs'}",
        f"train.max_steps={options.steps}",
        f"train.eval_steps={max(1, options.steps // 2)}",
        f"train.save_steps={max(1, options.steps // 2)}",
    ]
    if options.model:
        overrides.append(f"model.name_or_path={options.model}")
    return overrides


def score_base(config: Config, eval_limit: int) -> Baseline:
    """Load the base model and answer the first `eval_limit` held-out tickets with it."""
    from .data import load_records
    from .device import pick_precision
    from .errors import UserError
    from .modeling import load_model, load_tokenizer, resolve_model
    from .training.evaluate import generate_answers

    if config.data.eval is None:
        raise UserError(f"the demo scores held-out data: set data.eval in {TRAIN_CONFIG}")
    source = resolve_model(config.model.name_or_path)
    precision = pick_precision(config.model.device, config.model.dtype)
    tokenizer = load_tokenizer(config.model.name_or_path)
    held_out = [r.messages for r in load_records(config.data.eval, config.data)][:eval_limit]
    model = load_model(config.model.name_or_path, dtype=precision.dtype, device=precision.device)
    answers = generate_answers(model, tokenizer, held_out)
    return Baseline(source, precision, model, tokenizer, held_out, answers)


def summarize(
    config: Config,
    baseline: Baseline,
    after: list[HeldOutAnswer],
    run: RunFolder,
    merged: Path,
    serving: ServingCost,
    samples: int,
) -> dict[str, Any]:
    """The demo's summary.json, from the stages' results and the run folder."""
    from .training.evaluate import accuracy

    metrics = run.read_metrics()
    eval_losses = metrics.eval_losses
    before = baseline.answers
    return {
        "model": config.model.name_or_path,
        "model_source": baseline.source,
        "device": baseline.precision.device,
        "dtype": baseline.precision.dtype_name,
        "train_steps": metrics.global_step,
        "eval_loss_before": eval_losses[0] if eval_losses else None,
        "eval_loss_after": eval_losses[-1] if eval_losses else None,
        "held_out": len(baseline.held_out),
        "accuracy_before": accuracy(before),
        "accuracy_after": accuracy(after),
        "samples": [
            {
                "prompt": b.prompt[-1]["content"],
                "expected": b.expected,
                "before": b.got,
                "after": a.got,
            }
            for b, a in zip(before[:samples], after[:samples], strict=True)
        ],
        "training_cost": run.read_cost().model_dump(mode="json"),
        "serving_cost": serving.summary,
        "paths": {
            "run": str(run.path),
            "adapter": str(run.adapter),
            "merged": str(merged),
            "loss_plot": str(run.loss_plot),
            **serving.card_paths,
        },
    }


def _measure_cost(options: DemoOptions, train: Config, run: RunFolder) -> ServingCost:
    """A short sweep of our own server on the adapter, served beside the base, cold start
    included; then both answer the held-out tickets through it, scored and priced."""
    from .cost.command import run_token_cost
    from .cost.config import load_token_cost_config

    config = load_token_cost_config(
        TOKEN_COST_CONFIG,
        [f"server.model={train.model.name_or_path}"],
        {
            "server": {
                "overrides": [f"model.served_name={BASE}"],
                "adapters": {TUNED: str(run.finished_adapter())},
            },
            "endpoint": {"model": TUNED},
            "load": {
                "mode": "concurrency",
                "concurrency": list(options.concurrency),
                "requests_per_level": options.requests,
                "warmup_requests": 1,
            },
            "prompts": {"output_tokens": 16},
            "quality": {
                "enabled": True,
                "dataset": train.data.eval,
                "limit": options.eval_limit,
                "models": [BASE, TUNED],
            },
            "report": {"dir": str(options.out.resolve() / "cost")},
        },
    )
    card, paths = run_token_cost(config, runs=[run.path])
    serving = card.serving
    best = serving.best_level() if serving else None
    quality = serving.quality if serving else None
    cost = {
        "best_level": serving.best.label if serving else None,
        "meets_slo": serving.best.meets_slo if serving else None,
        "usd_per_1m_output_tokens": best.money.usd_per_1m_output_tokens if best else None,
        "usd_per_1m_input_tokens": best.money.usd_per_1m_input_tokens if best else None,
        "gpu_hourly_usd": card.prices.gpu_hourly_usd,
        "cold_start": serving.cold_start.model_dump() if serving and serving.cold_start else None,
        "partial": card.partial,
        "through_server": {
            entry.model: {
                "accuracy": entry.accuracy,
                "usd_per_1k_correct": entry.usd_per_1k_correct,
                "output_tokens": entry.output_tokens,
            }
            for entry in (quality.models if quality else [])
        },
    }
    return ServingCost(cost, {f"cost_card_{name}": str(path) for name, path in paths.items()})


def _fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def render_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"# Demo: LoRA on {summary['model']}",
        "",
        f"- model source: `{summary['model_source']}` on {summary['device']} "
        f"({summary['dtype']}), {summary['train_steps']} training steps",
        f"- eval loss: {_fmt(summary['eval_loss_before'])} before -> "
        f"{_fmt(summary['eval_loss_after'])} after",
        f"- held-out accuracy ({summary['held_out']} tickets): "
        f"{summary['accuracy_before']:.0%} before -> {summary['accuracy_after']:.0%} after",
    ]
    training = summary["training_cost"]
    lines.append(
        f"- training: {training['trained_tokens']} tokens in {training['wall_seconds']:.0f} s "
        f"({training['tokens_per_second']:.0f} tokens/s), ${training['usd']:.4f} at "
        f"${training['gpu_hourly_usd']}/h"
    )
    cost = summary["serving_cost"]
    if cost:
        slo = "meets the SLO" if cost["meets_slo"] else "no level met the SLO"
        lines.append(
            f"- serving: ${_fmt(cost['usd_per_1m_output_tokens'], '{:.2f}')} per 1M output "
            f"tokens and ${_fmt(cost['usd_per_1m_input_tokens'], '{:.2f}')} per 1M input "
            f"tokens at {cost['best_level']} ({slo}), at ${cost['gpu_hourly_usd']}/h"
            + (" — PARTIAL measurement" if cost["partial"] else "")
        )
        lines += _through_server(summary, cost["through_server"])
    gguf = summary.get("gguf")
    if gguf:
        lines.append(
            f"- GGUF f16 (llama.cpp's converter, read back by transformers): the same greedy "
            f"answer as the adapter on {gguf['same_answers']}/{gguf['held_out']} held-out "
            f"tickets, accuracy {gguf['accuracy']:.0%}"
        )
    lines += ["", "## Held-out answers", ""]
    for sample in summary["samples"]:
        lines += [
            f"> {sample['prompt']}",
            "",
            f"- expected: `{sample['expected']}`",
            f"- before: `{sample['before']!s}`",
            f"- after: `{sample['after']!s}`",
            "",
        ]
    lines += ["## Files", ""]
    lines += [f"- {name}: `{path}`" for name, path in summary["paths"].items()]
    return "\n".join(lines) + "\n"


def _through_server(summary: dict[str, Any], scored: dict[str, Any]) -> list[str]:
    """Before and after, as the server answers: accuracy and $ per 1000 correct answers."""
    if BASE not in scored or TUNED not in scored:
        return []
    before, after = scored[BASE], scored[TUNED]
    same = (before["accuracy"], after["accuracy"]) == (
        summary["accuracy_before"],
        summary["accuracy_after"],
    )
    return [
        f"- through the server: accuracy {before['accuracy']:.0%} before -> "
        f"{after['accuracy']:.0%} after, "
        f"{_fmt(before['usd_per_1k_correct'], '${:.4g}')} -> "
        f"{_fmt(after['usd_per_1k_correct'], '${:.4g}')} per 1000 correct answers "
        f"({'the same scores as in process' if same else 'NOT the scores in process'})"
    ]


def demo_command(options: DemoOptions) -> int:
    summary = run_demo(options)
    print(render_summary(summary))
    print(f"summary: {options.out / 'summary.md'}")
    return 0
