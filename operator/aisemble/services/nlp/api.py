"""The NLP routes: `/analyze` and `/similarity`, and OpenAI's `/v1/models` and `/v1/embeddings`.

Routes check what the settings limit (how many texts, how long), then hand
the model work to a worker thread, so the event loop keeps answering probes
while a batch runs. Errors under `/v1` take OpenAI's shape, because that is
what OpenAI clients parse; the native routes keep FastAPI's.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from aisemble.services.common import ServiceUnavailable
from aisemble.services.common.openai import (
    ErrorResponse,
    ModelCard,
    ModelList,
    OpenAIError,
    error_response,
)
from aisemble.services.nlp import textstats
from aisemble.services.nlp.engine import Embedded, NlpEngine
from aisemble.services.nlp.schemas import (
    VISIBLE,
    AnalyzeRequest,
    AnalyzeResponse,
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    LabelScore,
    Language,
    Message,
    Sentiment,
    SimilarityRequest,
    SimilarityResponse,
    Stats,
    TextAnalysis,
    Usage,
)
from aisemble.services.nlp.settings import NlpSettings

router = APIRouter()

# What the routes answer besides 200 and (on the native routes) FastAPI's own 422.
_NATIVE: dict[int | str, dict[str, Any]] = {
    400: {"model": Message, "description": "The body is not UTF-8 JSON"},
    503: {"model": Message, "description": "The model is loading (or failed to); see Retry-After"},
}
_OPENAI: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body is not UTF-8 JSON"},
    404: {"model": ErrorResponse, "description": "Not the model this service serves"},
    422: {"model": ErrorResponse, "description": "A malformed request; `param` names the field"},
    503: {
        "model": ErrorResponse,
        "description": "The model is loading (or failed to); see Retry-After",
    },
}


class NlpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.texts = Counter(
            "nlp_texts_embedded_total",
            "Texts run through the embedding model (labels and references included).",
            registry=registry,
        )
        self.inference = Histogram(
            "nlp_inference_duration_seconds",
            "Time the models took per request, by operation.",
            ["operation"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    @contextmanager
    def timed(self, operation: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.inference.labels(operation).observe(time.perf_counter() - started)


def get_settings(request: Request) -> NlpSettings:
    return request.app.state.settings


def get_metrics(request: Request) -> NlpMetrics:
    return request.app.state.nlp_metrics


def get_engine(request: Request) -> NlpEngine:
    """The engine, once its model is loaded; until then 503 with Retry-After."""
    engine: NlpEngine = request.app.state.engine
    if not engine.loaded:
        readiness = request.app.state.readiness
        if readiness.state == "failed":
            raise ServiceUnavailable(readiness.detail, readiness.retry_after)
        raise ServiceUnavailable("the model is still loading", readiness.retry_after)
    return engine


SettingsDep = Annotated[NlpSettings, Depends(get_settings)]
MetricsDep = Annotated[NlpMetrics, Depends(get_metrics)]
EngineDep = Annotated[NlpEngine, Depends(get_engine)]


@router.post("/analyze", response_model=AnalyzeResponse, responses=_NATIVE, tags=["nlp"])
async def analyze(
    body: AnalyzeRequest, engine: EngineDep, settings: SettingsDep, metrics: MetricsDep
) -> AnalyzeResponse:
    """Per text: embedding, sentiment, zero-shot classification, similarity, statistics."""
    texts = body.items()
    _check_texts(texts, settings, "texts" if body.texts is not None else "text")
    if body.labels is not None:
        if len(body.labels) > settings.max_labels:
            raise _invalid("labels", f"at most {settings.max_labels} labels per request")
        _check_texts(body.labels, settings, "labels")
    if body.reference is not None:
        _check_texts([body.reference], settings, "reference")
    return await run_in_threadpool(_analyze, engine, metrics, settings, body)


@router.post("/similarity", response_model=SimilarityResponse, responses=_NATIVE, tags=["nlp"])
async def similarity(
    body: SimilarityRequest, engine: EngineDep, settings: SettingsDep, metrics: MetricsDep
) -> SimilarityResponse:
    """Cosine similarity of every text in `a` with every text in `b`."""
    a = [body.a] if isinstance(body.a, str) else body.a
    b = [body.b] if isinstance(body.b, str) else body.b
    _check_texts(a, settings, "a")
    _check_texts(b, settings, "b")

    def work() -> SimilarityResponse:
        vectors = _embed(engine, metrics, a + b).vectors
        matrix = engine.cosine(vectors[: len(a)], vectors[len(a) :])
        return SimilarityResponse(
            model=settings.model_name, matrix=[[round(x, 6) for x in row] for row in matrix]
        )

    return await run_in_threadpool(work)


@router.get("/v1/models", response_model=ModelList, tags=["openai"])
async def list_models(request: Request, settings: SettingsDep) -> ModelList:
    return ModelList(data=[_card(request, settings)])


@router.get(
    "/v1/models/{model:path}",
    response_model=ModelCard,
    responses={404: _OPENAI[404]},
    tags=["openai"],
)
async def get_model(model: str, request: Request, settings: SettingsDep) -> ModelCard:
    _check_model(model, settings)
    return _card(request, settings)


@router.post(
    "/v1/embeddings", response_model=EmbeddingsResponse, responses=_OPENAI, tags=["openai"]
)
async def embeddings(
    body: EmbeddingsRequest, engine: EngineDep, settings: SettingsDep, metrics: MetricsDep
) -> EmbeddingsResponse:
    """OpenAI's embeddings API: `input` is a string or a list of strings."""
    _check_model(body.model, settings)
    texts = [body.input] if isinstance(body.input, str) else body.input
    _check_texts(texts, settings, "input")
    if body.dimensions is not None and body.dimensions != engine.dimensions:
        raise _invalid(
            "dimensions",
            f"{settings.model_name} makes {engine.dimensions}-dimensional embeddings only",
        )
    embedded = await run_in_threadpool(_embed, engine, metrics, texts)
    encode = _base64 if body.encoding_format == "base64" else list
    tokens = sum(embedded.tokens)
    return EmbeddingsResponse(
        data=[
            Embedding(index=index, embedding=encode(vector))
            for index, vector in enumerate(embedded.vectors)
        ],
        model=settings.model_name,
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )


