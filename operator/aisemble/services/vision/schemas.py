"""Request and response bodies of the vision API, as the gateway and OpenAPI see them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class AnalyzeOptions(BaseModel):
    """What to compute besides the always-present description. Multipart sends these as fields."""

    top_k: int = Field(5, ge=1, le=1000, description="How many labels to return, best first.")
    classify: bool = Field(
        True, description="Run the classification model (when one is configured)."
    )
    colours: int = Field(5, ge=1, le=32, description="How many dominant colours to find.")


class AnalyzeJson(AnalyzeOptions):
    image: str = Field(
        min_length=1,
        description="The image file, base64-encoded; a `data:image/...;base64,` prefix is accepted.",
    )


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
