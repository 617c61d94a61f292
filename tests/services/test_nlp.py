"""The NLP service in-process with the real all-MiniLM-L6-v2, loaded once for the session."""

from __future__ import annotations

import base64
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from vision_nlp_fixtures import wait_until_settled

from aisemble.services.nlp.app import create
from aisemble.services.nlp.engine import NlpEngine, default_model_path
from aisemble.services.nlp.schemas import VISIBLE_PATTERN
from aisemble.services.nlp.settings import NlpSettings

MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def engine() -> NlpEngine:
    engine = NlpEngine(NlpSettings())
    engine.load()
    return engine


@pytest.fixture
def client(engine: NlpEngine) -> Iterator[TestClient]:
    with TestClient(create(NlpSettings(), engine)) as client:
        assert wait_until_settled(client)["status"] == "ready"
        yield client


def embed(client: TestClient, texts: list[str], **options: object) -> list[list[float]]:
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": texts, **options})
    assert response.status_code == 200, response.text
    return [item["embedding"] for item in response.json()["data"]]


def analyze(client: TestClient, **body: object) -> list[dict]:
    response = client.post("/analyze", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"]


# --- embeddings -------------------------------------------------------------


def test_embeddings_have_384_dimensions_and_unit_length(client: TestClient) -> None:
    vectors = embed(client, ["A first sentence.", "And a second, somewhat longer one."])

    assert [len(vector) for vector in vectors] == [384, 384]
    for vector in vectors:
        assert math.sqrt(sum(x * x for x in vector)) == pytest.approx(1, abs=1e-5)


def test_the_model_is_the_one_the_package_ships(engine: NlpEngine) -> None:
    assert engine.model_path == default_model_path()
    assert Path(engine.model_path, "model.safetensors").is_file()
    assert engine.max_tokens == 256  # from its sentence_bert_config.json


def test_paraphrases_score_higher_than_unrelated_sentences(client: TestClient) -> None:
    response = client.post(
        "/similarity",
        json={
            "a": "The cat is sleeping on the sofa.",
            "b": [
                "A cat naps on the couch.",
                "Stock markets fell sharply on Monday.",
                "How do I reset my password?",
            ],
        },
    )

    assert response.status_code == 200
    [row] = response.json()["matrix"]
    assert row[0] > 0.6
    assert row[0] > row[1] + 0.4
    assert row[0] > row[2] + 0.4


def test_similarity_compares_every_a_with_every_b(client: TestClient) -> None:
    body = client.post("/similarity", json={"a": ["x y", "red car"], "b": ["red car", "z", "w"]})

    matrix = body.json()["matrix"]
    assert [len(row) for row in matrix] == [3, 3]
    assert matrix[1][0] == pytest.approx(1, abs=1e-5)


def test_batches_give_each_text_its_own_vector_in_order(engine: NlpEngine) -> None:
    # More texts than one batch holds, of mixed lengths: the engine sorts them by length.
    texts = [f"Sentence {i}" + " and more" * (i % 7) for i in range(engine.settings.batch_size + 3)]
    picked = [0, 1, 2, -3, -2, -1]

    together = np.array(engine.embed(texts).vectors)
    alone = np.array([engine.embed([texts[i]]).vectors[0] for i in picked])

    np.testing.assert_allclose(together[picked], alone, atol=1e-5)


# --- OpenAI compatibility ---------------------------------------------------


def test_the_openai_client_lists_the_model_and_gets_embeddings(client: TestClient) -> None:
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)

    models = [model.id for model in api.models.list()]
    # The client asks for base64 unless told otherwise, and decodes it itself.
    result = api.embeddings.create(model=MODEL, input=["hello world", "good morning"])
    as_floats = api.embeddings.create(model=MODEL, input="hello world", encoding_format="float")

    assert models == [MODEL]
    assert result.model == MODEL
    assert [item.index for item in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 384
    assert result.data[0].embedding == as_floats.data[0].embedding
    assert result.usage.prompt_tokens == result.usage.total_tokens == 2 * 4  # [CLS] w w [SEP]


def test_base64_decodes_to_the_same_floats(client: TestClient) -> None:
    [floats] = embed(client, ["Decode me exactly."])
    [encoded] = embed(client, ["Decode me exactly."], encoding_format="base64")

    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")

    assert decoded.tolist() == floats


def test_an_unknown_model_gets_openai_404(client: TestClient) -> None:
    response = client.post("/v1/embeddings", json={"model": "text-embedding-3-large", "input": "x"})
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)

    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_found")
    assert "text-embedding-3-large" in error["message"]
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4o")
    assert api.models.retrieve(MODEL).id == MODEL


