"""Request and response bodies of the NLP API: the native routes and the OpenAI-compatible ones.

The `/v1` shapes follow OpenAI's embeddings API field for field, so the
official client works with only its base URL changed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Task = Literal["embedding", "sentiment", "classify", "similarity", "stats"]
SentimentLabel = Literal["positive", "negative", "neutral"]


class AnalyzeRequest(BaseModel):
    text: str | None = Field(None, description="One text; or send `texts`.")
    texts: list[str] | None = Field(None, description="Several texts, analysed alike.")
    tasks: list[Task] | None = Field(
        None,
        description="What to compute per text. Default: sentiment and stats, plus classify "
        "when `labels` are given and similarity when `reference` is.",
    )
    labels: list[str] | None = Field(None, description="Candidate labels for `classify`.")
    reference: str | None = Field(None, description="The text `similarity` compares against.")

    @model_validator(mode="after")
    def _consistent(self) -> AnalyzeRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("send exactly one of `text` and `texts`")
        if self.texts is not None and not self.texts:
            raise ValueError("`texts` is empty")
        wanted = self.wanted()
        if "classify" in wanted and not self.labels:
            raise ValueError("the classify task needs `labels`")
        if "similarity" in wanted and self.reference is None:
            raise ValueError("the similarity task needs a `reference` text")
        return self

    def items(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])

    def wanted(self) -> list[Task]:
        if self.tasks is not None:
            return list(dict.fromkeys(self.tasks))
        tasks: list[Task] = ["sentiment", "stats"]
        if self.labels:
            tasks.append("classify")
        if self.reference is not None:
            tasks.append("similarity")
        return tasks


class Sentiment(BaseModel):
    label: SentimentLabel
    score: float = Field(description="Probability of the label.")
    method: Literal["model", "anchors"] = Field(
        description="`model`: the configured classifier. `anchors`: a heuristic, the nearest "
        "of positive/negative/neutral example sentences in embedding space."
    )


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="Cosine similarity of the text and the label (-1..1).")


class Language(BaseModel):
    code: str = Field(description="ISO 639-1 code, or `und` when undetermined.")
    name: str
    script: str | None = Field(description="Dominant script of the letters, e.g. Latin, Han.")
    confidence: float = Field(description="0..1: script share x clarity x amount of evidence.")


class Stats(BaseModel):
    characters: int = Field(description="Unicode code points.")
    words: int = Field(description="Approximate for scripts written without spaces.")
    sentences: int
    tokens: int = Field(description="Tokens by the model's tokenizer, without special tokens.")
    language: Language


class TextAnalysis(BaseModel):
    index: int
    embedding: list[float] | None = None
    sentiment: Sentiment | None = None
    classification: list[LabelScore] | None = Field(None, description="All labels, best first.")
    similarity: float | None = Field(None, description="Cosine similarity to `reference`.")
    stats: Stats | None = None


class AnalyzeResponse(BaseModel):
    model: str
    tasks: list[Task]
    results: list[TextAnalysis] = Field(description="One per text, in the order sent.")


class SimilarityRequest(BaseModel):
    a: str | list[str]
    b: str | list[str]


class SimilarityResponse(BaseModel):
    model: str
    matrix: list[list[float]] = Field(
        description="Cosine similarity: `matrix[i][j]` compares a[i] with b[j] (a single "
        "string counts as a list of one)."
    )


class EmbeddingsRequest(BaseModel):
    # Clients send fields this server has no use for (e.g. `user`); OpenAI ignores them too.
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(
        description="Floats, or with encoding_format=base64 the little-endian float32 bytes."
    )


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage
