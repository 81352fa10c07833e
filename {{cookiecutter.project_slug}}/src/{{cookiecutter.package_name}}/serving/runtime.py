"""Server state: load and warm the models in the background, timing each cold-start phase.

The HTTP server answers /health and /ready from the first moment; /ready turns true
only once every served model is loaded and has generated a token.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .config import ServeConfig
from .metrics import Metrics
from .protocol import ModelCard, ServedModelInfo, ServerInfo

if TYPE_CHECKING:
    from ..device import Precision
    from .engine import Engine

log = logging.getLogger(__name__)
_IMPORTED_AT = time.time()


@functools.cache  # constant, and /v1/models reads it on every call
def process_start_time() -> float:
    """Wall-clock time this process started (falls back to when this module was imported).

    On Linux from /proc/self/stat, whose start is in clock ticks since boot: psutil adds
    those to the boot time, which the kernel gives in whole seconds, and so put the start
    up to a second early (0.8 s measured), inflating the "ready" phase.
    """
    try:
        with open("/proc/self/stat") as stat:
            after_name = stat.read().rpartition(")")[2].split()
        started_ticks = int(after_name[19])  # field 22, starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:
        return _IMPORTED_AT


def check_before_loading(config: ServeConfig) -> None:
    """Fast checks (no torch): a bad path fails the command before the server starts."""
    from ..inference import check_adapter_dir
    from ..modeling import resolve_model

    resolve_model(config.model.name_or_path)
    for name, path in config.adapters.items():
        try:
            check_adapter_dir(path)
        except UserError as error:
            raise UserError(f"adapter {name!r}: {error}") from None


@dataclass(frozen=True)
class ServedModel:
    """A model the server answers for, loaded and not yet behind an engine."""

    name: str
    model: Any
    tokenizer: Any
    parent: str | None  # the base's served name, for an adapter
    source: str  # where the weights (or the adapter) came from
    tokenizer_source: str


class Runtime:
    def __init__(self, config: ServeConfig, metrics: Metrics) -> None:
        self.config, self.metrics = config, metrics
        self.engines: dict[str, Engine] = {}
        self.ready = False
        self.draining = False
        self.error: str | None = None
        self.phase = "starting"
        self.phases: dict[str, float] = {}
        self.on_fatal: Callable[[], None] | None = None
        self.precision: Precision | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ loading
    def start_loading(self) -> None:
        self._thread = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._thread.start()

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        self.phase = phase
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.phases[phase] = seconds
        self.metrics.cold_start.labels(phase).set(seconds)
        log.info("cold start: %-8s %7.2f s", phase, seconds)

    def _load(self) -> None:
        try:
            self._load_engines()
        except Exception as error:
            user = isinstance(error, UserError)
            self.error = str(error) if user else f"{error.__class__.__name__}: {error}"
            self.phase = "failed"
            log.error("loading failed: %s", self.error, exc_info=not user)
            if self.on_fatal is not None:
                self.on_fatal()

    def _load_engines(self) -> None:
        config = self.config
        with self._timed("imports"):
            from ..device import pick_precision
            from ..inference import context_length
            from ..modeling import import_model_code, load_tokenizer
            from .batching import missing_surface

            import_model_code(config.model.name_or_path, config.model.trust_remote_code)
            if config.adapters:
                import peft  # noqa: F401  (timed here, not in the adapter phase)
        missing = missing_surface()
        if missing:
            raise UserError(
                "this transformers lacks what the server relies on:\n  " + "\n  ".join(missing)
                + "\nInstall the locked version (requirements/serve.txt)."
            )  # fmt: skip
        precision = self.precision = pick_precision(config.model.device, config.model.dtype)
        with self._timed("tokenizer"):
            tokenizer = load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
        with self._timed("weights"):
            base = self._load_base(precision, tokenizer)
        context_len = context_length(base.model, config.model.max_context)
        with self._timed("adapters"):
            served = [base, *self._load_adapters(base)]
        with self._timed("warmup"):
            engines = self._start_engines(served, precision.device, context_len)
        self.engines = engines
        ready_after = time.time() - process_start_time()
        self.phases["ready"] = ready_after
        self.metrics.cold_start.labels("ready").set(ready_after)
        self.metrics.ready.set(1)
        self.phase = "ready"
        self.ready = True
        log.info(
            "ready after %.2f s (%s on %s %s, context %d)",
            ready_after,
            ", ".join(engines),
            precision.device,
            precision.dtype_name,
            context_len,
        )

    def _load_base(self, precision: Precision, tokenizer: Any) -> ServedModel:
        from ..modeling import load_model

        source, trust = self.config.model.name_or_path, self.config.model.trust_remote_code
        model = load_model(
            source,
            dtype=precision.dtype,
            device=precision.device,
            trust_remote_code=trust,
            attn_implementation=self.config.model.attn_implementation,
        )
        model.eval()
        return ServedModel(self.config.base_name, model, tokenizer, None, source, source)

    def _load_adapters(self, base: ServedModel) -> list[ServedModel]:
        """Each adapter on the base weights (shared, not copied), with its own tokenizer
        when its folder has one."""
        from ..inference import attach_adapter
        from ..modeling import load_tokenizer
        from ..runs import tokenizer_source

        trust = self.config.model.trust_remote_code
        vocab = base.model.get_input_embeddings().num_embeddings
        served = []
        for name, path in self.config.adapters.items():
            source = tokenizer_source(base.tokenizer_source, path)
            own = source != base.tokenizer_source
            tokenizer = load_tokenizer(source, trust_remote_code=trust) if own else base.tokenizer
            if len(tokenizer) > vocab:
                raise UserError(
                    f"adapter {name!r}: its tokenizer has {len(tokenizer)} tokens, "
                    f"the model's embeddings {vocab}; merge the run instead"
                )
            adapted = attach_adapter(base.model, path, name, share_base=True)
            served.append(ServedModel(name, adapted, tokenizer, base.name, str(path), source))
        return served

    def _start_engines(
        self, served: list[ServedModel], device: str, context_len: int
    ) -> dict[str, Engine]:
        from ..inference import eos_token_ids
        from .batching import cb_config_for
        from .engine import Engine

        engines = {}
        for index, item in enumerate(served):
            engine = Engine(
                item.name,
                item.model,
                item.tokenizer,
                context_len,
                eos_token_ids(item.model, item.tokenizer),
                cb_config_for(self.config, device, context_len, index, len(served)),
                parent=item.parent,
                source=item.source,
                tokenizer_source=item.tokenizer_source,
            )
            engine.start()
            settings = engine.loop.settings()
            log.info(
                "%s: attention %s; CUDA graphs %s, async batching %s, fast decode path %s",
                item.name,
                settings.attention,
                *("on" if on else "off" for on in (
                    settings.cuda_graphs, settings.async_batching, settings.decode_fast_path
                )),
            )  # fmt: skip
            engines[item.name] = engine
            self.metrics.track_engine(item.name, engine.pending)
            if self.config.engine.warmup:
                engine.warm()
        return engines

    # ------------------------------------------------------------------ serving
    def engine(self, name: str) -> Engine | None:
        return self.engines.get(name)

    def models(self) -> list[ModelCard]:
        created = int(process_start_time())
        served: list[tuple[str, str, str | None]] = [
            (self.config.base_name, self.config.model.name_or_path, None)
        ]
        served += [
            (name, str(Path(path)), self.config.base_name)
            for name, path in self.config.adapters.items()
        ]
        cards = []
        for name, root, parent in served:
            engine = self.engines.get(name)
            cards.append(
                ModelCard(
                    id=name,
                    created=created,
                    owned_by="{{ cookiecutter.package_name }}",
                    root=root,
                    parent=parent,
                    max_model_len=engine.context_len if engine else None,
                )
            )
        return cards

    def info(self) -> ServerInfo | None:
        """Device, precision and models once loaded (None before)."""
        if not self.ready or self.precision is None:
            return None
        from importlib.metadata import version

        from ..device import device_name

        device = self.precision.device
        if device == "cuda":
            import torch

            device = f"cuda:{torch.cuda.current_device()}"
        return ServerInfo(
            engine="transformers-continuous-batching",
            engine_version=version("transformers"),
            device=device,
            device_name=device_name(device),
            dtype=self.precision.dtype_name,
            models=[
                ServedModelInfo(
                    id=name,
                    source=engine.source,
                    parent=engine.parent,
                    tokenizer=engine.tokenizer_source,
                    max_model_len=engine.context_len,
                    **asdict(engine.loop.settings()),
                )
                for name, engine in self.engines.items()
            ],
        )

    def dead_engines(self) -> dict[str, str]:
        errors = {name: engine.fatal_error() for name, engine in self.engines.items()}
        return {name: error for name, error in errors.items() if error is not None}

    def cut_off(self, grace_s: float) -> None:
        """The drain grace ran out: end what is still generating with an error answer."""
        reason = (
            f"the server is shutting down and this request did not finish within its "
            f"{grace_s:g} s grace (server.shutdown_grace_s); retry it"
        )
        count = sum(engine.cut_off(reason) for engine in self.engines.values())
        if count:
            log.warning("grace of %g s over: cutting off %d request(s)", grace_s, count)

    def shutdown(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        for engine in self.engines.values():
            engine.stop()
