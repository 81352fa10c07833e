"""Server state: load and warm the models in the background, timing each cold-start phase.

The HTTP server answers /health and /ready from the first moment; /ready turns true
only once every served model is loaded and has generated a token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .config import ServeConfig
from .metrics import Metrics
from .protocol import ServedModelInfo, ServerInfo

if TYPE_CHECKING:
    from ..device import Precision

log = logging.getLogger(__name__)
_IMPORTED_AT = time.time()


def process_start_time() -> float:
    """Wall-clock time this process started (falls back to when this module was imported)."""
    try:
        import psutil

        return psutil.Process().create_time()
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


class Runtime:
    def __init__(self, config: ServeConfig, metrics: Metrics) -> None:
        self.config, self.metrics = config, metrics
        self.engines: dict[str, Any] = {}
        self.ready = False
        self.draining = False
        self.error: str | None = None
        self.phase = "starting"
        self.phases: dict[str, float] = {}
        self.on_fatal: Callable[[], None] | None = None
        self.precision: Precision | None = None
        self.tokenizer_sources: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

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
            self.error = f"{error.__class__.__name__}: {error}"
            self.phase = "failed"
            log.error("loading failed: %s", self.error, exc_info=not isinstance(error, UserError))
            if self.on_fatal is not None:
                self.on_fatal()

    def _load_engines(self) -> None:
        config = self.config
        with self._timed("imports"):
            from ..device import pick_precision
            from ..inference import attach_adapter, context_length, eos_token_ids, has_tokenizer
            from ..modeling import load_model, load_tokenizer
            from . import engine as engine_module

            if config.adapters:
                import peft  # noqa: F401  (timed here, not in the adapter phase)
        precision = self.precision = pick_precision(config.model.device, config.model.dtype)
        trust = config.model.trust_remote_code
        with self._timed("weights"):
            tokenizer = load_tokenizer(config.model.name_or_path, trust_remote_code=trust)
            model = load_model(
                config.model.name_or_path,
                dtype=precision.dtype,
                device=precision.device,
                trust_remote_code=trust,
            )
            model.eval()
        context_len = context_length(model, config.model.max_context)
        served: list[tuple[str, Any, Any, str | None, str]] = [
            (config.base_name, model, tokenizer, None, config.model.name_or_path)
        ]
        self.tokenizer_sources[config.base_name] = config.model.name_or_path
        with self._timed("adapters"):
            vocab = model.get_input_embeddings().num_embeddings
            for name, path in config.adapters.items():
                own = has_tokenizer(path)
                adapter_tokenizer = (
                    load_tokenizer(path, trust_remote_code=trust) if own else tokenizer
                )
                self.tokenizer_sources[name] = str(path) if own else config.model.name_or_path
                if len(adapter_tokenizer) > vocab:
                    raise UserError(
                        f"adapter {name!r}: its tokenizer has {len(adapter_tokenizer)} tokens, "
                        f"the model's embeddings {vocab}; merge the run instead"
                    )
                adapted = attach_adapter(model, path, name, share_base=True)
                served.append((name, adapted, adapter_tokenizer, config.base_name, str(path)))
        engines = {}
        with self._timed("warmup"):
            for index, (name, served_model, served_tokenizer, parent, source) in enumerate(served):
                cb_config = engine_module.cb_config_for(
                    config, precision.device, context_len, index, len(served)
                )
                engine = engine_module.Engine(
                    name,
                    served_model,
                    served_tokenizer,
                    context_len,
                    eos_token_ids(served_model, served_tokenizer),
                    cb_config,
                    parent=parent,
                    source=source,
                )
                engine.start()
                engines[name] = engine
                self.metrics.track_engine(name, engine.pending)
                if config.engine.warmup:
                    self._warm(engine)
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
            str(precision.dtype).removeprefix("torch."),
            context_len,
        )

    @staticmethod
    def _warm(engine: Any) -> None:
        """One real request through the engine, so the first user does not pay for it."""
        ids = engine.tokenizer("Hello", add_special_tokens=False)["input_ids"] or engine.eos_ids
        request_id = f"warmup-{engine.name}"
        engine.manager.add_request(ids, request_id=request_id, max_new_tokens=2, streaming=False)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            result = engine.manager.get_result(request_id=request_id, timeout=0.5)
            if result is not None and result.is_finished():
                if result.error:
                    raise RuntimeError(f"warm-up of {engine.name!r} failed: {result.error}")
                return
            if engine.fatal_error():
                raise RuntimeError(f"warm-up of {engine.name!r} failed: {engine.fatal_error()}")
        raise RuntimeError(f"warm-up of {engine.name!r} did not finish in 300 s")

    # ------------------------------------------------------------------ serving
    def engine(self, name: str) -> Any:
        return self.engines.get(name)

    def models(self) -> list[dict[str, Any]]:
        created = int(process_start_time())
        owner = "{{ cookiecutter.package_name }}"
        entries = [
            {
                "id": self.config.base_name,
                "object": "model",
                "created": created,
                "owned_by": owner,
                "root": self.config.model.name_or_path,
                "parent": None,
            }
        ]
        for name, path in self.config.adapters.items():
            entries.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": owner,
                    "root": str(Path(path)),
                    "parent": self.config.base_name,
                }
            )
        for entry in entries:
            engine = self.engines.get(entry["id"])
            entry["max_model_len"] = engine.context_len if engine else None
        return entries

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
            dtype=str(self.precision.dtype).removeprefix("torch."),
            models=[
                ServedModelInfo(
                    id=name,
                    source=engine.source,
                    parent=engine.parent,
                    tokenizer=self.tokenizer_sources[name],
                    max_model_len=engine.context_len,
                )
                for name, engine in self.engines.items()
            ],
        )

    def dead_engines(self) -> dict[str, str]:
        return {name: e.fatal_error() for name, e in self.engines.items() if e.fatal_error()}

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
        self._stopped.set()
