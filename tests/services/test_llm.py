"""The LLM service, through its HTTP API, on a tiny random-weight model loaded the real way.

The model is written by `make_tiny_model` and loaded with `from_pretrained`
once per session; each test gets its own app (and scheduler) over it. Where a
test needs the engine to pause or fail, it wraps the real engine, never torch.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from aisemble.services.llm import engine as engines
from aisemble.services.llm.app import create
from aisemble.services.llm.batching import GenerationRequest, Scheduler, TextStream
from aisemble.services.llm.engine import Engine, Sampling, load_engine, plain_transcript
from aisemble.services.llm.settings import LLMSettings
from aisemble.services.llm.tinymodel import make_tiny_model

PROMPT = "The quick brown fox"


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llm") / "tiny")


@pytest.fixture(scope="session")
def engine(model_path: Path) -> Engine:
    return load_engine(model_path, "cpu")


def make_client(model_path: Path, engine: Any = None, **overrides: Any) -> TestClient:
    return TestClient(create(LLMSettings(model_path=model_path, **overrides), engine=engine))


@pytest.fixture
def client(model_path: Path, engine: Engine) -> Iterator[TestClient]:
    with make_client(model_path, engine) as c:
        yield c


def poll(check: Callable[[], Any], timeout: float = 15, what: str = "condition") -> Any:
    """Wait until `check()` is truthy, looking every few ms, failing after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.01)


