"""Generation for the server: transformers continuous batching, one engine per served model.

Batching is done by the library, not here: each engine is a transformers
``ContinuousBatchingManager`` (``model.init_continuous_batching``), whose background
thread schedules requests into a paged KV cache and runs one forward pass per step over
every active sequence, adding and retiring requests between steps (FIFO scheduler). This
module only submits requests (``add_request``), receives their tokens
(``register_result_handler``) and cancels them (``cancel_request``).

LoRA adapters: one continuous-batching loop runs one set of weights, and peft's mixed
batches (``adapter_names=``) pick an adapter per batch row, while continuous batching packs
all sequences into a single row. So each adapter gets its own engine on a module tree that
shares the base weights (no copy) with the adapter injected unmerged; requests for the
same adapter are batched together, requests for different adapters run side by side, not
in one batch. To batch many adapters in one pass, use the vllm engine (multi-LoRA
kernels) or serve a merged model.

Sampling: temperature and top-p per request use the library's per-request processors;
greedy decoding (temperature 0) and per-request seeds are one more processor
(``SeededSampler``) plugged into the library's processor list, because the library samples
the whole batch from one random generator.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

log = logging.getLogger(__name__)

MASK32 = 0xFFFFFFFF
GREEDY = -1  # SeededSampler argument for a greedy row; 0 leaves the row to the library


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


class SeededSampler(ContinuousBatchingLogitsProcessor):
    """Greedy rows and seeded rows for continuous batching, batch-composition independent.

    Runs last, after temperature and top-p. A seeded row samples with the Gumbel-max trick
    from noise that is a hash of (seed, position, token id), so the same request with the
    same seed gives the same tokens whatever else is in the batch; the chosen token is left
    as the row's only finite logit, so the library's sampling step picks it. All tensor
    ops, no host sync on GPU, safe under CUDA graphs.
    """

    supported_kwargs: ClassVar[dict[str, type]] = {"seed": int, "greedy": bool}
    ignored_kwargs: ClassVar[tuple[str, ...]] = ()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        args = []
        for request in requests_with_new_token:
            kwargs = request.state.logit_processor_kwargs
            if kwargs.get("greedy"):
                args.append(GREEDY)
            elif kwargs.get("seed") is not None:
                # position_offset is the absolute position of the token about to be sampled
                args.append(row_key(kwargs["seed"], request.state.position_offset))
            else:
                args.append(0)
        return torch.tensor(args, dtype=torch.int32, device="cpu")

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        arg = tensor_arg[: scores.size(0)].to(torch.int64)
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


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def processor_kwargs(self) -> dict[str, Any]:
        greedy = self.temperature == 0.0
        kwargs: dict[str, Any] = {
            "temperature": 1.0 if greedy else float(self.temperature),
            "top_p": float(self.top_p),
            "greedy": greedy,
        }
        if self.seed is not None:
            kwargs["seed"] = int(self.seed)
        return kwargs


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
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
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
    """One served model (the base, or the base with one adapter) behind one CB manager."""

    _ids = itertools.count()

    def __init__(
        self,
        name: str,
        model: Any,
        tokenizer: Any,
        context_len: int,
        eos_ids: list[int],
        cb_config: ContinuousBatchingConfig,
        parent: str | None = None,
        source: str = "",
    ) -> None:
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.context_len, self.eos_ids = context_len, eos_ids
        self.cb_config, self.parent, self.source = cb_config, parent, source
        self.manager: Any = None
        self._lock = threading.Lock()
        # Requests not yet finished, with the event loop that reads them (for cut_off).
        self._live: dict[str, tuple[Submission, asyncio.AbstractEventLoop]] = {}

    def start(self) -> None:
        generation_config = GenerationConfig(
            do_sample=True,  # the library samples (multinomial); SeededSampler handles greedy rows
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            max_new_tokens=16,
        )
        manager = self.model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=self.cb_config
        )
        # Per-request temperature and top-p are the library's processors; they are created
        # from the generation config only when it holds non-default values, so the list is
        # built here, before the batch processor that reads it exists.
        processors = ContinuousBatchingLogitsProcessorList(
            LogitsProcessorList(
                [TemperatureLogitsWarper(1.0), TopPLogitsWarper(1.0), SeededSampler()]
            ),
            per_request_processors=True,
        )
        # The list counts one argument row per processor it converted; SeededSampler is
        # already a continuous-batching processor and needs its row too.
        processors.tensors_required = sum(
            isinstance(p, ContinuousBatchingLogitsProcessor) for p in processors.logits_processor
        )
        manager.logit_processor = processors
        manager.warmup()
        manager.start()
        self.manager = manager

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Submission:
        """Queue a request; must be called on the event loop that will read its tokens."""
        request_id = f"{self.name}-{next(self._ids)}"
        submission = Submission(request_id, len(prompt_ids))
        queue = submission._queue
        # Registered before the request exists, so even an instant result is delivered.
        self.manager.register_result_handler(request_id, queue.put_nowait)
        added = self.manager.add_request(
            list(prompt_ids),
            request_id=request_id,
            max_new_tokens=params.max_tokens,
            streaming=True,
            eos_token_id=self.eos_ids,
            **params.processor_kwargs(),
        )
        if added is None:
            self._forget(request_id)
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
            self.manager.cancel_request(submission.request_id)
            # The library drops a cancelled request without a last output, so the handler
            # registered in submit() is removed here.
            self._forget(submission.request_id)

    def cut_off(self, reason: str) -> int:
        """End every unfinished request with CutOff(reason); thread-safe. Returns how many."""
        with self._lock:
            live = list(self._live.values())
        for submission, loop in live:
            loop.call_soon_threadsafe(submission._queue.put_nowait, _CutOffOutput(reason))
        return len(live)

    def _forget(self, request_id: str) -> None:
        router = self.manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)

    def pending(self) -> int:
        """Requests the library holds: queued, waiting or generating."""
        manager = self.manager
        if manager is None:
            return 0
        count = manager.input_queue.qsize()
        processor = manager.batch_processor
        if processor is not None:
            scheduler = processor.scheduler
            count += len(scheduler.active_requests) + len(scheduler.waiting_requests)
        return count

    def fatal_error(self) -> str | None:
        if self.manager is None:
            return None
        error = self.manager.background_thread_status.fatal_error
        if error is not None:
            return str(error)
        if not self.manager.is_running():
            return "the generation loop is not running"
        return None

    def stop(self, timeout: float = 5.0) -> None:
        if self.manager is not None and self.manager.is_running():
            self.manager.stop(block=True, timeout=timeout)


def cb_config_for(
    config: Any, device: str, context_len: int, engine_index: int, engine_count: int
) -> Any:
    """The library's continuous-batching config for one of `engine_count` engines."""
    settings = config.engine
    kwargs: dict[str, Any] = {
        "page_size": settings.page_size,
        "per_request_processors": True,
        "max_queue_size": 0,
    }
    if settings.max_batch_tokens is not None:
        kwargs["max_batch_tokens"] = settings.max_batch_tokens
    tokens = settings.kv_cache_tokens
    if tokens is None and not device.startswith("cuda"):
        tokens = 8 * context_len
    if tokens is not None:
        kwargs["num_blocks"] = max(2, -(-tokens // settings.page_size))
        if settings.max_batch_tokens is None and not device.startswith("cuda"):
            kwargs["max_batch_tokens"] = min(2048, tokens)
    elif device.startswith("cuda"):
        # Each engine sizes its cache from the memory still free when it starts, so
        # engine i takes share / (1 - i * share) of that to end with equal shares.
        share = settings.gpu_memory_fraction / engine_count
        kwargs["max_memory_percent"] = share / (1 - engine_index * share)
    return ContinuousBatchingConfig(**kwargs)
