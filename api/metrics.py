"""Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from api.limits import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("clipdex_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("clipdex_request_seconds", "HTTP request latency",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("clipdex_batch_size", "inputs per model call",
                                    ["kind"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("clipdex_batch_seconds", "model call time per batch",
                                       ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("clipdex_queue_depth", "inputs waiting for the model",
                                 ["kind"], registry=r)
        self.rejected = Counter("clipdex_queue_rejected", "inputs refused: queue full",
                                ["kind"], registry=r)
        self.index_items = Gauge("clipdex_index_items", "items in the served generation",
                                 ["modality"], registry=r)
        self.reloads = Counter("clipdex_generation_reloads", "generation switches",
                               registry=r)

    def on_batch(self, kind: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)
        self.batch_seconds.labels(kind).observe(seconds)

    def watch_queue(self, kind: str, depth: Callable[[], float]) -> None:
        self.queue_depth.labels(kind).set_function(depth)


CLIENT_GONE = "499"  # the status label of a request whose client left before its answer


class RequestMetricsMiddleware:
    """Counts requests and times them under the route's template (/items/{item_id}),
    never the raw path, so ids in URLs do not explode the label set. A request the app
    returned from without answering had lost its client (AdmissionMiddleware heard it leave,
    or the server stopped its connection): it is counted as 499, not as a server error."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": CLIENT_GONE}

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except BaseException:
            if status["code"] == CLIENT_GONE:
                status["code"] = "500"
            raise
        finally:
            route = _route_template(scope)
            self.metrics.requests.labels(scope["method"], route, status["code"]).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def _route_template(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
