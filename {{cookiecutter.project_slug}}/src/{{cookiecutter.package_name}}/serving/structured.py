"""Structured output: `response_format` compiled to a grammar by llguidance.

The handler turns a request's response_format into an `LLMatcher` (`Grammars.matcher`), so
a schema llguidance refuses is a 400 before anything is queued. The engine hands the
matcher to its batching loop, where `batching.RequestProcessors` masks that request's
logits to the tokens the grammar allows at each step.

llguidance is imported at the first constrained request, not at start: it and its
tokenizer table cost about a second that a server never asked for JSON need not pay.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

from .protocol import JsonObjectFormat, JsonSchemaFormat, ResponseFormat

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer
    from llguidance._lib import JsonCompileOptions


# Compact JSON: with whitespace free between tokens, a model unsure how to go on can emit
# newlines until max_tokens. The separators are json.dumps's own; a schema's "x-guidance"
# key overrides these (llguidance's JSON options).
JSON_OPTIONS: JsonCompileOptions = dict(
    whitespace_flexible=False, item_separator=", ", key_separator=": "
)


class GrammarError(ValueError):
    """A response_format llguidance cannot compile; `param` names the field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def schema_of(response_format: ResponseFormat | None) -> tuple[dict[str, Any], str] | None:
    """The JSON Schema a response_format asks for, and the field it came from; None for
    free text."""
    if isinstance(response_format, JsonObjectFormat):
        return {"type": "object"}, "response_format"
    if isinstance(response_format, JsonSchemaFormat):
        return response_format.json_schema.json_schema, "response_format.json_schema.schema"
    return None


class Grammars:
    """One tokenizer's grammar compiler: llguidance's token table is built once, at the
    first constrained request, and shared by every request after it."""

    def __init__(self, tokenizer: Any, model: Any, eos_ids: list[int]) -> None:
        self._hf_tokenizer, self._model, self.eos_ids = tokenizer, model, eos_ids
        self._tokenizer: LLTokenizer | None = None
        self._lock = threading.Lock()

    def tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                # The model's output width, not len(tokenizer): the mask must cover every
                # logit. Our EOS ids are the ones the grammar allows once it is complete.
                width = int(self._model.get_output_embeddings().weight.shape[0])
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self._hf_tokenizer, n_vocab=width, eos_token=list(self.eos_ids)
                    )
                except ValueError as error:  # a slow (Python) tokenizer
                    raise GrammarError(
                        f"response_format needs a fast tokenizer for this model: {error}",
                        "response_format",
                    ) from None
            return self._tokenizer

    def matcher(self, schema: dict[str, Any], param: str) -> LLMatcher:
        """A fresh matcher for one request; GrammarError names what llguidance rejected."""
        from llguidance import LLMatcher

        try:
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except ValueError as error:
            raise GrammarError(f"{param} is not a JSON object: {error}", param) from None
        matcher = LLMatcher(self.tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(
                f"{param} cannot be compiled: {matcher.get_error()}. Use the JSON Schema "
                "subset llguidance supports (see the README's Structured output section).",
                param,
            )
        return matcher
