"""The vision service against its own OpenAPI document, with schemathesis-generated requests.

The cases reach the real engine with a tiny ViT classifier, through both forms
the route takes (JSON with base64, and multipart uploads).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from fuzz_helpers import call_and_check, load, serving, validation_errors
from starlette.types import ASGIApp
from vision_nlp_fixtures import save_tiny_vit

from aisemble.services.vision.app import create
from aisemble.services.vision.settings import VisionSettings

schema = load(create(VisionSettings(model_path="vit")))

# What the engine says of bytes it cannot read as a picture (see VisionEngine._open).
NOT_A_PICTURE = (
    "the image is empty",
    "the data is not an image",
    "the image header",
    "the image data",
)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ASGIApp]:
    path = save_tiny_vit(tmp_path_factory.mktemp("fuzz-vision"), {0: "cat", 1: "dog"})
    with serving(create(VisionSettings(model_path=str(path)))) as app:
        yield app


def not_a_picture(response: schemathesis.Response) -> bool:
    """Bytes that are not an image Pillow reads: a schema can say "base64", not "a picture"."""
    errors = validation_errors(response)
    return (
        response.status_code == 422
        and bool(errors)
        and all(
            e.get("loc") == ["body", "image"] and str(e.get("msg")).startswith(NOT_A_PICTURE)
            for e in errors
        )
    )


@schema.parametrize()
def test_vision_api_agrees_with_its_schema(case: schemathesis.Case, app: ASGIApp) -> None:
    call_and_check(case, app, not_a_picture)
