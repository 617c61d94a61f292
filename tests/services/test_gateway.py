"""The gateway against fake backends in-process (the real services meet it in tests/e2e)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from gateway_fixtures import KEY, Stack, wait_for_job, wait_until_entered

from aisemble.services.gateway.jobs import JobStore
from aisemble.services.nlp.app import create as create_nlp
from aisemble.services.nlp.settings import NlpSettings


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return Stack(tmp_path)


@pytest.fixture
def client(stack: Stack) -> Iterator[TestClient]:
    with stack.client() as c:
        yield c


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


class TestRequestIds:
    """Whatever bytes a caller puts in X-Request-ID, the id passed on is a safe token."""

    ROUTES = [
        ("/ai/nlp/analyze", {"text": "x"}, "nlp"),
        ("/ai/llm/completion", {"prompt": "x"}, "llm"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
            "llm",
        ),
    ]

    @pytest.mark.parametrize(
        "raw",
        ["café".encode(), "日本".encode(), b"caf\xe9", b"two words", b"x" * 129, b"tab\there"],
        ids=["utf8", "cjk", "latin1", "space", "too-long", "tab"],
    )
    @pytest.mark.parametrize("path, body, backend", ROUTES, ids=[r[0] for r in ROUTES])
    def test_an_id_that_cannot_be_passed_on_is_replaced(
        self, stack: Stack, client: TestClient, raw: bytes, path: str, body: dict, backend: str
    ) -> None:
        response = client.post(path, json=body, headers={"X-Request-ID": raw})
        assert response.status_code == 200, response.text
        rid = response.headers["X-Request-ID"]
        assert len(rid) == 32 and rid.isalnum()
        assert stack.backends[backend].seen[-1]["request_id"] == rid

    def test_printable_ascii_up_to_128_is_kept(self, stack: Stack, client: TestClient) -> None:
        for rid in ("!" + "~" * 127, "a/b:c=d"):
            response = client.post(
                "/ai/nlp/analyze", json={"text": "x"}, headers={"X-Request-ID": rid}
            )
            assert response.headers["X-Request-ID"] == rid
            assert stack.backends["nlp"].seen[-1]["request_id"] == rid


class TestJobs:
    def test_async_requests_become_jobs(self, client: TestClient) -> None:
        response = client.post("/ai/llm/completion", json={"prompt": "abc", "async": True})
        assert response.status_code == 202
        job_id = response.json()["id"]
        assert response.headers["Location"] == f"/jobs/{job_id}"
        job = wait_for_job(client, job_id)
        assert job["state"] == "succeeded" and job["result"]["text"] == "cba"
        assert job["started"] and job["finished"] and job["duration_ms"] >= 0
        read = {"op": "read", "path": "orders.csv"}
        data_job = client.post("/data/process", json={"operations": [read], "async": True}).json()
        assert wait_for_job(client, data_job["id"])["result"] == {"row_count": 1}
        listed = client.get("/jobs", params={"state": "succeeded"}).json()
        assert {j["id"] for j in listed["jobs"]} == {job_id, data_job["id"]}

    def test_a_failing_job_records_the_backends_answer(
        self, stack: Stack, client: TestClient
    ) -> None:
        stack.down.add("vision")
        job_id = client.post("/ai/vision/analyze", json={"image": "eA==", "async": True}).json()[
            "id"
        ]
        job = wait_for_job(client, job_id)
        assert job["state"] == "failed" and job["error"]["status"] == 503
        assert "unreachable" in job["error"]["detail"]

    def test_cancel_a_running_job(self, stack: Stack, client: TestClient) -> None:
        job_id = client.post("/ai/llm/completion", json={"prompt": "slow", "async": True}).json()[
            "id"
        ]
        wait_until_entered(client, stack.backends["llm"])
        assert client.get(f"/jobs/{job_id}").json()["state"] == "running"
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
        job = store.create("llm.completion", {"prompt": "abc"}, "rid", owner="tests")
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
        job = store.create("llm.completion", {"prompt": "abc"}, "rid", owner="tests")
        store.start(job.id)
        queued = store.create(
            "llm.completion", {"prompt": "xy"}, "rid", owner="tests"
        )  # never started
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

    @pytest.mark.parametrize(
        "text", ["${steps.gen.output.missing}", "about ${steps.gen.output.missing}!"]
    )
    def test_a_reference_the_output_lacks_is_422_naming_step_and_reference(
        self, client: TestClient, text: str
    ) -> None:
        flow = {
            "steps": [
                {"name": "gen", "call": "llm.completion", "input": {"prompt": "x"}},
                {"name": "stats", "call": "nlp.analyze", "input": {"text": text}},
            ]
        }
        response = client.post("/workflows", json=flow)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert (detail["step"], detail["index"], detail["status"]) == ("stats", 1, 422)
        assert "${steps.gen.output.missing}" in detail["error"]
        assert "has no 'missing'" in detail["error"]
        job_id = client.post("/workflows", json=flow | {"async": True}).json()["id"]
        job = wait_for_job(client, job_id)
        assert job["state"] == "failed" and job["error"]["status"] == 422
        assert job["error"]["detail"]["step"] == "stats"
        assert "${steps.gen.output.missing}" in job["error"]["detail"]["error"]

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
    def test_the_official_client_works_through_the_gateway(self, stack: Stack) -> None:
        with stack.client(key=None) as client:  # the SDK sends the key itself
            self._use_the_sdk(
                openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client)
            )

    def _use_the_sdk(self, ai: openai.OpenAI) -> None:
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


class TestAsDocumented:
    """What the published document promises (tests/services/test_fuzz_gateway.py fuzzes it)."""

    FLOW = {"steps": [{"name": "a", "call": "nlp.analyze", "input": {"text": "x"}}]}

    @pytest.mark.parametrize(
        "path, body",
        [
            ("/ai/llm/completion", {"prompt": "x", "async": 0}),
            ("/workflows", FLOW | {"async": 0}),
            ("/ai/nlp/analyze", {"text": "x", "async": 0}),
            ("/data/process", {"operations": [{"op": "read", "path": "a.csv"}], "async": 1}),
        ],
    )
    def test_async_is_true_or_false_not_a_number(
        self, client: TestClient, path: str, body: dict
    ) -> None:
        response = client.post(path, json=body)
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "async"] and error["type"] == "bool_type"
        assert client.get("/jobs").json()["count"] == 0

    def test_a_seed_is_within_the_llms_bounds(self, stack: Stack, client: TestClient) -> None:
        refused = client.post("/ai/llm/completion", json={"prompt": "x", "seed": 2**53})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == [
            "body",
            "seed",
        ]
        assert client.post(
            "/ai/llm/completion", json={"prompt": "x", "seed": -(2**53 - 1)}
        ).is_success

    @pytest.mark.parametrize(
        "path, body, field",
        [
            ("/ai/nlp/analyze", {"texts": [" "]}, None),
            ("/ai/nlp/analyze", {"text": "x", "tasks": ["nope"]}, "tasks"),
            ("/data/process", {"operations": []}, "operations"),
            ("/ai/vision/analyze", {"image": "not base64!"}, "image"),
        ],
    )
    def test_an_async_body_is_checked_before_a_job_is_taken(
        self, client: TestClient, path: str, body: dict, field: str | None
    ) -> None:
        response = client.post(path, json=body | {"async": True})
        assert response.status_code == 422, response.text
        (error, *_) = response.json()["detail"]
        assert error["loc"][:2] == (["body", field] if field else ["body"])
        assert {"loc", "msg", "type"} <= set(error)
        assert client.get("/jobs").json()["count"] == 0

    def test_openai_bodies_reach_the_service_as_they_came(self, stack: Stack) -> None:
        # Bytes that are not UTF-8 get the service's own answer, OpenAI's 400, not the
        # gateway's {"detail": ...}.
        stack.backends["nlp"].app = create_nlp(NlpSettings())
        with stack.client() as client:
            response = client.post(
                "/v1/embeddings",
                content=b'{"input": "\xff"}',
                headers={"Content-Type": "application/json"},
            )
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"

    def test_the_document_says_what_answers(self, client: TestClient) -> None:
        paths = client.get("/openapi.json").json()["paths"]
        assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
        assert "404" in paths["/jobs/{job_id}"]["get"]["responses"]
        assert {"404", "409"} <= set(paths["/jobs/{job_id}"]["delete"]["responses"])
        for path in ("/ai/vision/analyze", "/ai/nlp/analyze", "/data/process", "/workflows"):
            operation = paths[path]["post"]
            assert "202" in operation["responses"] and "requestBody" in operation
        completions = paths["/v1/completions"]["post"]
        assert "text/event-stream" in completions["responses"]["200"]["content"]
        assert "CompletionRequest" in json.dumps(completions["requestBody"])
