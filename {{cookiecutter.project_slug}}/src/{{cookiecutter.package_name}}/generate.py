"""`generate`: stream a model's answer to the terminal (base, base + adapter, or merged).

The prompt is formatted by `chat.prompt_ids`, the function training uses, unless
`--raw` asks for plain text completion. Tokens are printed as they are generated
(transformers' TextIteratorStreamer); the timing goes to stderr.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .errors import UserError

if TYPE_CHECKING:
    from .device import Precision
    from .inference import SamplingParams


def read_messages(path: str) -> list[dict[str, str]]:
    """A chat from a JSON file: a list of {role, content}, or {"messages": [...]}."""
    source = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(source)
    except json.JSONDecodeError as error:
        raise UserError(f"chat file {path}: not valid JSON ({error})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list) or not messages:
        raise UserError(f"chat file {path}: expected a non-empty list of messages")
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and {"role", "content"} <= message.keys()):
            raise UserError(f"chat file {path}: message {index} needs 'role' and 'content'")
    return messages


@dataclass(frozen=True)
class GenerateOptions:
    """`generate`'s command line."""

    model: str  # hub id, local folder, or runs/<run>/merged
    adapter: str | None = None  # a LoRA adapter folder injected into the model
    prompt: str | None = None  # the user message ("-": stdin); or chat_file
    chat_file: str | None = None  # a JSON conversation
    system: str | None = None  # a system message before the prompt
    raw: bool = False  # complete the prompt as plain text, no chat template
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False


def generate_command(
    options: GenerateOptions, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Stream the answer to `out` (stdout), then its timing to `err` (stderr)."""
    o = options
    prompt = o.prompt
    if (prompt is None) == (o.chat_file is None):
        raise UserError("give a prompt, or --chat FILE with a conversation (not both)")
    if o.raw and o.chat_file is not None:
        raise UserError("--raw completes plain text; it does not take a --chat file")
    if prompt == "-":
        prompt = sys.stdin.read()
    if o.adapter is not None:
        from .inference import check_adapter_dir

        check_adapter_dir(o.adapter)

    from .device import pick_precision
    from .inference import SamplingParams, context_length, eos_token_ids

    precision = pick_precision(o.device, o.dtype)
    started = time.perf_counter()
    lm, tokenizer = load(o.model, o.adapter, precision, o.trust_remote_code)
    loaded = time.perf_counter() - started

    if o.raw:
        ids: list[int] = tokenizer(prompt)["input_ids"]
    else:
        ids = chat_prompt_ids(tokenizer, prompt, o.chat_file, o.system)
    room = context_length(lm) - len(ids)
    if room < 1:
        raise UserError(
            f"the prompt is {len(ids)} tokens; the model's context is {context_length(lm)}"
        )
    eos = eos_token_ids(lm, tokenizer)
    sampling = SamplingParams(min(o.max_tokens, room), o.temperature, o.top_p, o.seed)
    generation = stream(lm, tokenizer, ids, eos, sampling, precision.device, out or sys.stdout)
    generated = generation.new_tokens(len(ids))
    stopped = "eos" if generated and generation.last_token in eos else "max_tokens"
    print(
        f"[{generated} tokens, stop: {stopped}, load {loaded:.1f} s, "
        f"first token {generation.first_token_s or generation.seconds:.2f} s, "
        f"{generated / max(generation.seconds, 1e-9):.1f} tokens/s, "
        f"{precision.device} {precision.dtype_name}]",
        file=err or sys.stderr,
    )
    return 0


def load(model: str, adapter: str | None, precision: Precision, trust: bool) -> tuple[Any, Any]:
    """The model (with the adapter injected, if any) in eval mode, and its tokenizer."""
    from .inference import attach_adapter
    from .modeling import load_model, load_tokenizer
    from .runs import tokenizer_source

    tokenizer = load_tokenizer(tokenizer_source(model, adapter), trust_remote_code=trust)
    lm = load_model(model, dtype=precision.dtype, device=precision.device, trust_remote_code=trust)
    if adapter is not None:
        lm = attach_adapter(lm, adapter, "adapter", share_base=False)
    lm.eval()
    return lm, tokenizer


def chat_prompt_ids(
    tokenizer: Any, prompt: str | None, chat_file: str | None, system: str | None
) -> list[int]:
    """The conversation (the chat file, or the prompt as one user turn) as prompt ids."""
    from .chat import Message, prompt_ids

    messages: list[Message]
    if chat_file:
        messages = read_messages(chat_file)
    else:
        messages = [{"role": "user", "content": prompt or ""}]
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    try:
        return prompt_ids(tokenizer, messages)
    except ValueError as error:
        raise UserError(f"{error}; or pass --raw to complete plain text") from None


@dataclass
class GenerateResult:
    output: Any = None  # the generated ids, prompt included (1 x length)
    error: BaseException | None = None
    first_token_s: float | None = None
    seconds: float = 0.0

    def new_tokens(self, prompt_length: int) -> int:
        return int(self.output.shape[1]) - prompt_length

    @property
    def last_token(self) -> int:
        return int(self.output[0, -1])


def stream(
    lm: Any,
    tokenizer: Any,
    ids: list[int],
    eos: list[int],
    sampling: SamplingParams,
    device: str,
    out: TextIO,
) -> GenerateResult:
    """Generate in a thread and write the text to `out` as it comes."""
    import torch
    from transformers import TextIteratorStreamer

    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = {
        "input_ids": torch.tensor([ids], device=device),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
        "max_new_tokens": sampling.max_tokens,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
        **sampling.generate_kwargs(),
    }
    result = GenerateResult()

    def run() -> None:
        try:
            with torch.inference_mode():
                result.output = lm.generate(**kwargs, streamer=streamer)
        except BaseException as error:  # surfaced in the main thread
            result.error = error
            streamer.end()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated

    worker = threading.Thread(target=run, daemon=True)
    begin = time.perf_counter()
    worker.start()
    for text in streamer:
        if text and result.first_token_s is None:
            result.first_token_s = time.perf_counter() - begin
        out.write(text)
        out.flush()
    worker.join()
    if result.error is not None:
        raise result.error
    out.write("\n")
    result.seconds = time.perf_counter() - begin
    return result
