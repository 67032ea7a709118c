"""Pydantic models of the OpenAI requests we accept and the answers we document.

Requests are validated against these models (strict types, unknown fields ignored). Answers
are built as plain dicts in the handlers for speed; the response models here describe them in
the OpenAPI document, and the schema tests check that every answer conforms.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.http.limits import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS


class _Strict(BaseModel):
    # strict: "5" is not an int and 1 is not a bool, as in OpenAI's API; unknown fields are
    # ignored so newer SDKs that send extra fields keep working.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = Field(
        False, description="Send a final chunk with `usage` and no choices."
    )


class SamplingFields(_Strict):
    """Fields shared by both generation endpoints."""

    model: str | None = Field(None, description="Served model name; omitted means the only one.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="Extension: -1 or 0 disables top-k.")
    seed: int | None = Field(None, description="Same seed and request give the same tokens.")
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} stop strings of at most "
        f"{MAX_STOP_STRING_CHARS} characters each."
    )
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description=f"Extension: up to {MAX_STOP_TOKEN_IDS} token ids that end generation."
    )
    ignore_eos: bool = Field(False, description="Extension: keep generating past end-of-sequence.")
    n: int = Field(1, ge=1, description="Only 1 is supported.")
    user: str | None = None
    # Accepted so that clients sending their defaults keep working; other values are refused.
    presence_penalty: float | None = Field(None, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(None, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported (empty only).")


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
        {"prompt": "Once upon a time", "max_tokens": 8, "stream": True,
         "stream_options": {"include_usage": True}, "stop": ["."], "seed": 7},
    ]})

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="A string or a list of token ids (one prompt per request)."
    )
    max_tokens: int | None = Field(None, ge=1, description="Default 16 (OpenAI's legacy default).")
    echo: bool = Field(False, description="Not supported.")
    suffix: str | None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, ge=1, description="Only 1 is supported.")
    logprobs: int | None = Field(None, ge=0, description="Not supported.")


class TextContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "Hello!"}], "max_completion_tokens": 8},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hello!"}],
         "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}},
    ]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of the next field.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Default: all the context the prompt leaves."
    )
    logprobs: bool | None = Field(None, description="Not supported.")
    top_logprobs: int | None = Field(None, ge=0, description="Not supported.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported.")
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'}.")




# -- answers -----------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV came from the prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class _Envelope(BaseModel):
    """The fields every completion answer and streamed chunk shares."""

    id: str
    created: int
    model: str
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(_Envelope):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunk(_Envelope):
    """One `data:` event of a streamed completion (`choices` is empty in the usage event)."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Envelope):
    """One `data:` event of a streamed chat completion (`choices` is empty in the usage event)."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatStreamChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, ChatMessage, TextContentPart,
                  StreamOptions)
