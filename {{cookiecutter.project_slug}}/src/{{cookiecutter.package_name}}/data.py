"""Training data: load records, check them, map every format to chat messages, tokenize.

Accepted record formats (one per line of JSONL, a list in JSON, rows in Parquet,
or a Hugging Face dataset id):

- ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``
- ``{"prompt": ..., "completion": ...}``
- ``{"instruction": ..., "input": ... (optional), "output": ...}``

Preference pairs (train.method=dpo), in the same files:

- ``{"prompt": ..., "chosen": ..., "rejected": ...}`` with texts, or
- the chat form: ``prompt`` a list of messages, ``chosen`` and ``rejected`` each a list
  holding the one assistant message.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

from .chat import (
    IGNORE_INDEX,
    ROLES,
    EncodedConversation,
    Message,
    encode_conversation,
    prompt_ids,
)
from .config import DataConfig
from .errors import UserError

log = logging.getLogger(__name__)
RecordT = TypeVar("RecordT")

FORMAT_KEYS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "output"),
}


@dataclass
class Record:
    where: str  # "file:line" or "dataset[index]", for error messages
    messages: list[Message]


@dataclass
class EncodedSplit:
    examples: list[EncodedConversation] = field(default_factory=list)
    records: int = 0
    truncated: int = 0
    dropped: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(example.input_ids) for example in self.examples)

    def summary(self, name: str) -> str:
        return (
            f"{name}: {self.records} records -> {len(self.examples)} examples, "
            f"{self.tokens} tokens ({self.truncated} truncated, {self.dropped} dropped as too long)"
        )


def _raw_records(source: str, split: str) -> Iterator[tuple[str, Any]]:
    path = Path(source)
    readers = {".jsonl": _jsonl_records, ".json": _json_records, ".parquet": _parquet_records}
    if path.suffix in readers:
        yield from readers[path.suffix](path, source)
    elif path.is_dir():
        yield from _hub_records(source, split)  # a folder of data files, read by datasets
    elif path.suffix or source.count("/") != 1:
        raise UserError(
            f"data source {source!r}: use a .jsonl, .json or .parquet file, "
            "or a Hugging Face dataset id like 'org/name'"
        )
    else:
        yield from _hub_records(source, split)


def _jsonl_records(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    with _open(path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield f"{source}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(
                    f"{source}:{number}: not valid JSON ({error.msg} at column {error.colno})"
                ) from None


def _json_records(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    with _open(path) as handle:
        try:
            content = json.load(handle)
        except json.JSONDecodeError as error:
            raise UserError(f"{source}:{error.lineno}: not valid JSON ({error.msg})") from None
    if isinstance(content, dict) and isinstance(content.get("data"), list):
        content = content["data"]
    if not isinstance(content, list):
        raise UserError(f"{source}: a JSON data file must hold a list of records")
    for index, record in enumerate(content):
        yield f"{source}[{index}]", record


def _parquet_records(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    if not path.is_file():
        raise UserError(f"data file {source} does not exist")
    import pyarrow.parquet as pq

    for index, record in enumerate(pq.read_table(path).to_pylist()):
        yield f"{source}[row {index}]", record


def _open(path: Path) -> TextIO:
    try:
        return path.open(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"data file {path} does not exist") from None


def _hub_records(dataset_id: str, split: str) -> Iterator[tuple[str, Any]]:
    # datasets caches downloads, reads the cache when HF_HUB_OFFLINE=1 and falls back
    # to the cached copy when the hub cannot be reached.
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, split=split)
    except Exception as error:  # the hub raises many types; all mean "cannot load"
        raise UserError(
            f"cannot load dataset {dataset_id!r} (split {split!r}): {error}\n"
            "  Use a local .jsonl/.json/.parquet file, or load it once with network access "
            "so it is cached (then HF_HUB_OFFLINE=1 works)."
        ) from None
    for index, record in enumerate(dataset):
        yield f"{dataset_id}[{index}]", record


def _detect_format(where: str, record: dict[str, Any], wanted: str) -> str:
    # Columnar sources (Parquet, datasets) fill missing fields with None: treat as absent.
    present = {key for key, value in record.items() if value is not None}
    formats = [name for name, keys in FORMAT_KEYS.items() if present.issuperset(keys)]
    if wanted != "auto":
        if wanted not in formats:
            keys = " and ".join(repr(k) for k in FORMAT_KEYS[wanted])
            raise UserError(f"{where}: format {wanted!r} needs the field(s) {keys}")
        return wanted
    if not formats:
        raise UserError(
            f"{where}: unknown record shape with fields {sorted(present)}; expected 'messages', "
            "'prompt' + 'completion', or 'instruction' + 'output'"
        )
    return formats[0]


def _text(where: str, record: dict[str, Any], key: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        value = ""
    if not isinstance(value, str) or (not optional and not value.strip()):
        raise UserError(f"{where}: field {key!r} must be a non-empty string (got {value!r})")
    return value


def _checked_messages(where: str, given: Any) -> list[Message]:
    if not isinstance(given, list) or not given:
        raise UserError(f"{where}: field 'messages' must be a non-empty list")
    checked: list[Message] = []
    for index, message in enumerate(given):
        name = f"messages[{index}]"
        if not isinstance(message, dict):
            raise UserError(f"{where}: field {name!r} must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise UserError(
                f"{where}: field '{name}.role' is {role!r}; use one of {', '.join(ROLES)}"
            )
        content = _text(f"{where}: {name}", message, "content", optional=role != "assistant")
        checked.append({"role": str(role), "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise UserError(f"{where}: field 'messages' has no assistant message to learn from")
    return checked


def to_messages(where: str, record: Any, wanted: str, system_prompt: str | None) -> list[Message]:
    """Check one record and map it to chat messages."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    kind = _detect_format(where, record, wanted)
    messages: list[Message]
    if kind == "messages":
        messages = _checked_messages(where, record["messages"])
    elif kind == "prompt_completion":
        messages = [
            {"role": "user", "content": _text(where, record, "prompt")},
            {"role": "assistant", "content": _text(where, record, "completion")},
        ]
    else:
        instruction = _text(where, record, "instruction")
        extra = _text(where, record, "input", optional=True)
        messages = [
            {"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
            {"role": "assistant", "content": _text(where, record, "output")},
        ]
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def load_records(source: str, config: DataConfig) -> list[Record]:
    records = [
        Record(where, to_messages(where, raw, config.format, config.system_prompt))
        for where, raw in _raw_records(source, config.split)
    ]
    if not records:
        raise UserError(f"data source {source} holds no records; add at least one example")
    return records


def encode_records(records: list[Record], tokenizer: Any, config: DataConfig) -> EncodedSplit:
    """Tokenize with the shared prompt format; truncate or drop what is too long."""
    split = EncodedSplit(records=len(records))
    for record in records:
        try:
            example = encode_conversation(tokenizer, record.messages, config.train_on_prompt)
        except ValueError as error:
            raise UserError(f"{record.where}: {error}") from None
        if len(example.input_ids) > config.max_length:
            if config.overlong == "drop":
                split.dropped += 1
                continue
            example = EncodedConversation(
                example.input_ids[: config.max_length], example.labels[: config.max_length]
            )
            if example.trained_tokens == 0:  # the prompt alone filled max_length
                split.dropped += 1
                continue
            split.truncated += 1
        split.examples.append(example)
    return split


def split_records(
    config: DataConfig, seed: int, load: Callable[[str, DataConfig], list[RecordT]]
) -> tuple[list[RecordT], list[RecordT] | None]:
    """Train and eval records: eval from its own file or a seeded share of the train data."""
    train_records = load(config.train, config)
    eval_records: list[RecordT] | None = None
    if config.eval:
        eval_records = load(config.eval, config)
    elif config.eval_fraction:
        shuffled = train_records[:]
        random.Random(seed).shuffle(shuffled)
        size = max(1, round(len(shuffled) * config.eval_fraction))
        if size >= len(shuffled):
            raise UserError(
                f"data.eval_fraction={config.eval_fraction} leaves no training records "
                f"out of {len(shuffled)}; lower it"
            )
        eval_records, train_records = shuffled[:size], shuffled[size:]
    return train_records, eval_records


def load_splits(
    config: DataConfig, tokenizer: Any, seed: int
) -> tuple[EncodedSplit, EncodedSplit | None]:
    """Train and eval splits: eval from its own file or a seeded share of the train data."""
    return _encoded_splits(config, tokenizer, seed, load_records, encode_records, "training record")


# --- preference pairs (train.method=dpo) ---------------------------------------------

PAIR_KEYS = ("prompt", "chosen", "rejected")


@dataclass
class PreferenceRecord:
    where: str
    prompt: list[Message]  # the conversation up to the answer
    chosen: str
    rejected: str


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]  # as served: chat.prompt_ids
    chosen_ids: list[int]  # the answer as SFT trains it: up to and including EOS
    rejected_ids: list[int]


