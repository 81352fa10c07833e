"""The prompt format: the one place where conversations become token ids.

Training and serving both call these functions, so the ids a model is trained
on are the ids it is served with, and every assistant turn ends in EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]
ROLES = ("system", "developer", "user", "assistant", "tool")
IGNORE_INDEX = -100  # label value that the loss skips


@dataclass(frozen=True)
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where a token carries no loss

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "use an instruct/chat model or set one with tokenizer.chat_template"
        )
    return str(
        tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The chat template already holds every special token it wants.
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Ids the model sees before it answers: the conversation plus the generation prompt."""
    return _ids(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def encode_conversation(
    tokenizer: Any, messages: Sequence[Message], train_on_prompt: bool = False
) -> EncodedConversation:
    """Token ids and labels for a conversation whose assistant turns are trained.

    Each assistant turn is cut out of the rendered template as the text between
    the generation prompt and the end of that turn, so every prompt segment is
    tokenized exactly as ``prompt_ids`` tokenizes it for serving. The trained
    part of a turn runs up to and including EOS; EOS is appended when the
    template does not emit it, so a fine-tuned model learns to stop.
    """
    eos_text, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    input_ids: list[int] = []
    labels: list[int] = []
    covered = ""  # rendered text already turned into ids
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True)
        turn = render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (prompt.startswith(covered) and turn.startswith(prompt)):
            raise ValueError(
                "the chat template does not render conversations as growing prefixes, so "
                "assistant turns cannot be masked reliably; use a template that keeps "
                "earlier turns unchanged"
            )
        answer = turn[len(prompt) :]
        end = answer.find(eos_text) + len(eos_text) if eos_text in answer else len(answer)
        prompt_part = _ids(tokenizer, prompt[len(covered) :])
        answer_part = _ids(tokenizer, answer[:end])
        if eos_text not in answer:
            answer_part.append(eos_id)
        input_ids += prompt_part + answer_part
        labels += prompt_part if train_on_prompt else [IGNORE_INDEX] * len(prompt_part)
        labels += answer_part
        covered = turn[: len(prompt) + end]
    if not input_ids:
        raise ValueError("a conversation needs at least one assistant message to train on")
    return EncodedConversation(input_ids, labels)
