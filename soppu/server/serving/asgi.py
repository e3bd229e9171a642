"""Plain ASGI middleware (no BaseHTTPMiddleware, so streams and disconnects pass untouched)
and the Prometheus metrics they and the engine feed."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from soppu.server.serving.request import Request
from soppu.server.serving.schemas import error_body

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: ~250,000 tokens of text, far past any model's window


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the limit of {limit:,} bytes")


class BodyLimit:
    """413 for a body over `limit` bytes: refused from its Content-Length before a byte of it
    is read, or as soon as a chunked upload passes the limit (the app's read raises)."""

    def __init__(self, app: ASGIApp, limit: int = DEFAULT_MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            message = str(BodyTooLarge(self.limit).detail)
            await _json(send, 413, error_body(scope.get("path", ""), message, "too_large", 413))
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    # No "connection: close": closing with the body unread resets the connection, and the
    # client, still sending, may never read this answer. The server drops the rest unread.
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class CountRequests:
    """soppu_requests_total{route, status} for every response of every route, whatever sent
    it (a route, a validation error, the body limit, an unhandled error)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Callable[[], set[str]]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts: an unhandled error

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope["path"] if scope["path"] in self.routes() else "other"
            self.metrics.requests.labels(route, str(status)).inc()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "soppu_requests",
            "Requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.finished = Counter(
            "soppu_generations",
            "Generations by how they ended (length, eos_token, stop_sequence, error, cancelled)",
            ["reason"],
            registry=self.registry,
        )
        self.tokens = Counter("soppu_generated_tokens", "Tokens generated", registry=self.registry)
        self.batch = Histogram(
            "soppu_batch_size",
            "Rows per model step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.latency = Histogram(
            "soppu_request_seconds",
            "Request latency",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.queue = Histogram(
            "soppu_queue_seconds",
            "From a request's arrival to its row joining the batch",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )
        self.first_token = Histogram(
            "soppu_time_to_first_token_seconds",
            "Time to first token",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )

    def watch(self, engine: Any) -> None:
        """Gauges read from `engine` at each scrape; counters fed as its requests end."""
        up = Gauge("soppu_engine_up", "1 while the engine thread runs", registry=self.registry)
        up.set_function(lambda: float(engine.alive))
        rows = Gauge("soppu_active_rows", "Rows in the running batch", registry=self.registry)
        rows.set_function(lambda: float(len(engine.active)))
        engine.on_step = lambda count, seconds: self.batch.observe(count)
        engine.on_finish = self.ended

    def ended(self, request: Request) -> None:
        """Called on the engine thread (prometheus_client is thread-safe)."""
        self.finished.labels(request.finish_reason or "error").inc()
        self.tokens.inc(len(request.tokens))
        end = request.finished_at or request.arrived
        self.latency.observe(end - request.arrived)
        if request.admitted_at is not None:
            self.queue.observe(request.admitted_at - request.arrived)
        if request.first_token_at is not None:
            self.first_token.observe(request.first_token_at - request.arrived)
