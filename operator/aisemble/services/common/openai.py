"""What the services that speak OpenAI's API share: model lists and the error body.

OpenAI's clients read `{"error": {"message", "type", "param", "code"}}`, so
errors on those routes are raised as `OpenAIError` and answered in that shape.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.openapi.constants import REF_TEMPLATE
from fastapi.responses import JSONResponse
from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "aisemble"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: clients read `error.message` and `error.code`."""

    error: ErrorDetail


class OpenAIError(Exception):
    """An error answered with OpenAI's body, so clients show its message and code."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(
            error=ErrorDetail(message=message, type=type, param=param, code=code)
        )


def error_response(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    return _answer(OpenAIError(status, message, type=type, code=code, param=param))


def _answer(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body.model_dump(), status_code=exc.status)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return _answer(exc)


def install(app: FastAPI) -> None:
    """Answer OpenAIError in OpenAI's shape."""
    app.add_exception_handler(OpenAIError, _handle)


def event_stream(chunk: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI for a 200 that is, with `stream: true`, server-sent events: one `chunk` (a
    component's name) as JSON per event, an `{"error": ...}` one if generation fails, and
    `[DONE]` at the end. The LLM documents its streams so; the gateway passes them on."""
    data = {
        "type": "string",
        "if": {"const": "[DONE]"},
        "else": {
            "contentMediaType": "application/json",
            "contentSchema": {
                "anyOf": [
                    {"$ref": f"#/components/schemas/{chunk}"},
                    {"$ref": "#/components/schemas/ErrorResponse"},
                ]
            },
        },
    }
    stream = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {200: {"content": {"text/event-stream": {"schema": stream}}}}


def components(model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """`model`'s JSON schema and those it refers to, as entries of an OpenAPI document's
    `components.schemas`: for a model no route names (the chunks of an event stream)."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE, mode="serialization")
    return {**schema.pop("$defs", {}), model.__name__: schema}
