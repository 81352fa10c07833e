"""Quality per dollar: the eval set answered through the endpoint, scored, then priced.

Each served model answers every record's prompt greedily (temperature 0), as `evaluate`
does in process, with the same chat formatting on the server's side, so the two give the
same answers. An answer costs its own tokens at the measured $ per 1M tokens; $ per 1,000
correct answers divides the set's cost by the score it earned.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from ..errors import UserError
from ..scoring import Scorer, resolve_scorer
from .config import QualitySection
from .load import Endpoint, Prompt, RequestResult, stream_request
from .money import usd_for_tokens
from .schema import ModelQuality, Money, Quality, sha256_json
from .summary import request_tokens

ANSWERS_FILE = "quality_answers.jsonl"


@dataclass(frozen=True)
class EvalItem:
    where: str  # file:line, for messages
    prompt: list[dict[str, str]]
    reference: str


@dataclass(frozen=True)
class Prices:
    """Where a model's $ per 1M tokens come from: a level of the sweep."""

    level: str
    money: Money | None


def eval_items(spec: QualitySection) -> list[EvalItem]:
    """The records of quality.dataset, each with its reference answer (the last turn)."""
    from ..config import DataConfig
    from ..data import load_records

    try:
        records = load_records(spec.dataset, DataConfig(train=spec.dataset, eval=None))
    except UserError as error:
        raise UserError(
            f"quality.dataset: {error} (each record's last turn is its reference answer)"
        ) from None
    items = []
    for record in records[: spec.limit]:
        last = record.messages[-1]
        if last["role"] != "assistant" or len(record.messages) < 2:
            raise UserError(
                f"{record.where}: quality.dataset needs the reference answer as the last "
                f"(assistant) turn of each record, and this one ends with a {last['role']} "
                "turn: add the answers, or point quality.dataset at a labelled eval set"
            )
        prompt = [{"role": m["role"], "content": m["content"]} for m in record.messages[:-1]]
        items.append(EvalItem(record.where, prompt, last["content"]))
    return items


@dataclass(frozen=True)
class EvalSet:
    """The records to answer and the scorer that judges them, read once before any start."""

    items: list[EvalItem]
    scorer: Scorer


def load_eval_set(spec: QualitySection) -> EvalSet:
    """quality.scorer and quality.dataset, checked: a bad one fails before a server starts."""
    return EvalSet(eval_items(spec), resolve_scorer(spec.scorer))


async def _answer_all(
    endpoint: Endpoint, models: list[str], items: list[EvalItem], concurrency: int
) -> dict[str, list[RequestResult]]:
    slots = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, model: str, index: int) -> RequestResult:
        async with slots:
            prompt = Prompt(messages=items[index].prompt)
            return await stream_request(client, replace(endpoint, model=model), prompt, index, 0)

    async with endpoint.client(concurrency) as client:
        answers = {}
        for model in models:
            jobs = [one(client, model, index) for index in range(len(items))]
            answers[model] = list(await asyncio.gather(*jobs))
    return answers


def score(
    spec: QualitySection,
    eval_set: EvalSet,
    endpoint: Endpoint,
    models: list[str],
    prices: dict[str, Prices],
    folder: Path,
) -> Quality:
    """Answer, score and price the eval set for each model; every answer goes to a file."""
    items, scorer = eval_set.items, eval_set.scorer
    greedy = replace(endpoint, api="chat", max_tokens=spec.max_tokens, temperature=0.0,
                     ignore_eos=False)  # fmt: skip
    answers = asyncio.run(_answer_all(greedy, models, items, spec.concurrency))
    path = folder / ANSWERS_FILE
    results = []
    with path.open("w", encoding="utf-8") as out:
        for model in models:
            scores = _scores(model, answers[model], items, scorer)
            for item, answer, value in zip(items, answers[model], scores, strict=True):
                row = {"model": model, "where": item.where, "reference": item.reference,
                       "answer": answer.text, "score": value,
                       "finish_reason": answer.finish_reason}  # fmt: skip
                out.write(json.dumps(row) + "\n")
            results.append(_priced(model, answers[model], scores, prices[model]))
    sent = [[item.prompt, item.reference] for item in items]
    return Quality(
        dataset=spec.dataset, examples=len(items), sha256=sha256_json(sent), scorer=spec.scorer,
        max_tokens=spec.max_tokens, answers_file=str(path), models=results,
    )  # fmt: skip


def _scores(
    model: str, answers: list[RequestResult], items: list[EvalItem], scorer: Scorer
) -> list[float]:
    failed = [a for a in answers if not a.ok]
    if failed:
        raise UserError(
            f"quality: {len(failed)} of {len(answers)} answers of {model!r} failed; "
            f"the first: {failed[0].error}"
        )
    values = []
    for item, answer in zip(items, answers, strict=True):
        value = float(scorer(answer.text, item.reference))
        if not 0.0 <= value <= 1.0:
            raise UserError(f"quality.scorer gave {value} for {item.where}: scores are in [0, 1]")
        values.append(value)
    return values


def _priced(
    model: str, answers: list[RequestResult], scores: list[float], prices: Prices
) -> ModelQuality:
    input_tokens, output_tokens = request_tokens(answers)
    money = prices.money
    per_in = money.usd_per_1m_input_tokens if money else None
    per_out = money.usd_per_1m_output_tokens if money else None
    usd = None
    if per_out is not None:
        usd = usd_for_tokens(input_tokens, output_tokens, per_in or 0.0, per_out)
    correct = sum(scores)
    return ModelQuality(
        model=model, examples=len(answers), correct=correct,
        accuracy=correct / len(answers) if answers else 0.0,
        input_tokens=input_tokens, output_tokens=output_tokens, prices_from=prices.level,
        usd_per_1m_input_tokens=per_in, usd_per_1m_output_tokens=per_out, usd=usd,
        usd_per_1k_correct=usd / correct * 1000 if usd is not None and correct else None,
    )  # fmt: skip
