"""The OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Each route checks the request against the served model (name, context
length, token limit), turns it into sequences for the scheduler and answers
with OpenAI's shapes: one JSON body, or with `stream: true` server-sent
events, one `data: {chunk}` per piece of text and `data: [DONE]` at the end.
Errors use OpenAI's `{"error": {...}}` body; 503 (loading, queue full) comes
from the common app with Retry-After, and malformed bodies get FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from aisemble.services.common import ServiceUnavailable
from aisemble.services.common.openai import (
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    OpenAIError,
    event_stream,
)
from aisemble.services.llm.batching import (
    GenerationFailed,
    GenerationRequest,
    GenerationTimeout,
    QueueFull,
    Result,
    Scheduler,
    SchedulerClosed,
    Ticket,
)
from aisemble.services.llm.engine import Sampling
from aisemble.services.llm.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Usage,
)
from aisemble.services.llm.settings import LLMSettings

# OpenAI's default for /v1/completions; chat defaults to what the limits allow.
DEFAULT_COMPLETION_TOKENS = 16
QUEUE_RETRY_AFTER = 1  # the queue drains a batch at a time: seconds, not minutes


def get_settings(request: Request) -> LLMSettings:
    return request.app.state.settings


def get_scheduler(request: Request) -> Scheduler:
    """The scheduler once the model is loaded; 503 with Retry-After until then."""
    scheduler = request.app.state.scheduler
    if scheduler is not None:
        return scheduler
    readiness = request.app.state.readiness
    if readiness.state == "failed":
        raise ServiceUnavailable(
            f"the model failed to load: {readiness.detail}", readiness.retry_after
        )
    if readiness.state == "waiting":
        raise ServiceUnavailable(readiness.detail, readiness.retry_after)
    raise ServiceUnavailable("the model is still loading; retry shortly", readiness.retry_after)


SettingsDep = Annotated[LLMSettings, Depends(get_settings)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Prompt or max_tokens beyond the model's limits"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    503: {"description": "Model loading or queue full; see Retry-After"},
    504: {"model": ErrorResponse, "description": "Not finished within the request timeout"},
}


def streamed(chunk: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI for a route that streams `chunk`s when asked (see `event_stream`)."""
    return {**event_stream(chunk), **ERRORS}


router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", response_model=ModelList)
async def list_models(request: Request, settings: SettingsDep) -> ModelList:
    """The one served model. Answers while the model loads, so callers can route early."""
    return ModelList(data=[ModelCard(id=settings.model_name, created=request.app.state.created)])


@router.post("/completions", response_model=Completion, responses=streamed("Completion"))
async def create_completion(
    body: CompletionRequest, scheduler: SchedulerDep, settings: SettingsDep
) -> Any:
    _check_model(body.model, settings)
    engine = scheduler.engine
    texts = body.prompts()
    if len(texts) > scheduler.max_queue:
        raise OpenAIError(
            400,
            f"{len(texts)} prompts in one request; this service queues at most {scheduler.max_queue}",
            param="prompt",
        )
    prompts = await asyncio.to_thread(lambda: [engine.encode(t) for t in texts])
    max_tokens = _max_tokens(
        body.max_tokens, DEFAULT_COMPLETION_TOKENS, prompts, engine, settings, "prompt"
    )
    ticket = _submit(scheduler, prompts, max_tokens, body)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_tokens = sum(len(p) for p in prompts)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(index: int, text: str, finish: str | None) -> Completion:
            choice = CompletionChoice(index=index, text=text, finish_reason=finish)
            return Completion(
                id=ident, created=created, model=settings.model_name, choices=[choice]
            )

        async def events() -> AsyncIterator[str]:
            completion_tokens = 0
            async for update in _guarded(ticket):
                if isinstance(update, str):  # an error event ends the stream
                    yield update
                    return
                if update.text:
                    yield _event(chunk(update.index, update.text, None))
                if update.finish_reason is not None:
                    completion_tokens += update.completion_tokens
                    yield _event(chunk(update.index, "", update.finish_reason))
            if include_usage:
                usage = _usage(prompt_tokens, completion_tokens)
                final = Completion(
                    id=ident, created=created, model=settings.model_name, choices=[], usage=usage
                )
                yield _event(final)
            yield "data: [DONE]\n\n"

        return _stream(events())

    results = await _wait(ticket)
    return Completion(
        id=ident,
        created=created,
        model=settings.model_name,
        choices=[
            CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason)
            for i, r in enumerate(results)
        ],
        usage=_usage(prompt_tokens, sum(r.completion_tokens for r in results)),
    )


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses=streamed("ChatCompletionChunk"),
)
async def create_chat_completion(
    body: ChatCompletionRequest, scheduler: SchedulerDep, settings: SettingsDep
) -> Any:
    _check_model(body.model, settings)
    # Both names are checked, as the document bounds both, though one wins.
    _within_limit(
        settings, max_tokens=body.max_tokens, max_completion_tokens=body.max_completion_tokens
    )
    engine = scheduler.engine
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt = await asyncio.to_thread(engine.encode_chat, messages)
    max_tokens = _max_tokens(
        body.token_limit(), settings.max_new_tokens_limit, [prompt], engine, settings, "messages"
    )
    ticket = _submit(scheduler, [prompt], max_tokens, body)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: ChatDelta, finish: str | None = None) -> ChatCompletionChunk:
            choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish)
            return ChatCompletionChunk(
                id=ident, created=created, model=settings.model_name, choices=[choice]
            )

        async def events() -> AsyncIterator[str]:
            yield _event(chunk(ChatDelta(role="assistant", content="")))
            completion_tokens = 0
            async for update in _guarded(ticket):
                if isinstance(update, str):
                    yield update
                    return
                if update.text:
                    yield _event(chunk(ChatDelta(content=update.text)))
                if update.finish_reason is not None:
                    completion_tokens = update.completion_tokens
                    yield _event(chunk(ChatDelta(), update.finish_reason))
            if include_usage:
                usage = _usage(len(prompt), completion_tokens)
                final = ChatCompletionChunk(
                    id=ident, created=created, model=settings.model_name, choices=[], usage=usage
                )
                yield _event(final)
            yield "data: [DONE]\n\n"

        return _stream(events())

    (result,) = await _wait(ticket)
    return ChatCompletion(
        id=ident,
        created=created,
        model=settings.model_name,
        choices=[
            ChatChoice(
                index=0,
                message=AssistantMessage(content=result.text),
                finish_reason=result.finish_reason,
            )
        ],
        usage=_usage(len(prompt), result.completion_tokens),
    )