@dataclass
class PreferenceSplit:
    examples: list[EncodedPair] = field(default_factory=list)
    records: int = 0
    truncated: int = 0
    dropped: int = 0

    @property
    def tokens(self) -> int:
        return sum(
            2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in self.examples
        )

    def summary(self, name: str) -> str:
        return (
            f"{name}: {self.records} preference records -> {len(self.examples)} pairs, "
            f"{self.tokens} tokens ({self.truncated} truncated, {self.dropped} dropped as too long)"
        )


def _answer(where: str, record: dict[str, Any], key: str) -> str:
    """An answer: a text, or the chat form's list with one assistant message."""
    value = record[key]
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise UserError(
                f"{where}: field {key!r} must be a text or a list with one assistant message "
                '(e.g. [{"role": "assistant", "content": "..."}])'
            )
        return _text(f"{where}: {key}[0]", value[0], "content")
    return _text(where, record, key)


def _prompt(where: str, value: Any) -> list[Message]:
    if isinstance(value, list):
        checked: list[Message] = []
        for index, message in enumerate(value):
            name = f"prompt[{index}]"
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise UserError(
                    f"{where}: field {name!r} must be a message with a role in {', '.join(ROLES)}"
                )
            content = _text(f"{where}: {name}", message, "content")
            checked.append({"role": str(message["role"]), "content": content})
        if not checked or checked[-1]["role"] == "assistant":
            raise UserError(
                f"{where}: field 'prompt' must be a non-empty list of messages that does not end "
                "with the assistant's answer (the answers go in 'chosen' and 'rejected')"
            )
        return checked
    return [{"role": "user", "content": _text(where, {"prompt": value}, "prompt")}]


