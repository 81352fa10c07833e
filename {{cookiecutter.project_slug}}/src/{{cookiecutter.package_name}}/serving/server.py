"""`serve`: run the configured engine, with a graceful SIGTERM drain."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

from .config import ServeConfig

log = logging.getLogger(__name__)


def serve(config: ServeConfig) -> int:
    if config.engine.kind == "vllm":
        from .vllm import run_vllm

        return run_vllm(config)
    return _serve_transformers(config)


def _serve_transformers(config: ServeConfig) -> int:
    import uvicorn

    from .app import create_app
    from .metrics import Metrics
    from .runtime import Runtime, check_before_loading

    check_before_loading(config)
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    runtime = Runtime(config, Metrics())
    app = create_app(config, runtime)

    class Server(uvicorn.Server):
        """On SIGTERM/SIGINT: /ready turns false at once, then uvicorn stops accepting
        connections, lets in-flight requests finish for up to shutdown_grace_s, cancels the
        rest, and the app's shutdown stops the engines."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not runtime.draining:
                log.info("signal %s: draining (grace %.0f s)", sig, config.server.shutdown_grace_s)
            runtime.draining = True
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            log_level=config.server.log_level,
            timeout_graceful_shutdown=config.server.shutdown_grace_s,
            access_log=config.server.log_level == "debug",
        )
    )

    def fatal() -> None:
        server.should_exit = True

    runtime.on_fatal = fatal
    # uvicorn re-raises the signal it caught once it has drained; with this handler in
    # place that re-raise is a no-op, so a drained SIGTERM ends with exit status 0.
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if runtime.error:
        print(f"error: {runtime.error}", file=sys.stderr)
        return 1
    return 0
