"""The LLM service against its own OpenAPI document, with schemathesis-generated requests.

The cases reach the real scheduler and engine, on the tiny model the other
LLM tests use, loaded from its directory the way the service loads any model.
A low token limit keeps generation short; the document publishes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fuzz_helpers import call_and_check, load, openai_error, serving
from starlette.types import ASGIApp

from aisemble.services.llm.app import create
from aisemble.services.llm.settings import LLMSettings
from aisemble.services.llm.tinymodel import make_tiny_model

SETTINGS = LLMSettings(model_path=Path("tiny"), max_new_tokens_limit=4, batch_window_ms=0)

schema = load(create(SETTINGS))


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ASGIApp]:
    path = make_tiny_model(tmp_path_factory.mktemp("fuzz-llm") / "tiny")
    with serving(create(SETTINGS.model_copy(update={"model_path": path}))) as app:
        yield app


def beyond_the_context(response: schemathesis.Response) -> bool:
    """A prompt plus max_tokens longer than the model's context: its tokens, not its
    characters, count, so no schema can bound it."""
    return response.status_code == 400 and openai_error(response).get("code") == (
        "context_length_exceeded"
    )


@schema.parametrize()
def test_llm_api_agrees_with_its_schema(case: schemathesis.Case, app: ASGIApp) -> None:
    call_and_check(case, app, beyond_the_context)
