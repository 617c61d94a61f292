"""Build the vision app: settings, engine, routes, and the model loading in the background.

Without a classification model the service is ready at once. With one,
`/ready` answers 503 while it loads (and reports the failure if it does not),
but images are still described: only classifying waits for the model.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from aisemble import __version__
from aisemble.services.common import Readiness, create_app
from aisemble.services.common.loading import load_in_background
from aisemble.services.vision.api import VisionMetrics, router
from aisemble.services.vision.engine import VisionEngine
from aisemble.services.vision.settings import VisionSettings, from_env

log = logging.getLogger("aisemble.services.vision")


def create(settings: VisionSettings | None = None, engine: VisionEngine | None = None) -> FastAPI:
    settings = settings or from_env()
    engine = engine or VisionEngine(settings)
    readiness = Readiness(retry_after=settings.load_retry_after)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine.configured:
            what = f"the classification model {settings.model_path}"
            load_in_background(engine.load, readiness, what, log)
        else:
            readiness.set("ready", "no classification model configured")
        yield

    app = create_app(
        "vision",
        version=__version__,
        lifespan=lifespan,
        max_body_bytes=settings.max_body_bytes,
        readiness=readiness,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.vision_metrics = VisionMetrics(app.state.metrics.registry)
    app.include_router(router)
    return app
