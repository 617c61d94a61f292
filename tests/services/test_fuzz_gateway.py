"""The gateway against its own OpenAPI document, with the real services behind it in-process.

Every case carries the fuzz key (the gateway requires one); rate and
concurrency limits are off, so no answer depends on how fast the cases come.
The backends are the apps the other fuzz tests use, each started once and
reached through an httpx transport by the host name in its URL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from data_fixtures import write_shop
from fuzz_helpers import call_and_check, load, openai_error, serving, validation_errors
from starlette.types import ASGIApp
from vision_nlp_fixtures import save_tiny_vit

from aisemble.services.data.app import create as create_data
from aisemble.services.data.settings import DataSettings
from aisemble.services.gateway.app import create
from aisemble.services.gateway.settings import GatewaySettings
from aisemble.services.llm.app import create as create_llm
from aisemble.services.llm.settings import LLMSettings
from aisemble.services.llm.tinymodel import make_tiny_model
from aisemble.services.nlp.app import create as create_nlp
from aisemble.services.nlp.engine import NlpEngine
from aisemble.services.nlp.settings import NlpSettings
from aisemble.services.vision.app import create as create_vision
from aisemble.services.vision.settings import VisionSettings

KEY = "sk-fuzz-3f9c2a7e5b1d4c8a9e0f6b2d7c1a5e3f"
AUTH = {"Authorization": f"Bearer {KEY}"}


def settings(jobs_db: Path) -> GatewaySettings:
    return GatewaySettings(
        api_keys=f"fuzz:{KEY}",
        rate_limit_rpm=0,
        max_concurrent_per_key=0,
        llm_url="http://llm",
        vision_url="http://vision",
        nlp_url="http://nlp",
        data_url="http://data",
        jobs_db=str(jobs_db),
    )


schema = load(create(settings(Path("jobs.db"))), headers=AUTH)


class Backends(httpx.AsyncBaseTransport):
    """Each request to the app its host names."""

    def __init__(self, apps: dict[str, ASGIApp]) -> None:
        self.transports = {name: httpx.ASGITransport(app=app) for name, app in apps.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.transports[request.url.host].handle_async_request(request)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ASGIApp]:
    tmp = tmp_path_factory.mktemp("fuzz-gateway")
    nlp = NlpEngine(NlpSettings())
    nlp.load()
    services: dict[str, Any] = {
        "llm": create_llm(
            LLMSettings(
                model_path=make_tiny_model(tmp / "tiny"),
                # The gateway's default max_tokens, so its own default is served.
                max_new_tokens_limit=128,
                batch_window_ms=0,
            )
        ),
        "vision": create_vision(
            VisionSettings(model_path=str(save_tiny_vit(tmp / "vit", {0: "cat", 1: "dog"})))
        ),
        "nlp": create_nlp(NlpSettings(), nlp),
        "data": create_data(DataSettings(root=write_shop(tmp / "data"))),
    }
    with ExitStack() as stack:
        apps = {name: stack.enter_context(serving(s)) for name, s in services.items()}
        gateway = create(settings(tmp / "jobs.db"), transport=Backends(apps))
        yield stack.enter_context(serving(gateway))


# What the LLM's 400 names when a request is beyond its deployment's limits: its token
# limit and queue (its own document states them, the gateway's is written without asking it),
# or the model's context (counted in tokens, which no schema can count).
LLM_LIMITS = ("max_tokens", "max_completion_tokens", "prompt", "messages")
# What the vision engine says of bytes it cannot read as a picture (as in test_fuzz_vision).
NOT_A_PICTURE = (
    "the image is empty",
    "the data is not an image",
    "the image header",
    "the image data",
)


def beyond_the_llms_limits(response: schemathesis.Response) -> bool:
    error = openai_error(response)
    return response.status_code == 400 and (
        error.get("code") == "context_length_exceeded" or error.get("param") in LLM_LIMITS
    )


def not_a_picture(response: schemathesis.Response) -> bool:
    """A schema can say "base64", not "a picture" (as in test_fuzz_vision)."""
    errors = validation_errors(response)
    return bool(errors) and all(
        e.get("loc") == ["body", "image"] and str(e.get("msg")).startswith(NOT_A_PICTURE)
        for e in errors
    )


def beyond_the_data(response: schemathesis.Response) -> bool:
    """As in test_fuzz_data: 400, the list cannot run on the files there are; or a 422 for
    a rule JSON Schema cannot state (the expression language...), or beyond the processor's
    preview limit, which its document states and the gateway's cannot know."""
    if response.status_code == 400:
        return True
    errors = validation_errors(response)
    return bool(errors) and all(_data_rule(e) for e in errors)


def _data_rule(error: dict[str, Any]) -> bool:
    loc, message = error.get("loc") or [], str(error.get("msg"))
    last = loc[-1] if isinstance(loc, list) and loc else None
    return (
        last in ("where", "expr", "preview_rows")
        or (last == "sort" and "flags for" in message)
        or (last == "group" and "result columns name" in message)
    )


def beyond_the_workflow(response: schemathesis.Response) -> bool:
    """A step the service it calls refused: a step's input is that service's body only once
    the earlier steps' outputs are put in for its references (of any type, anywhere in it),
    so the workflow's document cannot state it; the step's service checks it when it runs.
    Or a 422 for what JSON Schema cannot say of a list: that its items' names are unique,
    and that a reference names an earlier item."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return False
    if isinstance(detail, dict):
        return 400 <= response.status_code < 500 and "step" in detail
    errors = validation_errors(response)
    return (
        response.status_code == 422
        and bool(errors)
        and all(
            e.get("loc") == ["body"]
            and (
                "duplicate step name" in str(e.get("msg")) or "refers to step" in str(e.get("msg"))
            )
            for e in errors
        )
    )


def not_the_nlp_models_dimensions(response: schemathesis.Response) -> bool:
    """As in test_fuzz_nlp: the NLP model's dimensions are known once it is loaded."""
    return response.status_code == 422 and openai_error(response).get("param") == "dimensions"


BEYOND_SCHEMA = {
    "/ai/llm/completion": beyond_the_llms_limits,
    "/v1/completions": beyond_the_llms_limits,
    "/v1/chat/completions": beyond_the_llms_limits,
    "/ai/vision/analyze": lambda response: response.status_code == 422 and not_a_picture(response),
    "/data/process": beyond_the_data,
    "/workflows": beyond_the_workflow,
    "/v1/embeddings": not_the_nlp_models_dimensions,
}


def beyond_the_schema(response: schemathesis.Response) -> bool:
    """The refusals of valid input the gateway's document cannot state, by route: those of
    the services behind it that their own fuzz tests allow, and a workflow's failed step."""
    check = BEYOND_SCHEMA.get(urlsplit(str(response.request.url)).path)
    return check is not None and check(response)


@schema.parametrize()
def test_gateway_api_agrees_with_its_schema(case: schemathesis.Case, app: ASGIApp) -> None:
    call_and_check(case, app, beyond_the_schema, headers=AUTH)
