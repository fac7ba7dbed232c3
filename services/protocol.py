"""Request and response schemas of the HTTP service: OpenAI's field names, plus our `kv_*` extensions.

Only the fields we honour are declared; any other field is rejected (422 naming it) rather than
silently ignored, so a client never believes a setting took effect when it did not. Decoding is
greedy unless `temperature` > 0 is given (then multinomial sampling with `top_p` and `seed`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

# Static bound on max_tokens; the server's own cap (--max-tokens-cap) is checked by the engine.
MAX_TOKENS_LIMIT = 1_000_000
# Below these, logits / temperature overflow and the nucleus rounds to nothing: refuse them up front.
MIN_TEMPERATURE = 0.01
MIN_TOP_P = 1e-6
MAX_SEED = 2**63 - 1  # a torch.Generator seed


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Sampling(_Strict):
    """Fields shared by completions and chat completions."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=MIN_TOP_P, le=1.0)
    seed: StrictInt | None = Field(default=None, ge=0, le=MAX_SEED)
    n: StrictInt = Field(default=1, ge=1, le=1, description="one choice per request (batch size 1 per cache)")
    stream: StrictBool = False
    stop: str | list[str] | None = Field(default=None, max_length=4)
    user: str | None = None
    kv_budget: float | None = Field(
        default=None, gt=0.0, le=1.0, description="extension: KV bytes as a fraction of the full cache's"
    )
    kv_policy: str | None = Field(default=None, min_length=1, description="extension: a registered policy name")

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, 2], got {value}")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        """The stop sequences as a tuple (empty strings dropped)."""
        items = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in items if s)


class CompletionRequest(_Sampling):
    """POST /v1/completions: the raw prompt (text or token ids), no chat template."""

    prompt: str | list[StrictInt] = Field(min_length=1)
    max_tokens: StrictInt = Field(default=16, ge=1, le=MAX_TOKENS_LIMIT)


class ChatMessage(_Strict):
    """One chat turn (text content only)."""

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class StreamOptions(_Strict):
    """`stream_options`: add a final chunk with usage."""

    include_usage: StrictBool = False


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    stream_options: StreamOptions | None = None

    def token_limit(self) -> int | None:
        """`max_completion_tokens` (the newer name) or `max_tokens`; None means the server's cap."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class PlanRequest(_Strict):
    """POST /v1/plan: the plan the policy picks for a prompt, without generating."""

    model: str | None = None
    prompt: str | list[StrictInt] | None = None
    messages: list[ChatMessage] | None = None
    kv_budget: float | None = Field(default=None, gt=0.0, le=1.0)
    kv_policy: str | None = Field(default=None, min_length=1)


class ReloadRequest(_Strict):
    """POST /v1/admin/reload: re-resolve the configured policy, or switch to the one named here."""

    policy: str | None = Field(default=None, min_length=1)
    policy_uri: str | None = Field(default=None, min_length=1)


# ----------------------------------------------------------------------------- responses
class KVCacheInfo(BaseModel):
    """Extension on every response: the request's KV cache after its plan was applied."""

    full_bytes: int
    bytes: int
    ratio: float | None
    policy: str
    budget: float
    plan: dict[str, Any] | None
    final_full_bytes: int | None = None  # after decoding (the residual window grows, eviction trims)
    final_bytes: int | None = None
    note: str | None = None  # why the server's default budget was not applied, when it was not
    reused_tokens: int | None = None  # prompt tokens read from a stored compressed context (0: none reused)
    prefilled_tokens: int | None = None  # prompt tokens this request ran through the model


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    """Unix seconds, the `created` field."""
    return int(time.time())


class CompletionChoice(BaseModel):
    """One completion choice."""

    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    """Response of /v1/completions (and each streamed chunk, with a text delta)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    kv_cache: KVCacheInfo | None = None


class ChatResponseMessage(BaseModel):
    """The assistant's message."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One chat choice."""

    index: int = 0
    message: ChatResponseMessage
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    """Response of /v1/chat/completions (non-streaming)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    kv_cache: KVCacheInfo


class ChatDelta(BaseModel):
    """The increment carried by one streamed chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    """One choice of a streamed chunk."""

    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion; the last one with a choice carries kv_cache."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    kv_cache: KVCacheInfo | None = None


class ModelCard(BaseModel):
    """One entry of /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adaptive-kv"
    max_model_len: int | None = None
    kv_policy: str
    kv_budget: float


class ModelList(BaseModel):
    """Response of /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class PlanResponse(BaseModel):
    """Response of /v1/plan: the full Plan (JSON) and its predicted bytes."""

    object: Literal["kv_plan"] = "kv_plan"
    model: str
    prompt_tokens: int
    kv_cache: KVCacheInfo
    plan: dict[str, Any]


class ErrorBody(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """`{"error": {...}}`, the body of every 4xx/5xx."""

    error: ErrorBody
