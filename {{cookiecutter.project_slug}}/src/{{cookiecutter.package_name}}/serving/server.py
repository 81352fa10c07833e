"""`serve`: run the configured engine, with a graceful SIGTERM drain."""

from __future__ import annotations

import errno
import logging
import math
import signal
import socket
import sys
import threading
from typing import Any

from ..errors import UserError
from .config import ServeConfig

log = logging.getLogger(__name__)
CUT_OFF_MARGIN_S = 1.0  # after the grace: time to send the cut-off answers


def serve(config: ServeConfig) -> int:
    check_port_free(config.server.host, config.server.port)
    if config.engine.kind == "vllm":
        from .vllm import run_vllm

        return run_vllm(config)
    return _serve_transformers(config)


def check_port_free(host: str, port: int) -> None:
    """Said before a model is loaded, for either engine: the port is taken."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As the servers bind: connections of an earlier server in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            raise UserError(
                f"server.port={port}: {host}:{port} is in use by another process; stop it, "
                "or choose another port (server.port=0 takes any free one)"
            ) from None


def configure_logging(level: str) -> None:
    """server.log_level, with timestamps. `force`: the CLI has configured the root logger
    already, and basicConfig alone would leave that in place."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _serve_transformers(config: ServeConfig) -> int:
    import uvicorn

    from .app import create_app
    from .metrics import Metrics
    from .runtime import Runtime, check_before_loading

    check_before_loading(config)
    configure_logging(config.server.log_level)
    runtime = Runtime(config, Metrics(config.price.usd))
    app = create_app(config, runtime)

    grace = config.server.shutdown_grace_s

    class Server(uvicorn.Server):
        """On SIGTERM/SIGINT: /ready turns false at once, uvicorn stops accepting
        connections and lets in-flight requests finish for up to shutdown_grace_s. Then
        the runtime ends the rest with an OpenAI error answer (uvicorn would cancel them
        and send a plain-text 500, or cut a stream), and the app's shutdown stops the
        engines."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not runtime.draining:
                log.info("signal %s: draining (grace %g s)", sig, grace)
                timer = threading.Timer(grace, runtime.cut_off, args=(grace,))
                timer.daemon = True
                timer.start()
            runtime.draining = True
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            log_level=config.server.log_level,
            # uvicorn's own cancel comes only after the cut-off answers are sent
            timeout_graceful_shutdown=math.ceil(grace + CUT_OFF_MARGIN_S),
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
