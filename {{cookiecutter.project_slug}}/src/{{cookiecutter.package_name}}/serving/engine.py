"""Generation for the server: one engine per served model, over transformers' continuous
batching (batching.py holds every use of the library's internals).

Batching is done by the library, not here: its background thread schedules requests into
a paged KV cache and runs one forward pass per step over every active sequence, adding
and retiring requests between steps (FIFO scheduler). An engine submits requests, hands
their tokens to the event loop that reads them, and cancels them.

LoRA adapters: one continuous-batching loop runs one set of weights, and peft's mixed
batches (``adapter_names=``) pick an adapter per batch row, while continuous batching packs
all sequences into a single row. So each adapter gets its own engine on a module tree that
shares the base weights (no copy) with the adapter injected unmerged; requests for the
same adapter are batched together, requests for different adapters run side by side, not
in one batch. To batch many adapters in one pass, use the vllm engine (multi-LoRA
kernels) or serve a merged model.

Sampling: the loop decodes by argmax, so greedy requests (temperature 0) need nothing
more. A sampled request gets temperature and top-p from the library's per-request
processors, and its token from ``batching.SeededSampler``, keyed by its seed (a random one
when it gave none).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..inference import SamplingParams
from .structured import Grammars

if TYPE_CHECKING:  # batching imports torch: not before the server listens (handlers use this)
    from llguidance import LLMatcher

    from .batching import BatchingLoop, Output


class GenerationError(RuntimeError):
    """The engine failed a request (its message comes from the library)."""

    status = 500


class CutOff(GenerationError):
    """The server stopped the request: its shutdown grace ran out."""

    status = 503


@dataclass(frozen=True)
class _CutOffOutput:
    """Put into a submission's queue in place of the library's next output."""

    error: str


@dataclass
class Submission:
    """One request in an engine: an async stream of the tokens it generates."""

    request_id: str
    prompt_len: int
    _queue: asyncio.Queue[Output | _CutOffOutput] = field(default_factory=asyncio.Queue)
    _seen: int = 0
    finished: bool = False

    async def chunks(self) -> AsyncIterator[list[int]]:
        """New token ids as the engine produces them; ends when the request finishes."""
        while not self.finished:
            output = await self._queue.get()
            if isinstance(output, _CutOffOutput):  # still unfinished: cancel() frees it
                raise CutOff(output.error)
            if output.error is not None:
                self.finished = True
                raise GenerationError(output.error)
            new = output.generated_tokens[self._seen :]
            self._seen = len(output.generated_tokens)
            self.finished = output.is_finished()
            if new:
                yield new


class Engine:
    """One served model (the base, or the base with one adapter) behind one batching loop."""

    _ids = itertools.count()

    def __init__(
        self,
        name: str,
        model: Any,
        tokenizer: Any,
        context_len: int,
        eos_ids: list[int],
        cb_config: Any,
        parent: str | None = None,
        source: str = "",
        tokenizer_source: str = "",
    ) -> None:
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.context_len, self.eos_ids = context_len, eos_ids
        self.cb_config, self.parent, self.source = cb_config, parent, source
        self.tokenizer_source = tokenizer_source or source
        self.grammars = Grammars(tokenizer, model, eos_ids)
        self._loop: BatchingLoop | None = None
        self._lock = threading.Lock()
        # Requests not yet finished, with the event loop that reads them (for cut_off).
        self._live: dict[str, tuple[Submission, asyncio.AbstractEventLoop]] = {}

    def start(self) -> None:
        from .batching import BatchingLoop

        loop = BatchingLoop(self.model, self.eos_ids, self.tokenizer.pad_token_id, self.cb_config)
        loop.start()
        self._loop = loop

    @property
    def loop(self) -> BatchingLoop:
        if self._loop is None:
            raise RuntimeError(f"the engine {self.name!r} has not started")
        return self._loop

    def warm(self) -> None:
        """A short request through every first-use path a user's would take: the chat
        template (compiled on first use), a prefill, a decode step and the sampler."""
        from ..chat import prompt_ids

        try:
            ids = prompt_ids(self.tokenizer, [{"role": "user", "content": "Hello"}])
        except ValueError:  # no chat template: served for completions only
            ids = self.tokenizer("Hello", add_special_tokens=False)["input_ids"] or self.eos_ids
        params = SamplingParams(max_tokens=2, temperature=0.7, top_p=0.9, seed=0)
        sampled = params.processor_kwargs()
        try:
            self.loop.run_once(
                f"warmup-{self.name}", ids, 300, max_new_tokens=params.max_tokens, sampling=sampled
            )
        except RuntimeError as error:
            raise RuntimeError(f"warm-up of {self.name!r} failed: {error}") from None

    def constraint_blocker(self) -> str | None:
        """Why this engine cannot constrain an answer to a grammar, if it cannot."""
        return self.loop.constraint_blocker()

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, matcher: LLMatcher | None = None
    ) -> Submission:
        """Queue a request, its tokens constrained by `matcher` (from `self.grammars`) when
        given; must be called on the event loop that will read its tokens."""
        from .batching import Grammar

        request_id = f"{self.name}-{next(self._ids)}"
        submission = Submission(request_id, len(prompt_ids))
        grammar = None
        if matcher is not None:
            grammar = Grammar(matcher, self.grammars.tokenizer().vocab_size, self.eos_ids)
        added = self.loop.add(
            request_id,
            list(prompt_ids),
            params.max_tokens,
            self.eos_ids,
            submission._queue.put_nowait,
            params.processor_kwargs(),
            grammar,
        )
        if not added:
            raise GenerationError("the engine is stopping and does not accept requests")
        with self._lock:
            self._live[request_id] = (submission, asyncio.get_running_loop())
        return submission

    def cancel(self, submission: Submission) -> None:
        """Stop generating for a request and free its KV-cache blocks (a no-op once finished)."""
        with self._lock:
            self._live.pop(submission.request_id, None)
        if not submission.finished:
            submission.finished = True
            self.loop.cancel(submission.request_id)

    def cut_off(self, reason: str) -> int:
        """End every unfinished request with CutOff(reason); thread-safe. Returns how many."""
        with self._lock:
            live = list(self._live.values())
        for submission, loop in live:
            loop.call_soon_threadsafe(submission._queue.put_nowait, _CutOffOutput(reason))
        return len(live)

    def pending(self) -> int:
        """Requests the library holds: queued, waiting or generating."""
        return 0 if self._loop is None else self._loop.pending()

    def fatal_error(self) -> str | None:
        return None if self._loop is None else self._loop.fatal_error()

    def stop(self, timeout: float = 5.0) -> None:
        if self._loop is not None:
            self._loop.stop(timeout)
