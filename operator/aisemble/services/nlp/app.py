"""Build the NLP app: settings, engine, routes, and the model loading in the background.

The service starts answering at once; `/ready` says 503 (with Retry-After)
until the model is loaded, or reports why it failed to load, and the routes
that need the model answer 503 likewise meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from aisemble import __version__
from aisemble.services.common import Readiness, ServiceUnavailable, create_app, openai
from aisemble.services.common.loading import load_in_background
from aisemble.services.nlp.api import (
    NlpMetrics,
    http_error,
    router,
    unavailable,
    validation_error,
)
from aisemble.services.nlp.engine import NlpEngine
from aisemble.services.nlp.schemas import VISIBLE_PATTERN
from aisemble.services.nlp.settings import NlpSettings, from_env

log = logging.getLogger("aisemble.services.nlp")


def create(settings: NlpSettings | None = None, engine: NlpEngine | None = None) -> FastAPI:
    settings = settings or from_env()
    engine = engine or NlpEngine(settings)
    readiness = Readiness(retry_after=settings.load_retry_after)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        load_in_background(engine.load, readiness, "the embedding model", log)
        yield

    app = create_app(
        "nlp",
        version=__version__,
        lifespan=lifespan,
        max_body_bytes=settings.max_body_bytes,
        readiness=readiness,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.nlp_metrics = NlpMetrics(app.state.metrics.registry)
    app.state.created = int(time.time())  # the `created` of /v1/models
    openai.install(app)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ServiceUnavailable, unavailable)
    app.add_exception_handler(HTTPException, http_error)
    app.include_router(router)
    _publish_limits(app, settings)
    return app


def _publish_limits(app: FastAPI, settings: NlpSettings) -> None:
    """State this deployment's limits in its OpenAPI document: characters per text, texts
    per field, labels; clients learn them before sending, not from a 422."""
    build = app.openapi

    def limit(node: Any, items: int) -> None:
        """Every text under `node` (a string marked with the text pattern) and list of them."""
        if isinstance(node, dict):
            if node.get("pattern") == VISIBLE_PATTERN:
                node["maxLength"] = settings.max_chars
            if node.get("type") == "array" and node.get("items", {}).get("pattern"):
                node["maxItems"] = items
            for child in node.values():
                limit(child, items)
        elif isinstance(node, list):
            for child in node:
                limit(child, items)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schemas = build()["components"]["schemas"]
            for name in ("AnalyzeRequest", "SimilarityRequest", "EmbeddingsRequest"):
                limit(schemas[name]["properties"], settings.max_texts)
            labels = min(settings.max_labels, settings.max_texts)
            limit(schemas["AnalyzeRequest"]["properties"]["labels"], labels)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