def complete(client: TestClient, prompt: str = PROMPT, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/completions", json={"prompt": prompt, **body})
    assert response.status_code == 200, response.text
    return response.json()


def sse(response: Any) -> list[dict[str, Any]]:
    """The JSON chunks of an event stream, checking it ends with `data: [DONE]`."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == "", "the stream must end with a blank line"
    events = events[:-1]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


class GatedEngine:
    """The real engine, but starting a batch waits until the test opens the gate."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def start(self, *args: Any) -> Any:
        self.entered.set()
        if not self.gate.wait(15):
            raise RuntimeError("the test never opened the gate")
        return self._engine.start(*args)


class BrokenEngine:
    """The real engine, failing after the first token, as an out-of-memory would."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def advance(self, *args: Any) -> None:
        raise RuntimeError("CUDA out of memory (simulated)")


# -- loading and readiness ---------------------------------------------------


def test_ready_is_503_while_loading_then_200(
    model_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, gate = threading.Event(), threading.Event()

    def slow_load(path: Path, device: str | None = None) -> Engine:
        entered.set()
        assert gate.wait(15), "the test never let loading finish"
        return load_engine(path, "cpu")

    monkeypatch.setattr(engines, "load_engine", slow_load)
    with make_client(model_path) as client:
        assert entered.wait(5)
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert ready.headers["Retry-After"].isdigit()
        assert ready.json()["status"] == "loading"
        assert client.get("/health").status_code == 200
        busy = client.post("/v1/completions", json={"prompt": "hi"})
        assert busy.status_code == 503 and "Retry-After" in busy.headers
        assert "loading" in busy.json()["detail"]
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"

        gate.set()
        poll(lambda: client.get("/ready").status_code == 200, what="ready")
        assert complete(client, max_tokens=2)["usage"]["completion_tokens"] <= 2


def test_load_failure_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with make_client(path) as client:
        body = poll(
            lambda: (
                (r := client.get("/ready")).status_code == 503
                and r.json()["status"] == "failed"
                and r.json()
            ),
            what="failed readiness",
        )
        assert "cannot load" in body["detail"] and str(path) in body["detail"]
        refused = client.post("/v1/completions", json={"prompt": "hi"})
        assert refused.status_code == 503
        assert "failed to load" in refused.json()["detail"]
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("layout", ["missing", "empty"])
def test_a_model_that_is_not_there_yet_is_waited_for(tmp_path: Path, layout: str) -> None:
    path = tmp_path / "model"
    if layout == "empty":
        path.mkdir()
    with make_client(path) as client:
        body = poll(
            lambda: (
                (r := client.get("/ready")).status_code == 503
                and r.json()["status"] == "waiting"
                and r.json()
            ),
            what="waiting readiness",
        )
        assert f"no model at {path} yet" in body["detail"]
        refused = client.post("/v1/completions", json={"prompt": "hi"})
        assert refused.status_code == 503 and "no model at" in refused.json()["detail"]
        make_tiny_model(path)  # the stack's volume gets its model after the service started
        poll(lambda: client.get("/ready").status_code == 200, what="ready")
        assert complete(client, max_tokens=2)["usage"]["completion_tokens"] <= 2


# -- completions ---------------------------------------------------------------


def test_completion_counts_tokens_and_stops_at_max_tokens(
    client: TestClient, engine: Engine
) -> None:
    body = complete(client, max_tokens=5, temperature=0)
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["text"]
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(engine.encode(PROMPT))
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5


def test_greedy_matches_transformers_generate(client: TestClient, engine: Engine) -> None:
    import torch

    ids = engine.encode(PROMPT)
    with torch.inference_mode():
        out = engine.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=engine.pad_token_id,
        )
    expected = engine.decode(out[0, len(ids) :].tolist())
    assert complete(client, max_tokens=12, temperature=0)["choices"][0]["text"] == expected
    assert complete(client, max_tokens=12, temperature=0, seed=5)["choices"][0]["text"] == expected


def test_seed_makes_sampling_repeatable(client: TestClient) -> None:
    def text(seed: int) -> str:
        return complete(client, max_tokens=10, temperature=1.0, seed=seed)["choices"][0]["text"]

    assert text(7) == text(7)
    assert len({text(seed) for seed in range(4)}) > 1
    nucleus = complete(client, max_tokens=10, temperature=0.8, top_p=0.5, seed=3)
    again = complete(client, max_tokens=10, temperature=0.8, top_p=0.5, seed=3)
    assert again["choices"] == nucleus["choices"]


def test_stream_gives_the_same_text_as_one_answer(client: TestClient) -> None:
    params = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.9, "seed": 11}
    whole = complete(client, **params)
    chunks = sse(client.post("/v1/completions", json={**params, "stream": True}))
    assert len(chunks) >= 2
    assert all(c["object"] == "text_completion" for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


def test_stop_string_ends_the_text_before_it(client: TestClient) -> None:
    full = complete(client, max_tokens=16, temperature=0)["choices"][0]["text"]
    stop = full[4:6]
    cut = full.find(stop)
    assert cut > 0, f"pick another stop for {full!r}"
    body = complete(client, max_tokens=16, temperature=0, stop=["never-appears", stop])
    assert body["choices"][0] == {
        "index": 0,
        "text": full[:cut],
        "finish_reason": "stop",
        "logprobs": None,
    }
    assert body["usage"]["completion_tokens"] < 16
    chunks = sse(
        client.post(
            "/v1/completions",
            json={
                "prompt": PROMPT,
                "max_tokens": 16,
                "temperature": 0,
                "stop": stop,
                "stream": True,
            },
        )
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:cut]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_several_prompts_give_one_choice_each(client: TestClient) -> None:
    single = [
        complete(client, p, max_tokens=4, temperature=0)["choices"][0]["text"] for p in ("a", "b c")
    ]
    body = complete(client, ["a", "b c"], max_tokens=4, temperature=0)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == single
    assert body["usage"]["completion_tokens"] == 8


# -- chat ----------------------------------------------------------------------


def test_chat_completion_uses_the_chat_template(client: TestClient, engine: Engine) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
    ]
    response = client.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    templated = "system: Be brief.\nuser: Hello\nassistant:"
    assert body["usage"]["prompt_tokens"] == len(engine.encode(templated))
    assert body["usage"]["completion_tokens"] == 6

    chunks = sse(
        client.post(
            "/v1/chat/completions",
            json={"messages": messages, "max_tokens": 6, "temperature": 0, "stream": True},
        )
    )
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "length",
        "logprobs": None,
    }
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == choice["message"]["content"]


def test_chat_without_a_template_uses_a_plain_transcript(model_path: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(model_path, bare)
    (bare / "chat_template.jinja").unlink()
    engine = load_engine(bare, "cpu")
    assert not engine.tokenizer.chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert plain_transcript(messages) == "user: hi\nassistant:"
    assert engine.encode_chat(messages) == engine.encode("user: hi\nassistant:")


# -- batching ------------------------------------------------------------------


def test_concurrent_requests_are_generated_in_one_batch(
    client: TestClient, model_path: Path, engine: Engine
) -> None:
    prompts = [f"request {i}: " + "word " * i for i in range(6)]
    alone = [complete(client, p, max_tokens=6, temperature=0) for p in prompts]
    assert client.app.state.scheduler.stats.largest_batch == 1
    # A wide window, so threads that start a little apart still meet.
    with make_client(model_path, engine, batch_window_ms=300) as client:
        scheduler = client.app.state.scheduler
        barrier = threading.Barrier(len(prompts))

        def together(prompt: str) -> dict[str, Any]:
            barrier.wait(5)
            return complete(client, prompt, max_tokens=6, temperature=0)

        with ThreadPoolExecutor(len(prompts)) as pool:
            batched = list(pool.map(together, prompts))
        assert scheduler.stats.largest_batch > 1
        # Padding and batch-mates change nothing: each text is the one it gets alone.
        assert [b["choices"] for b in batched] == [a["choices"] for a in alone]
        metrics = client.get("/metrics").text
        count = _sample(metrics, "llm_batch_size_count")
        assert count - _sample(metrics, 'llm_batch_size_bucket{le="1.0"}') > 0
        assert _sample(metrics, "llm_generated_tokens_total") == 36
        assert "llm_queue_depth 0.0" in metrics and "llm_tokens_per_second" in metrics


def test_a_new_request_joins_a_running_batch(client: TestClient) -> None:
    long_alone = complete(client, "hello", max_tokens=300, temperature=0)
    short_alone = complete(client, max_tokens=3, temperature=0)
    scheduler = client.app.state.scheduler
    steps = scheduler.stats.steps
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(complete, client, "hello", max_tokens=300, temperature=0)
        poll(lambda: scheduler.stats.steps > steps + 2, what="the long request running")
        short = complete(client, max_tokens=3, temperature=0)
        assert not running.done(), "the short request waited for the long one"
        assert short["choices"] == short_alone["choices"]
        assert running.result(30)["choices"] == long_alone["choices"]
    assert scheduler.stats.largest_batch == 2


def test_full_queue_is_503_with_retry_after(model_path: Path, engine: Engine) -> None:
    gated = GatedEngine(engine)
    with (
        make_client(model_path, gated, max_batch_size=1, max_queue=1, batch_window_ms=0) as client,
        ThreadPoolExecutor(2) as pool,
    ):
        scheduler = client.app.state.scheduler
        first = pool.submit(complete, client, max_tokens=2)
        assert gated.entered.wait(5)
        # Generation runs off the event loop: the service answers meanwhile.
        assert client.get("/health").status_code == 200
        second = pool.submit(complete, client, max_tokens=2)
        poll(lambda: scheduler.queue_depth == 1, what="the second request queued")
        refused = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert "queue is full" in refused.json()["detail"]
        assert "llm_queue_rejections_total 1.0" in client.get("/metrics").text
        gated.gate.set()
        assert first.result(15)["choices"][0]["text"]
        assert second.result(15)["choices"][0]["text"]


def test_timeout_is_504_and_the_service_goes_on(model_path: Path, engine: Engine) -> None:
    gated = GatedEngine(engine)
    with make_client(model_path, gated, request_timeout_s=0.3) as client:
        response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "timeout"
        gated.gate.set()
        assert complete(client, max_tokens=2)["usage"]["completion_tokens"] <= 2


def test_engine_failure_is_500_then_the_service_goes_on(model_path: Path, engine: Engine) -> None:
    with make_client(model_path, BrokenEngine(engine)) as client:
        response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert response.status_code == 500
        assert "out of memory" in response.json()["error"]["message"]
        chunks = client.post(
            "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": True}
        ).text
        assert '"generation_failed"' in chunks and "[DONE]" not in chunks
        # A one-token answer never reaches the failing step.
        assert complete(client, max_tokens=1)["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.asyncio
async def test_a_cancelled_request_leaves_the_batch(engine: Engine) -> None:
    scheduler = Scheduler(engine, max_batch_size=4, batch_window_s=0.05)
    scheduler.start()
    try:
        prompt = engine.encode(PROMPT)
        keep = scheduler.submit([GenerationRequest(prompt, 20, Sampling(temperature=0))])
        drop = scheduler.submit([GenerationRequest(prompt, 200, Sampling(temperature=0))])
        async for _ in drop.updates():
            drop.cancel()
            break
        (result,) = await keep.results()
        assert result.completion_tokens == 20
        # The cancelled row left after its first token or so, not after 200.
        assert scheduler.stats.tokens < 40
    finally:
        await asyncio.to_thread(scheduler.close)


# -- errors --------------------------------------------------------------------


def test_unknown_model_is_404_in_openai_shape(client: TestClient) -> None:
    for route, extra in (
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ):
        response = client.post(route, json={"model": "gpt-9", **extra})
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "model_not_found"
        assert "gpt-9" in error["message"]
    assert complete(client, model="tiny", max_tokens=1)["model"] == "tiny"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "hi", "max_tokens": "lots"}, "max_tokens"),
        ({"prompt": "hi", "temperature": 5}, "temperature"),
        ({"prompt": "hi", "n": 2}, "n"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "hi", "echo": True}, "echo"),
        ({"prompt": "hi", "logprobs": 2}, "logprobs"),
        # Strict: a value only of the type the schema names, as schemathesis found 0 taken for false.
        ({"prompt": "hi", "echo": 0}, "echo"),
        ({"prompt": "hi", "stream_options": {"include_usage": 0}}, "stream_options"),
        ({"prompt": "hi", "temperature": "0.5"}, "temperature"),
        ({"prompt": "hi", "n": True}, "n"),
        # Values that failed inside generation (500) before they were bounded.
        ({"prompt": "hi", "seed": 2**64}, "seed"),
        ({"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
        ({"prompt": "hi", "top_k": -2}, "top_k"),
        ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "hi", "frequency_penalty": -3}, "frequency_penalty"),
    ],
)
def test_bad_body_is_422_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 422
    assert any(error["loc"][:2] == ["body", field] for error in response.json()["detail"])


def test_n_above_one_is_refused_for_chat_too(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 3}
    )
    assert response.status_code == 422
    assert "only n=1" in response.text


def test_limits_are_400_with_a_reason(client: TestClient, engine: Engine) -> None:
    too_many = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 513})
    assert too_many.status_code == 400
    assert too_many.json()["error"]["param"] == "max_tokens"
    long_prompt = "word " * engine.context_length
    too_long = client.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"


def test_whole_floats_are_integers_as_in_json_schema(client: TestClient) -> None:
    # Strict validation must not refuse what the schema's "integer" admits.
    body = complete(client, max_tokens=3.0, n=1.0, best_of=1.0, logprobs=0.0, seed=2.0)
    assert body["usage"]["completion_tokens"] <= 3


def test_max_tokens_is_bounded_under_either_name(client: TestClient) -> None:
    messages = [{"role": "user", "content": "x"}]
    for body in ({"max_tokens": 513, "max_completion_tokens": 2}, {"max_completion_tokens": 513}):
        response = client.post("/v1/chat/completions", json={"messages": messages, **body})
        assert response.status_code == 400, body
        assert response.json()["error"]["param"] in body


def test_a_body_that_is_not_utf8_is_an_openai_400(client: TestClient) -> None:
    response = client.post(
        "/v1/completions", content=b"\xff\xfe{", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("sampling", [{"temperature": 1e-300}, {"top_p": 5e-324}])
def test_tiny_temperature_and_top_p_sample_the_likeliest_token(
    client: TestClient, sampling: dict[str, float]
) -> None:
    # Both once made the probabilities NaN or all zero, and generation failed with a 500.
    greedy = complete(client, max_tokens=6, temperature=0)["choices"][0]["text"]
    body = complete(client, max_tokens=6, **{"temperature": 1.0, **sampling})
    assert body["choices"][0]["text"] == greedy


def test_top_k_one_is_greedy_and_penalties_are_accepted(client: TestClient) -> None:
    greedy = complete(client, max_tokens=8, temperature=0)["choices"][0]["text"]
    assert complete(client, max_tokens=8, top_k=1, seed=3)["choices"][0]["text"] == greedy
    wide = complete(client, max_tokens=8, top_k=-1, presence_penalty=1, frequency_penalty=-1)
    assert wide["choices"][0]["finish_reason"] in ("length", "stop")


def test_the_schema_says_what_is_accepted(model_path: Path) -> None:
    app = create(LLMSettings(model_path=model_path, max_new_tokens_limit=100, max_queue=7))
    document = app.openapi()
    schemas = document["components"]["schemas"]
    completion = schemas["CompletionRequest"]["properties"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    # This deployment's limits, so a client need not learn them from a 400.
    assert completion["max_tokens"]["maximum"] == 100
    assert chat["max_tokens"]["maximum"] == chat["max_completion_tokens"]["maximum"] == 100
    assert completion["prompt"]["maxItems"] == 7
    assert completion["prompt"]["anyOf"][1]["minItems"] == 1
    # What OpenAI has and this service does not do: only the values that ask for nothing.
    assert completion["n"]["enum"] == [1, None]
    assert completion["best_of"]["enum"] == [1, None]
    assert completion["echo"]["enum"] == [False, None]
    assert completion["suffix"]["enum"] == ["", None]
    assert chat["logprobs"]["enum"] == [False, 0, None]
    assert completion["seed"]["anyOf"][0] == {
        "type": "integer",
        "minimum": -(2**53 - 1),
        "maximum": 2**53 - 1,
    }
    # Streams are documented as the events they are.
    for path, chunk in (
        ("/v1/completions", "Completion"),
        ("/v1/chat/completions", "ChatCompletionChunk"),
    ):
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        event = content["text/event-stream"]["schema"]["properties"]["data"]
        assert event["else"]["contentSchema"]["anyOf"][0]["$ref"].endswith(f"/{chunk}")
    assert "ChatChunkChoice" in schemas and "ChatDelta" in schemas


# -- the official client -------------------------------------------------------


def test_the_openai_client_works(client: TestClient) -> None:
    api = openai.OpenAI(
        base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0
    )
    assert [m.id for m in api.models.list()] == ["tiny"]

    completion = api.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, seed=1
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    streamed = api.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text

    chat = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    stream = api.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5

    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="other", prompt="hi")


# -- text assembly -------------------------------------------------------------


def _reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """What a stop string leaves: the text up to the first stop seen while the text grows."""
    for end in range(1, len(text) + 1):
        seen = text[:end]
        hits = [seen.find(s) for s in stops if s and s in seen]
        if hits:
            return seen[: min(hits)], True
    return text, False


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab é🚀", max_size=20),
    stops=st.lists(st.text(alphabet="ab é🚀", max_size=3), max_size=3),
)
def test_text_stream_never_hands_out_a_stop_string(text: str, stops: list[str]) -> None:
    # Tokens are single UTF-8 bytes, so characters arrive in pieces, as with byte-level BPE.
    stream = TextStream(
        lambda ids: bytes(ids).decode("utf-8", errors="replace"), tuple(stops), context=[]
    )
    pieces, stopped = [], False
    for byte in text.encode():
        piece, stopped = stream.push(byte)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        piece, stopped = stream.flush()
        pieces.append(piece)
    assert ("".join(pieces), stopped) == _reference(text, stops)
    assert not any("\ufffd" in piece for piece in pieces)


def test_tiny_model_is_deterministic(tmp_path: Path, model_path: Path) -> None:
    started = time.monotonic()
    again = make_tiny_model(tmp_path / "again")
    assert time.monotonic() - started < 2
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (again / name).read_bytes() == (model_path / name).read_bytes()


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_the_demo_model_is_readable_by_every_user(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m")
    assert {f.name: f.stat().st_mode & 0o444 for f in path.iterdir()} == {
        f.name: 0o444 for f in path.iterdir()
    }
