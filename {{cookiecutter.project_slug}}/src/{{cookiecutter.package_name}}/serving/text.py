"""Token ids in, text out: incremental detokenization and stop strings.

Pure Python over a tokenizer, so it is tested without a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


class TextStream:
    """Turns a request's generated ids into text that is safe to send.

    Text that could be the start of a stop string is held back until it is known not
    to be one, so a stop string never reaches the client, even split across chunks.
    `tokens` counts the ids consumed: the completion tokens of the usage.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._decoded = ""  # fallback decoder state
        self._stream: Any = None
        backend = getattr(tokenizer, "_tokenizer", None)
        if getattr(tokenizer, "is_fast", False) and backend is not None:
            try:  # O(1) per token; tokenizers >= 0.21
                from tokenizers.decoders import DecodeStream
            except ImportError:
                pass  # the fallback: decode the whole answer at each token
            else:
                self._stream = DecodeStream(skip_special_tokens=True)
                self._backend = backend
        self.text = ""
        self.emitted = 0
        self.stopped_by_string = False

    @property
    def tokens(self) -> int:
        return len(self._ids)

    @property
    def last(self) -> int | None:
        """The last id consumed (None before the first)."""
        return self._ids[-1] if self._ids else None

    def _step(self, token_id: int) -> str:
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # an incomplete character: wait for its next byte
            return ""
        piece = full[len(self._decoded) :] if full.startswith(self._decoded) else ""
        self._decoded = full
        return piece

    def push(self, token_ids: Iterable[int]) -> str:
        """Consume new ids; return the text that can be sent now (may be empty)."""
        for token_id in token_ids:
            if self.stopped_by_string:
                break
            self._ids.append(int(token_id))
            piece = self._step(int(token_id))
            if not piece:
                continue
            search_from = max(0, len(self.text) - self._hold)
            self.text += piece
            cut = self._find_stop(search_from)
            if cut is not None:
                self.text = self.text[:cut]
                self.stopped_by_string = True
        return self._emit(final=self.stopped_by_string)

    def finish(self) -> str:
        """The held-back rest, once generation is over."""
        if not self.stopped_by_string:
            # Bytes that never formed a character are rendered as the tokenizer renders them.
            full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
            if full.startswith(self.text) and self._find_stop(0, full) is None:
                self.text = full
        return self._emit(final=True)

    def _find_stop(self, start: int, text: str | None = None) -> int | None:
        text = self.text if text is None else text
        found = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _emit(self, final: bool) -> str:
        end = len(self.text) if final else max(self.emitted, len(self.text) - self._hold)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