def _check_model(model: str | None, settings: LLMSettings) -> None:
    if model is not None and model != settings.model_name:
        raise OpenAIError(
            404,
            f"The model '{model}' does not exist; this service serves '{settings.model_name}'",
            code="model_not_found",
            param="model",
        )


def _max_tokens(
    requested: int | None,
    default: int,
    prompts: list[list[int]],
    engine: Any,
    settings: LLMSettings,
    param: str,
) -> int:
    """The tokens to generate per prompt, within the service's limit and the model's context."""
    _within_limit(settings, max_tokens=requested)
    longest = max(len(p) for p in prompts)
    room = engine.context_length - longest
    if room < 1 or (requested is not None and requested > room):
        raise OpenAIError(
            400,
            f"This model's maximum context length is {engine.context_length} tokens; "
            f"the prompt has {longest} tokens and {requested or 1} more were requested",
            code="context_length_exceeded",
            param=param,
        )
    return requested if requested is not None else min(default, settings.max_new_tokens_limit, room)


def _within_limit(settings: LLMSettings, **requested: int | None) -> None:
    limit = settings.max_new_tokens_limit
    for param, value in requested.items():
        if value is not None and value > limit:
            raise OpenAIError(
                400,
                f"{param} is {value}, but this service generates at most {limit} tokens",
                param=param,
            )


def _submit(
    scheduler: Scheduler,
    prompts: list[list[int]],
    max_tokens: int,
    body: CompletionRequest | ChatCompletionRequest,
) -> Ticket:
    sampling = Sampling(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        seed=body.seed,
    )
    requests = [
        GenerationRequest(prompt, max_tokens, sampling, body.stop_strings()) for prompt in prompts
    ]
    try:
        return scheduler.submit(requests)
    except QueueFull as exc:
        raise ServiceUnavailable(str(exc), QUEUE_RETRY_AFTER) from None
    except SchedulerClosed as exc:
        raise ServiceUnavailable(str(exc)) from None


async def _wait(ticket: Ticket) -> list[Result]:
    try:
        return await ticket.results()
    except GenerationTimeout as exc:
        raise OpenAIError(504, str(exc), type="timeout_error", code="timeout") from None
    except GenerationFailed as exc:
        raise OpenAIError(500, str(exc), type="server_error", code="generation_failed") from None
    finally:
        ticket.cancel()  # a no-op when finished; stops the rows if the client left


async def _guarded(ticket: Ticket) -> AsyncIterator[Any]:
    """The ticket's updates, then an OpenAI-style error event instead of an exception.

    The status line has gone out when a stream fails, so the error travels as
    a `data: {"error": ...}` event, which the openai client raises as APIError.
    """
    try:
        async for update in ticket.updates():
            yield update
    except GenerationTimeout as exc:
        yield _error_event(str(exc), "timeout_error", "timeout")
    except GenerationFailed as exc:
        yield _error_event(str(exc), "server_error", "generation_failed")
    finally:
        ticket.cancel()  # also runs when the client disconnects mid-stream


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _event(payload: Completion | ChatCompletionChunk) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def _error_event(message: str, type: str, code: str) -> str:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type, code=code))
    return f"data: {json.dumps(body.model_dump())}\n\n"


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and no proxy buffering: each token should reach the client as it comes.
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
