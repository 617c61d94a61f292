"""The gateway against fake backends in-process (the real services meet it in tests/e2e)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from aisemble.services.gateway.app import create
from aisemble.services.gateway.jobs import JobStore
from aisemble.services.gateway.settings import GatewaySettings


class Backend:
    """A fake service: records what it was sent, can be made slow, down or not ready."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready = True
        self.seen: list[dict[str, Any]] = []
        self.release = asyncio.Event()
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
    def __init__(self, tmp: Path, **settings: Any) -> None:
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
            **settings,
        )

    def client(self) -> TestClient:
        return TestClient(create(self.settings, transport=Routing(self.backends, self.down)))


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return Stack(tmp_path)


@pytest.fixture
def client(stack: Stack) -> Iterator[TestClient]:
    with stack.client() as c:
        yield c


def wait_for_job(
    client: TestClient,
    job_id: str,
    states=("succeeded", "failed", "cancelled"),
    timeout: float = 10.0,
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s")


class TestProbes:
    def test_health_never_depends_on_backends(self, stack: Stack, client: TestClient) -> None:
        stack.down.add("llm")
        assert client.get("/health").json() == {"status": "ok", "service": "gateway"}

    def test_ready_when_every_backend_is(self, stack: Stack, client: TestClient) -> None:
        assert client.get("/ready").status_code == 200
        stack.backends["nlp"].ready = False
        stack.down.add("data")
        response = client.get("/ready")
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert sorted(response.json()["failing"]) == [
            "data: unreachable (ConnectError)",
            "nlp: loading",
        ]


class TestAIRoutes:
    def test_completion_reaches_the_llm_and_propagates_the_request_id(
        self, stack: Stack, client: TestClient
    ) -> None:
        response = client.post(
            "/ai/llm/completion",
            json={"prompt": "abc", "max_tokens": 5},
            headers={"X-Request-ID": "req-42"},
        )
        assert response.status_code == 200, response.text
        assert response.json()["text"] == "cba" and response.json()["model"] == "tiny"
        assert response.headers["X-Request-ID"] == "req-42"
        sent = [s for s in stack.backends["llm"].seen if s["path"] == "/v1/completions"][-1]
        assert sent["request_id"] == "req-42"
        assert sent["body"]["max_tokens"] == 5 and "model" not in sent["body"]

    def test_passthrough_routes(self, stack: Stack, client: TestClient) -> None:
        assert client.post("/ai/vision/analyze", json={"image": "xyz"}).json() == {"width": 3}
        nlp = client.post("/ai/nlp/analyze", json={"text": "hello"}).json()
        assert nlp["results"][0]["stats"]["characters"] == 5
        data = client.post("/data/process", json={"operations": [{"op": "limit"}]}).json()
        assert data == {"row_count": 1}

    def test_malformed_bodies_are_422_naming_the_field(self, client: TestClient) -> None:
        response = client.post("/ai/llm/completion", json={"max_tokens": 5})
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "prompt"]
        bad = client.post("/ai/llm/completion", json={"prompt": "x", "temperature": 9})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "temperature"]
        # A backend's own 422 passes through unchanged.
        passed = client.post("/ai/nlp/analyze", json={"texts": []})
        assert passed.status_code == 422 and passed.json()["detail"][0]["loc"] == ["body", "text"]

    def test_oversized_payloads_are_413(self, tmp_path: Path) -> None:
        small = Stack(tmp_path, max_body_bytes=2048)
        with small.client() as client:
            response = client.post("/ai/vision/analyze", json={"image": "x" * 5000})
        assert response.status_code == 413

    def test_a_backend_down_or_loading_is_503_with_retry_after(
        self, stack: Stack, client: TestClient
    ) -> None:
        stack.down.add("vision")
        down = client.post("/ai/vision/analyze", json={"image": "x"})
        assert down.status_code == 503 and down.headers["Retry-After"] == "5"
        assert "vision is unreachable" in down.json()["detail"]
        stack.backends["nlp"].ready = False
        loading = client.post("/ai/nlp/analyze", json={"text": "x"})
        assert loading.status_code == 503 and loading.headers["Retry-After"] == "7"

    def test_backend_timeouts_are_bounded(self, tmp_path: Path) -> None:
        stack = Stack(tmp_path, backend_timeout_s=0.2)
        with stack.client() as client:
            started = time.monotonic()
            response = client.post("/ai/llm/completion", json={"prompt": "slow"})
            assert time.monotonic() - started < 5
        assert response.status_code == 504
        assert "did not answer" in response.json()["detail"]


