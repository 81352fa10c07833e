"""Training throughput, measured side by side in one run (ratios, not absolute times).

1. `train` (our run_training) against a reference script: plain TRL SFTTrainer with a
   peft LoraConfig, given the same model, data and hyperparameters.
2. Packing against no packing on variable-length conversations, in effective
   (non-pad) tokens per second.
3. `train.method=dpo` against plain TRL DPOTrainer + peft on the bundled preference
   pairs, in pairs per second (both arms train the same pairs; TRL tokenizes them itself).

Each arm runs --repeats times, interleaved so machine noise hits both alike; the
median, min and max of non-pad tokens/s are written to the project's
reports/bench_train.json (or --output). Runs with the baked project's own interpreter
(`nox -s bench` runs it through bench.py; see baked.py):

    P=build/bench/lora-chat; PY=$P/.venv/bin/python
    $PY benchmarks/train_throughput.py --project $P                # tiny random Llama
    $PY benchmarks/train_throughput.py --project $P --model DIR    # any local model folder
    $PY benchmarks/train_throughput.py --project $P --arms ours,reference   # some arms
    $PY benchmarks/train_throughput.py --project $P --arms dpo,dpo_reference   # DPO vs TRL's
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import baked


def variable_length_data(project: Path, path: Path, count: int, seed: int) -> Path:
    """Conversations of 1 to 8 ticket turns: lengths vary about tenfold."""
    tickets = [
        json.loads(line)["messages"][1:]
        for line in (project / "data" / "tickets_train.jsonl").read_text().splitlines()
    ]
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(count):
            turns = [m for _ in range(rng.randint(1, 8)) for m in rng.choice(tickets)]
            handle.write(json.dumps({"messages": turns}) + "\n")
    return path


def mean_length(project: Path, model: Path, data: Path) -> float:
    """Mean example length in tokens, as the training pipeline encodes it."""
    data_module = baked.module(project, "data")
    config = baked.module(project, "config").DataConfig()
    records = data_module.load_records(str(data), config)
    tokenizer = baked.module(project, "modeling").load_tokenizer(str(model))
    split = data_module.encode_records(records, tokenizer, config)
    return split.tokens / len(split.examples)


def run_training(project: Path, overrides: list[str]) -> dict[str, Any]:
    """The project's `train` with configs/train.yaml and these overrides; its cost.json."""
    config = baked.module(project, "config").load_config(
        project / "configs" / "train.yaml", overrides
    )
    run = baked.module(project, "training.run").run_training(config)
    return json.loads((run.run_dir / "cost.json").read_text())


def ours(
    project: Path, model: Path, data: Path, out: Path, steps: int, batch: int, packing: bool
) -> float:
    cost = run_training(
        project,
        [
            f"model.name_or_path={model}", f"data.train={data}", "data.eval=null",
            f"data.packing={str(packing).lower()}", f"train.max_steps={steps}",
            f"train.batch_size={batch}", "train.save_steps=100000",
            f"output.dir={out}", f"output.run_name=ours-{time.monotonic_ns()}",
        ],
    )  # fmt: skip
    return cost["trained_tokens"] / cost["wall_seconds"]


def reference_lora() -> Any:
    """The LoRA of both hand-written reference arms: the same as configs/train.yaml's."""
    from peft import LoraConfig

    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def reference(model: Path, data: Path, out: Path, steps: int, batch: int, fp32: bool) -> float:
    """What a user would write by hand: SFTTrainer + peft on a messages dataset.

    With ``fp32=False`` it keeps TRL's precision default (bf16 where torch allows it,
    which on a CPU without native bf16 runs a slow reference kernel); with
    ``fp32=True`` it uses the precision our run picks on CPU, for a like-for-like ratio.
    """
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        args=SFTConfig(
            output_dir=str(out / f"ref-{time.monotonic_ns()}"),
            max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-4,
            lr_scheduler_type="cosine", warmup_steps=0.05, max_length=512,
            assistant_only_loss=False, save_strategy="no", report_to="none",
            include_num_input_tokens_seen="non_padding", disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(), seed=42,
            **({"bf16": False, "fp16": False} if fp32 else {}),
        ),
        train_dataset=load_dataset("json", data_files=str(data), split="train"),
        processing_class=tokenizer,
        peft_config=reference_lora(),
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    return trainer.state.num_input_tokens_seen / (time.perf_counter() - started)


def pairs(project: Path) -> Path:
    """The bundled preference pairs, which both DPO arms train on."""
    return project / "data" / "preferences_train.jsonl"