def to_preference(where: str, record: Any, system_prompt: str | None) -> PreferenceRecord:
    """Check one preference record: a prompt, and two different answers to it."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    missing = [key for key in PAIR_KEYS if record.get(key) is None]
    if missing:
        raise UserError(
            f"{where}: a preference record needs 'prompt', 'chosen' and 'rejected'; "
            f"{' and '.join(repr(key) for key in missing)} missing (fields: {sorted(record)})"
        )
    prompt = _prompt(where, record["prompt"])
    chosen, rejected = _answer(where, record, "chosen"), _answer(where, record, "rejected")
    if chosen.strip() == rejected.strip():
        raise UserError(
            f"{where}: 'chosen' and 'rejected' are the same text; a pair must prefer one answer "
            "over a different one (fix or drop the record)"
        )
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return PreferenceRecord(where, prompt, chosen, rejected)


def load_preferences(source: str, config: DataConfig) -> list[PreferenceRecord]:
    records = [
        to_preference(where, raw, config.system_prompt)
        for where, raw in _raw_records(source, config.split)
    ]
    if not records:
        raise UserError(f"data source {source} holds no records; add at least one pair")
    return records


def _answer_ids(tokenizer: Any, prompt: list[Message], answer: str) -> list[int]:
    """The answer's ids exactly as SFT trains them (the last assistant turn, with EOS)."""
    encoded = encode_conversation(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
    trained = 0
    for label in reversed(encoded.labels):
        if label == IGNORE_INDEX:
            break
        trained += 1
    return encoded.input_ids[len(encoded.input_ids) - trained :]


def encode_preferences(
    records: list[PreferenceRecord], tokenizer: Any, config: DataConfig
) -> PreferenceSplit:
    """Tokenize with the shared prompt format; truncate answers or drop what is too long."""
    split = PreferenceSplit(records=len(records))
    for record in records:
        try:
            prompt = prompt_ids(tokenizer, record.prompt)
            chosen = _answer_ids(tokenizer, record.prompt, record.chosen)
            rejected = _answer_ids(tokenizer, record.prompt, record.rejected)
        except ValueError as error:
            raise UserError(f"{record.where}: {error}") from None
        room = config.max_length - len(prompt)
        if len(chosen) > room or len(rejected) > room:
            if config.overlong == "drop" or room <= 0:
                split.dropped += 1
                continue
            chosen, rejected = chosen[:room], rejected[:room]
            split.truncated += 1
        split.examples.append(EncodedPair(prompt, chosen, rejected))
    return split


def load_preference_splits(
    config: DataConfig, tokenizer: Any, seed: int
) -> tuple[PreferenceSplit, PreferenceSplit | None]:
    return _encoded_splits(
        config, tokenizer, seed, load_preferences, encode_preferences, "preference pair"
    )


SplitT = TypeVar("SplitT", EncodedSplit, PreferenceSplit)


def _encoded_splits(
    config: DataConfig,
    tokenizer: Any,
    seed: int,
    load: Callable[[str, DataConfig], list[RecordT]],
    encode: Callable[[list[RecordT], Any, DataConfig], SplitT],
    what: str,
) -> tuple[SplitT, SplitT | None]:
    """Load, split and encode; a train split left empty by data.max_length is an error."""
    train_records, eval_records = split_records(config, seed, load)
    train = encode(train_records, tokenizer, config)
    if not train.examples:
        raise UserError(
            f"every {what} is longer than data.max_length={config.max_length} and was "
            "dropped; raise data.max_length or set data.overlong=truncate"
        )
    log.info(train.summary("train"))
    evaluation = encode(eval_records, tokenizer, config) if eval_records else None
    if evaluation is not None:
        log.info(evaluation.summary("eval"))
    return train, evaluation
