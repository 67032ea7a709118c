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
    n: int = Field(1, ge=1, le=128, description="Choices per prompt (one shared prefill).")
    user: str | None = Field(None, description="Accepted; not used for generation.")
    presence_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Subtracted once from every token generated so far."
    )
    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, description="Subtracted per occurrence in the output so far."
    )
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=100.0, description="Extension (HF's definition); 1 is off."
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias added to its logit, clamped to "
        "[-100, 100]."
    )
    min_tokens: int | None = Field(
        None, ge=0, description="Extension: EOS and stop tokens are impossible before this many."
    )


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
        {"prompt": "Once upon a time", "max_tokens": 8, "stream": True,
         "stream_options": {"include_usage": True}, "stop": ["."], "seed": 7},
    ]})

    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="A string, a list of token ids, or a list of either (batched prompts: "
        "choice i*n+j is choice j of prompt i)."
    )
    max_tokens: int | None = Field(
        None, ge=0, description="Default 16 (OpenAI's legacy default); 0 only with echo."
    )
    echo: bool = Field(False, description="Return the prompt before the completion.")
    suffix: str | None = Field(None, description="Not supported.")
    best_of: int | None = Field(
        None, ge=1, le=128, description="Generate this many, return the n with the highest "
        "cumulative logprob (not streamed)."
    )
    logprobs: int | None = Field(None, ge=0, le=20, description="Top alternatives per token.")


class TextContentPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(description="JSON text of the arguments.")


class ToolCallIn(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, description="Assistant messages only.")
    tool_call_id: str | None = Field(None, description="Tool messages: the call answered.")


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments.")
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


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
    logprobs: bool | None = Field(None, description="Return each token's logprob.")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="Alternatives per token (needs logprobs: true)."
    )
    tools: list[Tool] | None = Field(None, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="Default: auto with tools, none without."
    )
    parallel_tool_calls: bool | None = Field(None, description="Default true.")
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object or json_schema (grammar-enforced)."
    )




# -- answers -----------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


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


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class CompletionResponse(_Envelope):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
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
    tool_calls: list[ToolCallDelta] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
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
                  StreamOptions, ToolCallIn, FunctionCall, Tool, FunctionDef, NamedToolChoice,
                  NamedFunction, ResponseFormat, JsonSchemaFormat)
