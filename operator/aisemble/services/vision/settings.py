"""The vision service's settings, from `VISION_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from aisemble.services.common import env_settings


class VisionSettings(BaseModel):
    model_path: str | None = Field(
        None,
        description="Directory of a transformers image-classification model "
        "(config, weights, preprocessor config). Unset: no classification.",
    )
    model_name: str | None = Field(
        None, description="Name reported for the model; defaults to the directory's name."
    )
    device: str | None = Field(
        None, description="torch device (`cpu`, `cuda`, `cuda:1`); unset: CUDA when visible."
    )
    max_body_bytes: int = Field(20 * 2**20, gt=0, description="Larger requests get 413.")
    max_pixels: int = Field(
        64_000_000,
        gt=0,
        description="Images with more pixels are refused (422) before they are decoded, "
        "so a small file cannot expand into gigabytes (a decompression bomb).",
    )
    load_retry_after: int = Field(
        5, gt=0, description="Seconds clients are told to wait while the model loads."
    )

    @property
    def model_label(self) -> str | None:
        if self.model_name:
            return self.model_name
        return Path(self.model_path).name if self.model_path else None


def from_env() -> VisionSettings:
    return env_settings(VisionSettings, "VISION")