@pytest.mark.parametrize(
    "payload",
    [
        {"input": ""},
        {"input": []},
        {"input": ["fine", "  "]},
        {"input": [[1, 2, 3]]},
        {"input": "x", "dimensions": 1536},
        {"input": "x", "encoding_format": "int8"},
    ],
    ids=["empty-string", "empty-list", "blank-item", "token-arrays", "dimensions", "format"],
)
def test_bad_embedding_requests_get_openai_422(client: TestClient, payload: dict) -> None:
    response = client.post("/v1/embeddings", json={"model": MODEL, **payload})

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]


# --- /analyze ---------------------------------------------------------------


def test_sentiment_reads_clear_cases_the_right_way(client: TestClient) -> None:
    results = analyze(
        client,
        texts=[
            "I absolutely love this, it is wonderful and works perfectly!",
            "This is the worst purchase I have ever made, a total waste of money.",
        ],
        tasks=["sentiment"],
    )

    positive, negative = (result["sentiment"] for result in results)
    assert positive["label"] == "positive" and positive["score"] > 0.5
    assert negative["label"] == "negative" and negative["score"] > 0.5
    assert positive["method"] == "anchors"


def test_classify_ranks_the_obvious_label_first(client: TestClient) -> None:
    labels = ["sports", "cooking", "finance", "technology"]
    results = analyze(
        client,
        texts=[
            "The striker scored twice in the final minutes of the match.",
            "Simmer the onions in butter until golden, then add the garlic.",
            "The central bank raised interest rates to fight inflation.",
        ],
        labels=labels,
        tasks=["classify"],
    )

    assert [result["classification"][0]["label"] for result in results] == labels[:3]
    for result in results:
        assert {entry["label"] for entry in result["classification"]} == set(labels)
        assert result["sentiment"] is None


def test_similarity_to_a_reference(client: TestClient) -> None:
    results = analyze(
        client,
        texts=["A man is playing a guitar.", "The invoice is overdue."],
        reference="Someone plays an instrument.",
        tasks=["similarity"],
    )

    assert results[0]["similarity"] > results[1]["similarity"] + 0.3


def test_the_embedding_task_matches_the_embeddings_api(client: TestClient) -> None:
    [result] = analyze(client, text="Same text, same vector.", tasks=["embedding"])
    [vector] = embed(client, ["Same text, same vector."])

    assert result["embedding"] == pytest.approx(vector, abs=1e-6)


def test_default_tasks_follow_what_was_sent(client: TestClient) -> None:
    response = client.post("/analyze", json={"text": "Nice!", "labels": ["a", "b"]})

    assert response.json()["tasks"] == ["sentiment", "stats", "classify"]
    [result] = response.json()["results"]
    assert result["embedding"] is None and result["similarity"] is None


def test_stats_count_characters_words_sentences_and_tokens(client: TestClient) -> None:
    [result] = analyze(client, text="Hello world. This is a test! Is it working?", tasks=["stats"])

    stats = result["stats"]
    assert (stats["characters"], stats["words"], stats["sentences"]) == (43, 9, 3)
    # hello world . this is a test ! is it working ? (the uncased WordPiece vocabulary)
    assert stats["tokens"] == 12


@pytest.mark.parametrize(
    ("text", "code", "script"),
    [
        (
            "The weather is nice today and we are going to the park with the children.",
            "en",
            "Latin",
        ),
        ("私は東京に住んでいます。毎日電車で会社に行きます。", "ja", "Japanese"),
        (
            "Der Hund läuft schnell über die Straße und die Katze schläft auf dem Sofa.",
            "de",
            "Latin",
        ),
    ],
    ids=["english", "japanese", "german"],
)
def test_language_hints(client: TestClient, text: str, code: str, script: str) -> None:
    [result] = analyze(client, text=text, tasks=["stats"])

    language = result["stats"]["language"]
    assert (language["code"], language["script"]) == (code, script)
    assert language["confidence"] >= 0.6


