"""Wiring of the gateway: settings, API keys and limits, backends, the job runner, routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.middleware import Middleware

from aisemble.services.common import Readiness, create_app, env_settings
from aisemble.services.common.clock import Clock
from aisemble.services.common.settings import SettingsError
from aisemble.services.gateway.answers import complete_openapi
from aisemble.services.gateway.api import Gateway, router
from aisemble.services.gateway.auth import Guard, GuardMetrics, Keyring, document
from aisemble.services.gateway.backends import BackendError, Backends
from aisemble.services.gateway.jobs import JobStore
from aisemble.services.gateway.quotas import Limits, Quotas, parse_key_limits
from aisemble.services.gateway.runner import JobRunner, Sleep
from aisemble.services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

JOB_KINDS = ("llm.completion", "vision.analyze", "nlp.analyze", "data.process")
SECRET = "ai-semble-gateway"


def create(
    settings: GatewaySettings | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock | None = None,
    sleep: Sleep | None = None,
) -> FastAPI:
    """The gateway app. `transport` lets tests put backends in-process; `clock` and `sleep`
    let them move time (rate limits, job timestamps and pruning) instead of waiting.

    Raises SettingsError, so the gateway does not start, when the settings cannot hold:
    authentication required but no key, a malformed key list, limits for unknown keys.
    """
    settings = settings or env_settings(GatewaySettings, "GATEWAY")
    clock = clock or Clock()
    registry = CollectorRegistry()
    readiness = Readiness()
    guard = _guard(settings, registry, clock)
    if guard is None:
        log.warning("GATEWAY_AUTH=none: every caller may use every route and see every job")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backends = Backends(
            settings.backend_urls(),
            timeout=settings.backend_timeout_s,
            connect_timeout=settings.connect_timeout_s,
            ready_timeout=settings.ready_timeout_s,
            transport=transport,
            registry=registry,
        )
        store = JobStore(settings.jobs_db, now=clock.now)
        gateway = Gateway(backends)
        handlers = {kind: partial(gateway.call, kind) for kind in JOB_KINDS}
        handlers["workflow"] = gateway.workflow
        gateway.runner = JobRunner(
            store,
            handlers,
            settings.job_workers,
            max_queued=settings.max_queued,
            retention_s=settings.job_retention_s,
            max_jobs=settings.max_jobs,
            prune_interval_s=settings.prune_interval_s,
            **({"sleep": sleep} if sleep else {}),
        )
        app.state.gateway = gateway
        gateway.runner.start(settings.rerun_interrupted)
        required = [b.strip() for b in settings.required_backends.split(",") if b.strip()]
        readiness.checks[:] = [partial(backends.ready, name) for name in required]
        readiness.set("ready")
        try:
            yield
        finally:
            readiness.set("stopping")
            await gateway.runner.shutdown()
            await backends.close()
            store.close()

    app = create_app(
        "gateway",
        lifespan=lifespan,
        max_body_bytes=settings.max_body_bytes,
        readiness=readiness,
        registry=registry,
        middleware=[guard] if guard else [],
        docs=settings.docs,
    )

    @app.exception_handler(BackendError)
    async def backend_error(request: Request, exc: BackendError) -> JSONResponse:
        body = exc.body if isinstance(exc.body, dict) else {"detail": exc.body}
        return JSONResponse(body, status_code=exc.status)

    app.include_router(router)
    complete_openapi(app)
    if guard is not None:
        document(app)
    return app


def _guard(
    settings: GatewaySettings, registry: CollectorRegistry, clock: Clock
) -> Middleware | None:
    """The API-key guard the settings ask for (None: GATEWAY_AUTH=none), or SettingsError."""
    if settings.auth == "none":
        return None
    try:
        keyring = Keyring.parse(settings.api_keys.get_secret_value())
    except ValueError as exc:
        raise SettingsError(f"invalid settings: GATEWAY_API_KEYS: {exc}") from None
    if not keyring.keys:
        raise SettingsError(
            "GATEWAY_AUTH is 'required' but GATEWAY_API_KEYS holds no key, so the gateway "
            "will not start. Give it one or more keys (NAME:KEY, one per line or comma "
            f"separated): in the reference stack they come from the podman secret {SECRET}, "
            f"key api-key, e.g. `aisemble secret create {SECRET} --from-literal "
            "api-key=main:$(openssl rand -hex 32)`. To run without authentication instead, set "
            "GATEWAY_AUTH=none."
        )
    overrides = parse_key_limits(settings.key_limits)
    unknown = sorted(set(overrides) - set(keyring.names))
    if unknown:
        raise SettingsError(
            f"invalid settings: GATEWAY_KEY_LIMITS: no key is named {', '.join(unknown)} "
            f"(GATEWAY_API_KEYS names {', '.join(keyring.names)})"
        )
    defaults = Limits(rpm=settings.rate_limit_rpm, concurrent=settings.max_concurrent_per_key)
    quotas = Quotas(defaults, overrides, clock.monotonic)
    return Middleware(Guard, keyring=keyring, quotas=quotas, metrics=GuardMetrics(registry, quotas))
