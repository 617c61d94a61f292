"""Request and response bodies of the vision API, as the gateway and OpenAPI see them."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

# What the service reads as base64 (an optional `data:...;base64,` prefix, then the alphabet
# in groups of four, padded, with line breaks and spaces anywhere), so the schema says it.
_WHITESPACE = "[ \\t\\r\\n]*"
_LETTER = f"{_WHITESPACE}[A-Za-z0-9+/]"
BASE64_PATTERN = (
    f"^(data:[^,]*;base64,)?({_LETTER * 4})*"
    f"({_LETTER * 2}{_WHITESPACE}={_WHITESPACE}=|{_LETTER * 3}{_WHITESPACE}=)?{_WHITESPACE}$"
)
BASE64_WHITESPACE = " \t\r\n"


def _base64_text(text: str) -> str:
    # The same pattern the schema publishes (its classes and anchors mean the same in
    # Python and in JSON Schema's regexes), with a message a person can act on.
    if not re.search(BASE64_PATTERN, text):
        raise ValueError("the image is not valid base64 (or a data: URL with ;base64,)")
    return text


def _whole_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# With strict validation, makes an int field JSON Schema's integer: 3 and 3.0 (it counts
# values, not spellings), never true or "3". Bounds go before it in the Annotated, or
# pydantic writes them into the schema as `ge`/`le` instead of minimum/maximum.
WHOLE = BeforeValidator(_whole_number)


class AnalyzeOptions(BaseModel):
    """What to compute besides the always-present description. Multipart sends these as fields."""

    top_k: Annotated[int, Field(ge=1, le=1000), WHOLE] = Field(
        5, description="How many labels to return, best first."
    )
    classify: bool = Field(
        True, description="Run the classification model (when one is configured)."
    )
    colours: Annotated[int, Field(ge=1, le=32), WHOLE] = Field(
        5, description="How many dominant colours to find."
    )


class AnalyzeJson(AnalyzeOptions):
    image: Annotated[str, AfterValidator(_base64_text)] = Field(
        min_length=1,
        description="The image file, base64-encoded; a `data:image/...;base64,` prefix is accepted.",
        json_schema_extra={"pattern": BASE64_PATTERN},
    )


class Message(BaseModel):
    detail: str


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="Where: `body`, then the field, e.g. top_k.")
    msg: str
    type: str


class InvalidRequest(BaseModel):
    """FastAPI's 422 body, which this route answers in too."""

    detail: list[ErrorItem]


class Colour(BaseModel):
    rgb: tuple[int, int, int]
    hex: str = Field(description="`#rrggbb`")
    fraction: float = Field(description="Share of the (visible) pixels nearest to this colour.")


class Label(BaseModel):
    label: str
    score: float = Field(description="Probability of the label under the model.")


class AnalyzeResponse(BaseModel):
    format: str | None = Field(description="Pillow's name for the file format, e.g. PNG, JPEG.")
    width: int
    height: int
    mode: str = Field(description="Pillow's pixel mode, e.g. RGB, RGBA, L, P.")
    frames: int = Field(description="Frames in the file (animations); the first is analysed.")
    exif: dict[str, Any] = Field(
        description="EXIF tags by name; GPS tags nested under `GPSInfo`. Empty when none."
    )
    dominant_colours: list[Colour] = Field(description="Most common first.")
    classification: list[Label] | None = Field(
        description="Top labels, best first; null when not asked for or no model is configured."
    )
    model: str | None = Field(description="The classification model that produced the labels.")
    note: str | None = Field(None, description="Why `classification` is null, when it is.")
