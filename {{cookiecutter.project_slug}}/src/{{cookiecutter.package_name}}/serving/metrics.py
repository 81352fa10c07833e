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

PREFIX = "llm"
# Seconds: TTFT on a warm GPU is tens of ms, on a CPU or under load it is seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the output for nothing
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered, by endpoint, served model and HTTP status",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of answered requests", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Generated tokens", ["model"], registry=r
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From request received to its first generated token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "From request received to its last byte",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight", "Generation requests being answered", registry=r
        )
        self.engine_pending = Gauge(
            f"{PREFIX}_engine_pending_requests",
            "Requests held by the batching engine (queued or generating)",
            ["model"],
            registry=r,
        )
        self.cold_start = Gauge(
            f"{PREFIX}_cold_start_seconds",
            "Seconds spent in each start-up phase (ready: process start to ready)",
            ["phase"],
            registry=r,
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 once the models are loaded and warm", registry=r)

    def track_engine(self, model: str, pending: Callable[[], int]) -> None:
        self.engine_pending.labels(model).set_function(pending)

    def render(self) -> bytes:
        return generate_latest(self.registry)
