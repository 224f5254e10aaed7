"""Prometheus metrics of one server (GET /metrics), in a registry of its own (:class:`ServerMetrics`).

Routes outside the API are counted under ``route="other"`` (so unknown paths cannot blow up the
number of series).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/classify", "/v1/models",
          "/health", "/metrics")

__all__ = ["ServerMetrics", "ROUTES", "CONTENT_TYPE_LATEST"]


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


class ServerMetrics:
    """The counters, gauges and histograms of one app (a registry per app: several servers can
    live in one process, as in the tests)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("fromzero_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("fromzero_request_latency_seconds", "Time from request to the end of the response",
                                 ["route"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.generated_tokens = Counter("fromzero_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("fromzero_prompt_tokens", "Prompt tokens accepted for generation", registry=r)
        self.batch_size = Histogram("fromzero_batch_size", "Sequences decoded together per decoding step",
                                    registry=r, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128))
        self.queue_depth = Gauge("fromzero_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("fromzero_running_sequences", "Sequences being generated", registry=r)
        self.rejected = Counter("fromzero_rejected_requests", "Requests refused: queue_full (503), timeout (504)",
                                ["reason"], registry=r)

    def track(self, queue_depth: Callable[[], float], running: Callable[[], float]) -> None:
        """Read the gauges from the engine at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
