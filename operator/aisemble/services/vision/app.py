"""Build the vision app: settings, engine, routes, and the model loading in the background.

Without a classification model the service is ready at once. With one,
`/ready` answers 503 while it loads (and reports the failure if it does not),
but images are still described: only classifying waits for the model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from aisemble import __version__
from aisemble.services.common import Readiness, create_app
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
            _load_in_background(engine, readiness)
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


def _load_in_background(engine: VisionEngine, readiness: Readiness) -> threading.Thread:
    """Load in a daemon thread: start-up returns at once and shutdown never waits on it."""
    path = engine.settings.model_path
    readiness.set("loading", f"loading the classification model from {path}")

    def load() -> None:
        started = time.perf_counter()
        try:
            engine.load()
        except Exception as exc:
            log.exception("the classification model at %s failed to load", path)
            readiness.set("failed", f"the classification model failed to load: {exc}")
            return
        log.info("classification model loaded in %.1f s", time.perf_counter() - started)
        readiness.set("ready")

    thread = threading.Thread(target=load, name="vision-model-load", daemon=True)
    thread.start()
    return thread
