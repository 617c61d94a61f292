"""Fakes for the gateway's tests: backends in-process, a clock to move, a stack to start.

The gateway meets the real services in tests/e2e; here each backend is a small
FastAPI app reached through an httpx transport, and time is a FakeClock.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from aisemble.services.gateway.app import create
from aisemble.services.gateway.settings import GatewaySettings

KEY = "sk-tests-5b0e6c1f9a8d4e27b3c6a1f0e9d8c7b6"
OTHER_KEY = "sk-other-0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class FakeClock:
    """Both clocks of services.common.clock.Clock, moved only by advance()."""

    def __init__(self) -> None:
        self.wall = datetime(2030, 1, 1, tzinfo=UTC)
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


class Backend:
    """A fake service: records what it was sent, can be made slow, down or not ready."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready = True
        self.seen: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.app = FastAPI()

        @self.app.get("/ready")
        async def ready() -> JSONResponse:
            if self.ready:
                return JSONResponse({"status": "ready"})
            return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "7"})

        @self.app.middleware("http")
        async def record(request: Request, call_next):
            body = await request.body()
            self.seen.append(
                {
                    "path": request.url.path,
                    "request_id": request.headers.get("x-request-id"),
                    "body": json.loads(body) if body else None,
                }
            )
            if not self.ready and request.url.path != "/ready":
                return JSONResponse({"detail": "model loading"}, 503, headers={"Retry-After": "7"})
            return await call_next(request)


def llm_backend() -> Backend:
    b = Backend("llm")

    @b.app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "tiny", "object": "model", "owned_by": "t"}]}

    @b.app.post("/v1/completions")
    async def completions(body: dict) -> Any:
        if body.get("model", "tiny") != "tiny":
            error = {
                "message": f"no model {body.get('model')}",
                "type": "invalid_request_error",
                "code": "model_not_found",
            }
            return JSONResponse({"error": error}, 404)
        if body.get("prompt") == "slow":
            b.entered.set()
            await b.release.wait()
        text = body["prompt"][::-1]
        if body.get("stream"):

            async def events():
                for ch in text:
                    chunk = {
                        "object": "text_completion",
                        "model": "tiny",
                        "choices": [{"index": 0, "text": ch, "finish_reason": None}],
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 0,
            "model": "tiny",
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    @b.app.post("/v1/chat/completions")
    async def chat(body: dict) -> Any:
        text = body["messages"][-1]["content"].upper()
        if body.get("stream"):

            async def events():
                for ch in text:
                    chunk = {
                        "id": "c",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": "tiny",
                        "choices": [{"index": 0, "delta": {"content": ch}, "finish_reason": None}],
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": "tiny",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    return b


def nlp_backend() -> Backend:
    b = Backend("nlp")

    @b.app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "mini", "object": "model", "owned_by": "t"}]}

    @b.app.post("/v1/embeddings")
    async def embeddings(body: dict) -> dict:
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0]}
            for i, t in enumerate(texts)
        ]
        return {
            "object": "list",
            "data": data,
            "model": "mini",
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }

    @b.app.post("/analyze")
    async def analyze(body: dict) -> dict:
        if "text" not in body:
            return JSONResponse(
                {"detail": [{"loc": ["body", "text"], "msg": "Field required"}]}, 422
            )
        return {"results": [{"stats": {"characters": len(body["text"])}}]}

    return b


def simple_backend(name: str, path: str, answer) -> Backend:
    b = Backend(name)
    b.app.post(path)(answer)
    return b


class Routing(httpx.AsyncBaseTransport):
    """Sends each request to the fake backend its host names; unknown hosts are down."""

    def __init__(self, backends: dict[str, Backend], down: set[str]) -> None:
        self.transports = {n: httpx.ASGITransport(app=b.app) for n, b in backends.items()}
        self.down = down

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in self.down or host not in self.transports:
            raise httpx.ConnectError(f"connection refused: {host}", request=request)
        return await self.transports[host].handle_async_request(request)


class Stack:
    """Fake backends and the gateway's settings; by default one key, `tests:KEY`."""

    def __init__(
        self, tmp: Path, clock: FakeClock | None = None, sleep: Any = None, **settings: Any
    ) -> None:
        async def vision(body: dict) -> dict:
            return {"width": len(body.get("image", ""))}

        async def data(body: dict) -> dict:
            return {"row_count": len(body.get("operations", []))}

        self.backends = {
            "llm": llm_backend(),
            "nlp": nlp_backend(),
            "vision": simple_backend("vision", "/analyze", vision),
            "data": simple_backend("data", "/process", data),
        }
        self.down: set[str] = set()
        self.settings = GatewaySettings(
            llm_url="http://llm:8000",
            nlp_url="http://nlp:8000",
            vision_url="http://vision:8000",
            data_url="http://data:8000",
            jobs_db=str(tmp / "jobs.db"),
            **({"api_keys": f"tests:{KEY}"} | settings),
        )
        self.clock = clock
        self.sleep = sleep

    def app(self) -> FastAPI:
        return create(
            self.settings,
            transport=Routing(self.backends, self.down),
            clock=self.clock,
            sleep=self.sleep,
        )

    def client(self, key: str | None = KEY) -> TestClient:
        """A client sending `key` with every request (None: no key)."""
        return TestClient(self.app(), headers=bearer(key) if key else None)


def on_loop(client: TestClient, fn: Any, *args: Any, timeout: float = 10.0) -> Any:
    """Await fn(*args) on the app's event loop; the timeout only stops a broken test."""

    async def bounded() -> Any:
        return await asyncio.wait_for(fn(*args), timeout)

    assert client.portal is not None, "use the client inside `with`"
    return client.portal.call(bounded)


def wait_for_job(client: TestClient, job_id: str) -> dict:
    """The job's view once it has ended: the runner says when, nothing polls."""
    on_loop(client, client.app.state.gateway.runner.wait, job_id)
    return client.get(f"/jobs/{job_id}").json()


def wait_until_entered(client: TestClient, backend: Backend) -> None:
    """Until a slow request has reached `backend` (and so its job is running)."""
    on_loop(client, backend.entered.wait)