def dpo_ours(project: Path, model: Path, out: Path, steps: int, batch: int) -> float:
    cost = run_training(
        project,
        [
            f"model.name_or_path={model}", "train.method=dpo", f"data.train={pairs(project)}",
            "data.eval=null", f"train.max_steps={steps}", f"train.batch_size={batch}",
            "train.save_steps=100000", f"output.dir={out}",
            f"output.run_name=dpo-{time.monotonic_ns()}",
        ],
    )  # fmt: skip
    return steps * batch / cost["wall_seconds"]


def dpo_reference(project: Path, model: Path, out: Path, steps: int, batch: int) -> float:
    """What a user would write by hand: DPOTrainer + peft on the same pairs, in float32
    (the precision our run picks on a CPU), the same LoRA and DPO settings, and without
    gradient checkpointing (TRL's DPOConfig turns it on by default; our config does not)."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        args=DPOConfig(
            output_dir=str(out / f"dpo-ref-{time.monotonic_ns()}"),
            max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-4,
            lr_scheduler_type="cosine", warmup_steps=0.05, beta=0.1, max_length=None,
            save_strategy="no", report_to="none", disable_tqdm=True, bf16=False, fp16=False,
            gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(), seed=42,
        ),
        train_dataset=load_dataset("json", data_files=str(pairs(project)), split="train"),
        processing_class=AutoTokenizer.from_pretrained(model),
        peft_config=reference_lora(),
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    return steps * batch / (time.perf_counter() - started)


DEFAULT_ARMS = ("ours", "reference", "reference_defaults", "no_packing", "packing")
ARMS = (*DEFAULT_ARMS, "dpo", "dpo_reference")  # the DPO pair runs when named in --arms
RATIOS = {
    "ours_vs_reference": ("ours", "reference"),
    "ours_vs_reference_defaults": ("ours", "reference_defaults"),
    "packing_vs_no_packing": ("packing", "no_packing"),
    "dpo_vs_reference": ("dpo", "dpo_reference"),
}


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": values,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    baked.add_project_argument(parser)
    parser.add_argument("--model", help="local model folder (default: a tiny random Llama)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", help="the JSON report (default: reports/bench_train.json "
                        "of the project)")  # fmt: skip
    parser.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help=f"comma list of arms to run, of {','.join(ARMS)} (a ratio is reported when both "
        "of its arms ran)",
    )
    args = parser.parse_args()
    wanted = args.arms.split(",")
    if not set(wanted) <= set(ARMS):
        parser.error(f"--arms: choose from {','.join(ARMS)}")
    project = args.project
    baked.check_installed(project)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = Path(args.model) if args.model else baked.tiny_model(project, scratch / "tiny")
        data = project / "data" / "tickets_train.jsonl"
        varied = variable_length_data(project, scratch / "varied.jsonl", 400, seed=0)
        # Packed rows hold data.max_length (512) tokens: give packing as many real tokens
        # per step as the unpacked batch holds, so both arms train on the same budget.
        packed_batch = max(1, round(args.batch_size * mean_length(project, model, varied) / 512))
        steps, batch = args.steps, args.batch_size
        arms = {
            "ours": lambda: ours(project, model, data, scratch, steps, batch, False),
            "reference": lambda: reference(model, data, scratch, steps, batch, fp32=True),
            "reference_defaults": lambda: reference(model, data, scratch, steps, batch, False),
            "no_packing": lambda: ours(project, model, varied, scratch, steps, batch, False),
            "packing": lambda: ours(project, model, varied, scratch, steps, packed_batch, True),
            "dpo": lambda: dpo_ours(project, model, scratch, steps, batch),
            "dpo_reference": lambda: dpo_reference(project, model, scratch, steps, batch),
        }
        arms = {name: arm for name, arm in arms.items() if name in wanted}
        results: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(args.repeats):  # interleaved, so drift hits every arm alike
            for name, arm in arms.items():
                results[name].append(arm())

    figures = {name: summarize(values) for name, values in results.items()}
    median = {name: figure["median"] for name, figure in figures.items()}
    report = {
        "benchmark": "training non-pad tokens/s (dpo arms: preference pairs/s)",
        "model": args.model or baked.TINY_MODEL,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "tokens_per_second": figures,
        "ratios": {
            name: median[top] / median[bottom]
            for name, (top, bottom) in RATIOS.items()
            if top in median and bottom in median
        },
        "packed_batch_size": packed_batch,
        "targets": {
            "ours_vs_reference": 1.0,
            "ours_vs_reference_defaults": 1.0,
            "packing_vs_no_packing": 1.5,
            "dpo_vs_reference": 1.0,
        },
        "environment": baked.module(project, "info").describe(),
        "date": time.strftime("%Y-%m-%d"),
    }
    output = Path(args.output or project / "reports" / "bench_train.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    for name, ratio in report["ratios"].items():
        target = report["targets"][name]
        print(f"{name}: {ratio:.2f}x (target >= {target}x) {'PASS' if ratio >= target else 'FAIL'}")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
