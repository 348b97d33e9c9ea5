"""Request and response bodies of the OpenAI-compatible API, as pydantic models.

Requests are checked in two stages: these models check shapes and types (strictly: `"5"` is not an integer, an
unknown field is refused, as OpenAI refuses it), then `paradec.server.requests` and the engine check values
(ranges, context length, model and method names). Fields that OpenAI defines but paradec cannot honour are accepted
at their neutral value only (no logprobs, no penalties, `best_of=1`), so that clients which send defaults explicitly
keep working. `n` (1..16) asks for that many choices: samples of the prompt, decoded together.

Non-standard fields: `method`, `method_options`, `top_k` and `min_p` in requests; `paradec` (the generation's
stats: τ, steps, acceptance by position, timings) in responses and in the last chunk of a stream.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_serializer

from paradec.metrics import GenerationStats

# --- requests -----------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False  # send one more chunk, with `usage` and no choices, before [DONE]


class GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # the served model's name; None = the served model
    max_tokens: int | None = None
    temperature: float = 1.0  # OpenAI's default; 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1  # choices (samples of the prompt), 1..16: the engine checks the range
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    method: str | None = None  # decoding method (`paradec methods`); None = the server's --method
    method_options: dict[str, Any] | None = None  # options of `method`; None = its defaults (or the server's --opt)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]  # text or token ids; a list holds one prompt
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # fields a client may echo back from earlier turns (tool_calls, refusal, ...) are ignored, not refused
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # newer name of max_tokens; wins when both are given
    logprobs: bool = False
    top_logprobs: int | None = None


# names that can appear in a validation error's location (the rest are pydantic's union-member tags)
FIELD_NAMES = frozenset().union(
    *(cls.model_fields for cls in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions))
)

# --- responses ----------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ParadecStats(BaseModel):
    """What paradec adds to a response: how the generation went (see `paradec.metrics.GenerationStats`)."""

    method: str
    new_tokens: int
    steps: int  # target forwards after the prefill
    tau: float  # new tokens per step
    proposed_tokens: int
    accepted_tokens: int
    acceptance_rate: float
    acceptance_by_position: list[float]  # [i] = share of steps that accepted draft position i + 1
    queue_seconds: float  # waiting for the engine
    prefill_seconds: float
    first_token_seconds: float  # from the start of the generation (queue wait not included)
    wall_seconds: float  # the generation, queue wait not included
    tokens_per_second: float

    @classmethod
    def of(cls, stats: GenerationStats, queue_seconds: float) -> ParadecStats:
        fields = stats.to_dict()
        return cls(queue_seconds=queue_seconds, **{name: fields[name] for name in cls.model_fields if name in fields})


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or one chunk of a streamed one (OpenAI uses the same object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    paradec: ParadecStats | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    paradec: ParadecStats


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _set_fields_only(self) -> dict[str, str]:
        # a delta names only what changed: {"role": "assistant", "content": ""} first, then {"content": "..."}
        return {key: value for key, value in (("role", self.role), ("content", self.content)) if value is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    paradec: ParadecStats | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "paradec"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
