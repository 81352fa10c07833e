"""Held-out accuracy: does the model answer each prompt with the reference answer, then stop?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..chat import Message, prompt_ids
from ..scoring import exact_match


@dataclass
class HeldOutAnswer:
    prompt: list[Message]
    expected: str
    got: str
    stopped: bool  # generation ended with EOS rather than the token limit

    @property
    def correct(self) -> bool:
        return exact_match(self.got, self.expected) == 1.0


def generate_answers(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[HeldOutAnswer]:
    """Greedy answers to the last assistant turn of each conversation, batched."""
    import torch

    answers = []
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        prompts = [list(c[:-1]) for c in batch]
        ids = [prompt_ids(tokenizer, p) for p in prompts]
        width = max(map(len, ids))
        # Left padding keeps every prompt's last token next to its first new token.
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)
        attention = torch.tensor(
            [[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device
        )
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad,
            )
        for prompt, conversation, row in zip(prompts, batch, output[:, width:], strict=True):
            tokens = row.tolist()
            stopped = tokenizer.eos_token_id in tokens
            if stopped:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            answers.append(HeldOutAnswer(prompt, conversation[-1]["content"], text, stopped))
    return answers


def accuracy(answers: Sequence[HeldOutAnswer]) -> float:
    return sum(a.correct for a in answers) / len(answers) if answers else 0.0