async def unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After, as the common app answers it, in OpenAI's shape under /v1."""
    assert isinstance(exc, ServiceUnavailable)
    headers = {"Retry-After": str(exc.retry_after)}
    if request.url.path.startswith("/v1/"):
        response = error_response(503, exc.detail, "service_unavailable")
        response.headers.update(headers)
        return response
    return JSONResponse({"detail": exc.detail}, status_code=503, headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's bare 400 for a body that is not UTF-8, in OpenAI's shape under /v1."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400 and request.url.path.startswith("/v1/"):
        return error_response(400, str(exc.detail))
    return await http_exception_handler(request, exc)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422s: OpenAI's shape under /v1 (its clients read `error.message`), FastAPI's elsewhere."""
    assert isinstance(exc, RequestValidationError)
    if not request.url.path.startswith("/v1/"):
        return await request_validation_exception_handler(request, exc)
    errors = list(exc.errors())
    params = [".".join(str(part) for part in error["loc"][1:]) for error in errors]
    message = "; ".join(
        f"{param}: {error['msg']}" if param else error["msg"]
        for param, error in zip(params, errors, strict=True)
    )
    return error_response(
        422, message or "invalid request", "invalid_request_error", params[0] if params else None
    )


def _analyze(
    engine: NlpEngine, metrics: NlpMetrics, settings: NlpSettings, body: AnalyzeRequest
) -> AnalyzeResponse:
    texts = body.items()
    tasks = body.wanted()
    labels = body.labels if "classify" in tasks else []
    references = [body.reference] if "similarity" in tasks and body.reference is not None else []
    results = [TextAnalysis(index=index) for index in range(len(texts))]
    if set(tasks) & {"embedding", "sentiment", "classify", "similarity"}:
        # One pass through the model for the texts, the labels and the reference together.
        vectors = _embed(engine, metrics, texts + labels + references).vectors
        own = vectors[: len(texts)]
        if "embedding" in tasks:
            for result, vector in zip(results, own, strict=True):
                result.embedding = vector
        if "sentiment" in tasks:
            with metrics.timed("sentiment"):
                sentiments = engine.sentiment(texts, own)
            for result, found in zip(results, sentiments, strict=True):
                result.sentiment = Sentiment(
                    label=found.label, score=found.score, method=found.method
                )
        if labels:
            scores = engine.cosine(own, vectors[len(texts) : len(texts) + len(labels)])
            for result, row in zip(results, scores, strict=True):
                ranked = sorted(zip(labels, row, strict=True), key=lambda item: -item[1])
                result.classification = [
                    LabelScore(label=label, score=round(score, 6)) for label, score in ranked
                ]
        if references:
            scores = engine.cosine(own, vectors[-1:])
            for result, row in zip(results, scores, strict=True):
                result.similarity = round(row[0], 6)
    if "stats" in tasks:
        with metrics.timed("tokenize"):
            tokens = engine.count_tokens(texts)
        for result, text, count in zip(results, texts, tokens, strict=True):
            found = textstats.stats(text)
            language = found.language
            result.stats = Stats(
                characters=found.characters,
                words=found.words,
                sentences=found.sentences,
                tokens=count,
                language=Language(
                    code=language.code,
                    name=language.name,
                    script=language.script,
                    confidence=language.confidence,
                ),
            )
    return AnalyzeResponse(model=settings.model_name, tasks=tasks, results=results)


def _embed(engine: NlpEngine, metrics: NlpMetrics, texts: list[str]) -> Embedded:
    with metrics.timed("embed"):
        embedded = engine.embed(texts)
    metrics.texts.inc(len(texts))
    return embedded


def _check_texts(texts: Sequence[str], settings: NlpSettings, field: str) -> None:
    """Non-empty texts, at most max_texts in the field (each field on its own, as the
    schema can say that), each within the per-text length."""
    if not texts:
        raise _invalid(field, "no text given")
    if len(texts) > settings.max_texts:
        raise _invalid(field, f"too many texts: at most {settings.max_texts} per field")
    single = len(texts) == 1
    for index, text in enumerate(texts):
        where = field if single else f"{field}[{index}]"
        if not VISIBLE.search(text):
            raise _invalid(field, f"{where} is empty")
        if len(text) > settings.max_chars:
            raise _invalid(
                field,
                f"{where} has {len(text)} characters, more than the limit of {settings.max_chars}",
            )


def _check_model(model: str, settings: NlpSettings) -> None:
    if model != settings.model_name:
        raise OpenAIError(
            404,
            f"The model `{model}` does not exist; this server serves `{settings.model_name}`",
            code="model_not_found",
            param="model",
        )


def _card(request: Request, settings: NlpSettings) -> ModelCard:
    return ModelCard(id=settings.model_name, created=request.app.state.created)


def _base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the vector as little-endian float32, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _invalid(field: str, message: str) -> RequestValidationError:
    """A 422 shaped like FastAPI's own (or OpenAI's under /v1), naming the field at fault."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", field), "msg": message, "input": None}]
    )
