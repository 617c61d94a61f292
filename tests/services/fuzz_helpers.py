"""What the schema-driven fuzz tests share: one schemathesis configuration, the checks, the app's life.

Each service is fuzzed against the OpenAPI document its own app publishes at
`/openapi.json`, fetched in-process (`from_asgi`), so the schema tested is
the one clients see. Generation is derandomized with a fixed seed: the same
cases run every time, so a failure in CI is a failure on every machine.

The document is loaded when the module is imported (schemathesis makes one
test per operation from it, which needs it before fixtures exist), from an
app built by the service's own factory but never started. The app the cases
reach is built by a fixture, with the real engine and a tiny model, and
started once per module by `serving`: the test owns its lifespan, so
readiness is awaited once, before the first case, and never races a load.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import schemathesis
from fastapi.testclient import TestClient
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.types import ASGIApp, Receive, Scope, Send

# About 30 examples per operation keeps the fuzz suite within a few minutes on 2 CPUs.
EXAMPLES = int(os.environ.get("AISEMBLE_FUZZ_EXAMPLES", "30"))
SEED = 20240501

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    # Together these say the schema and the validation agree: what the schema
    # admits is accepted, what it excludes is refused.
    positive_data_acceptance,
    negative_data_rejection,
]

# Whether a refusal of schema-valid input is one JSON Schema cannot express (a file
# that is missing, bytes that are not an image, a prompt longer than the model's
# context), so the schema could not have said it beforehand.
BeyondSchema = Callable[[schemathesis.Response], bool]


def config() -> schemathesis.Config:
    """Deterministic generation of valid and invalid inputs, in every phase but stateful."""
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # The one health check that times generation: on a busy CI machine it would fail
            # a run that, derandomized, is otherwise the same every time.
            "suppress-health-check": ["too_slow"],
            "generation": {
                "mode": "all",
                "max-examples": EXAMPLES,
                "deterministic": True,
                # No example database: what ran before must not change what runs now.
                "database": "none",
            },
            # The services keep no resources a sequence of calls could link.
            "phases": {"stateful": {"enabled": False}},
            # Reports show what was sent: the only key is the tests' own, and a field named
            # max_tokens is no secret.
            "output": {"sanitization": {"enabled": False}},
        }
    )


def call_and_check(
    case: schemathesis.Case,
    app: ASGIApp,
    beyond_schema: BeyondSchema | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """Send the case to the app and run every check. `beyond_schema` tells the refusals of
    valid input that the schema cannot state; they are not held against positive cases."""

    def positive_data_acceptance_within_schema(
        ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
    ) -> bool | None:
        if beyond_schema is not None and beyond_schema(response):
            return None
        return positive_data_acceptance(ctx, response, case)

    checks = [c for c in CHECKS if c is not positive_data_acceptance]
    checks.append(positive_data_acceptance_within_schema)
    case.call_and_validate(app=app, headers=headers, checks=checks)


def openai_error(response: schemathesis.Response) -> dict[str, Any]:
    """The `error` of an OpenAI-shaped error body, or {} for any other body."""
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def validation_errors(response: schemathesis.Response) -> list[dict[str, Any]]:
    """The errors of a FastAPI 422 body (`{"detail": [{loc, msg, ...}]}`), or []."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return []
    return detail if isinstance(detail, list) else []


def load(app: ASGIApp, headers: dict[str, str] | None = None) -> Any:
    """The app's own OpenAPI document, as schemathesis fuzzes it; the app is not started."""
    return schemathesis.openapi.from_asgi(
        "/openapi.json", without_lifespan(app), config=config(), headers=headers or {}
    )


def without_lifespan(app: ASGIApp) -> ASGIApp:
    """The app with its requests only: whoever calls it through this cannot start or stop it.

    An app that fails the lifespan scope before reading a message says, per
    the ASGI spec, that it has no lifespan; the server then just sends requests.
    """

    async def requests_only(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("this app's lifespan belongs to the test")
        await app(scope, receive, send)

    return requests_only


@contextmanager
def serving(app: Any, timeout: float = 60) -> Iterator[ASGIApp]:
    """Start the app, wait until /ready says ready, and yield it for schemathesis to call."""
    with TestClient(app) as client:
        deadline = time.monotonic() + timeout
        while (ready := client.get("/ready")).status_code != 200:
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready after {timeout} s: {ready.json()}")
            time.sleep(0.02)
        yield without_lifespan(app)
