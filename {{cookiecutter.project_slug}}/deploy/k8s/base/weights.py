"""The weights on the models volume (HF_HOME): `fetch` downloads the model the serving config
serves (the weights Job), `wait` holds a replica back until it and the adapters are there
(the server's init container). Runs in the serving image, from the ConfigMap.

A finished download leaves a marker, so that `wait` never lets a replica load a model whose
files are still arriving.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from {{ cookiecutter.package_name }}.errors import UserError
from {{ cookiecutter.package_name }}.serving.config import ServeConfig, load_serve_config

# What the server reads: safetensors weights, configs and tokenizer files; no .bin, GGUF
# or ONNX copies of the same weights.
SERVED_FILES = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
POLL_S = 10


def is_hub_id(name_or_path: str) -> bool:
    return not name_or_path.startswith(("/", ".", "~"))


def marker(model_id: str) -> Path:
    return Path(os.environ.get("HF_HOME", "/models")) / "fetched" / model_id.replace("/", "--")


def fetch(config: ServeConfig) -> int:
    model = config.model.name_or_path
    if not is_hub_id(model):
        print(f"model {model} is a folder, not a hub id: copy it onto the volume yourself")
        return 0
    from huggingface_hub import snapshot_download

    folder = snapshot_download(model, allow_patterns=SERVED_FILES)
    marker(model).parent.mkdir(parents=True, exist_ok=True)
    marker(model).write_text(folder + "\n", encoding="utf-8")
    print(f"model {model}: {folder}")
    return 0


def missing(config: ServeConfig) -> list[str]:
    """What a replica would not find: the model (fetched or a folder) and adapter folders."""
    model = config.model.name_or_path
    wanted = [] if is_hub_id(model) else [model]
    wanted += list(config.adapters.values())
    gaps = [f"{path} (no such folder)" for path in wanted if not Path(path).is_dir()]
    if is_hub_id(model) and not marker(model).is_file():
        gaps.insert(0, f"{model} (not fetched yet: no {marker(model)}; see the weights Job)")
    return gaps


def wait(config: ServeConfig, timeout_s: float | None) -> int:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while gaps := missing(config):
        if deadline is not None and time.monotonic() >= deadline:
            print("still missing: " + "; ".join(gaps), file=sys.stderr)
            return 1
        print("waiting for: " + "; ".join(gaps), flush=True)
        time.sleep(POLL_S)
    print("weights are in place")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["fetch", "wait"])
    parser.add_argument("--config", required=True, help="the serving config (serve.yaml)")
    parser.add_argument("--timeout", type=float, help="wait: give up after this many seconds")
    args = parser.parse_args(argv)
    try:
        config = load_serve_config(args.config)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return fetch(config) if args.action == "fetch" else wait(config, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
