"""The data processor's routes: POST /process runs an operation list, GET /engines says what can run it.

Runs happen on worker threads (pandas and Spark both block), so the event
loop keeps answering /health and /ready while a long run goes on.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from aisemble.services.data.runner import OperationError, Processor
from aisemble.services.data.schemas import (
    EnginesResponse,
    ErrorBody,
    ProcessRequest,
    ProcessResponse,
)


def get_processor(request: Request) -> Processor:
    return request.app.state.processor


ProcessorDep = Annotated[Processor, Depends(get_processor)]

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorBody,
        "description": "The list cannot run as written: unknown column or frame, a type "
        "mistake, a path outside the data root, an unreadable file, an unavailable engine.",
    },
    422: {"description": "A malformed list; `loc` names the field, e.g. operations.2.filter.where"},
    503: {"description": "Spark did not start; see Retry-After"},
}

router = APIRouter(tags=["data"])


async def operation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OperationError)
    return JSONResponse(exc.body(), status_code=400)


@router.post("/process", response_model=ProcessResponse, responses=ERRORS)
async def process(body: ProcessRequest, processor: ProcessorDep) -> ProcessResponse:
    """Run an operation list and return the result's first rows (and write its outputs)."""
    settings = processor.settings
    rows = settings.preview_rows if body.preview_rows is None else body.preview_rows
    if rows > settings.max_preview_rows:
        raise RequestValidationError(
            [
                {
                    "type": "less_than_equal",
                    "loc": ("body", "preview_rows"),
                    "msg": f"Input should be less than or equal to {settings.max_preview_rows}",
                    "input": rows,
                    "ctx": {"le": settings.max_preview_rows},
                }
            ]
        )
    return await run_in_threadpool(processor.process, body, rows)


@router.get("/engines", response_model=EnginesResponse)
def engines(processor: ProcessorDep) -> EnginesResponse:
    """The engines, whether they can run here and why not; Spark's Java is checked, not started."""
    return processor.engines.describe()