def test_japanese_words_are_counted_without_spaces(client: TestClient) -> None:
    [result] = analyze(client, text="私は学生です。", tasks=["stats"])

    # 私 / は / 学生 / です: a word per change of script
    assert (result["stats"]["words"], result["stats"]["sentences"]) == (4, 1)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text": ""}, "text is empty"),
        ({"texts": []}, "`texts` is empty"),
        ({"texts": ["ok", " "]}, "texts[1] is empty"),
        ({}, "exactly one of `text` and `texts`"),
        ({"text": "a", "texts": ["b"]}, "exactly one of `text` and `texts`"),
        ({"text": "a", "tasks": ["classify"]}, "needs `labels`"),
        ({"text": "a", "tasks": ["similarity"]}, "needs a `reference`"),
        ({"text": "a", "tasks": ["translate"]}, "Input should be"),
    ],
)
def test_bad_analyze_requests_get_422(client: TestClient, body: dict, message: str) -> None:
    response = client.post("/analyze", json=body)

    assert response.status_code == 422
    assert message in " ".join(error["msg"] for error in response.json()["detail"])


def test_empty_similarity_input_gets_422(client: TestClient) -> None:
    assert client.post("/similarity", json={"a": [], "b": "x"}).status_code == 422


@pytest.mark.parametrize(
    ("route", "body"),
    [
        # pydantic alone took "384" for 384 (and false for 0): the schema says integer.
        ("/v1/embeddings", {"model": MODEL, "input": "x", "dimensions": "384"}),
        ("/analyze", {"text": 5}),
        ("/similarity", {"a": "x", "b": [True]}),
    ],
)
def test_values_of_another_json_type_get_422(client: TestClient, route: str, body: dict) -> None:
    assert client.post(route, json=body).status_code == 422


def test_whole_floats_are_integers_as_in_json_schema(client: TestClient) -> None:
    body = {"model": MODEL, "input": "x", "dimensions": 384.0}
    assert client.post("/v1/embeddings", json=body).status_code == 200


def test_texts_of_unicode_spaces_only_are_empty(client: TestClient) -> None:
    response = client.post("/analyze", json={"texts": ["ok", "\u2003\x1c"]})
    assert "texts[1] is empty" in response.json()["detail"][0]["msg"]


def test_a_body_that_is_not_utf8_is_a_400_in_each_routes_shape(client: TestClient) -> None:
    headers = {"content-type": "application/json"}
    openai_400 = client.post("/v1/embeddings", content=b"\xff{", headers=headers)
    native_400 = client.post("/analyze", content=b"\xff{", headers=headers)
    assert openai_400.status_code == native_400.status_code == 400
    assert openai_400.json()["error"]["type"] == "invalid_request_error"
    assert native_400.json()["detail"]


def test_the_schema_says_what_is_accepted(engine: NlpEngine) -> None:
    settings = NlpSettings(max_texts=7, max_chars=30, max_labels=3)
    document = create(settings, engine).openapi()
    schemas = document["components"]["schemas"]
    analyze = schemas["AnalyzeRequest"]
    text = analyze["properties"]["text"]["anyOf"][0]
    texts = analyze["properties"]["texts"]["anyOf"][0]
    labels = analyze["properties"]["labels"]["anyOf"][0]
    assert (text["minLength"], text["maxLength"], text["pattern"]) == (1, 30, VISIBLE_PATTERN)
    assert (texts["minItems"], texts["maxItems"], labels["maxItems"]) == (1, 7, 3)
    # The rules the request model checks across fields.
    assert [set(branch["required"]) for branch in analyze["oneOf"]] == [{"text"}, {"texts"}]
    needs = {
        rule["if"]["properties"]["tasks"]["contains"]["const"]: rule["then"]["required"]
        for rule in analyze["allOf"]
    }
    assert needs == {"classify": ["labels"], "similarity": ["reference"]}
    # Token arrays are not offered, and every status the routes answer is documented.
    embeddings = schemas["EmbeddingsRequest"]["properties"]["input"]["anyOf"]
    assert [branch["type"] for branch in embeddings] == ["string", "array"]
    assert embeddings[1]["items"]["type"] == "string"
    paths = document["paths"]
    assert {"400", "404", "422", "503"} <= set(paths["/v1/embeddings"]["post"]["responses"])
    assert "404" in paths["/v1/models/{model}"]["get"]["responses"]
    for route in ("/analyze", "/similarity"):
        assert {"400", "422", "503"} <= set(paths[route]["post"]["responses"])


