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
from pathlib import Path
from typing import Any, TextIO

from .errors import UserError


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


def generate_command(
    model: str,
    adapter: str | None = None,
    prompt: str | None = None,
    chat_file: str | None = None,
    system: str | None = None,
    raw: bool = False,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    if (prompt is None) == (chat_file is None):
        raise UserError("give a prompt, or --chat FILE with a conversation (not both)")
    if raw and chat_file is not None:
        raise UserError("--raw completes plain text; it does not take a --chat file")
    if prompt == "-":
        prompt = sys.stdin.read()
    if adapter is not None:
        from .inference import check_adapter_dir

        check_adapter_dir(adapter)

    import torch
    from transformers import TextIteratorStreamer

    from .chat import prompt_ids
    from .device import pick_precision
    from .inference import attach_adapter, context_length, eos_token_ids, tokenizer_source
    from .modeling import load_model, load_tokenizer

    precision = pick_precision(device, dtype)
    started = time.perf_counter()
    source = tokenizer_source(model, adapter)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    lm = load_model(
        model,
        dtype=precision.dtype,
        device=precision.device,
        trust_remote_code=trust_remote_code,
    )
    if adapter is not None:
        lm = attach_adapter(lm, adapter, "adapter", share_base=False)
    lm.eval()
    loaded = time.perf_counter() - started

    if raw:
        ids = tokenizer(prompt)["input_ids"]
    else:
        messages = read_messages(chat_file) if chat_file else [{"role": "user", "content": prompt}]
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        try:
            ids = prompt_ids(tokenizer, messages)
        except ValueError as error:
            raise UserError(f"{error}; or pass --raw to complete plain text") from None
    room = context_length(lm) - len(ids)
    if room < 1:
        raise UserError(
            f"the prompt is {len(ids)} tokens; the model's context is {context_length(lm)}"
        )
    eos = eos_token_ids(lm, tokenizer)
    kwargs: dict[str, Any] = {
        "input_ids": torch.tensor([ids], device=precision.device),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=precision.device),
        "max_new_tokens": min(max_tokens, room),
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(seed)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            with torch.inference_mode():
                result["ids"] = lm.generate(**kwargs, streamer=streamer)
        except BaseException as error:  # surfaced in the main thread
            result["error"] = error
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    begin = time.perf_counter()
    worker.start()
    first: float | None = None
    for text in streamer:
        if text and first is None:
            first = time.perf_counter() - begin
        out.write(text)
        out.flush()
    worker.join()
    if "error" in result:
        raise result["error"]
    out.write("\n")
    elapsed = time.perf_counter() - begin
    generated = int(result["ids"].shape[1]) - len(ids)
    stopped = "eos" if generated and int(result["ids"][0, -1]) in eos else "max_tokens"
    print(
        f"[{generated} tokens, stop: {stopped}, load {loaded:.1f} s, "
        f"first token {first or elapsed:.2f} s, {generated / max(elapsed, 1e-9):.1f} tokens/s, "
        f"{precision.device} {str(precision.dtype).removeprefix('torch.')}]",
        file=err,
    )
    return 0
