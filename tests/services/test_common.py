"""What every service gets from create_app(): probes, request ids, limits, settings."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from aisemble.services.common import Readiness, ServiceUnavailable, create_app, env_settings
from aisemble.services.common.settings import SettingsError


class Example(BaseModel):
    model_path: str | None = None
    batch: int = Field(8, ge=1)


def test_settings_come_from_prefixed_variables_and_empty_means_unset() -> None:
    got = env_settings(Example, "svc", {"SVC_MODEL_PATH": "/m", "SVC_BATCH": "4", "OTHER": "x"})
    assert (got.model_path, got.batch) == ("/m", 4)
    assert env_settings(Example, "svc", {"SVC_MODEL_PATH": "", "SVC_BATCH": ""}) == Example()
    with pytest.raises(SettingsError, match="SVC_BATCH"):
        env_settings(Example, "svc", {"SVC_BATCH": "0"})


def test_probes_request_ids_and_unavailable() -> None:
    readiness = Readiness()
    app = create_app("demo", readiness=readiness, max_body_bytes=64)

    @app.post("/work")
    async def work(body: dict) -> dict:
        if body.get("busy"):
            raise ServiceUnavailable("model loading", retry_after=9)
        return body

    with TestClient(app) as client:
        assert client.get("/ready").status_code == 200  # no lifespan: ready at once
        readiness.set("loading", "weights")
        loading = client.get("/ready")
        assert loading.status_code == 503 and loading.json() == {
            "status": "loading",
            "detail": "weights",
        }
        answer = client.post("/work", json={"a": 1}, headers={"X-Request-ID": "r-1"})
        assert answer.json() == {"a": 1} and answer.headers["X-Request-ID"] == "r-1"
        assert len(client.post("/work", json={}).headers["X-Request-ID"]) == 32
        busy = client.post("/work", json={"busy": True})
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "9"
        too_big = client.post("/work", json={"x": "y" * 100})
        assert too_big.status_code == 413 and too_big.headers["X-Request-ID"]
        metrics = client.get("/metrics").text
        # Refused before routing, so counted without a route.
        assert 'route="unmatched",service="demo",status="413"' in metrics
        assert 'route="/work",service="demo",status="503"' in metrics
