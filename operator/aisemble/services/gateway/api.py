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

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from aisemble.services.common import ServiceUnavailable
from aisemble.services.common.logs import request_id
from aisemble.services.gateway import workflows
from aisemble.services.gateway.auth import CallerDep, caller_of
from aisemble.services.gateway.backends import BackendError, Backends
from aisemble.services.gateway.jobs import FINAL, Job
from aisemble.services.gateway.runner import JobRunner

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


class LLMCompletion(BaseModel):
    """POST /ai/llm/completion: a prompt in, text out."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    prompt: str = Field(min_length=1, description="The text to continue.")
    model: str | None = Field(None, description="Model id; by default the one the LLM serves.")
    max_tokens: int = Field(128, ge=1, le=8192, description="Most tokens to generate.")
    temperature: float = Field(0.7, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(None, description="Text that ends the completion.")
    seed: int | None = Field(None, description="Same seed, same text.")
    run_async: bool = Field(False, alias="async", description="Answer at once with a job id.")


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


@router.post("/ai/llm/completion", tags=["ai"])
async def llm_completion(req: LLMCompletion, gw: GatewayDep, caller: CallerDep) -> Response:
    return await _dispatch(
        gw, "llm.completion", req.model_dump(exclude={"run_async"}), req.run_async, caller
    )


_ROUTES = {
    "vision.analyze": ("vision", "/analyze"),
    "nlp.analyze": ("nlp", "/analyze"),
    "data.process": ("data", "/process"),
}


def _passthrough(kind: str):
    backend, path = _ROUTES[kind]

    async def route(request: Request, gw: GatewayDep) -> Response:
        raw = await request.body()
        # The backend validates the body; the gateway only looks inside for "async",
        # and only parses when the bytes could hold it (the hot path forwards them as-is).
        if b'"async"' in raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise HTTPException(
                    422, [{"loc": ["body"], "msg": f"invalid JSON: {exc}"}]
                ) from exc
            if isinstance(body, dict) and "async" in body:
                run_async = body.pop("async")
                if not isinstance(run_async, bool):
                    raise HTTPException(
                        422, [{"loc": ["body", "async"], "msg": "must be true or false"}]
                    )
                if run_async:
                    return await _dispatch(gw, kind, body, True, caller_of(request))
                raw = json.dumps(body).encode()
        reply = await gw.backends.forward(backend, path, raw)
        return Response(
            reply.content,
            status_code=reply.status_code,
            media_type=reply.headers.get("content-type"),
        )

    return route


router.post("/ai/vision/analyze", tags=["ai"], summary="Analyse an image")(
    _passthrough("vision.analyze")
)
router.post("/ai/nlp/analyze", tags=["ai"], summary="Analyse text")(_passthrough("nlp.analyze"))
router.post("/data/process", tags=["data"], summary="Run an operation list")(
    _passthrough("data.process")
)


@router.post("/workflows", tags=["workflows"])
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


@router.get("/jobs/{job_id}", tags=["jobs"])
async def get_job(job_id: str, gw: GatewayDep, caller: CallerDep) -> dict[str, Any]:
    return _own_job(gw, job_id, caller).view()


@router.delete("/jobs/{job_id}", tags=["jobs"])
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


async def _openai(gw: Gateway, backend: str, path: str, body: dict[str, Any]) -> Response:
    if body.get("stream"):
        status, headers, chunks = await gw.backends.stream(backend, path, body)
        return StreamingResponse(
            chunks,
            status_code=status,
            media_type=headers.get("content-type", "text/event-stream"),
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    reply = await gw.backends.call(backend, "POST", path, json=body)
    return JSONResponse(reply.body, status_code=reply.status)


@router.post("/v1/completions", tags=["openai"])
async def completions(gw: GatewayDep, body: Annotated[dict[str, Any], Body()]) -> Response:
    return await _openai(gw, "llm", "/v1/completions", body)


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(gw: GatewayDep, body: Annotated[dict[str, Any], Body()]) -> Response:
    return await _openai(gw, "llm", "/v1/chat/completions", body)


@router.post("/v1/embeddings", tags=["openai"])
async def embeddings(gw: GatewayDep, body: Annotated[dict[str, Any], Body()]) -> Response:
    return await _openai(gw, "nlp", "/v1/embeddings", body)
