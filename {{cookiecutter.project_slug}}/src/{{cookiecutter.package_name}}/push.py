"""Publish a run on the Hugging Face Hub: its adapter, its merged model or both, with a
generated model card (README.md with the Hub's metadata).

Everything is checked before the network is touched: the repo id, every file, the token.
The upload is one commit (`HfApi.create_commit`): the Hub uploads the large files first
and makes them visible only when the commit is created, so an upload cut off midway leaves
the repo as it was, never half-updated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .chat import render
from .config import Config
from .errors import UserError
from .runs import ADAPTER_CONFIG, PROGRAM, RunFolder, TrainingCost, TrainingMetrics

What = Literal["adapter", "merged", "both"]
CARD = "README.md"


@dataclass(frozen=True)
class PushOptions:
    run: Path
    repo_id: str | None = None  # default: push.repo_id of the run's config
    what: What | None = None  # default: push.what
    private: bool | None = None  # default: push.private
    dry_run: bool = False
    card_out: Path | None = None  # where --dry-run writes the card; default <run>/README.md
    cost_card: Path | None = None  # serving cost_card.json; default: the newest in reports/


@dataclass(frozen=True)
class Upload:
    """One file of the commit: where it is here and where it goes in the repo."""

    local: Path
    in_repo: str

    @property
    def size(self) -> int:
        return self.local.stat().st_size


@dataclass(frozen=True)
class PushPlan:
    repo_id: str
    private: bool
    what: What
    uploads: list[Upload]
    card: str


def check_repo_id(repo_id: str | None) -> str:
    """The Hub's own rules for a repo id (huggingface_hub's validator), as one line."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # lazy export

    if not repo_id:
        raise UserError(
            "no Hub repo id: give --repo-id user/name or set push.repo_id in the config"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"Hub repo id {repo_id!r} is not valid: {error}") from None
    if repo_id.count("/") != 1:
        raise UserError(f"Hub repo id {repo_id!r} must be user/name (or org/name)")
    return repo_id


def _files(folder: Path, fix: str, required: tuple[str, ...]) -> list[Path]:
    missing = [name for name in required if not (folder / name).is_file()]
    weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if missing or not weights:
        name = missing[0] if missing else "*.safetensors"
        raise UserError(f"{folder / name} is missing, so nothing was uploaded; {fix}")
    # peft writes a placeholder README.md into the adapter: the generated card replaces it.
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != CARD)


def plan_uploads(run: RunFolder, what: What) -> list[Upload]:
    """The merged model at the repo's root (so it loads by repo id) and the adapter at the
    root when pushed alone, else under adapter/."""
    uploads: list[Upload] = []
    if what in ("merged", "both"):
        fix = f"merge the run first: {PROGRAM} merge {run.path}"
        uploads += [Upload(p, p.name) for p in _files(run.merged, fix, ("config.json",))]
    if what in ("adapter", "both"):
        fix = f"finish or resume the run first: {PROGRAM} train --resume {run.path}"
        prefix = "" if what == "adapter" else "adapter/"
        files = _files(run.adapter, fix, (ADAPTER_CONFIG,))
        uploads += [Upload(p, prefix + p.name) for p in files]
    return uploads


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_line(source: str | None) -> str:
    if not source:
        return "none"
    path = Path(source)
    if path.is_file():
        return f"`{path.name}` (sha256 `{sha256(path)}`)"
    return f"`{source}` (a Hugging Face dataset id; not hashed here: files only)"


def serving_headline(cost_card: Path | None) -> str | None:
    """The best level of the newest serving cost card, in one line."""
    from pydantic import ValidationError

    from .cost.schema import CostCard

    cards = [cost_card] if cost_card else sorted(
        Path("reports").glob("*/cost_card.json"), key=lambda p: p.stat().st_mtime, reverse=True
    )  # fmt: skip
    for path in cards:
        try:
            card = CostCard.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as error:
            if not cost_card:
                continue  # an older or foreign card among the reports
            reason = (
                f"{error.error_count()} problems, first: {error.errors()[0]['msg']}"
                if isinstance(error, ValidationError)
                else str(error)
            )
            raise UserError(
                f"cost card {path} is not a cost card this version reads ({reason}); give the "
                "cost_card.json that `token-cost` wrote, or leave out --cost-card"
            ) from None
        serving = card.serving
        level = serving.best_level() if serving else None
        if serving is None or level is None:
            continue
        money = level.money
        return (
            f"${money.usd_per_1m_output_tokens:.4g} per 1M output tokens and "
            f"${money.usd_per_1m_input_tokens:.4g} per 1M input tokens at {serving.best.label} "
            f"({level.output_tokens_per_s:.1f} output tokens/s on {card.environment.device}, "
            f"${card.prices.gpu_hourly_usd}/hour; {path})"
        )
    return None


