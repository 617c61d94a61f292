"""The gateway's routes: the seed's AI API, jobs, workflows, and OpenAI-compatible proxying.

Every route here runs behind the API-key guard (auth.py); a route that needs
to know the caller (jobs belong to the key that created them) asks for
`CallerDep`, which is None when the gateway runs without keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

# The services' request and answer models: light pydantic modules, the same the services
# validate with, so the gateway publishes (and on its async path checks) what they take.
from aisemble.services.common import ServiceUnavailable
from aisemble.services.common.logs import request_id
from aisemble.services.data.schemas import ErrorBody
from aisemble.services.gateway import workflows
from aisemble.services.gateway.answers import (
    ACCEPTED,
    LLM_ERRORS,
    NO_JOB,
    OPENAI_LLM,
    OPENAI_NLP,
    UNAVAILABLE,
    RawBody,
    Responses,
    documents,
    either,
    streamed,
)
from aisemble.services.gateway.auth import CallerDep, caller_of
from aisemble.services.gateway.backends import BackendError, Backends
from aisemble.services.gateway.jobs import FINAL, Job
from aisemble.services.gateway.runner import JobRunner
from aisemble.services.gateway.schemas import BODIES, Detail, LLMCompletion
from aisemble.services.llm.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
)
from aisemble.services.nlp.schemas import EmbeddingsRequest
from aisemble.services.vision.schemas import InvalidRequest

log = logging.getLogger(__name__)


class Gateway:
    """What the routes need, built once by the app: backends and the job runner."""

    def __init__(self, backends: Backends, runner: JobRunner | None = None) -> None:
        self.backends = backends
        self.runner = runner

    async def call(self, name: str, body: dict[str, Any]) -> Any:
        """Run one service call by name (as routes, jobs and workflow steps do)."""
        if name == "llm.completion":
            return await self.llm_completion(LLMCompletion.model_validate(body))
        backend, path = _ROUTES[name]
        return (await self.backends.call(backend, "POST", path, json=body)).body

    async def llm_completion(self, req: LLMCompletion) -> dict[str, Any]:
        # Without a model the LLM service uses the one it serves.
        body = req.model_dump(exclude_none=True, exclude={"run_async"})
        reply = await self.backends.call("llm", "POST", "/v1/completions", json=body)
        choice = reply.body["choices"][0]
        return {
            "model": reply.body.get("model"),
            "text": choice["text"],
            "finish_reason": choice.get("finish_reason"),
            "usage": reply.body.get("usage"),
        }

    async def workflow(self, body: dict[str, Any]) -> dict[str, Any]:
        flow = workflows.Workflow.model_validate(body)
        try:
            return await workflows.run(flow, self.call)
        except workflows.StepFailed as exc:
            status, detail = _error_of(exc.cause)
            raise HTTPException(
                status,
                {"step": exc.step, "index": exc.index, "status": status, "error": detail},
            ) from exc


def _error_of(exc: Exception) -> tuple[int, Any]:
    if isinstance(exc, BackendError):
        return exc.status, exc.body
    if isinstance(exc, HTTPException):
        return exc.status_code, exc.detail
    if isinstance(exc, ServiceUnavailable):
        return 503, exc.detail
    if isinstance(exc, ValueError):
        return 422, str(exc)
    raise exc


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


router = APIRouter()


async def _dispatch(
    gw: Gateway, kind: str, body: dict[str, Any], run_async: bool, caller: str | None
) -> Response:
    if run_async:
        assert gw.runner is not None
        job = gw.runner.submit(kind, body, request_id.get() or None, owner=caller)
        location = f"/jobs/{job.id}"
        return JSONResponse(
            {"id": job.id, "kind": kind, "state": job.state, "href": location},
            status_code=202,
            headers={"Location": location},
        )
    return JSONResponse(
        await gw.call(kind, body) if kind != "workflow" else await gw.workflow(body)
    )


@router.post("/ai/llm/completion", tags=["ai"], responses={**ACCEPTED, **LLM_ERRORS, **UNAVAILABLE})
async def llm_completion(req: LLMCompletion, gw: GatewayDep, caller: CallerDep) -> Response:
    return await _dispatch(
        gw, "llm.completion", req.model_dump(exclude={"run_async"}), req.run_async, caller
    )


_ROUTES = {
    "vision.analyze": ("vision", "/analyze"),
    "nlp.analyze": ("nlp", "/analyze"),
    "data.process": ("data", "/process"),
}


def _object_naming(raw: bytes, key: str) -> dict[str, Any] | None:
    """The JSON object of `raw` if it has `key`, else None. Parsed only when the bytes could
    hold the key: the hot path forwards bodies as they came, unread. A body that is not
    JSON is None too, and goes as it is, for the backend to answer as it does."""
    if f'"{key}"'.encode() not in raw:
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) and key in body else None


def _passthrough(kind: str):
    backend, path = _ROUTES[kind]
    model = BODIES[kind]

    @documents(model)
    async def route(request: Request) -> Response:
        gw = get_gateway(request)
        raw = await request.body()
        # The backend validates the body; the gateway only looks inside for "async".
        body = _object_naming(raw, "async")
        if body is not None:
            run_async = body.pop("async")
            if not isinstance(run_async, bool):
                raise RequestValidationError(
                    [
                        {
                            "type": "bool_type",
                            "loc": ("body", "async"),
                            "msg": "Input should be a valid boolean",
                            "input": run_async,
                        }
                    ]
                )
            if run_async:
                # Checked now, as the backend would: a job is taken only for a body the
                # document admits; beyond that (a file, a picture) the job reports it.
                _validate(model, body)
                return await _dispatch(gw, kind, body, True, caller_of(request))
            raw = json.dumps(body).encode()
        reply = await gw.backends.forward(backend, path, raw)
        return Response(
            reply.content,
            status_code=reply.status_code,
            media_type=reply.headers.get("content-type"),
        )

    return route


def _validate(model: type[BaseModel], body: dict[str, Any]) -> None:
    try:
        model.model_validate(body, strict=True)
    except ValidationError as exc:
        raise RequestValidationError(
            [
                {**error, "loc": ("body", *error["loc"])}
                for error in exc.errors(include_url=False, include_context=False)
            ]
        ) from None


_PASSTHROUGHS: dict[str, tuple[str, str, str, Responses]] = {
    "vision.analyze": (
        "/ai/vision/analyze",
        "Analyse an image",
        "ai",
        {422: {"model": InvalidRequest, "description": "A malformed body, or not a picture"}},
    ),
    "nlp.analyze": (
        "/ai/nlp/analyze",
        "Analyse text",
        "ai",
        {400: {"model": Detail, "description": "The body is not UTF-8 JSON"}},
    ),
    "data.process": (
        "/data/process",
        "Run an operation list",
        "data",
        {400: {"model": ErrorBody, "description": "The list cannot run on the files there are"}},
    ),
}

for _kind, (_path, _summary, _tag, _errors) in _PASSTHROUGHS.items():
    router.add_api_route(
        _path,
        _passthrough(_kind),
        methods=["POST"],
        tags=[_tag],
        summary=_summary,
        responses={**ACCEPTED, **_errors, **UNAVAILABLE},
        route_class_override=RawBody,
    )


@router.post(
    "/workflows",
    tags=["workflows"],
    responses={
        **ACCEPTED,
        **{status: workflows.STEP_FAILED for status in (400, 404, 502, 503, 504)},
        413: either("The body is too large, or a step's is", "Detail", "StepFailure"),
        422: either(
            "A malformed workflow, or a step the service refused",
            "HTTPValidationError",
            "StepFailure",
        ),
    },
)
async def run_workflow(flow: workflows.Workflow, gw: GatewayDep, caller: CallerDep) -> Response:
    body = flow.model_dump(exclude={"run_async"})
    return await _dispatch(gw, "workflow", body, flow.run_async, caller)


# -- jobs ------------------------------------------------------------------------------------


def _own_job(gw: Gateway, job_id: str, caller: str | None) -> Job:
    """The caller's job, else 404: another key's job is answered as if it did not exist."""
    assert gw.runner is not None
    job = gw.runner.store.get(job_id)
    if job is None or (caller is not None and job.owner != caller):
        raise HTTPException(404, f"no job {job_id}")
    return job


@router.get("/jobs", tags=["jobs"])
async def list_jobs(
    gw: GatewayDep,
    caller: CallerDep,
    state: Annotated[
        str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")
    ] = None,
    kind: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    assert gw.runner is not None
    jobs = gw.runner.store.list(state=state, kind=kind, limit=limit, owner=caller)
    return {"jobs": [j.view() | {"result": None} for j in jobs], "count": len(jobs)}


@router.get("/jobs/{job_id}", tags=["jobs"], responses=NO_JOB)
async def get_job(job_id: str, gw: GatewayDep, caller: CallerDep) -> dict[str, Any]:
    return _own_job(gw, job_id, caller).view()


@router.delete(
    "/jobs/{job_id}",
    tags=["jobs"],
    responses={**NO_JOB, 409: {"model": Detail, "description": "The job has already ended"}},
)
async def cancel_job(job_id: str, gw: GatewayDep, caller: CallerDep) -> dict[str, Any]:
    before = _own_job(gw, job_id, caller)
    assert gw.runner is not None
    if before.state in FINAL:
        raise HTTPException(409, f"job {job_id} already {before.state}; nothing to cancel")
    job = gw.runner.cancel(job_id)
    assert job is not None
    return job.view()


# -- OpenAI-compatible routes ----------------------------------------------------------------


@router.get("/v1/models", tags=["openai"])
async def models(gw: GatewayDep) -> dict[str, Any]:
    """The LLM's and the NLP service's models together; one of them down still lists the other."""
    replies = await asyncio.gather(
        gw.backends.call("llm", "GET", "/v1/models"),
        gw.backends.call("nlp", "GET", "/v1/models"),
        return_exceptions=True,
    )
    data: list[dict[str, Any]] = []
    errors = []
    for reply in replies:
        if isinstance(reply, BaseException):
            errors.append(reply)
        else:
            data.extend(reply.body.get("data") or [])
    if not data and errors:
        raise errors[0]
    return {"object": "list", "data": data}


def _openai(backend: str, path: str):
    """A raw route to an OpenAI route of `backend`: the body goes as it came, the answer
    comes back as it is (a stream when the body asks for one)."""

    async def route(request: Request) -> Response:
        gw = get_gateway(request)
        raw = await request.body()
        body = _object_naming(raw, "stream")
        if body is not None and body.get("stream") is True:
            status, headers, chunks = await gw.backends.stream(backend, path, raw)
            return StreamingResponse(
                chunks,
                status_code=status,
                media_type=headers.get("content-type", "text/event-stream"),
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        reply = await gw.backends.forward(backend, path, raw)
        return Response(
            reply.content,
            status_code=reply.status_code,
            media_type=reply.headers.get("content-type"),
        )

    return route


# path, backend, request model, answer model, answers
_OPENAI_ROUTES: list[tuple[str, str, type[BaseModel], type[BaseModel] | None, Responses]] = [
    ("/v1/completions", "llm", CompletionRequest, Completion, streamed("Completion")),
    (
        "/v1/chat/completions",
        "llm",
        ChatCompletionRequest,
        ChatCompletion,
        streamed("ChatCompletionChunk"),
    ),
    ("/v1/embeddings", "nlp", EmbeddingsRequest, None, {}),
]
for _path, _backend, _body, _answer, _answers in _OPENAI_ROUTES:
    router.add_api_route(
        _path,
        documents(_body)(_openai(_backend, _path)),
        methods=["POST"],
        tags=["openai"],
        response_model=_answer,
        responses={**_answers, **(OPENAI_LLM if _backend == "llm" else OPENAI_NLP)},
        route_class_override=RawBody,
    )
