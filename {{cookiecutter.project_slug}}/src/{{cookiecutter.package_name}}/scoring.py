"""Scorers: how an answer is judged against its reference, shared by `evaluate` (in
process) and `token-cost`'s quality per dollar (through the endpoint). No torch here.

A scorer is a function (answer, reference) -> a score in [0, 1]; 1 is correct.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from .errors import UserError

Scorer = Callable[[str, str], float]


def exact_match(answer: str, reference: str) -> float:
    """1 when the answer is the reference, ignoring case and surrounding whitespace."""
    return float(answer.strip().lower() == reference.strip().lower())


def contains(answer: str, reference: str) -> float:
    """1 when the reference appears in the answer, ignoring case."""
    return float(reference.strip().lower() in answer.lower())


SCORERS: dict[str, Scorer] = {"exact_match": exact_match, "contains": contains}


def resolve_scorer(name: str, field: str = "quality.scorer") -> Scorer:
    """A built-in scorer by name, or MODULE:FUNCTION importable from here."""
    if name in SCORERS:
        return SCORERS[name]
    module_name, sep, function_name = name.partition(":")
    known = ", ".join(SCORERS)
    if not sep or not module_name or not function_name:
        raise UserError(
            f"{field}: no scorer {name!r}; use one of {known}, or MODULE:FUNCTION for a "
            "function (answer, reference) -> score in [0, 1]"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"{field}: cannot import {module_name!r} ({error})") from None
    scorer = getattr(module, function_name, None)
    if not callable(scorer):
        raise UserError(f"{field}: {module_name} has no function {function_name!r}")
    checked: Scorer = scorer
    return checked
