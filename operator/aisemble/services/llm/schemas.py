"""The OpenAI-compatible request and response bodies.

They follow OpenAI's field names and shapes closely enough that the official
`openai` client works with only its base_url changed, and the gateway can
forward bodies untouched. Fields OpenAI has but this service does not
implement are declared with the values that ask for nothing more (`n` 1,
`logprobs` unset or false...), so the published schema says what is accepted
and anything else is refused rather than silently done less; the penalties
are accepted within OpenAI's range and ignored, as clients send them by
default. Other unknown fields (logit_bias, user...) are ignored.

Requests validate strictly: a JSON value is taken only as the type the schema
names (no `0` for false, no `"5"` for 5), so the schema and the validation
agree on every input.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
)

FinishReason = Literal["stop", "length"]

# Integers JSON parsers agree on (JavaScript's safe range); torch seeds with any of them.
SEED_MAX = 2**53 - 1


def _whole_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# With strict validation, makes an int field JSON Schema's integer: 3 and 3.0 (it counts
# values, not spellings), never true or "3". Bounds go before it in the Annotated, or
# pydantic writes them into the schema as `ge`/`le` instead of minimum/maximum.
WHOLE = BeforeValidator(_whole_number)
Integer = Annotated[int, WHOLE]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def _only(*allowed: Any, description: str) -> Any:
    """A field the service does not implement: the schema lists the values that ask for nothing."""
    return Field(None, description=description, json_schema_extra={"enum": [*allowed, None]})


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="End the stream with a chunk carrying usage.")


class _Sampling(_Request):
    model: str | None = Field(None, description="The served model's id; omitted means that one.")
    temperature: float | None = Field(
        None, ge=0, le=2, description="0 is greedy; higher is more random. Default 1."
    )
    top_p: float | None = Field(
        None, gt=0, le=1, description="Nucleus sampling: keep the most likely tokens of this mass."
    )
    top_k: Annotated[int, Field(ge=-1), WHOLE] | None = Field(
        None, description="Sample among the k most likely tokens only; 0, -1 or unset: among all."
    )
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, description="Accepted for compatibility and ignored."
    )
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="Accepted for compatibility and ignored."
    )
    stop: str | list[str] | None = Field(
        None, description="Text that ends generation; it is not part of the answer."
    )
    seed: Annotated[int, Field(ge=-SEED_MAX, le=SEED_MAX), WHOLE] | None = Field(
        None,
        description="The same seed and prompt give the same text. At most 2^53 - 1 either way.",
    )
    stream: bool | None = Field(False, description="Answer as server-sent events, token by token.")
    stream_options: StreamOptions | None = None
    n: Integer | None = Field(
        1,
        description="Choices per prompt; only 1 is supported.",
        json_schema_extra={"enum": [1, None]},
    )
    logprobs: bool | Integer | None = _only(
        False, 0, description="Not supported: must be unset, false or 0."
    )

    @field_validator("n")
    @classmethod
    def _only_one(cls, n: int | None) -> int:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported: send several requests for several answers")
        return 1

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        return [s for s in stops if s]

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, logprobs: bool | int | None) -> None:
        # Answering without them would look like success with data missing.
        if logprobs:
            raise ValueError("logprobs are not supported by this service")
        return None

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)] = Field(
        description="A prompt, or a list of prompts (one choice each)."
    )
    max_tokens: Annotated[int, Field(ge=1), WHOLE] | None = Field(
        None, description="Most tokens to generate per prompt. Default 16."
    )
    echo: bool | None = _only(False, description="Not supported: must be unset or false.")
    best_of: Integer | None = _only(1, description="Not supported: must be unset or 1.")
    suffix: str | None = _only("", description="Not supported: must be unset or empty.")

    @field_validator("echo", "best_of", "suffix")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> None:
        # best_of=1 is the one value that asks for nothing more; for the others, any truthy one.
        if (value != 1 if info.field_name == "best_of" else bool(value)) and value is not None:
            raise ValueError(f"{info.field_name} is not supported by this service")
        return None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: str = Field(description="system, user, assistant...")
    content: str | list[ContentPart] | None = Field(
        None, description="Text, or a list of text parts (images are not supported)."
    )

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1), WHOLE] | None = Field(
        None, description="Most tokens to generate. Default: up to the service's limit."
    )
    max_completion_tokens: Annotated[int, Field(ge=1), WHOLE] | None = Field(
        None, description="OpenAI's newer name for max_tokens; wins when both are set."
    )

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler: Any) -> dict[str, Any]:
        # A delta carries only what changed, as OpenAI's do: {"content": "..."}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
