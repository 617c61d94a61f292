"""The data processor's app: the common probes and metrics, the data routes, Spark's life cycle.

The service is ready as soon as it starts and its data root is there: pandas
loads in the background meanwhile, and Spark starts on the first run that asks
for it, so readiness never waits for a JVM. At shutdown a started Spark is
stopped.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from aisemble.services.common import Readiness, create_app
from aisemble.services.data import api
from aisemble.services.data.runner import OperationError, Processor
from aisemble.services.data.settings import DataSettings, load_settings


def create(settings: DataSettings | None = None) -> FastAPI:
    settings = settings or load_settings()
    readiness = Readiness()

    async def data_root_present() -> tuple[bool, str]:
        present = settings.root.is_dir()
        return present, "" if present else f"the data root {settings.root} is not a directory"

    readiness.checks.append(data_root_present)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # pandas and pyarrow import in the background: the first request need not
        # wait for them, and neither does readiness.
        threading.Thread(target=app.state.processor.engines.warm, daemon=True).start()
        readiness.set("ready")
        try:
            yield
        finally:
            await run_in_threadpool(app.state.processor.close)

    app = create_app("data", lifespan=lifespan, readiness=readiness)
    app.state.settings = settings
    app.state.processor = Processor(settings, app.state.metrics.registry)
    app.include_router(api.router)
    app.add_exception_handler(OperationError, api.operation_error)
    _publish_limits(app, settings)
    return app


def _publish_limits(app: FastAPI, settings: DataSettings) -> None:
    """State this deployment's preview limit in its OpenAPI document, so a client knows it
    before sending, not from a 422."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            request = build()["components"]["schemas"]["ProcessRequest"]
            request["properties"]["preview_rows"]["maximum"] = settings.max_preview_rows
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
