"""Seeded and greedy token choice that does not depend on what else is in the batch.

A seeded row samples with the Gumbel-max trick from noise that is a hash of (seed,
position, token id), so the same request with the same seed gives the same tokens
whatever else is in the batch. The chosen token is left as the row's only finite logit,
so the library's own sampling step picks it. All tensor ops: no host sync on a GPU, safe
under CUDA graphs.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def _mix32(value: int) -> int:
    """A 32-bit integer hash (xorshift-multiply), the same function as `_mix32_tensor`."""
    value &= MASK32
    value ^= value >> 16
    value = (value * 0x7FEB352D) & MASK32
    value ^= value >> 15
    value = (value * 0x846CA68B) & MASK32
    return value ^ (value >> 16)


def _mix32_tensor(values: torch.Tensor) -> torch.Tensor:
    """`_mix32` on int64 values in [0, 2**32): products wrap, the mask keeps 32 bits."""
    values = values ^ (values >> 16)
    values = (values * 0x7FEB352D) & MASK32
    values = values ^ (values >> 15)
    values = (values * 0x846CA68B) & MASK32
    return values ^ (values >> 16)


def row_key(seed: int, position: int) -> int:
    """A positive int32 key for (seed, position of the token being sampled)."""
    mixed = _mix32((seed & MASK32) ^ _mix32(((seed >> 32) & MASK32) ^ _mix32(position)))
    return mixed % 0x7FFFFFFE + 1


def gumbel_choice(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The token each row samples from softmax(scores), given its key (Gumbel-max)."""
    vocab = torch.arange(scores.size(-1), device=scores.device, dtype=torch.int64)
    mixed = (keys[:, None] * 0x9E3779B1) & MASK32
    bits = _mix32_tensor(mixed ^ vocab[None, :]) >> 8  # 24 uniform bits per (row, token)
    uniform = (bits.to(torch.float32) + 0.5) / float(1 << 24)  # strictly inside (0, 1)
    return torch.argmax(scores - torch.log(-torch.log(uniform)), dim=-1)


def pick_seeded(scores: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """Scores with each sampled row (arg > 0, its key) reduced to its one chosen token as
    the only finite logit; rows with arg == 0 are returned as they are."""
    if scores.device.type == "cpu":  # only the sampled rows; on a CPU finding them is free
        rows = (arg > 0).nonzero().squeeze(-1)
        if rows.numel() == 0:
            return scores
        sampled = scores[rows]
        scores = scores.clone()
        scores[rows] = _only(sampled, gumbel_choice(sampled, arg[rows]))
        return scores
    only = _only(scores, gumbel_choice(scores, arg.clamp(min=0)))  # no host sync on a GPU
    return torch.where((arg > 0)[:, None], only, scores)


def _only(scores: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Each row's chosen token as its only finite logit."""
    return torch.full_like(scores, float("-inf")).scatter_(1, choice[:, None], 0.0)
