"""The LLM service's app: the common probes and metrics, the OpenAI routes, and the model's life cycle.

The model loads on a background thread at start-up, so `/health` answers at
once and `/ready` says 503 (loading, or failed and why) until the scheduler
runs. A test or a benchmark can pass a ready engine instead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException

from aisemble.services.common import Readiness, create_app, openai
from aisemble.services.llm import api
from aisemble.services.llm import engine as engines
from aisemble.services.llm.batching import LLMMetrics, Scheduler
from aisemble.services.llm.schemas import ChatCompletionChunk
from aisemble.services.llm.settings import LLMSettings, load_settings

log = logging.getLogger("aisemble.services.llm")

# Small models load in seconds: clients and probes should look again soon.
LOADING_RETRY_AFTER = 2
# How often to look for a model that is not there yet.
MODEL_POLL_S = 1.0


class _Lifecycle:
    """Loads the engine off the event loop, starts the scheduler, and stops it at shutdown."""

    def __init__(self, app: FastAPI, settings: LLMSettings, metrics: LLMMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.readiness: Readiness = app.state.readiness
        self._lock = threading.Lock()
        self._closing = False
        self._stopped = threading.Event()

    def start(self, engine: Any | None) -> None:
        self._closing = False
        self._stopped.clear()
        if engine is not None:
            self._run(engine)
            return
        self.readiness.set("loading", f"loading the model from {self.settings.model_path}")
        # A daemon thread, not the default executor: shutting down must not
        # wait for a load that may take minutes.
        threading.Thread(target=self._load, name="llm-load", daemon=True).start()

    def _load(self) -> None:
        # A stack's model volume is often filled after the stack starts (the demo does
        # so): wait for the model to appear instead of failing for good.
        path = Path(self.settings.model_path)
        while not (path / "config.json").is_file():
            self.readiness.set(
                "waiting",
                f"no model at {path} yet: put a model directory saved with save_pretrained "
                f"there (a demo one: python -m aisemble.services.llm.tinymodel {path})",
            )
            if self._stopped.wait(MODEL_POLL_S):
                return
        self.readiness.set("loading", f"loading the model from {path}")
        try:
            engine = engines.load_engine(self.settings.model_path, self.settings.device)
        except engines.ModelLoadError as exc:
            log.error("cannot load the model: %s", exc)
            self.readiness.set("failed", str(exc))
            return
        except Exception as exc:  # anything else from torch/transformers, reported the same way
            log.exception("cannot load the model")
            self.readiness.set(
                "failed", f"cannot load the model from {self.settings.model_path}: {exc}"
            )
            return
        self._run(engine)

    def _run(self, engine: Any) -> None:
        s = self.settings
        scheduler = Scheduler(
            engine,
            max_batch_size=s.max_batch_size,
            batch_window_s=s.batch_window_ms / 1000,
            max_queue=s.max_queue,
            request_timeout_s=s.request_timeout_s,
            metrics=self.metrics,
        )
        with self._lock:
            if self._closing:  # shut down while loading: nothing to serve
                return
            scheduler.start()
            self.app.state.scheduler = scheduler
        self.readiness.set("ready")

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            self._closing = True
            scheduler, self.app.state.scheduler = self.app.state.scheduler, None
        if scheduler is not None:
            scheduler.close()


def create(settings: LLMSettings | None = None, engine: Any | None = None) -> FastAPI:
    """The app. `engine` (from `engine.load_engine`) skips loading: it is served at once."""
    settings = settings or load_settings()
    lifecycle: _Lifecycle | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        assert lifecycle is not None
        lifecycle.start(engine)
        try:
            yield
        finally:
            # Off the loop: the worker may be mid-step, and streams still drain.
            await asyncio.to_thread(lifecycle.stop)

    app = create_app("llm", lifespan=lifespan, readiness=Readiness(retry_after=LOADING_RETRY_AFTER))
    app.state.settings = settings
    app.state.scheduler = None
    app.state.created = int(time.time())
    lifecycle = _Lifecycle(app, settings, LLMMetrics(app.state.metrics.registry))
    app.include_router(api.router)
    openai.install(app)
    app.add_exception_handler(HTTPException, _openai_400)
    _complete_openapi(app, settings)
    return app


async def _openai_400(request: Request, exc: Exception) -> Response:
    """FastAPI's bare 400 for a body it cannot decode (not UTF-8), in OpenAI's shape as documented."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400:
        return openai.error_response(400, str(exc.detail))
    return await http_exception_handler(request, exc)


def _complete_openapi(app: FastAPI, settings: LLMSettings) -> None:
    """Add to the OpenAPI document what FastAPI cannot derive: the streamed chunks' schema
    (routes name it for their event streams), and this deployment's limits, so clients know
    before sending that a larger max_tokens or more prompts are refused."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schemas = build()["components"]["schemas"]
            for name, schema in openai.components(ChatCompletionChunk).items():
                schemas.setdefault(name, schema)
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                fields = schemas[name]["properties"]
                for field in ("max_tokens", "max_completion_tokens"):
                    if field in fields:
                        fields[field]["maximum"] = settings.max_new_tokens_limit
            schemas["CompletionRequest"]["properties"]["prompt"]["maxItems"] = settings.max_queue
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
