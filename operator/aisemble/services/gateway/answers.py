"""What the gateway's OpenAPI document says its routes answer, beyond their models.

Routes that forward bytes (the passthrough and OpenAI routes) read no body
model, so `RawBody` and `documents` give the document the body they forward;
the answers the services give through the gateway, and the gateway's own for a
service it cannot use, are declared here once.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from aisemble.services.common.openai import ErrorResponse, components, event_stream
from aisemble.services.gateway.schemas import Detail, JobAccepted
from aisemble.services.llm.schemas import ChatCompletionChunk

Responses = dict[int | str, dict[str, Any]]

ACCEPTED: Responses = {
    202: {
        "model": JobAccepted,
        "description": 'With `"async": true`: the job, run in the background; poll Location',
        "headers": {"Location": {"description": "/jobs/{id}", "schema": {"type": "string"}}},
    }
}
# What the gateway answers for a service it cannot use (backends.py), on every route to one.
UNAVAILABLE: Responses = {
    413: {"model": Detail, "description": "The body is larger than the gateway or service takes"},
    502: {"model": Detail, "description": "The service failed (answered 5xx)"},
    503: {
        "model": Detail,
        "description": "The service is unreachable or not ready; see Retry-After",
    },
    504: {"model": Detail, "description": "The service did not answer in time"},
}


def either(description: str, *schemas: str) -> dict[str, Any]:
    """An answer whose body is one of the components `schemas`."""
    refs = [{"$ref": f"#/components/schemas/{name}"} for name in schemas]
    return {
        "description": description,
        "content": {"application/json": {"schema": {"anyOf": refs}}},
    }


LLM_ERRORS: Responses = {
    400: either(
        "Beyond the LLM's limits (max_tokens, context): OpenAI's error, from the LLM; or, "
        "from the gateway, a body that is not UTF-8",
        "ErrorResponse",
        "Detail",
    ),
    404: {"model": ErrorResponse, "description": "A model the LLM does not serve"},
}


NO_JOB: Responses = {404: {"model": Detail, "description": "No such job (of this key's)"}}


def streamed(chunk: str) -> Responses:
    """The 200 of a route that, with `stream: true`, answers the LLM's server-sent events."""
    return event_stream(chunk)


# The OpenAI routes' errors: the service's own, in OpenAI's shape, passed through, besides
# the gateway's for a service it cannot use. The LLM's 422 is FastAPI's (documented by it).
OPENAI_LLM: Responses = {
    **LLM_ERRORS,
    400: {"model": ErrorResponse, "description": "Beyond the LLM's limits, or not UTF-8 JSON"},
    **UNAVAILABLE,
}
OPENAI_NLP: Responses = {
    400: {"model": ErrorResponse, "description": "The body is not UTF-8 JSON"},
    404: {"model": ErrorResponse, "description": "A model the NLP service does not serve"},
    422: {"model": ErrorResponse, "description": "A malformed request; `param` names the field"},
    **UNAVAILABLE,
}


class RawBody(APIRoute):
    """A route that hands its endpoint the request as it came, unread: the gateway forwards
    the bytes. The document still shows a body, the one the endpoint's `__signature__`
    declares (see `documents`), with FastAPI's own schema for it and its 422."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        return self.endpoint


def documents(body: type[BaseModel]):
    """Give a raw route's endpoint the signature that documents `body` as its request body."""

    def decorate(endpoint: Callable[[Request], Awaitable[Response]]):
        parameter = inspect.Parameter(
            "body", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=body
        )
        endpoint.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [parameter], return_annotation=Response
        )
        return endpoint

    return decorate


def complete_openapi(app: FastAPI) -> None:
    """Add what no route names but the streams refer to: the chat chunk's schema."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schemas = build()["components"]["schemas"]
            for name, schema in components(ChatCompletionChunk).items():
                if schemas.setdefault(name, schema) != schema:
                    raise AssertionError(f"two schemas are named {name} in the gateway's document")
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
