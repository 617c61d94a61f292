"""create_app(): the FastAPI app every service starts from.

It gives each service the same outside: `GET /health` (liveness: the process
answers), `GET /ready` (readiness: the service can do its work, e.g. its model
is loaded), `GET /metrics` (Prometheus text), an `X-Request-ID` on every
response (taken from the request when it is a safe token, else made up), JSON
access logs carrying it, a request-size limit (413), and `ServiceUnavailable`
turned into 503 with `Retry-After`, as Kubernetes probes and HTTP clients
expect. A service may slot its own ASGI middleware (the gateway's API keys and
quotas) inside the request id and access log, so its answers are logged too,
and add fields to the access line with `log_fields`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aisemble.services.common import logs
from aisemble.services.common.errors import ServiceUnavailable

log = logging.getLogger("aisemble.services")

REQUEST_ID = "X-Request-ID"
DEFAULT_MAX_BODY = 10 * 2**20
PROBES = frozenset({"/health", "/ready", "/metrics"})
_SAFE_REQUEST_ID = re.compile(rb"[!-~]{1,128}")
# Where inner layers leave fields for the access log line (see log_fields).
_LOG_FIELDS = "aisemble.log_fields"


def log_fields(scope: Scope, **fields: Any) -> None:
    """Add fields to this request's access log line (e.g. the gateway's key name)."""
    scope.setdefault(_LOG_FIELDS, {}).update(fields)


def _request_id(raw: bytes | None) -> str:
    """The caller's request id when it is 1-128 printable ASCII characters (`!`..`~`),
    else a new one: anything else cannot be passed on in an HTTP header (httpx
    refuses non-ASCII) or would let a caller write spaces and quotes into logs."""
    if raw and _SAFE_REQUEST_ID.fullmatch(raw):
        return raw.decode("ascii")
    return uuid.uuid4().hex


@dataclass
class Readiness:
    """What `/ready` reports. Services flip it as their model loads (or fails to)."""

    state: str = "starting"  # starting, loading, ready, failed
    detail: str = ""
    retry_after: int = 5
    checks: list[Callable[[], Awaitable[tuple[bool, str]]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set(self, state: str, detail: str = "") -> None:
        with self._lock:
            self.state, self.detail = state, detail

    async def report(self) -> tuple[bool, dict[str, Any]]:
        """(ready?, body). Ready means state `ready` and every extra check passing."""
        body: dict[str, Any] = {"status": self.state}
        if self.detail:
            body["detail"] = self.detail
        if self.state != "ready":
            return False, body
        failing = []
        for check in self.checks:
            passed, detail = await check()
            if not passed:
                failing.append(detail)
        if failing:
            body.update(status="degraded", failing=failing)
            return False, body
        return True, body


class Metrics:
    """A registry per app (tests make many apps) with the HTTP metrics every service has."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests by route and status.",
            ["service", "method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time to answer HTTP requests (to the first byte of a streamed body).",
            ["service", "method", "route"],
            registry=self.registry,
            buckets=(
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
            ),
        )
        self.service = service


def create_app(
    service: str,
    version: str = "0.1.0",
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    readiness: Readiness | None = None,
    registry: CollectorRegistry | None = None,
    middleware: Sequence[Middleware] = (),
    docs: bool = True,
) -> FastAPI:
    """The service's app. `registry`: where its metrics go, when the service made metrics
    before the app (for its `middleware`, which runs inside the request id and access
    log, outside the body limit). `docs=False` removes /docs, /redoc and /openapi.json."""
    ready = readiness or Readiness()

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        if lifespan is None:
            ready.set("ready")
            yield
            return
        async with lifespan(app):
            yield

    hidden: dict[str, Any] = (
        {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    )
    app = FastAPI(title=f"AI-semble {service}", version=version, lifespan=run, **hidden)
    app.state.service = service
    app.state.readiness = ready
    app.state.metrics = Metrics(service, registry)

    @app.get("/health", tags=["probes"])
    async def health() -> dict[str, str]:
        """Liveness: the process answers. Never depends on backends or models."""
        return {"status": "ok", "service": service}

    @app.get("/ready", tags=["probes"])
    async def is_ready() -> Response:
        """Readiness: 200 when the service can do its work, else 503 with Retry-After."""
        ok, body = await ready.report()
        if ok:
            return JSONResponse(body)
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(ready.retry_after)})

    # Prometheus' text format, not JSON: the document says so, for clients and fuzzers.
    @app.get("/metrics", tags=["probes"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus metrics, in its text exposition format."""
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ServiceUnavailable)
    async def unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.detail},
            status_code=503,
            headers={"Retry-After": str(exc.retry_after)},
        )

    # The last added runs first: every answer, a 413 or the service's own (a 401) too,
    # gets its request id, log and count.
    app.add_middleware(_LimitBody, limit=max_body_bytes)
    for layer in reversed(middleware):
        app.add_middleware(layer.cls, *layer.args, **layer.kwargs)
    app.add_middleware(_Observe, metrics=app.state.metrics)
    return app


class _LimitBody:
    """413 for bodies over the limit, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _too_large(self.limit, send)
            return
        seen = 0
        responded = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal responded
            responded = True
            await send(message)

        try:
            await self.app(scope, limited, tracking_send)
        except _BodyTooLarge:
            if not responded:
                await _too_large(self.limit, send)


class _BodyTooLarge(Exception):
    pass


async def _too_large(limit: int, send: Send) -> None:
    response = JSONResponse(
        {"detail": f"request body is larger than the limit of {limit} bytes"}, status_code=413
    )
    await response({"type": "http"}, _nothing, send)


async def _nothing() -> Message:  # pragma: no cover - JSONResponse does not read
    return {"type": "http.disconnect"}


class _Observe:
    """Request id, access log and HTTP metrics for every request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = _request_id(headers.get(b"x-request-id"))
        token = logs.request_id.set(rid)
        started = time.perf_counter()
        status = 500

        async def with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (b"x-request-id", rid.encode("ascii"))
                ]
                route = _route(scope)
                self.metrics.latency.labels(self.metrics.service, scope["method"], route).observe(
                    time.perf_counter() - started
                )
            await send(message)

        try:
            await self.app(scope, receive, with_id)
        finally:
            route = _route(scope)
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(
                self.metrics.service, scope["method"], route, str(status)
            ).inc()
            if route not in PROBES:
                fields = {
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                }
                fields.update(scope.get(_LOG_FIELDS) or {})
                log.info(
                    "%s %s %s", scope["method"], scope["path"], status, extra={"fields": fields}
                )
            logs.request_id.reset(token)


def _route(scope: Scope) -> str:
    """The route's template (`/jobs/{id}`), so metrics do not get a label per id."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