def test_limits_on_count_and_length_are_clear(engine: NlpEngine) -> None:
    settings = NlpSettings(max_texts=3, max_chars=50, max_labels=2)
    with TestClient(create(settings, engine)) as client:
        wait_until_settled(client)
        many = client.post("/analyze", json={"texts": ["a", "b", "c", "d"]})
        long = client.post("/v1/embeddings", json={"model": MODEL, "input": ["x" * 51]})
        labels = client.post("/analyze", json={"text": "a", "labels": ["x", "y", "z"]})
        both = client.post("/similarity", json={"a": ["a", "b", "c"], "b": ["d", "e", "f"]})
        side = client.post("/similarity", json={"a": ["a", "b", "c", "d"], "b": "e"})

    assert many.status_code == 422
    assert "at most 3 per field" in many.json()["detail"][0]["msg"]
    assert long.status_code == 422
    assert "51 characters, more than the limit of 50" in long.json()["error"]["message"]
    assert "at most 2 labels" in labels.json()["detail"][0]["msg"]
    # Each field on its own, as the published schema can say (not all fields together).
    assert both.status_code == 200
    assert side.status_code == 422 and "at most 3 per field" in side.json()["detail"][0]["msg"]


def test_metrics_count_embedded_texts(client: TestClient) -> None:
    embed(client, ["one", "two", "three"])
    analyze(client, text="four", labels=["five", "six"], tasks=["classify"])

    metrics = client.get("/metrics").text
    assert "nlp_texts_embedded_total 6.0" in metrics
    assert 'nlp_inference_duration_seconds_count{operation="embed"} 2.0' in metrics


# --- loading ----------------------------------------------------------------


class GatedEngine(NlpEngine):
    """Fails to load, but only once the test opens the gate: both states can be seen."""

    def __init__(self) -> None:
        super().__init__(NlpSettings(load_retry_after=9))
        self.gate = threading.Event()

    def load(self) -> None:
        assert self.gate.wait(30), "the test never opened the gate"
        raise RuntimeError("weights are corrupt")


def test_requests_wait_for_the_model_and_hear_why_it_failed() -> None:
    engine = GatedEngine()
    with TestClient(create(engine.settings, engine)) as client:
        ready = client.get("/ready")
        loading = client.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
        engine.gate.set()
        settled = wait_until_settled(client)
        failed = client.post("/analyze", json={"text": "x"})
        models = client.get("/v1/models")

    assert (ready.status_code, ready.headers["retry-after"]) == (503, "9")
    assert (loading.status_code, loading.headers["retry-after"]) == (503, "9")
    assert "still loading" in loading.json()["error"]["message"]
    assert settled == {
        "status": "failed",
        "detail": "the embedding model failed to load: weights are corrupt",
    }
    assert failed.status_code == 503
    assert "weights are corrupt" in failed.json()["detail"]
    assert models.status_code == 200  # naming the model needs no model


def test_a_missing_model_directory_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NLP_MODEL_PATH", str(tmp_path / "nowhere"))
    with TestClient(create()) as client:
        settled = wait_until_settled(client)

    assert settled["status"] == "failed"
    assert "nowhere" in settled["detail"] and "does not exist" in settled["detail"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, engine: NlpEngine) -> Path:
    """A tiny random BERT encoder and a tiny sentiment classifier, with MiniLM's tokenizer."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        BertModel,
    )

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(engine.model_path, local_files_only=True)
    shape = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    for name, model in (
        ("encoder", BertModel(BertConfig(**shape))),
        (
            "sentiment",
            BertForSequenceClassification(
                BertConfig(**shape, id2label={0: "NEGATIVE", 1: "POSITIVE"})
            ),
        ),
        ("unlabelled", BertForSequenceClassification(BertConfig(**shape, num_labels=2))),
    ):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def test_a_configured_sentiment_model_is_used(tiny_models: Path) -> None:
    settings = NlpSettings(
        model_path=str(tiny_models / "encoder"),
        sentiment_model_path=str(tiny_models / "sentiment"),
    )
    with TestClient(create(settings)) as client:
        assert wait_until_settled(client)["status"] == "ready"
        results = analyze(client, texts=["good", "bad"], tasks=["sentiment", "embedding"])

    for result in results:
        assert result["sentiment"]["method"] == "model"
        assert result["sentiment"]["label"] in ("positive", "negative")
        assert 0.5 <= result["sentiment"]["score"] <= 1
        assert len(result["embedding"]) == 16


def test_a_sentiment_model_with_unreadable_labels_fails_clearly(tiny_models: Path) -> None:
    settings = NlpSettings(
        model_path=str(tiny_models / "encoder"),
        sentiment_model_path=str(tiny_models / "unlabelled"),
    )
    with TestClient(create(settings)) as client:
        settled = wait_until_settled(client)

    assert settled["status"] == "failed"
    assert "'LABEL_0' is not positive, negative or neutral" in settled["detail"]
