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
GREEDY = -1  # row argument for a greedy row; 0 leaves the row to the library


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


def pick_seeded(scores: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """Scores with each greedy (arg == GREEDY) or seeded (arg > 0) row reduced to its one
    chosen token; rows with arg == 0 are returned as they are."""
    if scores.device.type == "cpu" and not bool((arg != 0).any()):
        return scores  # nothing to do, and on a CPU the check costs nothing
    vocab = torch.arange(scores.size(-1), device=scores.device, dtype=torch.int64)
    keys = (arg.clamp(min=0)[:, None] * 0x9E3779B1) & MASK32
    bits = _mix32_tensor(keys ^ vocab[None, :]) >> 8  # 24 uniform bits per (row, token)
    uniform = (bits.to(torch.float32) + 0.5) / float(1 << 24)  # strictly inside (0, 1)
    gumbel = -torch.log(-torch.log(uniform))
    sampled = torch.argmax(scores + gumbel, dim=-1)
    greedy = torch.argmax(scores, dim=-1)
    choice = torch.where(arg == GREEDY, greedy, sampled)
    only = torch.full_like(scores, float("-inf")).scatter_(1, choice[:, None], 0.0)
    return torch.where((arg != 0)[:, None], only, scores)