class TestJobs:
    def test_async_requests_become_jobs(self, client: TestClient) -> None:
        response = client.post("/ai/llm/completion", json={"prompt": "abc", "async": True})
        assert response.status_code == 202
        job_id = response.json()["id"]
        assert response.headers["Location"] == f"/jobs/{job_id}"
        job = wait_for_job(client, job_id)
        assert job["state"] == "succeeded" and job["result"]["text"] == "cba"
        assert job["started"] and job["finished"] and job["duration_ms"] >= 0
        data_job = client.post("/data/process", json={"operations": [], "async": True}).json()
        assert wait_for_job(client, data_job["id"])["result"] == {"row_count": 0}
        listed = client.get("/jobs", params={"state": "succeeded"}).json()
        assert {j["id"] for j in listed["jobs"]} == {job_id, data_job["id"]}

    def test_a_failing_job_records_the_backends_answer(
        self, stack: Stack, client: TestClient
    ) -> None:
        stack.down.add("vision")
        job_id = client.post("/ai/vision/analyze", json={"image": "x", "async": True}).json()["id"]
        job = wait_for_job(client, job_id)
        assert job["state"] == "failed" and job["error"]["status"] == 503
        assert "unreachable" in job["error"]["detail"]

    def test_cancel_a_running_job(self, stack: Stack, client: TestClient) -> None:
        job_id = client.post("/ai/llm/completion", json={"prompt": "slow", "async": True}).json()[
            "id"
        ]
        wait_for_job(client, job_id, states=("running",))
        cancelled = client.delete(f"/jobs/{job_id}")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert client.delete(f"/jobs/{job_id}").status_code == 409
        assert client.get(f"/jobs/{job_id}").json()["state"] == "cancelled"
        assert client.get("/jobs/nope").status_code == 404

    def test_jobs_survive_a_restart(self, stack: Stack) -> None:
        with stack.client() as client:
            job_id = client.post("/ai/llm/completion", json={"prompt": "ab", "async": True}).json()[
                "id"
            ]
            assert wait_for_job(client, job_id)["state"] == "succeeded"
        with stack.client() as client:
            job = client.get(f"/jobs/{job_id}").json()
        assert job["state"] == "succeeded" and job["result"]["text"] == "ba"

    def test_a_job_running_when_the_gateway_died_is_failed_not_lost(self, stack: Stack) -> None:
        store = JobStore(stack.settings.jobs_db)
        job = store.create("llm.completion", {"prompt": "abc"}, "rid")
        assert store.start(job.id)  # then the process "dies"
        store.close()
        with stack.client() as client:
            seen = client.get(f"/jobs/{job.id}").json()
        assert (
            seen["state"] == "failed"
            and "stopped while this job was running" in seen["error"]["detail"]
        )

    def test_or_run_again_when_asked(self, tmp_path: Path) -> None:
        stack = Stack(tmp_path, rerun_interrupted=True)
        store = JobStore(stack.settings.jobs_db)
        job = store.create("llm.completion", {"prompt": "abc"}, "rid")
        store.start(job.id)
        queued = store.create("llm.completion", {"prompt": "xy"}, "rid")  # never started
        store.close()
        with stack.client() as client:
            rerun = wait_for_job(client, job.id)
            waiting = wait_for_job(client, queued.id)
        assert rerun["state"] == "succeeded" and rerun["attempts"] == 2
        assert waiting["result"]["text"] == "yx"


