"""End to end: build the images, apply the reference stack, call every gateway route.

The stack is manifests/ai-semble-test.yaml under a name and host port of this
test's own. Its model volume gets the demo LLM (random weights, real
from_pretrained loading) and its data volume a CSV; then every route of the
gateway is called through the published port, including the OpenAI-compatible
ones with the official client and a workflow across services, with the API key
the stack's gateway takes from a podman secret (and refused without it). The
gateway's container is restarted and the finished jobs must still be there.
"""

from __future__ import annotations

import base64
import io
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from podman_helpers import Env, free_port

from aisemble.podman.images import build_images

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "manifests" / "ai-semble-test.yaml"


def poll(check, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except httpx.HTTPError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


class NotReady(str):
    def __bool__(self) -> bool:
        return False


def ready(base: str) -> bool | NotReady:
    """True when the gateway is ready, else a falsy answer saying why (for the failure)."""
    response = httpx.get(f"{base}/ready", timeout=5)
    return response.status_code == 200 or NotReady(f"{response.status_code} {response.text}")


def podman(*args: str, stdin: bytes | None = None) -> str:
    result = subprocess.run(["podman", *args], input=stdin, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


@pytest.fixture(scope="module")
def images() -> None:
    """All the stack's images, built (or found up to date) the way users build them."""
    build_images()


@pytest.fixture
def stack(images: None, env: Env, stack_name: str) -> Iterator[dict[str, Any]]:
    doc = yaml.safe_load(MANIFEST.read_text())
    doc["metadata"]["name"] = stack_name
    port = free_port()
    doc["spec"]["expose"][0]["hostPort"] = port
    # The gateway's keys, as the demo makes them, in a secret of this test's own (a
    # person's `ai-semble-gateway` on this host stays untouched).
    secret, key = f"{stack_name}-gateway", "sk-" + secrets.token_urlsafe(32)
    [gateway] = [s for s in doc["spec"]["services"] if s["name"] == "gateway"]
    [keys] = [e for e in gateway["env"] if e["name"] == "GATEWAY_API_KEYS"]
    keys["valueFrom"]["secretKeyRef"]["name"] = secret
    created = env.cli("secret", "create", secret, "--from-literal", f"api-key=e2e:{key}")
    assert created.code == 0, created.text
    path = env.write("stack.yaml", doc)
    result = env.cli("apply", "-f", path, "--timeout", "5m")
    assert result.code == 0, result.text

    volume = f"aisemble_default_{stack_name}_models"
    # Written aside, then moved in: the LLM service waits for config.json to appear.
    # As the image's own (non-root) user, the one the service reads as.
    podman(
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        f"{volume}:/models",
        "localhost/aisemble/llm:latest",
        "sh",
        "-c",
        "python -m aisemble.services.llm.tinymodel /models/.llm-new && mv /models/.llm-new /models/llm",
    )
    csv = (
        b"region,product,units,price\nnorth,a,3,2.5\nsouth,b,5,1.0\nnorth,b,2,1.0\nsouth,a,1,2.5\n"
    )
    podman(
        "run",
        "--rm",
        "-i",
        "--network",
        "none",
        "-v",
        f"aisemble_default_{stack_name}_data:/data",
        "localhost/aisemble/data-processor:latest",
        "sh",
        "-c",
        "cat > /data/sales.csv",
        stdin=csv,
    )
    base = f"http://127.0.0.1:{port}"
    poll(lambda: ready(base), 300, "gateway ready")
    try:
        yield {"base": base, "name": stack_name, "port": port, "key": key}
    finally:
        assert env.cli("delete", stack_name, "--purge-volumes").code == 0
        assert env.cli("secret", "delete", secret).code == 0


def _png() -> str:
    from PIL import Image

    image = Image.new("RGB", (40, 20), (200, 30, 30))
    for x in range(20, 40):
        for y in range(20):
            image.putpixel((x, y), (30, 30, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_every_gateway_route_on_the_real_stack(stack: dict[str, Any], env: Env) -> None:
    base = stack["base"]
    bearer = {"Authorization": f"Bearer {stack['key']}"}
    client = httpx.Client(base_url=base, timeout=120, headers=bearer)

    # The probes answer anyone; everything else only a caller with a key.
    anyone = httpx.Client(base_url=base, timeout=30)
    assert anyone.get("/health").json()["status"] == "ok"
    assert anyone.get("/ready").json()["status"] == "ready"
    refused = anyone.post("/ai/llm/completion", json={"prompt": "hello", "max_tokens": 2})
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["code"] == "invalid_api_key"
    wrong = {"Authorization": "Bearer sk-not-the-key"}
    assert anyone.get("/v1/models", headers=wrong).status_code == 401
    assert anyone.get("/openapi.json").status_code == 401
    assert anyone.get("/v1/models", headers={"x-api-key": stack["key"]}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="sk-not-the-key").models.list()

    # The seed's AI API, synchronously.
    completion = client.post(
        "/ai/llm/completion", json={"prompt": "hello", "max_tokens": 8, "seed": 1}
    )
    assert completion.status_code == 200, completion.text
    assert completion.json()["usage"]["completion_tokens"] <= 8
    vision = client.post("/ai/vision/analyze", json={"image": _png(), "colours": 2})
    assert vision.status_code == 200, vision.text
    assert (vision.json()["width"], vision.json()["height"]) == (40, 20)
    assert {c["hex"] for c in vision.json()["dominant_colours"]} == {"#c81e1e", "#1e1ec8"}
    nlp = client.post(
        "/ai/nlp/analyze", json={"text": "What a wonderful day.", "tasks": ["sentiment", "stats"]}
    )
    assert nlp.status_code == 200, nlp.text
    assert nlp.json()["results"][0]["stats"]["words"] == 4
    operations = [
        {"op": "read", "path": "sales.csv"},
        {"op": "derive", "column": "revenue", "expr": "units * price"},
        {
            "op": "group",
            "by": ["region"],
            "aggregations": [{"column": "revenue", "func": "sum", "as": "total"}],
        },
        {"op": "sort", "by": ["region"]},
        {"op": "write", "path": "out/by_region.csv"},
    ]
    data = client.post("/data/process", json={"operations": operations})
    assert data.status_code == 200, data.text
    assert data.json()["rows"] == [
        {"region": "north", "total": 9.5},
        {"region": "south", "total": 7.5},
    ]

    # Errors clients can act on.
    assert client.post("/ai/llm/completion", json={"max_tokens": 3}).status_code == 422
    assert client.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404

    # Asynchronous jobs, listed, fetched, cancelled.
    job = client.post("/data/process", json={"operations": operations[:2], "async": True})
    assert job.status_code == 202
    job_id = job.json()["id"]
    done = poll(
        lambda: (j := client.get(f"/jobs/{job_id}").json())["state"] == "succeeded" and j,
        60,
        "data job",
    )
    assert done["result"]["row_count"] == 4
    slow = client.post(
        "/ai/llm/completion", json={"prompt": "a long story", "max_tokens": 512, "async": True}
    ).json()
    cancelled = client.delete(f"/jobs/{slow['id']}")
    assert cancelled.status_code in (200, 409)  # it may have finished already on a fast host
    assert job_id in {j["id"] for j in client.get("/jobs").json()["jobs"]}

    # A workflow across services: LLM text -> NLP statistics -> data processor.
    flow = {
        "steps": [
            {
                "name": "draft",
                "call": "llm.completion",
                "input": {"prompt": "sales report", "max_tokens": 5, "seed": 3},
            },
            {
                "name": "facts",
                "call": "nlp.analyze",
                "input": {"text": "${steps.draft.output.text} and more", "tasks": ["stats"]},
            },
            {"name": "report", "call": "data.process", "input": {"operations": operations[:3]}},
        ]
    }
    workflow = client.post("/workflows", json=flow)
    assert workflow.status_code == 200, workflow.text
    assert set(workflow.json()["steps"]) == {"draft", "facts", "report"}
    assert workflow.json()["result"]["row_count"] == 2

    # OpenAI-compatible routes with the official client.
    ai = openai.OpenAI(base_url=f"{base}/v1", api_key=stack["key"])
    models = {m.id for m in ai.models.list()}
    assert {"llm", "all-MiniLM-L6-v2"} <= models
    text = ai.completions.create(model="llm", prompt="hi", max_tokens=4, seed=7).choices[0].text
    assert isinstance(text, str)
    stream = ai.chat.completions.create(
        model="llm", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True, seed=7
    )
    assert sum(1 for _ in stream) >= 1
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "llm",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
        },
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    vectors = ai.embeddings.create(model="all-MiniLM-L6-v2", input=["a cat", "a dog"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 384

    metrics = client.get("/metrics").text
    assert "gateway_backend_request_duration_seconds" in metrics

    # The gateway restarts; the finished jobs are still there.
    [gateway] = [
        c
        for c in env.containers(stack["name"])
        if c["Labels"].get("aisemble.io/service") == "gateway"
    ]
    podman("restart", "--time", "10", gateway["Id"])
    poll(lambda: ready(base), 120, "gateway back")
    after = httpx.get(f"{base}/jobs/{job_id}", timeout=10, headers=bearer).json()
    assert after["state"] == "succeeded" and after["result"] == done["result"]
