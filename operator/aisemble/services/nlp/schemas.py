"""Request and response bodies of the NLP API: the native routes and the OpenAI-compatible ones.

The `/v1` shapes follow OpenAI's embeddings API field for field, so the
official client works with only its base URL changed.

Requests validate strictly (a JSON value only of the type the schema names),
and what the routes check beyond types is written into the schema too
(`json_schema_extra`): a text has a visible character, a list is not empty,
`text` and `texts` exclude each other, a task that needs labels or a
reference requires them. The routes keep their own messages for those rules,
so the schema states them and the errors still say what to fix.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

Task = Literal["embedding", "sentiment", "classify", "similarity", "stats"]
SentimentLabel = Literal["positive", "negative", "neutral"]

# A text must have a character that is not whitespace: Python's whitespace (what
# str.strip removes), spelled out, as `\s` means other sets in Rust's and JSON Schema's
# regexes. The routes check texts with the same pattern the schema publishes.
WHITESPACE = "\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
VISIBLE_PATTERN = f"[^{WHITESPACE}]"
VISIBLE = re.compile(VISIBLE_PATTERN)

Text = Annotated[str, Field(json_schema_extra={"minLength": 1, "pattern": VISIBLE_PATTERN})]
Texts = Annotated[list[Text], Field(json_schema_extra={"minItems": 1})]


def _whole_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# With strict validation, JSON Schema's integer: 3 and 3.0, never true or "3".
Integer = Annotated[int, BeforeValidator(_whole_number)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True)


def _task_needs(task: str, field: str, schema: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema for "when `tasks` lists `task`, `field` is given and is `schema`"."""
    return {
        "if": {
            "required": ["tasks"],
            "properties": {"tasks": {"type": "array", "contains": {"const": task}}},
        },
        "then": {"required": [field], "properties": {field: schema}},
    }


class AnalyzeRequest(_Request):
    model_config = ConfigDict(
        json_schema_extra={
            # Exactly one of text and texts (null counts as absent).
            "oneOf": [
                {"required": ["text"], "properties": {"text": {"type": "string"}}},
                {"required": ["texts"], "properties": {"texts": {"type": "array"}}},
            ],
            "allOf": [
                _task_needs("classify", "labels", {"type": "array"}),
                _task_needs("similarity", "reference", {"type": "string"}),
            ],
        }
    )

    text: Text | None = Field(None, description="One text; or send `texts`.")
    texts: Texts | None = Field(None, description="Several texts, analysed alike.")
    tasks: list[Task] | None = Field(
        None,
        description="What to compute per text. Default: sentiment and stats, plus classify "
        "when `labels` are given and similarity when `reference` is.",
    )
    labels: Texts | None = Field(None, description="Candidate labels for `classify`.")
    reference: Text | None = Field(None, description="The text `similarity` compares against.")

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


class Message(BaseModel):
    detail: str


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


class SimilarityRequest(_Request):
    a: Text | Texts = Field(description="A text or a list of texts.")
    b: Text | Texts = Field(description="A text or a list of texts.")


class SimilarityResponse(BaseModel):
    model: str
    matrix: list[list[float]] = Field(
        description="Cosine similarity: `matrix[i][j]` compares a[i] with b[j] (a single "
        "string counts as a list of one)."
    )


class EmbeddingsRequest(_Request):
    # Clients send fields this server has no use for (e.g. `user`); OpenAI ignores them too.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    input: Text | Texts = Field(
        description="A text or a list of texts. OpenAI's token arrays are not taken: this "
        "model's tokenizer is not OpenAI's."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Integer | None = Field(
        None, description="The model's own dimensions only (384 for all-MiniLM-L6-v2)."
    )

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_arrays(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(item, int | list) for item in value):
            raise ValueError(
                "token arrays are not supported: this model's tokenizer is not OpenAI's; send text"
            )
        return value


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