class TestWorkflows:
    def test_steps_use_earlier_outputs(self, stack: Stack, client: TestClient) -> None:
        flow = {
            "steps": [
                {"name": "gen", "call": "llm.completion", "input": {"prompt": "olleh"}},
                {
                    "name": "stats",
                    "call": "nlp.analyze",
                    "input": {"text": "${steps.gen.output.text}", "tasks": ["stats"]},
                },
                {
                    "name": "note",
                    "call": "data.process",
                    "input": {
                        "operations": [
                            {
                                "op": "limit",
                                "n": "${steps.stats.output.results[0].stats.characters}",
                            },
                            {"op": "label", "text": "was ${steps.gen.output.text}!"},
                        ]
                    },
                },
            ]
        }
        response = client.post("/workflows", json=flow)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["steps"]["gen"]["output"]["text"] == "hello"
        sent = stack.backends["data"].seen[-1]["body"]
        assert sent["operations"][0]["n"] == 5  # a whole reference keeps its type
        assert sent["operations"][1]["text"] == "was hello!"
        assert body["result"] == {"row_count": 2}

    def test_async_workflow(self, client: TestClient) -> None:
        flow = {
            "async": True,
            "steps": [{"name": "a", "call": "llm.completion", "input": {"prompt": "xy"}}],
        }
        job_id = client.post("/workflows", json=flow).json()["id"]
        assert wait_for_job(client, job_id)["result"]["result"]["text"] == "yx"

    def test_references_must_point_back(self, client: TestClient) -> None:
        flow = {
            "steps": [
                {"name": "a", "call": "nlp.analyze", "input": {"text": "${steps.b.output.text}"}},
                {"name": "b", "call": "llm.completion", "input": {"prompt": "x"}},
            ]
        }
        response = client.post("/workflows", json=flow)
        assert response.status_code == 422
        assert "refers to step 'b', which does not run before it" in response.text

    def test_a_failing_step_is_named(self, stack: Stack, client: TestClient) -> None:
        stack.down.add("nlp")
        flow = {
            "steps": [
                {"name": "gen", "call": "llm.completion", "input": {"prompt": "x"}},
                {
                    "name": "stats",
                    "call": "nlp.analyze",
                    "input": {"text": "${steps.gen.output.text}"},
                },
            ]
        }
        response = client.post("/workflows", json=flow)
        assert response.status_code == 503
        detail = response.json()["detail"]
        assert detail["step"] == "stats" and detail["index"] == 1


class TestOpenAI:
    def test_the_official_client_works_through_the_gateway(self, client: TestClient) -> None:
        ai = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
        assert sorted(m.id for m in ai.models.list()) == ["mini", "tiny"]
        completion = ai.completions.create(model="tiny", prompt="abc", max_tokens=3)
        assert completion.choices[0].text == "cba"
        chat = ai.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}]
        )
        assert chat.choices[0].message.content == "HI"
        stream = ai.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "abc"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "ABC"
        vectors = ai.embeddings.create(model="mini", input=["a", "bcd"])
        assert [d.embedding[0] for d in vectors.data] == [1.0, 3.0]

    def test_streams_end_with_done(self, client: TestClient) -> None:
        with client.stream(
            "POST", "/v1/completions", json={"model": "tiny", "prompt": "ab", "stream": True}
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert [json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]] == ["b", "a"]

    def test_unknown_models_are_404_in_openai_shape(self, client: TestClient) -> None:
        response = client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"

    def test_models_list_survives_one_backend_down(self, stack: Stack, client: TestClient) -> None:
        stack.down.add("nlp")
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]


def test_metrics_cover_backends_and_routes(client: TestClient) -> None:
    client.post("/ai/llm/completion", json={"prompt": "abc"})
    text = client.get("/metrics").text
    assert 'gateway_backend_request_duration_seconds_count{backend="llm",outcome="200"}' in text
    assert (
        'http_requests_total{method="POST",route="/ai/llm/completion",service="gateway",status="200"}'
        in text
    )
