"""Prometheus metrics: one registry per app (no process globals, so tests can run several apps)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["PROMETHEUS_CONTENT_TYPE", "Metrics", "MetricsMiddleware"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_CODEC_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The service's instruments."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_seconds = Histogram(
            "compass_http_request_duration_seconds", "HTTP request latency by route template",
            ["method", "route", "status"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.encode_seconds = Histogram(
            "compass_encode_duration_seconds", "Time to encode one upload into a .cmp stream",
            buckets=_CODEC_BUCKETS, registry=r,
        )
        self.decode_seconds = Histogram(
            "compass_decode_duration_seconds", "Time to decode and encode one rendition (cache miss)",
            buckets=_CODEC_BUCKETS, registry=r,
        )
        self.uploads = Counter(
            "compass_uploads_total", "Upload outcomes", ["outcome"], registry=r,
        )
        self.encodes = Counter("compass_encodes_total", "Encode outcomes", ["outcome"], registry=r)
        self.cache_requests = Counter(
            "compass_rendition_cache_requests_total", "Rendition cache lookups", ["result"], registry=r,
        )
        self.queue_depth = Gauge("compass_encode_queue_depth", "Encode jobs waiting", registry=r)
        self.cache_hit_ratio = Gauge(
            "compass_rendition_cache_hit_ratio", "Rendition cache hits / lookups since start",
            registry=r,
        )
        self.cache_bytes = Gauge("compass_rendition_cache_bytes", "Bytes in the rendition cache",
                                 registry=r)
        self._hits = 0
        self._lookups = 0
        self.cache_hit_ratio.set_function(lambda: self._hits / self._lookups if self._lookups else 0.0)

    def bind_queue_depth(self, fn: Callable[[], int]) -> None:
        self.queue_depth.set_function(lambda: float(fn()))

    def bind_cache_bytes(self, fn: Callable[[], int]) -> None:
        self.cache_bytes.set_function(lambda: float(fn()))

    def cache_lookup(self, hit: bool) -> None:
        self._lookups += 1
        self._hits += int(hit)
        self.cache_requests.labels("hit" if hit else "miss").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware timing every HTTP request, labelled by route template (not raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # Unmatched paths share one label: raw paths would make the label set unbounded.
            template = getattr(route, "path", None) or "<unmatched>"
            self.metrics.request_seconds.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - start
            )
