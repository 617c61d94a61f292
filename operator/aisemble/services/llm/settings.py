"""The LLM service's settings, from LLM_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from aisemble.services.common import env_settings


class LLMSettings(BaseModel):
    model_path: Path = Field(
        Path("/models/llm"), description="A transformers save_pretrained directory."
    )
    model_name: str = Field(
        "", description="The served model id clients send; default: the directory's name."
    )
    device: str | None = Field(
        None, description="cpu, cuda, cuda:1...; default: cuda when a GPU is visible, else cpu."
    )
    max_batch_size: int = Field(8, ge=1, description="Most sequences generated together.")
    batch_window_ms: float = Field(
        10, ge=0, description="How long a first request waits for others to batch with."
    )
    max_queue: int = Field(64, ge=1, description="Sequences that may wait; more get 503.")
    max_new_tokens_limit: int = Field(512, ge=1, description="Largest max_tokens accepted.")
    request_timeout_s: float = Field(
        300,
        gt=0,
        description="A request not finished after this is cancelled: 504, or an error event "
        "ending its stream.",
    )

    @model_validator(mode="after")
    def _name_from_path(self) -> LLMSettings:
        if not self.model_name:
            self.model_name = self.model_path.name or "llm"
        return self


def load_settings() -> LLMSettings:
    return env_settings(LLMSettings, "LLM")