def model_card(
    run: RunFolder, config: Config, repo_id: str, what: What, cost_card: Path | None
) -> str:
    """README.md: the Hub's metadata block, then what a user needs to trust and load it."""
    from huggingface_hub import ModelCard, ModelCardData

    from .modeling import load_tokenizer

    metrics: TrainingMetrics | None = run.read_metrics() if run.metrics_file.is_file() else None
    cost: TrainingCost | None = run.read_cost() if run.cost_file.is_file() else None
    evaluation = run.read_eval()
    base = config.model.name_or_path
    method = config.train.method
    tags = ["lora", "peft", method, "text-generation", PROGRAM.replace("_", "-")]
    data = ModelCardData(
        base_model=base if not Path(base).exists() else None,
        license=config.push.license,
        library_name="peft" if what == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )
    tokenizer = load_tokenizer(str(run.adapter), config.model.trust_remote_code)
    sample = [{"role": "user", "content": "Hello!"}]
    lora = config.lora
    lines = [
        f"# {repo_id.split('/')[1]}",
        "",
        f"A LoRA fine-tune ({method.upper()}) of `{base}`, trained with `{PROGRAM}`.",
        "",
        "## Training",
        "",
        f"- Base model: `{base}`",
        f"- Method: {method}"
        + (f" (beta {config.dpo.beta}, {config.dpo.loss_type} loss)" if method == "dpo" else ""),
        f"- LoRA: r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout}, "
        f"target modules {lora.target_modules}, init {lora.init}"
        + (", rsLoRA" if lora.use_rslora else "")
        + (", DoRA" if lora.use_dora else ""),
        f"- Quantization while training: {config.quantization.mode}",
        f"- Training data: {data_line(config.data.train)}",
        f"- Evaluation data: {data_line(config.data.eval)}",
        f"- Steps: {metrics.global_step if metrics else 'unknown'}; learning rate "
        f"{config.train.learning_rate:g} ({config.train.lr_scheduler}), batch "
        f"{config.train.batch_size} x {config.train.grad_accum} accumulation",
    ]
    if metrics and metrics.eval_losses:
        losses = metrics.eval_losses
        lines.append(f"- Eval loss: {losses[0]:.4f} before training -> {losses[-1]:.4f} after")
    if evaluation:
        lines.append(
            f"- Held-out accuracy: {evaluation.accuracy:.1%} on {evaluation.examples} examples"
            + (f" of `{Path(evaluation.data).name}`" if evaluation.data else "")
        )
    if cost:
        usd = f"${cost.usd:.4f}" if cost.usd is not None else "unknown"
        lines.append(
            f"- Training cost: {usd} ({cost.wall_seconds:.0f} s on {cost.device} at "
            f"${cost.gpu_hourly_usd}/hour, {cost.trained_tokens} tokens)"
        )
    headline = serving_headline(cost_card)
    if headline:
        lines.append(f"- Serving cost (measured): {headline}")
    lines += [
        "",
        "## Chat template",
        "",
        "The model was trained on conversations rendered with this template; serve it with "
        "the same one (the tokenizer files here carry it). A user turn renders as:",
        "",
        "```text",
        render(tokenizer, sample, add_generation_prompt=True),
        "```",
        "",
        "```jinja",
        str(tokenizer.chat_template),
        "```",
        "",
        "## Use it",
        "",
        *_usage(repo_id, base, what),
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return str(ModelCard(content).content)


def _usage(repo_id: str, base: str, what: What) -> list[str]:
    adapter_from = repo_id if what == "adapter" else f'{repo_id}", subfolder="adapter'
    lines: list[str] = []
    if what in ("merged", "both"):
        lines += [
            "With transformers (the merged model):",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            "```",
            "",
            "With vLLM:",
            "",
            "```bash",
            f"vllm serve {repo_id}",
            "```",
            "",
        ]
    if what in ("adapter", "both"):
        vllm_adapter = repo_id if what == "adapter" else f"<download of {repo_id}>/adapter"
        lines += [
            "With peft (the adapter on its base):",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{adapter_from}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{adapter_from}")',
            "```",
            "",
            "With vLLM (the adapter by name):",
            "",
            "```bash",
            f"vllm serve {base} --enable-lora --lora-modules adapter={vllm_adapter}",
            "```",
            "",
        ]
    return lines


def plan_push(options: PushOptions) -> PushPlan:
    run = RunFolder(options.run)
    config = run.read_config()
    repo_id = check_repo_id(options.repo_id or config.push.repo_id)
    what: What = options.what or config.push.what
    private = config.push.private if options.private is None else options.private
    uploads = plan_uploads(run, what)
    card = model_card(run, config, repo_id, what, options.cost_card)
    return PushPlan(repo_id, private, what, uploads, card)


def hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()  # HF_TOKEN, else the token `hf auth login` saved
    if not token:
        raise UserError(
            "no Hugging Face token, so nothing was uploaded: export HF_TOKEN=<a write token from "
            "https://huggingface.co/settings/tokens> (or run `hf auth login`), or use --dry-run"
        )
    return token


def upload(plan: PushPlan, token: str) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
    operations = [CommitOperationAdd(u.in_repo, str(u.local)) for u in plan.uploads]
    operations.append(CommitOperationAdd(CARD, plan.card.encode("utf-8")))
    commit = api.create_commit(
        plan.repo_id, operations=operations, commit_message=f"Upload {plan.what} from {PROGRAM}"
    )
    return str(commit.commit_url)


def push_command(options: PushOptions) -> int:
    plan = plan_push(options)
    token = None if options.dry_run else hub_token()
    width = max(len(u.in_repo) for u in plan.uploads)
    privacy = "private" if plan.private else "public"
    print(f"{plan.repo_id} ({privacy}): {plan.what}, {len(plan.uploads) + 1} files in one commit")
    for item in plan.uploads:
        print(f"  {item.in_repo:<{width}}  {item.size:>12,} bytes")
    print(f"  {CARD:<{width}}  {len(plan.card.encode()):>12,} bytes (generated model card)")
    if options.dry_run or token is None:
        card_out = options.card_out or RunFolder(options.run).model_card
        card_out.parent.mkdir(parents=True, exist_ok=True)
        card_out.write_text(plan.card, encoding="utf-8")
        print(f"dry run: nothing uploaded; the card is at {card_out}")
        return 0
    print(f"uploaded: {upload(plan, token)}")
    return 0
