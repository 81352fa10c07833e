"""Prometheus metrics of the server, in a registry of its own (prometheus-client)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from . import metric_names as names

# Seconds: TTFT on a warm GPU is tens of ms, on a CPU or under load it is seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    def __init__(self, price: Callable[[int, int], float | None] | None = None) -> None:
        """`price`: the dollars of a request's (input, output) tokens, None when unpriced."""
        self.price = price
        # no *_created series: they double the output for nothing
        disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            names.REQUESTS,
            "Requests answered, by endpoint, served model and HTTP status",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            names.PROMPT_TOKENS, "Prompt tokens of answered requests", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            names.COMPLETION_TOKENS, "Generated tokens", ["model"], registry=r
        )
        self.cost_usd = Counter(
            names.COST_USD,
            "Dollars charged for answered requests at the serve config's price",
            ["model"],
            registry=r,
        )
        self.ttft = Histogram(
            names.TIME_TO_FIRST_TOKEN,
            "From request received to its first generated token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            names.E2E_LATENCY,
            "From request received to its last byte",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            names.REQUESTS_IN_FLIGHT, "Generation requests being answered", registry=r
        )
        self.engine_pending = Gauge(
            names.ENGINE_PENDING,
            "Requests held by the batching engine (queued or generating)",
            ["model"],
            registry=r,
        )
        self.cold_start = Gauge(
            names.COLD_START,
            "Seconds spent in each start-up phase (ready: process start to ready)",
            ["phase"],
            registry=r,
        )
        self.ready = Gauge(names.READY, "1 once the models are loaded and warm", registry=r)

    def answered(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Count a request's tokens, and their dollars where the serve config has a price."""
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.completion_tokens.labels(model).inc(completion_tokens)
        usd = self.price(prompt_tokens, completion_tokens) if self.price else None
        if usd is not None:
            self.cost_usd.labels(model).inc(usd)

    def track_engine(self, model: str, pending: Callable[[], int]) -> None:
        self.engine_pending.labels(model).set_function(pending)

    def render(self) -> bytes:
        return generate_latest(self.registry)
