"""The NLP service against its own OpenAPI document, with schemathesis-generated requests.

The cases reach the real all-MiniLM-L6-v2 engine the other NLP tests use.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fuzz_helpers import call_and_check, load, openai_error, serving
from starlette.types import ASGIApp

from aisemble.services.nlp.app import create
from aisemble.services.nlp.engine import NlpEngine
from aisemble.services.nlp.settings import NlpSettings

schema = load(create(NlpSettings()))


@pytest.fixture(scope="module")
def app() -> Iterator[ASGIApp]:
    engine = NlpEngine(NlpSettings())
    engine.load()
    with serving(create(NlpSettings(), engine)) as app:
        yield app


def not_the_models_dimensions(response: schemathesis.Response) -> bool:
    """`dimensions` other than the loaded model's: the document is written before any model
    is loaded, so it cannot name them."""
    return response.status_code == 422 and openai_error(response).get("param") == "dimensions"


@schema.parametrize()
def test_nlp_api_agrees_with_its_schema(case: schemathesis.Case, app: ASGIApp) -> None:
    call_and_check(case, app, not_the_models_dimensions)
