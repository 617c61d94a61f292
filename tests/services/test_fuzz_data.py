"""The data processor against its own OpenAPI document, with schemathesis-generated requests.

The cases reach the real runner and engines over a copy of the shop data the
other data tests use, in a temporary data root.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from data_fixtures import write_shop
from fuzz_helpers import call_and_check, load, serving, validation_errors
from starlette.types import ASGIApp

from aisemble.services.data.app import create
from aisemble.services.data.settings import DataSettings

schema = load(create(DataSettings(root=Path("data"))))


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ASGIApp]:
    root = write_shop(tmp_path_factory.mktemp("fuzz-data") / "data")
    with serving(create(DataSettings(root=root))) as app:
        yield app


def rule_beyond_json_schema(error: dict[str, object]) -> bool:
    """A rule the models check that JSON Schema cannot state: the expression language's
    syntax, one sort flag per column, distinct result columns of a group."""
    loc, message = error.get("loc") or [], str(error.get("msg"))
    last = loc[-1] if isinstance(loc, list) and loc else None
    return (
        last in ("where", "expr")
        or (last == "sort" and "flags for" in message)
        or (last == "group" and "result columns name" in message)
    )


def beyond_the_schema(response: schemathesis.Response) -> bool:
    """400: the list cannot run on the files there are (a missing file or column...), which
    the schema cannot know; or a 422 only for rules beyond JSON Schema."""
    if response.status_code == 400:
        return True
    errors = validation_errors(response)
    return (
        response.status_code == 422 and bool(errors) and all(map(rule_beyond_json_schema, errors))
    )


@schema.parametrize()
def test_data_api_agrees_with_its_schema(case: schemathesis.Case, app: ASGIApp) -> None:
    call_and_check(case, app, beyond_the_schema)
