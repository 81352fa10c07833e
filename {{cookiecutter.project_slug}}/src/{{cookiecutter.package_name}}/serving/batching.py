"""Every use of transformers' continuous-batching internals, in one module.

The library's ``ContinuousBatchingManager`` (``model.init_continuous_batching``) schedules
requests into a paged KV cache and runs one forward pass per step over every active
sequence. Its public surface (add_request, register_result_handler, cancel_request) is
enough to serve; the rest this module reaches into is not a stable API:

- the logits-processor protocol (``cb_logits_processors``), for per-request sampling,
  SeededSampler and grammar masks, and replacing ``manager.logit_processor`` before the
  loop starts;
- a request's state while its batch is prepared (``request_id``, ``generated_tokens``,
  ``initial_tokens``, ``_true_initial_tokens``), for the tokens a grammar has to follow;
- ``output_router`` (its lock and handler table), to drop the handler of a cancelled
  request, which the library keeps;
- ``input_queue`` and the scheduler's request tables, for the pending-requests gauge;
- ``background_thread_status``, for a generation loop that died.

`LIBRARY_SURFACE` lists each of them; tests/test_transformers_surface.py checks them
against the installed transformers, so an upgrade that moves one fails in seconds with
the version named, not in a served request.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy
import torch
import transformers
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching import cb_logits_processors
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
    ContinuousBatchingTopPLogitsWarper,
)
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from .seeding import pick_seeded, row_key

if TYPE_CHECKING:
    from .config import ServeConfig


class Output(Protocol):
    """What the library hands a result handler for each step of a request."""

    generated_tokens: list[int]
    error: str | None

    def is_finished(self) -> bool: ...


class SeededSampler(ContinuousBatchingLogitsProcessor):
    """Picks the token of every sampled row, batch-composition independent.

    Runs last, after temperature and top-p; the math is `seeding.pick_seeded`. The loop
    itself decodes greedily (argmax), as the peer server does: a greedy row needs nothing
    more, and a sampled row is left with its chosen token as its only finite logit. (The
    library would sample the whole batch from one random generator, so a seed would not
    give the same tokens from one batch to the next, and its softmax and multinomial over
    the vocabulary would run for greedy rows too.)
    """

    def __init__(self) -> None:
        self.supported_kwargs: dict[str, type] = {"seed": int}
        self.ignored_kwargs: tuple[str, ...] = ()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        args = []
        for request in requests_with_new_token:
            seed = request.state.logit_processor_kwargs.get("seed")
            # Greedy rows (and the warm-up's) carry no seed: 0 leaves them to the argmax.
            # position_offset is the absolute position of the token about to be sampled.
            args.append(0 if seed is None else row_key(seed, request.state.position_offset))
        return torch.tensor(args, dtype=torch.int32, device="cpu")

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        return pick_seeded(scores, tensor_arg[: scores.size(0)].to(torch.int64))


class RowTopP(ContinuousBatchingTopPLogitsWarper):
    """The library's per-request top-p, on a CPU only for the rows that set top_p < 1.

    It sorts every row's whole vocabulary at each step, top_p 1 or not: 9% of a SmolLM2
    decode step on 2 CPU cores (py-spy). On a GPU it runs as it is: choosing rows
    there would wait for the device at each step.
    """

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if scores.device.type != "cpu":
            return super().__call__(scores, tensor_arg)
        top_p = tensor_arg[: scores.size(0)].view(dtype=torch.float32)
        rows = (top_p < 1.0).nonzero().squeeze(-1)
        if rows.numel() == 0:
            return scores
        scores = scores.clone()
        scores[rows] = super().__call__(scores[rows], tensor_arg[rows])
        return scores


def generated_tokens(state: Any) -> list[int]:
    """Every token a request has generated. A request the library moved out of its cache
    and back carries its earlier tokens in its prompt (as `to_generation_output` reads)."""
    start = state._true_initial_tokens
    earlier: list[int] = state.initial_tokens[start:] if start else []
    tokens: list[int] = earlier + state.generated_tokens
    return tokens


class Grammar:
    """One constrained request's llguidance matcher, kept in step with its tokens."""

    def __init__(self, matcher: Any, vocab_size: int, eos_ids: list[int]) -> None:
        self.matcher, self.vocab_size, self.eos_ids = matcher, vocab_size, eos_ids
        self.consumed = 0

    def fill(self, state: Any, bitmask: Any, row: int) -> None:
        """Advance past the tokens generated since the last step, then write the tokens
        allowed next into `bitmask[row]` (a numpy view, one bit per token)."""
        import llguidance.numpy

        tokens = generated_tokens(state)
        if len(tokens) > self.consumed:
            self.matcher.consume_tokens(tokens[self.consumed :])
            self.consumed = len(tokens)
        if self.matcher.is_error():  # not with the mask applied; if so, end the answer
            words = bitmask[row].view("uint32")
            words[:] = 0
            for token in self.eos_ids:
                words[token // 32] |= 1 << (token % 32)
            return
        llguidance.numpy.fill_next_token_bitmask(self.matcher, bitmask, row)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's bitmask (little-endian int32 words, bit i of word w is token 32*w + i)
    as booleans, one per token. numpy's unpackbits does it 10-100x faster than shifts in
    torch on a CPU (0.02-0.4 ms for 4 rows of SmolLM2's vocabulary); llguidance.torch's own
    version is compiled by torch.compile at first use."""
    packed = bitmask.numpy().view(numpy.uint8)
    bits = numpy.unpackbits(packed, axis=-1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(numpy.ascontiguousarray(bits)).view(torch.bool)


class RequestProcessors(ContinuousBatchingLogitsProcessorList):
    """Temperature and top-p per request, then SeededSampler; skipped for an all-greedy batch.

    Every sampled request carries a seed (inference.SamplingParams), so the batch's requests say
    on the host, while its arguments are prepared, whether any row samples. With none, the
    loop's argmax needs nothing more, and the vocabulary-wide processors are skipped (5-9% of
    the CPU time per token on a tiny model at concurrency 32; on a GPU a top-p sort per row).
    Deciding on the host never waits for the device. Where the loop captures CUDA graphs
    (`always=True`) they always run: a captured graph replays what it recorded and cannot
    branch per batch.

    A request with a grammar (`grammars`, by request id) has its row masked to the tokens
    the grammar allows, before temperature and top-p. The mask is computed on the host
    while the batch is prepared, for those rows only; a batch without such a row does no
    grammar work.

    The library builds its per-request processors from the generation config only when that
    holds non-default values, so the list is made here, before the loop starts.
    """

    def __init__(self, always: bool = False) -> None:
        super().__init__(
            LogitsProcessorList(
                [TemperatureLogitsWarper(1.0), RowTopP(TopPLogitsWarper(1.0)), SeededSampler()]
            ),
            per_request_processors=True,
        )
        # The list counts one argument row per processor it converted; SeededSampler is
        # already a continuous-batching processor and needs its row too (the last one).
        self.tensors_required = sum(
            isinstance(p, ContinuousBatchingLogitsProcessor) for p in self.logits_processor
        )
        self.always = always
        self.sampled = True  # until a batch is prepared
        self.grammars: dict[str, Grammar] = {}
        self.masks: tuple[torch.Tensor, torch.Tensor] | None = None  # rows, their bitmasks

    def prepare_tensor_args(
        self, requests_in_batch: list[Any], arg_storage: torch.Tensor
    ) -> torch.Tensor:
        # Called on the loop's thread for each batch before its forward pass.
        self.sampled = any(
            request.has_new_token and request.state.logit_processor_kwargs.get("seed") is not None
            for request in requests_in_batch
        )
        self.masks = self._grammar_masks(requests_in_batch) if self.grammars else None
        prepared: torch.Tensor = super().prepare_tensor_args(requests_in_batch, arg_storage)
        return prepared

    def __call__(
        self,
        input_ids: torch.LongTensor,
        scores: torch.Tensor,
        logits_processor_args: torch.Tensor,
    ) -> torch.Tensor:
        if self.masks is not None:
            rows, bitmask = self.masks
            allowed = allowed_tokens(bitmask, scores.size(-1)).to(scores.device)
            rows = rows.to(scores.device)
            scores[rows] = scores[rows].masked_fill(~allowed, float("-inf"))
        if not (self.always or self.sampled):
            return scores
        processed: torch.Tensor = super().__call__(input_ids, scores, logits_processor_args)
        return processed

    def _grammar_masks(
        self, requests_in_batch: list[Any]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows of this batch's logits that have a grammar, and each one's bitmask.
        Rows are the requests with a new token, in batch order."""
        rows, constrained = [], []
        with_token = (r for r in requests_in_batch if r.has_new_token)
        for row, request in enumerate(with_token):
            grammar = self.grammars.get(request.state.request_id)
            if grammar is not None:
                rows.append(row)
                constrained.append((request.state, grammar))
        if not rows:
            return None
        words = -(-constrained[0][1].vocab_size // 32)
        bitmask = torch.empty((len(rows), words), dtype=torch.int32)
        view = bitmask.numpy()
        for index, (state, grammar) in enumerate(constrained):
            grammar.fill(state, view, index)
        return torch.tensor(rows), bitmask


@dataclass(frozen=True)
class LoopSettings:
    """The speed settings a loop runs with; all but attention need flash attention on a GPU
    unless forced (engine.cuda_graphs, engine.async_batching)."""

    attention: str  # the attention implementation continuous batching runs
    cuda_graphs: bool  # steps replayed from captured CUDA graphs
    async_batching: bool  # the next batch prepared while the device computes this one
    decode_fast_path: bool  # decode steps read the paged cache through a block table


class BatchingLoop:
    """One model's continuous-batching manager: start, submit, cancel, watch, stop."""

    def __init__(self, model: Any, eos_ids: list[int], pad_id: int | None, cb: Any) -> None:
        generation_config = GenerationConfig(  # type: ignore[no-untyped-call]  # **kwargs
            do_sample=False,  # argmax: SeededSampler has picked every sampled row's token
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            max_new_tokens=16,
        )
        self._manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb
        )
        self._processors: RequestProcessors | None = None

    def start(self) -> None:
        graphs = any(self._manager.continuous_batching_config.cuda_graph_booleans)
        self._processors = RequestProcessors(always=graphs)
        self._manager.logit_processor = self._processors
        self._manager.warmup()
        self._manager.start()

    def settings(self) -> LoopSettings:
        """What the library chose for this loop once its config was resolved."""
        resolved = self._manager.continuous_batching_config
        varlen, decode = resolved.cuda_graph_booleans
        return LoopSettings(
            attention=str(self._manager.model.config._attn_implementation),
            cuda_graphs=bool(varlen or decode),
            async_batching=bool(resolved.use_async_batching),
            decode_fast_path=bool(resolved.max_blocks_per_request),
        )

    def add(
        self,
        request_id: str,
        prompt_ids: list[int],
        max_new_tokens: int,
        eos_ids: list[int],
        on_output: Callable[[Output], None],
        sampling: dict[str, Any],
        grammar: Grammar | None = None,
    ) -> bool:
        """Queue a request whose every output goes to `on_output` (called on the event
        loop that queued it), its tokens masked by `grammar` when it has one. False when
        the loop no longer accepts requests."""
        if grammar is not None:
            self.processors.grammars[request_id] = grammar
            on_output = self._freeing_grammar(request_id, on_output)
        # Registered before the request exists, so even an instant result is delivered.
        self._manager.register_result_handler(request_id, on_output)
        added = self._manager.add_request(
            prompt_ids,
            request_id=request_id,
            max_new_tokens=max_new_tokens,
            streaming=True,
            eos_token_id=eos_ids,
            **sampling,
        )
        if added is None:
            self.forget(request_id)
        return added is not None

    @property
    def processors(self) -> RequestProcessors:
        if self._processors is None:
            raise RuntimeError("the batching loop has not started")
        return self._processors

    def constraint_blocker(self) -> str | None:
        """Why this loop cannot mask a request's tokens by a grammar, if it cannot: the
        mask is computed on the host from the tokens so far, which a captured CUDA graph
        cannot run and an asynchronous batch does not have yet."""
        settings = self.settings()
        if settings.cuda_graphs or settings.async_batching:
            return (
                "this engine runs CUDA graphs or asynchronous batching, which constrained "
                "decoding cannot follow: set engine.cuda_graphs and engine.async_batching "
                "to false in the serve config, or serve with engine.kind: vllm"
            )
        return None

    def _freeing_grammar(
        self, request_id: str, on_output: Callable[[Output], None]
    ) -> Callable[[Output], None]:
        def deliver(output: Output) -> None:
            if output.error is not None or output.is_finished():
                self.processors.grammars.pop(request_id, None)
            on_output(output)

        return deliver

    def cancel(self, request_id: str) -> None:
        """Free the request's KV-cache blocks. The library drops a cancelled request without
        a last output, so its handler is dropped here too."""
        self._manager.cancel_request(request_id)
        self.forget(request_id)

    def forget(self, request_id: str) -> None:
        if self._processors is not None:
            self._processors.grammars.pop(request_id, None)
        router = self._manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)

    def run_once(
        self,
        request_id: str,
        prompt_ids: list[int],
        timeout_s: float,
        max_new_tokens: int = 1,
        sampling: dict[str, Any] | None = None,
    ) -> None:
        """Generate without a handler (the warm-up); raises on failure."""
        self._manager.add_request(
            prompt_ids,
            request_id=request_id,
            max_new_tokens=max_new_tokens,
            streaming=False,
            **(sampling or {}),
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self._manager.get_result(request_id=request_id, timeout=0.5)
            if result is not None and result.is_finished():
                if result.error:
                    raise RuntimeError(str(result.error))
                return
            if self.fatal_error():
                raise RuntimeError(str(self.fatal_error()))
        raise RuntimeError(f"it did not finish in {timeout_s:g} s")

    def pending(self) -> int:
        """Requests the library holds: queued, waiting or generating."""
        count: int = self._manager.input_queue.qsize()
        processor = self._manager.batch_processor
        if processor is not None:
            scheduler = processor.scheduler
            count += len(scheduler.active_requests) + len(scheduler.waiting_requests)
        return count

    def fatal_error(self) -> str | None:
        error = self._manager.background_thread_status.fatal_error
        if error is not None:
            return str(error)
        if not self._manager.is_running():
            return "the generation loop is not running"
        return None

    def stop(self, timeout_s: float) -> None:
        if self._manager.is_running():
            self._manager.stop(block=True, timeout=timeout_s)


def cpu_cache_tokens(config: ServeConfig, context_len: int) -> int:
    """The CPU default: the configured concurrency of typical requests, and room for one
    request of the whole context."""
    per_request = min(context_len, config.engine.kv_tokens_per_request)
    return max(context_len, config.engine.max_concurrency * per_request)


def cb_config_for(
    config: ServeConfig, device: str, context_len: int, engine_index: int, engine_count: int
) -> ContinuousBatchingConfig:
    """The library's continuous-batching config for one of `engine_count` engines."""
    settings = config.engine
    page_size = settings.page_size or (256 if device.startswith("cuda") else 16)
    kwargs: dict[str, Any] = {
        "page_size": page_size,
        "use_cuda_graph": settings.cuda_graphs,
        "use_async_batching": settings.async_batching,
        "per_request_processors": True,
        "max_queue_size": 0,
        # The library's own switch to flash attention, only where it can help: on a CPU it
        # would still look for a flash kernel on the Hub at every start.
        "auto_switch_to_flash": device.startswith("cuda")
        and config.model.attn_implementation == "auto",
    }
    if settings.max_batch_tokens is not None:
        kwargs["max_batch_tokens"] = settings.max_batch_tokens
    tokens = settings.kv_cache_tokens
    if tokens is None and not device.startswith("cuda"):
        tokens = cpu_cache_tokens(config, context_len)
    if tokens is not None:
        kwargs["num_blocks"] = max(2, -(-tokens // page_size))
        if settings.max_batch_tokens is None and not device.startswith("cuda"):
            kwargs["max_batch_tokens"] = min(2048, tokens)
    elif device.startswith("cuda"):
        # Each engine sizes its cache from the memory still free when it starts, so
        # engine i takes share / (1 - i * share) of that to end with equal shares.
        share = (settings.gpu_memory_fraction or processor_memory_margin()) / engine_count
        kwargs["max_memory_percent"] = share / (1 - engine_index * share)
    return ContinuousBatchingConfig(**kwargs)


def processor_memory_margin() -> float:
    """The share of free GPU memory the library gives a KV cache when logits processors run
    (ours always may): it keeps the rest for their vocabulary-wide temporaries. The library
    decides this before our processors are installed, so it is asked here."""
    from transformers.generation.continuous_batching.initialization import (
        resolve_max_memory_percent,
    )

    probe = ContinuousBatchingConfig()
    resolve_max_memory_percent(probe, has_logit_processors=True, device=torch.device("cuda"))
    if probe.max_memory_percent is None:
        raise RuntimeError("transformers left max_memory_percent unset for a GPU")
    return float(probe.max_memory_percent)


@dataclass(frozen=True)
class Surface:
    """One thing this module relies on: `owner` and `names` say what, for the message."""

    owner: str
    names: tuple[str, ...]
    present: Callable[[], bool]


def _declares(owner: Any, names: tuple[str, ...]) -> bool:
    """Each name is an attribute of owner, or (on a class) an annotated one."""
    declared = set(dir(owner)) | set(getattr(owner, "__annotations__", {}))
    return set(names) <= declared


def _accepts(function: Any, names: tuple[str, ...]) -> bool:
    return set(names) <= set(inspect.signature(function).parameters)


def _manager() -> Any:
    from transformers.generation.continuous_batching import ContinuousBatchingManager

    return ContinuousBatchingManager


def _initialization() -> Any:
    from transformers.generation.continuous_batching import initialization

    return initialization


CB_CONFIG = ("page_size", "num_blocks", "max_batch_tokens", "max_memory_percent",
             "use_cuda_graph", "use_async_batching", "per_request_processors",
             "max_queue_size", "auto_switch_to_flash")  # fmt: skip
MANAGER_METHODS = ("add_request", "register_result_handler", "cancel_request", "get_result",
                   "warmup", "start", "stop", "is_running")  # fmt: skip
ADD_REQUEST = ("request_id", "max_new_tokens", "streaming", "eos_token_id")
PROCESSOR = ("supported_kwargs", "ignored_kwargs", "fill_defaults", "prepare_tensor_args")
# Set in the manager's __init__, so not visible on the class: the surface test builds a
# manager on a tiny model to check these.
MANAGER_ATTRIBUTES = ("output_router", "input_queue", "batch_processor",
                      "background_thread_status", "logit_processor",
                      "continuous_batching_config", "model")  # fmt: skip
LIBRARY_SURFACE = (
    Surface("ContinuousBatchingConfig", CB_CONFIG,
            lambda: _accepts(ContinuousBatchingConfig, CB_CONFIG)),
    Surface("ContinuousBatchingManager", MANAGER_METHODS,
            lambda: _declares(_manager(), MANAGER_METHODS)),
    Surface("ContinuousBatchingManager.add_request", ADD_REQUEST,
            lambda: _accepts(_manager().add_request, ADD_REQUEST)),
    Surface("ContinuousBatchingLogitsProcessor", PROCESSOR,
            lambda: _declares(ContinuousBatchingLogitsProcessor, PROCESSOR)),
    Surface("ContinuousBatchingLogitsProcessorList", ("per_request_processors",),
            lambda: _accepts(ContinuousBatchingLogitsProcessorList, ("per_request_processors",))),
    Surface("ContinuousBatchingLogitsProcessorList.prepare_tensor_args",
            ("requests_in_batch", "arg_storage"),
            lambda: _accepts(ContinuousBatchingLogitsProcessorList.prepare_tensor_args,
                             ("requests_in_batch", "arg_storage"))),
    Surface("continuous_batching.initialization", ("resolve_max_memory_percent",),
            lambda: _accepts(_initialization().resolve_max_memory_percent,
                             ("cb_config", "has_logit_processors", "device"))),
    Surface("cb_logits_processors", ("ContinuousBatchingLogitsProcessor",),
            lambda: _declares(cb_logits_processors, ("ContinuousBatchingLogitsProcessor",))),
)  # fmt: skip


def missing_surface() -> list[str]:
    """What LIBRARY_SURFACE names that the installed transformers lacks, one line each."""
    missing = []
    for item in LIBRARY_SURFACE:
        try:
            ok = item.present()
        except (AttributeError, ImportError, TypeError, ValueError):
            ok = False
        if not ok:
            missing.append(
                f"transformers {transformers.__version__}: {item.owner} no longer has "
                f"{', '.join(item.names)} (serving/batching.py relies on it)"
            )
    return missing
