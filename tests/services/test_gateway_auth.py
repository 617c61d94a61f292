"""The gateway's API keys, per-key limits and audit lines, against fake backends in-process.

Time is a FakeClock, so the rate limits are checked to the second without waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from gateway_fixtures import KEY, OTHER_KEY, FakeClock, Stack, bearer, on_loop

from aisemble.services.common import env_settings
from aisemble.services.common.logs import JsonFormatter
from aisemble.services.common.settings import SettingsError
from aisemble.services.gateway.auth import Keyring
from aisemble.services.gateway.quotas import Limits, Quotas, parse_key_limits
from aisemble.services.gateway.settings import GatewaySettings

TWO_KEYS = f"tests:{KEY}\nother:{OTHER_KEY}"
BAD_KEY = "sk-bad-7c1d9e0f3a2b4c5d6e7f8091a2b3c4d5"


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return Stack(tmp_path)


@pytest.fixture
def client(stack: Stack) -> Iterator[TestClient]:
    with stack.client() as c:
        yield c


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def metric(client: TestClient, line_start: str) -> float | None:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


class TestKeyList:
    def test_named_and_unnamed_keys_by_newline_or_comma(self) -> None:
        ring = Keyring.parse(f" tests:{KEY} ,\n{OTHER_KEY}\n\n")
        [unnamed] = [n for n in ring.names if n != "tests"]
        assert re.fullmatch(r"key-[0-9a-f]{8}", unnamed)
        assert ring.identify(KEY.encode()) == "tests"
        assert ring.identify(OTHER_KEY.encode()) == unnamed
        assert ring.identify(BAD_KEY.encode()) is None
        assert ring.identify(b"") is None

    @pytest.mark.parametrize(
        "text, message",
        [
            (f"a:{KEY},a:{OTHER_KEY}", "entries 1 and 2 are both named 'a'"),
            (f"a:{KEY},b:{KEY}", "entries 1 and 2 hold the same key"),
            (f"bad name:{KEY}", "entry 1: the name before ':' may only hold"),
            ("a:", "entry 1 (a): no key after the ':'"),
        ],
    )
    def test_mistakes_are_named_without_the_key(self, text: str, message: str) -> None:
        with pytest.raises(ValueError, match=re.escape(message)) as caught:
            Keyring.parse(text)
        assert KEY not in str(caught.value) and OTHER_KEY not in str(caught.value)

    def test_the_settings_never_show_a_key(self) -> None:
        settings = GatewaySettings(api_keys=TWO_KEYS)
        assert KEY not in repr(settings) and KEY not in str(settings.model_dump())


class TestStartUp:
    def test_no_key_refuses_to_start_saying_how_to_make_one(self, tmp_path: Path) -> None:
        with pytest.raises(SettingsError) as caught:
            Stack(tmp_path, api_keys="").app()
        message = str(caught.value)
        assert "GATEWAY_API_KEYS" in message and "GATEWAY_AUTH=none" in message
        assert "aisemble secret create ai-semble-gateway --from-literal api-key=" in message

    def test_the_process_exits_with_that_message_last(self, tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env |= {"GATEWAY_JOBS_DB": str(tmp_path / "jobs.db"), "PORT": "0"}
        proc = subprocess.run(
            [sys.executable, "-m", "aisemble.services.gateway"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2
        last = proc.stderr.strip().splitlines()[-1]
        assert "GATEWAY_API_KEYS" in last and "GATEWAY_AUTH=none" in last, proc.stderr
        assert "Traceback" not in proc.stderr  # one line to act on, as describe shows it

    def test_a_malformed_key_list_names_the_variable_not_the_key(self, tmp_path: Path) -> None:
        with pytest.raises(SettingsError, match="GATEWAY_API_KEYS: entries 1 and 2") as caught:
            Stack(tmp_path, api_keys=f"a:{KEY},a:{OTHER_KEY}").app()
        assert KEY not in str(caught.value) and OTHER_KEY not in str(caught.value)

    def test_without_authentication_no_key_is_needed(self, tmp_path: Path) -> None:
        with Stack(tmp_path, auth="none", api_keys="").client(key=None) as client:
            assert client.post("/ai/nlp/analyze", json={"text": "x"}).status_code == 200
            assert client.get("/openapi.json").status_code == 200

    @pytest.mark.parametrize(
        "value, message",
        [
            ("ci=rpm:x", "entry 1 ('ci=rpm:x'): rpm must be a whole number"),
            ("ci=burst:3", "'burst:3' is not rpm:N or concurrent:N"),
            ("ci=rpm:1;ci=rpm:2", "key name 'ci' is given limits twice"),
            ("=rpm:1", "expected NAME=rpm:N,concurrent:N"),
        ],
    )
    def test_key_limits_are_checked(self, value: str, message: str) -> None:
        with pytest.raises(SettingsError, match="GATEWAY_KEY_LIMITS") as caught:
            env_settings(GatewaySettings, "GATEWAY", {"GATEWAY_KEY_LIMITS": value})
        assert message in str(caught.value)

    def test_key_limits_for_a_key_that_does_not_exist(self, tmp_path: Path) -> None:
        with pytest.raises(SettingsError, match="GATEWAY_KEY_LIMITS: no key is named ci"):
            Stack(tmp_path, key_limits="ci=rpm:60").app()

    def test_durations_and_defaults(self) -> None:
        env = {"GATEWAY_JOB_RETENTION_S": "12h", "GATEWAY_PRUNE_INTERVAL_S": "90"}
        settings = env_settings(GatewaySettings, "GATEWAY", env)
        assert (settings.job_retention_s, settings.prune_interval_s) == (43200, 90)
        assert GatewaySettings().job_retention_s == 7 * 86400
        with pytest.raises(SettingsError, match="GATEWAY_JOB_RETENTION_S"):
            env_settings(GatewaySettings, "GATEWAY", {"GATEWAY_JOB_RETENTION_S": "1 week"})


class TestAuthentication:
    def test_bearer_and_x_api_key_both_work(self, stack: Stack) -> None:
        with stack.client(key=None) as client:
            for headers in (
                bearer(KEY),
                {"Authorization": f"bearer  {KEY} "},
                {"x-api-key": KEY},
            ):
                response = client.post("/ai/nlp/analyze", json={"text": "x"}, headers=headers)
                assert response.status_code == 200, headers

    @pytest.mark.parametrize(
        "headers, reason",
        [
            ({}, "missing"),
            ({"Authorization": "Bearer "}, "missing"),
            ({"Authorization": f"Basic {KEY}"}, "missing"),
            ({"Authorization": f"Bearer {BAD_KEY}"}, "invalid"),
            ({"x-api-key": BAD_KEY}, "invalid"),
            ({"Authorization": f"Bearer {KEY[:-1]}"}, "invalid"),
        ],
    )
    def test_no_valid_key_is_401_in_openai_shape(
        self, stack: Stack, headers: dict[str, str], reason: str
    ) -> None:
        with stack.client(key=None) as client:
            response = client.post("/v1/chat/completions", json={}, headers=headers)
            assert response.status_code == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert response.headers["X-Request-ID"]
            error = error_of(response)
            assert error["code"] == "invalid_api_key" and error["param"] is None
            assert error["type"] == "invalid_request_error"
            assert metric(client, f'gateway_auth_failures_total{{reason="{reason}"}}') == 1
        assert not stack.backends["llm"].seen  # refused before anything was forwarded

    def test_every_route_but_the_probes_needs_a_key(self, stack: Stack) -> None:
        with stack.client(key=None) as client:
            for path in ("/health", "/ready", "/metrics"):
                assert client.get(path).status_code == 200, path
            for path in ("/docs", "/redoc", "/openapi.json", "/jobs", "/v1/models", "/nowhere"):
                assert client.get(path).status_code == 401, path
            for path in ("/docs", "/redoc", "/openapi.json", "/v1/models"):
                assert client.get(path, headers=bearer(KEY)).status_code == 200, path

    def test_the_schema_declares_the_keys(self, client: TestClient) -> None:
        schema = client.get("/openapi.json").json()
        assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
        operation = schema["paths"]["/v1/chat/completions"]["post"]
        assert operation["security"] == [{"bearer": []}, {"apiKey": []}]
        assert {"401", "429"} <= set(operation["responses"])
        assert "security" not in schema["paths"]["/health"]["get"]

    def test_docs_can_be_turned_off(self, tmp_path: Path) -> None:
        with Stack(tmp_path, docs=False).client() as client:
            for path in ("/docs", "/redoc", "/openapi.json"):
                assert client.get(path).status_code == 404, path

    def test_the_official_client_with_a_wrong_key(self, stack: Stack) -> None:
        with stack.client(key=None) as client:
            ai = openai.OpenAI(base_url="http://testserver/v1", api_key=BAD_KEY, http_client=client)
            with pytest.raises(openai.AuthenticationError) as caught:
                ai.models.list()
        assert caught.value.code == "invalid_api_key"


class TestAudit:
    def test_failures_leave_one_audit_line_and_no_key_anywhere(
        self, stack: Stack, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO)
        answers = []
        with stack.client(key=None) as client:
            answers.append(client.get("/jobs", headers=bearer(BAD_KEY)))
            answers.append(client.post("/ai/nlp/analyze", json={"text": "x"}))
            answers.append(
                client.post("/ai/nlp/analyze", json={"text": "x"}, headers={"x-api-key": KEY})
            )
            answers.append(client.get("/metrics"))
        formatter = JsonFormatter("gateway")
        lines = [json.loads(formatter.format(r)) for r in caplog.records]
        audits = [line for line in lines if line.get("audit")]
        assert [(a["method"], a["path"], a["reason"]) for a in audits] == [
            ("GET", "/jobs", "invalid"),
            ("POST", "/ai/nlp/analyze", "missing"),
        ]
        for audit in audits:
            assert audit["outcome"] == "auth_failed" and audit["key"] is None
            assert audit["client"] == "testclient" and audit["level"] == "warning"
        access = [line for line in lines if line.get("status") == 200]
        assert [(a["path"], a["key"]) for a in access] == [("/ai/nlp/analyze", "tests")]
        everything = "\n".join(
            [json.dumps(line) for line in lines]
            + [a.text + json.dumps(dict(a.headers)) for a in answers]
        )
        assert BAD_KEY not in everything and KEY not in everything


class TestLimits:
    def test_requests_per_minute_with_retry_after(self, tmp_path: Path) -> None:
        clock = FakeClock()
        stack = Stack(tmp_path, clock=clock, rate_limit_rpm=3, api_keys=TWO_KEYS)
        with stack.client() as client:
            for _ in range(3):
                assert client.get("/v1/models").status_code == 200
            refused = client.get("/v1/models")
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "20"
            error = error_of(refused)
            assert error["code"] == "rate_limit_exceeded"
            assert "3 requests per minute" in error["message"]
            # Another key has its own bucket.
            assert client.get("/v1/models", headers=bearer(OTHER_KEY)).status_code == 200
            clock.advance(19)
            assert client.get("/v1/models").headers["Retry-After"] == "1"
            clock.advance(1)
            assert client.get("/v1/models").status_code == 200
            assert client.get("/v1/models").status_code == 429
            assert metric(client, 'gateway_rate_limited_total{key="tests",limit="rpm"}') == 3
            assert metric(client, 'gateway_key_requests_total{key="tests",outcome="2xx"}') == 4
            assert (
                metric(client, 'gateway_key_requests_total{key="tests",outcome="rate_limited"}')
                == 3
            )
            assert metric(client, 'gateway_key_requests_total{key="other",outcome="2xx"}') == 1

    def test_per_key_overrides(self, tmp_path: Path) -> None:
        stack = Stack(
            tmp_path,
            clock=FakeClock(),
            rate_limit_rpm=1,
            api_keys=TWO_KEYS,
            key_limits="other=rpm:0,concurrent:5; tests=rpm:2",
        )
        with stack.client() as client:
            assert [client.get("/v1/models").status_code for _ in range(3)] == [200, 200, 429]
            other = [client.get("/v1/models", headers=bearer(OTHER_KEY)) for _ in range(20)]
            assert {r.status_code for r in other} == {200}

    def test_the_official_client_sees_a_rate_limit_error(self, tmp_path: Path) -> None:
        stack = Stack(tmp_path, clock=FakeClock(), rate_limit_rpm=1)
        with stack.client(key=None) as client:
            ai = openai.OpenAI(
                base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0
            )
            ai.models.list()
            with pytest.raises(openai.RateLimitError) as caught:
                ai.models.list()
        assert caught.value.code == "rate_limit_exceeded"

    def test_a_stream_holds_its_slot_until_it_ends(self, tmp_path: Path) -> None:
        stack = Stack(tmp_path, max_concurrent_per_key=1)
        started, release = asyncio.Event(), asyncio.Event()
        with stack.client() as client:
            assert client.portal is not None
            streaming = client.portal.start_task_soon(
                stream_held, client.app, {"model": "tiny", "prompt": "abc", "stream": True},
                started, release,
            )  # fmt: skip
            on_loop(client, started.wait)
            refused = client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
            assert "1 requests in progress" in error_of(refused)["message"]
            assert metric(client, 'gateway_key_requests_in_progress{key="tests"}') == 1
            client.portal.call(release.set)
            streamed = streaming.result(timeout=10)
            assert streamed.rstrip().endswith(b"data: [DONE]")
            assert metric(client, 'gateway_key_requests_in_progress{key="tests"}') == 0
            again = client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
            assert again.status_code == 200
            assert metric(client, 'gateway_rate_limited_total{key="tests",limit="concurrent"}') == 1

    def test_a_slow_request_holds_its_slot(self, tmp_path: Path) -> None:
        stack = Stack(tmp_path, max_concurrent_per_key=1)
        llm = stack.backends["llm"]
        with stack.client() as client:
            assert client.portal is not None
            slow = client.portal.start_task_soon(
                client_post, client, "/ai/llm/completion", {"prompt": "slow"}
            )
            on_loop(client, llm.entered.wait)
            assert client.post("/ai/nlp/analyze", json={"text": "x"}).status_code == 429
            client.portal.call(llm.release.set)
            assert slow.result(timeout=10) == 200
            assert client.post("/ai/nlp/analyze", json={"text": "x"}).status_code == 200


async def client_post(client: TestClient, path: str, body: dict) -> int:
    """A request from the loop itself, so the test thread stays free to send others."""
    return (await asyncio.to_thread(client.post, path, json=body)).status_code


async def stream_held(
    app: FastAPI, body: dict, started: asyncio.Event, release: asyncio.Event
) -> bytes:
    """POST /v1/completions straight to the ASGI app, as a client that reads the first
    chunk and then stops reading until `release` (a slow reader holds the stream open)."""
    payload = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"authorization", f"Bearer {KEY}".encode()),
        ],
        "client": ("testclient", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    delivered = False
    received: list[bytes] = []

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await asyncio.Event().wait()  # the client never goes away
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200
        if message["type"] == "http.response.body":
            received.append(message.get("body", b""))
            if message.get("more_body") and not started.is_set():
                started.set()
                await release.wait()

    await app(scope, receive, send)
    return b"".join(received)


class TestQuotasAlone:
    """The decisions without HTTP: exact arithmetic on a stepped clock."""

    def test_a_bucket_bursts_a_minute_then_refills_steadily(self) -> None:
        now = [0.0]
        quotas = Quotas(Limits(rpm=60, concurrent=0), {}, lambda: now[0])
        for _ in range(60):
            assert quotas.admit("k") is None
            quotas.release("k")
        refusal = quotas.admit("k")
        assert refusal is not None and (refusal.limit, refusal.retry_after) == ("rpm", 1)
        now[0] = 0.5
        assert quotas.admit("k") is not None
        now[0] = 1.0
        assert quotas.admit("k") is None
        now[0] = 1000.0  # refills up to one minute's worth, no more
        quotas.release("k")
        assert sum(quotas.admit("k") is None for _ in range(100)) == 60

    def test_concurrency_is_checked_before_a_token_is_spent(self) -> None:
        quotas = Quotas(Limits(rpm=2, concurrent=1), {}, lambda: 0.0)
        assert quotas.admit("k") is None
        for _ in range(5):
            refusal = quotas.admit("k")
            assert refusal is not None and refusal.limit == "concurrent"
        quotas.release("k")
        assert quotas.admit("k") is None  # the second token was still there

    def test_overrides_keep_the_defaults_they_do_not_name(self) -> None:
        overrides = parse_key_limits("batch=rpm:6000,concurrent:64;ci=rpm:60\nfree=concurrent:0")
        quotas = Quotas(Limits(rpm=600, concurrent=32), overrides, lambda: 0.0)
        assert quotas.limits("batch") == Limits(6000, 64)
        assert quotas.limits("ci") == Limits(60, 32)
        assert quotas.limits("free") == Limits(600, 0)
        assert quotas.limits("anyone") == Limits(600, 32)
