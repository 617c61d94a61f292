"""The gateway's own request and answer models, and the services' bodies with `async`.

The services' models come from their light pydantic modules (no engine is
imported), the same they validate with: the gateway publishes them, and checks
a body against them before it takes a job, so what its document admits the
service takes too.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from aisemble.services.data.schemas import ProcessRequest
from aisemble.services.llm.schemas import SEED_MAX, WHOLE
from aisemble.services.nlp.schemas import VISIBLE
from aisemble.services.nlp.schemas import AnalyzeRequest as NlpAnalyzeRequest
from aisemble.services.vision.schemas import AnalyzeJson


class LLMCompletion(BaseModel):
    """POST /ai/llm/completion: a prompt in, text out.

    Strict, as the LLM's own models are: a JSON value only of the type the schema names
    (no `0` for false, no `"5"` for 5), and within the LLM's bounds (a seed of at most
    2^53 - 1 either way), so what the document admits the LLM takes too."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)

    prompt: str = Field(min_length=1, description="The text to continue.")
    model: str | None = Field(None, description="Model id; by default the one the LLM serves.")
    max_tokens: Annotated[int, Field(ge=1, le=8192), WHOLE] = Field(
        128, description="Most tokens to generate; the LLM may allow fewer (400 beyond)."
    )
    temperature: float = Field(0.7, ge=0, le=2, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(None, description="Text that ends the completion.")
    seed: Annotated[int, Field(ge=-SEED_MAX, le=SEED_MAX), WHOLE] | None = Field(
        None, description="Same seed, same text. At most 2^53 - 1 either way."
    )
    run_async: bool = Field(False, alias="async", description="Answer at once with a job id.")


class Detail(BaseModel):
    """The gateway's own error body (and FastAPI's): what went wrong, in words."""

    detail: str


class JobAccepted(BaseModel):
    """The answer to `"async": true`: the job, to poll at `href` (also in Location)."""

    id: str
    kind: str
    state: str
    href: str


class Async(BaseModel):
    run_async: bool = Field(
        False, alias="async", strict=True, description="Answer at once with a job id."
    )


class VisionAnalyzeRequest(AnalyzeJson, Async):
    """The vision service's JSON body, and `async`."""


class NlpAnalyze(NlpAnalyzeRequest, Async):
    """The NLP service's body, and `async`."""

    @model_validator(mode="after")
    def _texts_have_text(self) -> NlpAnalyze:
        # The service's route checks these (its schema states them); the gateway checks them
        # too before it accepts a job, so no job is taken that the service must refuse.
        for field in ("text", "texts", "labels", "reference"):
            value = getattr(self, field)
            texts = [value] if isinstance(value, str) else value
            if texts is None:
                continue
            if not texts:
                raise ValueError(f"`{field}` is empty")
            if not all(VISIBLE.search(text) for text in texts):
                raise ValueError(f"`{field}` holds a text with no visible character")
        return self


class DataProcessRequest(ProcessRequest, Async):
    """The data processor's body, and `async`."""


BODIES: dict[str, type[BaseModel]] = {
    "vision.analyze": VisionAnalyzeRequest,
    "nlp.analyze": NlpAnalyze,
    "data.process": DataProcessRequest,
}
