"""Wiring of the gateway: settings, backends, the job store and runner, routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from aisemble.services.common import Readiness, create_app, env_settings
from aisemble.services.gateway.api import Gateway, router
from aisemble.services.gateway.backends import BackendError, Backends
from aisemble.services.gateway.jobs import JobRunner, JobStore
from aisemble.services.gateway.settings import GatewaySettings

JOB_KINDS = ("llm.completion", "vision.analyze", "nlp.analyze", "data.process")


def create(
    settings: GatewaySettings | None = None, transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    """The gateway app. `transport` lets tests put backends in-process."""
    settings = settings or env_settings(GatewaySettings, "GATEWAY")
    readiness = Readiness()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backends = Backends(
            settings.backend_urls(),
            timeout=settings.backend_timeout_s,
            connect_timeout=settings.connect_timeout_s,
            ready_timeout=settings.ready_timeout_s,
            transport=transport,
            registry=app.state.metrics.registry,
        )
        store = JobStore(settings.jobs_db)
        gateway = Gateway(backends)
        handlers = {kind: partial(gateway.call, kind) for kind in JOB_KINDS}
        handlers["workflow"] = gateway.workflow
        gateway.runner = JobRunner(store, handlers, settings.job_workers)
        app.state.gateway = gateway
        gateway.runner.resume(settings.rerun_interrupted)
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
        "gateway", lifespan=lifespan, max_body_bytes=settings.max_body_bytes, readiness=readiness
    )

    @app.exception_handler(BackendError)
    async def backend_error(request: Request, exc: BackendError) -> JSONResponse:
        body = exc.body if isinstance(exc.body, dict) else {"detail": exc.body}
        return JSONResponse(body, status_code=exc.status)

    app.include_router(router)
    return app
