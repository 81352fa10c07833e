"""The bundled ticket-routing task as the training tests use it: shared by the CPU and GPU tests."""

from __future__ import annotations

import json
from pathlib import Path

from {{ cookiecutter.package_name }}.config import load_config

PROJECT = Path(__file__).resolve().parents[1]
CONFIG = PROJECT / "configs" / "train.yaml"


def conversations(path: Path) -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines()]


def write_ticket_data(folder: Path) -> dict[str, Path]:
    """The bundled tickets without their system prompt: short prompts suit a 2-layer model
    with hidden size 64."""
    paths = {}
    for split in ("train", "eval"):
        records = conversations(PROJECT / "data" / f"tickets_{split}.jsonl")
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text(
            "".join(json.dumps({"messages": r[1:]}) + "\n" for r in records), encoding="utf-8"
        )
    return paths


def tiny_config(model_dir: Path, data: dict[str, Path], out: Path, *overrides: str):
    """configs/train.yaml on the tiny model: a larger batch and learning rate than a real run."""
    return load_config(
        CONFIG,
        [
            f"model.name_or_path={model_dir}",
            f"data.train={data['train']}",
            f"data.eval={data['eval']}",
            f"output.dir={out}",
            "train.batch_size=16",
            "train.learning_rate=5e-3",
            *overrides,
        ],
    )
