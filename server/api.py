"""FastAPI app: OpenAI-compatible routes, auth, health, metrics, SSE streaming, drain.

The app never touches torch. It tokenizes on the event loop with `engine.tokenizer`, hands token
ids to `engine.add_request` and relays the engine's `RequestOutput` increments, either as one JSON
body or as OpenAI-style server-sent events. The engine is created in the background after the
socket is serving (importing `server.engine` pulls in torch), so `/health` answers from the first
moment; `/v1/*` answers 503 until the engine reports `ready`.

Every error a client can cause is a 4xx with OpenAI's `{"error": {message, type, param, code}}`
body; FastAPI's 422 validation answer is replaced by that shape with status 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import __version__
from server.config import ServerConfig
from server.health import (
    DRAINING,
    FAILED,
    READY,
    RETRY_AFTER_UNAVAILABLE,
    Lifecycle,
    graphs_body,
    not_ready_message,
)
from server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from server.metrics import ServerMetrics
from server.request import (
    EngineNotReadyError,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
)

logger = logging.getLogger("graphserve.api")

DEFAULT_ENGINE_CLASS = "server.engine:AsyncEngine"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default
RETRY_AFTER_QUEUE_FULL = "1"
ENGINE_SHUTDOWN_TIMEOUT = 15.0  # seconds we wait for engine.shutdown() before giving up on it
V1_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


# ============================================================================ errors
class ApiError(Exception):
    """An error answer in OpenAI's shape; raised anywhere in a request's handling."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> Response:
        return JSONBody(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None  # noqa: A002
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _dumps(obj: Any) -> bytes:
    # ensure_ascii: client-supplied strings may hold lone surrogates (legal in JSON escapes,
    # not encodable as UTF-8); escaping keeps every answer encodable. allow_nan=False: strict JSON.
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class JSONBody(JSONResponse):
    """JSONResponse that can encode any string the client sent (see `_dumps`)."""

    def render(self, content: Any) -> bytes:
        return _dumps(content)


# ============================================================================ schema
class _Strict(BaseModel):
    # strict: "5" is not an int and 1 is not a bool, as in OpenAI's API; unknown fields are
    # ignored so newer SDKs that send extra fields keep working.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = Field(
        False, description="Send a final chunk with `usage` and no choices."
    )


class _SamplingFields(_Strict):
    """Fields shared by both generation endpoints."""

    model: str | None = Field(None, description="Served model name; omitted means the only one.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="Extension: -1 or 0 disables top-k.")
    seed: int | None = Field(None, description="Same seed and request give the same tokens.")
    stop: str | list[str] | None = Field(None, description="Up to any number of stop strings.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Extension: token ids that end generation."
    )
    ignore_eos: bool = Field(False, description="Extension: keep generating past end-of-sequence.")
    n: int = Field(1, ge=1, description="Only 1 is supported.")
    user: str | None = None
    # Accepted so that clients sending their defaults keep working; other values are refused.
    presence_penalty: float | None = Field(None, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(None, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported (empty only).")


class CompletionRequest(_SamplingFields):
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


class ChatCompletionRequest(_SamplingFields):
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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Invalid request",
        401: "Missing or wrong API key",
        404: "Unknown model",
        429: "Queue full; retry after `Retry-After` seconds",
        500: "Engine fault while generating",
        503: "Not ready (starting, draining or failed); see `Retry-After`",
    }
    return {c: {"model": ErrorResponse, "description": text[c]} for c in codes}


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionChunk(BaseModel):
    """One `data:` event of a streamed completion (`choices` is empty in the usage event)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion (`choices` is empty in the usage event)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# Placeholder: _customize_openapi replaces it with the per-event schema of each endpoint.
_STREAM_DOC = {"text/event-stream": {}}
_STREAM_CHUNKS = {"/v1/completions": CompletionChunk,
                  "/v1/chat/completions": ChatCompletionChunk}


def _sse_event_schema(chunk: str) -> dict[str, Any]:
    """OpenAPI 3.1 schema of one SSE event: `data` is a JSON chunk, an error, or `[DONE]`."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"const": "message"},
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "then": {},
                "else": {"contentMediaType": "application/json", "contentSchema": payload},
            },
        },
    }


# ============================================================================ generation
class Generation:
    """One admitted request: relays the engine stream, records metrics, aborts when abandoned."""

    def __init__(
        self,
        state: ServerState,
        request_id: str,
        prompt_ids: list[int],
        stream: Any,
        arrival: float,
    ):
        self.state = state
        self.request_id = request_id
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.finished = False
        self.abort_cause: str | None = None
        self._stream = stream
        self._arrival = arrival
        self._engine = state.engine  # kept: state.engine is cleared at shutdown

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The engine's increments; ends after the one with `finished=True`."""
        metrics = self.state.metrics
        last_token_at: float | None = None
        async for out in self._stream:
            n = len(out.token_ids)
            if n:
                now = time.perf_counter()
                if last_token_at is None:
                    metrics.ttft.observe(now - self._arrival)
                else:
                    per_token = (now - last_token_at) / n
                    for _ in range(n):
                        metrics.itl.observe(per_token)
                last_token_at = now
                self.completion_tokens += n
                metrics.generation_tokens.inc(n)
            if out.finished:
                self.completion_tokens = max(self.completion_tokens, out.completion_tokens or 0)
                self.finish_reason = out.finish_reason or "stop"
                self.error = out.error
                self.finished = True
                metrics.duration.observe(time.perf_counter() - self._arrival)
            yield out
            if self.finished:
                return
        if not self.finished:
            # The contract says the last increment is finished; a stream that just stops is an
            # engine fault, reported like one rather than passed off as a normal end.
            self.finished = True
            self.finish_reason = "error"
            self.error = "the engine ended the request's stream without a final output"
            logger.error("request %s: %s", self.request_id, self.error)
            yield RequestOutput(self.request_id, finished=True, finish_reason="error",
                                error=self.error)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def abort(self, cause: str) -> None:
        """Ask the engine to free this request's slot (idempotent)."""
        if self.finished or self.abort_cause is not None:
            return
        self.abort_cause = cause
        self.state.metrics.aborted.labels(cause).inc()
        logger.info("aborting request %s (%s)", self.request_id, cause)
        try:
            self._engine.abort(self.request_id)
        except Exception:
            logger.exception("engine.abort(%s) failed", self.request_id)

    def close(self) -> None:
        """End of the HTTP exchange: abort if the engine is still working on it, deregister."""
        if not self.finished:
            self.abort("client_disconnect")
        self.state.release(self.request_id)

    def failure(self) -> ApiError | None:
        """The error to answer with if the request ended badly (engine fault or abort)."""
        if self.finish_reason == "error":
            return ApiError(500, f"generation failed: {self.error or 'engine error'}",
                            type="server_error", code="engine_error")
        if self.finish_reason == "abort":
            if self.abort_cause == "drain":
                return ApiError(503, "request aborted: the server is shutting down",
                                type="service_unavailable_error", code="draining",
                                headers={"Retry-After": RETRY_AFTER_UNAVAILABLE})
            return ApiError(500, "request aborted by the engine",
                            type="server_error", code="aborted")
        return None


# ============================================================================ state
class ServerState:
    """Everything the routes share: config, lifecycle, metrics, the engine, in-flight requests."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        lifecycle: Lifecycle | None = None,
        engine_factory: Callable[..., Any] | None = None,
        engine_class: str = DEFAULT_ENGINE_CLASS,
        on_exit: Callable[[int], None] | None = None,
    ):
        self.config = config
        self.lifecycle = lifecycle or Lifecycle()
        self.metrics = ServerMetrics(self.lifecycle, lambda: self.engine)
        self.engine: Any = None
        self.inflight: dict[str, Generation] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._engine_factory = engine_factory
        self._engine_class = engine_class
        self._on_exit = on_exit
        self._boot_task: asyncio.Task | None = None
        self._exit_handle: asyncio.TimerHandle | None = None
        self._was_ready = False
        self._api_key = config.api_key.encode() if config.api_key else None

    # ------------------------------------------------------------- lifecycle
    async def startup(self) -> None:
        """Called from the app's lifespan: returns at once, the engine boots in the background."""
        loop = asyncio.get_running_loop()
        self.lifecycle.bind_loop(loop)
        self.lifecycle.add_listener(self._on_phase_change)
        self._boot_task = loop.create_task(self._boot(), name="graphserve-engine-boot")

    async def _boot(self) -> None:
        try:
            factory = self._engine_factory
            if factory is None:
                # Off the event loop: importing the engine module may import torch (seconds of
                # CPU), and /health must keep answering meanwhile.
                factory = await _in_thread(_resolve, self._engine_class)
            if self.lifecycle.phase in (DRAINING, FAILED):
                return
            engine = factory(self.config.engine, on_phase=self._on_engine_phase)
            self.engine = engine
            engine.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("engine failed to start")
            self.lifecycle.fail(f"engine failed to start: {type(exc).__name__}: {exc}")

    def _on_engine_phase(self, phase: str, detail: Any = None) -> None:
        # Called on the engine thread.
        self.lifecycle.set_phase(phase, None if detail is None else str(detail))

    def _on_phase_change(self, phase: str, detail: str | None) -> None:
        # Called on the event loop.
        if phase == READY:
            self._was_ready = True
        if phase == FAILED and self._exit_handle is None:
            grace = self.config.startup_failure_grace
            logger.error(
                "engine failed: %s; exiting in %.1fs (readiness reports the reason until then)",
                detail, grace,
            )
            loop = asyncio.get_running_loop()
            self._exit_handle = loop.call_later(grace, self.request_exit, 1)

    def request_exit(self, code: int) -> None:
        if self._on_exit is not None:
            self._on_exit(code)
        else:
            logger.warning("exit with code %d requested, but no exit hook is installed", code)

    async def shutdown(self) -> None:
        """Lifespan shutdown: stop the boot task and the engine thread (bounded wait)."""
        if self._boot_task is not None and not self._boot_task.done():
            self._boot_task.cancel()
            with contextlib.suppress(BaseException):
                await self._boot_task
        if self._exit_handle is not None:
            self._exit_handle.cancel()
        for gen in list(self.inflight.values()):
            gen.abort("shutdown")
        engine, self.engine = self.engine, None
        if engine is None:
            return
        # An engine that never got ready holds no requests: waiting for its thread to finish
        # loading a model (minutes, on a big GPU model) would only delay the exit.
        timeout = ENGINE_SHUTDOWN_TIMEOUT if self._was_ready else 2.0
        try:
            await asyncio.wait_for(_in_thread(engine.shutdown), timeout)
            logger.info("engine shut down")
        except asyncio.TimeoutError:
            if self._was_ready:
                logger.error("engine.shutdown() did not return within %.0fs", timeout)
            else:
                logger.info("engine still starting; exiting without waiting for it")
        except Exception:
            logger.exception("engine.shutdown() failed")

    async def drain(self, timeout: float) -> None:
        """SIGTERM: refuse new work at once, let in-flight requests finish for up to `timeout`
        seconds, then abort the rest and give their handlers a moment to answer."""
        self.lifecycle.set_phase(DRAINING, "shutdown requested")
        stop_accepting = getattr(self.engine, "stop_accepting", None)
        if callable(stop_accepting):
            stop_accepting()
        if self.inflight:
            logger.info("draining %d in-flight request(s), up to %.1fs",
                        len(self.inflight), timeout)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        if self.inflight:
            logger.warning(
                "drain timeout (%.1fs): aborting %d request(s)", timeout, len(self.inflight)
            )
            for gen in list(self.inflight.values()):
                gen.abort("drain")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 5.0)
        logger.info("drain complete")

    # ------------------------------------------------------------- requests
    def gate(self, headers: list[tuple[bytes, bytes]]) -> ApiError | None:
        """Auth first (nothing leaks to a caller without the key), then readiness."""
        if self._api_key is not None:
            supplied = b""
            for name, value in headers:
                if name == b"authorization":
                    scheme, _, token = value.partition(b" ")
                    if scheme.lower() == b"bearer":
                        supplied = token.strip()
                    break
            if not hmac.compare_digest(supplied, self._api_key):
                return ApiError(
                    401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                    type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return self.not_ready_error()

    def not_ready_error(self) -> ApiError | None:
        phase = self.lifecycle.phase
        if phase == READY and self.engine is not None:
            return None
        return ApiError(503, not_ready_message(phase, self.lifecycle.detail),
                        type="service_unavailable_error", code=phase,
                        headers={"Retry-After": RETRY_AFTER_UNAVAILABLE})

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               arrival: float) -> Generation:
        err = self.not_ready_error()  # SIGTERM may have come while the body was read
        if err is not None:
            raise err
        try:
            stream = self.engine.add_request(request_id, prompt_ids, params)
        except InvalidRequestError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        except QueueFullError as exc:
            raise ApiError(
                429, f"The server is at capacity, retry later ({exc})".replace(" ()", ""),
                type="rate_limit_error", code="queue_full",
                headers={"Retry-After": RETRY_AFTER_QUEUE_FULL},
            ) from None
        except EngineNotReadyError as exc:
            raise ApiError(503, f"The engine is not accepting requests: {exc}",
                           type="service_unavailable_error", code="engine_not_ready",
                           headers={"Retry-After": RETRY_AFTER_UNAVAILABLE}) from None
        gen = Generation(self, request_id, prompt_ids, stream, arrival)
        self.inflight[request_id] = gen
        self._idle.clear()
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        return gen

    def release(self, request_id: str) -> None:
        self.inflight.pop(request_id, None)
        if not self.inflight:
            self._idle.set()


def _in_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future:
    """Run `fn(*args)` on a fresh daemon thread; await the result on the loop.

    Not `asyncio.to_thread`: its executor cannot start during interpreter shutdown (a lifespan
    stopped from an atexit hook), and its non-daemon workers would keep a stuck call alive.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    def run() -> None:
        try:
            result = (True, fn(*args))
        except BaseException as exc:  # handed to the awaiting coroutine
            result = (False, exc)
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle, *result)

    threading.Thread(target=run, name=f"graphserve-{getattr(fn, '__name__', 'call')}",
                     daemon=True).start()
    return future


def _resolve(spec: str) -> Any:
    """'package.module:Name' -> the object (used for the engine class)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"engine class must look like 'module:Name', got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)


# ============================================================================ prompt handling
def _check_text(value: str, param: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{param} is not valid Unicode (lone surrogate)", param=param) from None


def _encode(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    except Exception as exc:  # text the tokenizer cannot take is the client's problem
        logger.info("tokenizer rejected the input: %s", exc)
        raise ApiError(400, f"The text could not be tokenized: {exc}") from None


def _vocab_size(engine: Any) -> int | None:
    size = getattr(engine, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    try:
        return len(engine.tokenizer)
    except TypeError:
        return None


def _completion_prompt(engine: Any, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(
                400, f"Batched prompts are not supported ({len(prompt)} prompts given); "
                "send one request per prompt.", param="prompt", code="batch_not_supported",
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        _check_text(prompt, "prompt")
        ids = _encode(engine.tokenizer, prompt, add_special_tokens=True)
        if not ids:
            bos = getattr(engine.tokenizer, "bos_token_id", None)
            if not isinstance(bos, int):
                raise ApiError(400, "prompt is empty", param="prompt")
            ids = [bos]
        return ids
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    vocab = _vocab_size(engine)
    if vocab is not None:
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})",
                           param="prompt")
    return list(prompt)


def _chat_prompt(engine: Any, messages: list[ChatMessage]) -> list[int]:
    conversation = []
    for i, msg in enumerate(messages):
        if isinstance(msg.content, list):
            content = "\n".join(part.text for part in msg.content)
        elif msg.content is None:
            if msg.role != "assistant":
                raise ApiError(400, f"messages.{i}.content is required for role {msg.role!r}",
                               param=f"messages.{i}.content")
            content = ""
        else:
            content = msg.content
        _check_text(content, f"messages.{i}.content")
        # Most chat templates know 'system' but not OpenAI's newer 'developer' role.
        entry = {"role": "system" if msg.role == "developer" else msg.role, "content": content}
        if msg.name is not None:
            _check_text(msg.name, f"messages.{i}.name")
            entry["name"] = msg.name
        conversation.append(entry)
    tokenizer = engine.tokenizer
    try:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:
        # Templates reject conversations they cannot render (e.g. roles not alternating).
        logger.info("chat template rejected the conversation: %s", exc)
        raise ApiError(400, f"The model's chat template rejected the messages: {exc}",
                       param="messages") from None
    # The rendered template already holds any BOS token; adding special tokens would double it.
    return _encode(tokenizer, text, add_special_tokens=False)


def _refuse_unsupported(body: _SamplingFields) -> None:
    def refuse(param: str, message: str) -> None:
        raise ApiError(400, message, param=param, code="unsupported_parameter")

    if body.n != 1:
        refuse("n", "n > 1 is not supported: send one request per choice.")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0.0):
            refuse(name, f"{name} is not supported (only 0).")
    if body.logit_bias:
        refuse("logit_bias", "logit_bias is not supported.")
    if body.stream_options is not None and not body.stream:
        refuse("stream_options", "stream_options is only allowed when stream is true.")
    if isinstance(body, CompletionRequest):
        if body.echo:
            refuse("echo", "echo is not supported.")
        if body.suffix:
            refuse("suffix", "suffix is not supported.")
        if body.best_of not in (None, 1):
            refuse("best_of", "best_of > 1 is not supported.")
        if body.logprobs is not None:
            refuse("logprobs", "logprobs are not supported.")
    if isinstance(body, ChatCompletionRequest):
        if body.logprobs or body.top_logprobs:
            refuse("logprobs", "logprobs are not supported.")
        if body.tools:
            refuse("tools", "tools are not supported.")
        if body.response_format not in (None, {"type": "text"}):
            refuse("response_format", "response_format other than {'type': 'text'} is not "
                   "supported.")


def _sampling_params(body: _SamplingFields, max_tokens: int) -> SamplingParams:
    stop = body.stop if isinstance(body.stop, list) else ([body.stop] if body.stop else [])
    for s in stop:
        _check_text(s, "stop")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        seed=body.seed,
        stop=stop,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
    )
    try:
        params.validate()
    except InvalidRequestError as exc:
        raise ApiError(400, str(exc), param=exc.param) from None
    return params


def _max_tokens(requested: int | None, default: int | None, prompt_len: int, max_len: int,
                param: str, prompt_param: str) -> int:
    """The generation budget: explicit values must fit the context; defaults are clipped to it."""
    room = max_len - prompt_len
    if room < 1:
        raise ApiError(
            400, f"The prompt is {prompt_len} tokens; this model's context is {max_len} tokens, "
            "which leaves no room to generate.", param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise ApiError(
            400, f"{param}={requested} plus the {prompt_len}-token prompt exceeds the model's "
            f"{max_len}-token context (at most {room} new tokens fit).",
            param=param, code="context_length_exceeded",
        )
    return requested


# ============================================================================ responses
class EventStreamResponse(StreamingResponse):
    """Server-sent events with disconnect detection that does not wait for the next chunk.

    A queued request produces nothing for a while; watching `receive()` for `http.disconnect`
    alongside the sender frees its engine slot as soon as the client goes away.
    """

    def __init__(self, events: AsyncIterator[bytes], generation: Generation, request_id: str):
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                     "X-Request-Id": request_id},
        )
        self._events = events
        self._generation = generation

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for chunk in self._events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pump_task = asyncio.ensure_future(pump())
        watch_task = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            client_gone = not pump_task.done()
            for task in (pump_task, watch_task):
                task.cancel()
            results = await asyncio.gather(pump_task, watch_task, return_exceptions=True)
            if isinstance(results[0], OSError):  # ASGI >= 2.4 servers raise on a closed socket
                client_gone = True
            if client_gone:
                self._generation.abort("client_disconnect")
            with contextlib.suppress(Exception):
                await self._events.aclose()  # type: ignore[attr-defined]
            self._generation.close()
        if isinstance(results[0], Exception) and not isinstance(results[0], OSError):
            raise results[0]


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


_SSE_DONE = b"data: [DONE]\n\n"
_TEXT_MARK = "\x00graphserve-text\x00"


def _sse_text_template(base: dict[str, Any], chat: bool) -> tuple[bytes, bytes]:
    """The bytes before and after the JSON string of a token's text in a streamed chunk.

    Rendered from the same dict a full chunk is, with a marker as the text, so a template chunk
    and `_sse({**base, "choices": [choice]})` are byte-identical for the same text.
    """
    if chat:
        choice = {"index": 0, "delta": {"content": _TEXT_MARK}, "logprobs": None,
                  "finish_reason": None}
    else:
        choice = {"index": 0, "text": _TEXT_MARK, "logprobs": None, "finish_reason": None}
    rendered = _sse({**base, "choices": [choice]})
    prefix, suffix = rendered.split(_dumps(_TEXT_MARK), 1)
    return prefix, suffix


async def _stream_events(gen: Generation, chat: bool, request_id: str, model: str,
                         include_usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())
    base: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
    }
    if include_usage:
        base["usage"] = None  # OpenAI sends "usage": null on every chunk but the last

    def chunk(choice: dict[str, Any]) -> bytes:
        return _sse({**base, "choices": [choice]})

    # The chunk of an ordinary token differs from the next only in its text: serialise the
    # rest once. Per-token JSON of the whole chunk was ~6 of the event loop's ~30 µs per token,
    # which bounds a small model's throughput at high concurrency.
    text_prefix, text_suffix = _sse_text_template(base, chat)

    try:
        if chat:
            yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None})
        async for out in gen.outputs():
            final = out.finished and out.finish_reason in ("stop", "length")
            if chat:
                if out.text:
                    yield text_prefix + _dumps(out.text) + text_suffix
                if final:
                    yield chunk({"index": 0, "delta": {}, "logprobs": None,
                                 "finish_reason": out.finish_reason})
            elif final:
                yield chunk({"index": 0, "text": out.text, "logprobs": None,
                             "finish_reason": out.finish_reason})
            elif out.text:
                yield text_prefix + _dumps(out.text) + text_suffix
        failure = gen.failure()
        if failure is not None:
            logger.warning("request %s ended with an error: %s", request_id, failure.message)
            yield _sse(failure.body())
        elif include_usage:
            yield _sse({**base, "choices": [], "usage": gen.usage()})
    except Exception as exc:
        # A bug here must not cut the stream mid-way without a word: tell the client, then end.
        logger.exception("request %s: stream failed", request_id)
        yield _sse(error_body(f"internal error while streaming: {exc}", "server_error",
                              code="internal_error"))
    yield _SSE_DONE


async def _collect(gen: Generation) -> str:
    parts = [out.text async for out in gen.outputs() if out.text]
    failure = gen.failure()
    if failure is not None:
        raise failure
    return "".join(parts)


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _ClientGone(Exception):
    pass


async def _collect_or_disconnect(request: Request, gen: Generation) -> str:
    """Collect a non-streaming answer, aborting the engine request if the client leaves first."""
    work = asyncio.ensure_future(_collect(gen))
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        gen.abort("client_disconnect")
        raise _ClientGone
    finally:
        for task in (work, watcher):
            task.cancel()
        await asyncio.gather(work, watcher, return_exceptions=True)
        gen.close()


# ============================================================================ middleware
class _V1Middleware:
    """For `/v1/*`: stamps arrival, enforces auth and readiness, counts requests by status."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["arrival"] = time.perf_counter()
        path = scope["path"].rstrip("/")
        endpoint = path if path in V1_ENDPOINTS else "other"
        status: list[int] = []

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        code = "499"  # nothing sent: the client went away (or the server is force-exiting)
        try:
            err = self.state.gate(scope["headers"])
            if err is not None:
                await err.response()(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        except Exception:
            code = "500"
            raise
        finally:
            if status:
                code = str(status[0])
            self.state.metrics.requests.labels(endpoint, code).inc()


# ============================================================================ app
def create_app(
    config: ServerConfig | None = None,
    *,
    engine_factory: Callable[..., Any] | None = None,
    engine_class: str = DEFAULT_ENGINE_CLASS,
    lifecycle: Lifecycle | None = None,
    on_exit: Callable[[int], None] | None = None,
) -> FastAPI:
    """Build the app. `engine_factory(engine_config, on_phase=cb)` overrides `engine_class`
    (a 'module:Name' imported in the background); `on_exit(code)` asks the process to exit."""
    config = config or ServerConfig()
    state = ServerState(config, lifecycle=lifecycle, engine_factory=engine_factory,
                        engine_class=engine_class, on_exit=on_exit)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(
        title="graphserve",
        version=__version__,
        description="OpenAI-compatible LLM server with graph-aware readiness.",
        lifespan=lifespan,
        default_response_class=JSONBody,
    )
    app.state.graphserve = state
    app.add_middleware(_V1Middleware, state=state)
    _install_error_handlers(app)
    _add_health_routes(app, state)
    _add_v1_routes(app, state)
    _customize_openapi(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        message, param = _describe_validation(exc.errors())
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONBody(error_body(str(exc.detail), kind), status_code=exc.status_code,
                        headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONBody(error_body(f"internal error: {type(exc).__name__}", "server_error",
                                   code="internal_error"), status_code=500)


def _field_names() -> frozenset[str]:
    names: set[str] = set()
    for model in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextContentPart,
                  StreamOptions):
        names.update(model.model_fields)
    return frozenset(names)


_FIELD_NAMES = _field_names()


def _describe_validation(errors: Any) -> tuple[str, str | None]:
    """Pydantic's error list -> (one readable message, OpenAI-style param path)."""
    errors = list(errors) or [{"msg": "invalid request", "loc": ()}]
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"Malformed JSON body: {ctx.get('error', 'could not parse')}", None

    def path(err: dict) -> list:
        # Drop 'body' and the type tags pydantic puts in the location of union members
        # ('str', 'list[int]'): keep field names and list indices.
        return [p for p in err.get("loc", ()) if isinstance(p, int) or p in _FIELD_NAMES]

    where = path(first)
    if not where and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        if isinstance(first.get("input"), (bytes, str)):
            return ("The request body must be JSON, sent with 'Content-Type: "
                    "application/json'.", None)
        return "The request body must be a JSON object.", None
    param = ".".join(str(p) for p in where) or None
    # Every alternative of a union fails separately; the deepest failure is the most specific.
    related = [e for e in errors if path(e)[: len(where)] == where]
    best = max(related, key=lambda e: len(e.get("loc", ())))
    if len(best.get("loc", ())) > len(first.get("loc", ())):
        first, where = best, path(best)
        param = ".".join(str(p) for p in where) or None
        msg = best.get("msg", "invalid value")
    elif len(related) > 1:
        depth = len(first.get("loc", ()))
        tags = [str(e["loc"][depth - 1]) for e in related if len(e.get("loc", ())) == depth]
        msg = "invalid type; expected " + " or ".join(dict.fromkeys(tags))
    else:
        msg = "field required" if first.get("type") == "missing" else first.get("msg", "invalid")
    others = len(errors) - len(related)
    extra = f" (and {others} more problem(s))" if others > 0 else ""
    return (f"{param}: {msg}{extra}" if param else f"{msg}{extra}"), param


def _customize_openapi(app: FastAPI) -> None:
    """Drop FastAPI's 422 answers (validation errors are 400 here) and describe SSE events."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                if isinstance(op, dict):
                    op.get("responses", {}).pop("422", None)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.pop("HTTPValidationError", None)
        comps.pop("ValidationError", None)
        # Streamed answers: document each SSE event (FastAPI knows only the JSON body).
        _, defs = models_json_schema(
            [(m, "serialization") for m in (*_STREAM_CHUNKS.values(), ErrorResponse)],
            ref_template="#/components/schemas/{model}",
        )
        for name, definition in defs.get("$defs", {}).items():
            comps.setdefault(name, definition)
        for path, chunk in _STREAM_CHUNKS.items():
            op = schema["paths"].get(path, {}).get("post")
            if op is not None:
                content = op["responses"]["200"].setdefault("content", {})
                content["text/event-stream"] = {"schema": _sse_event_schema(chunk.__name__)}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_health_routes(app: FastAPI, state: ServerState) -> None:
    lifecycle = state.lifecycle
    health_doc = {503: {"description": "The server failed to start"}}

    @app.head("/health", include_in_schema=False)  # HEAD probes: same answer, no body
    @app.get("/health", tags=["health"], responses=health_doc,
             summary="Liveness: 200 unless startup failed")
    async def health() -> Response:
        status, body = lifecycle.liveness()
        return JSONBody(body, status_code=status)

    @app.head("/health/ready", include_in_schema=False)  # HEAD probes: same answer, no body
    @app.get("/health/ready", tags=["health"],
             responses={503: {"description": "Not ready: the body names the phase"}},
             summary="Readiness: 200 once the largest decode graph is captured")
    async def ready() -> Response:
        status, body = lifecycle.readiness()
        return JSONBody(body, status_code=status)

    @app.head("/health/graphs", include_in_schema=False)  # HEAD probes: same answer, no body
    @app.get("/health/graphs", tags=["health"], summary="CUDA graph capture report")
    async def graphs() -> Response:
        return JSONBody(graphs_body(lifecycle, state.engine))

    @app.head("/metrics", include_in_schema=False)  # HEAD probes: same answer, no body
    @app.get("/metrics", tags=["health"], summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


def _add_v1_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/models", response_model=ModelList, tags=["openai"],
             responses=_errors(401, 503))
    async def list_models() -> Response:
        engine = state.engine
        card = {"id": engine.model_name, "object": "model", "created": int(time.time()),
                "owned_by": "graphserve", "max_model_len": engine.max_model_len}
        return JSONBody({"object": "list", "data": [card]})

    def check_model(name: str | None) -> str:
        served = state.engine.model_name
        if name is not None and name != served:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves "
                           f"'{served}'.", param="model", code="model_not_found")
        return served

    def arrival(request: Request) -> float:
        return request.scope.get("state", {}).get("arrival") or time.perf_counter()

    @app.post("/v1/completions", response_model=CompletionResponse, tags=["openai"],
              responses={200: {"content": _STREAM_DOC}, **_errors(400, 401, 404, 429, 500, 503)})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine = state.engine
        model = check_model(body.model)
        _refuse_unsupported(body)
        prompt_ids = _completion_prompt(engine, body.prompt)
        max_tokens = _max_tokens(body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS,
                                 len(prompt_ids), engine.max_model_len, "max_tokens", "prompt")
        params = _sampling_params(body, max_tokens)
        _check_stop_ids(engine, params)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        gen = state.submit(request_id, prompt_ids, params, arrival(request))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _stream_events(gen, False, request_id, model, include_usage)
            return EventStreamResponse(events, gen, request_id)
        try:
            text = await _collect_or_disconnect(request, gen)
        except _ClientGone:
            return Response(status_code=499)
        return JSONBody({
            "id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": gen.finish_reason}],
            "usage": gen.usage(),
        }, headers={"X-Request-Id": request_id})

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["openai"],
              responses={200: {"content": _STREAM_DOC}, **_errors(400, 401, 404, 429, 500, 503)})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        engine = state.engine
        model = check_model(body.model)
        _refuse_unsupported(body)
        prompt_ids = _chat_prompt(engine, body.messages)
        if body.max_completion_tokens is not None:
            requested, param = body.max_completion_tokens, "max_completion_tokens"
        else:
            requested, param = body.max_tokens, "max_tokens"
        max_tokens = _max_tokens(requested, None, len(prompt_ids), engine.max_model_len, param,
                                 "messages")
        params = _sampling_params(body, max_tokens)
        _check_stop_ids(engine, params)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        gen = state.submit(request_id, prompt_ids, params, arrival(request))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _stream_events(gen, True, request_id, model, include_usage)
            return EventStreamResponse(events, gen, request_id)
        try:
            text = await _collect_or_disconnect(request, gen)
        except _ClientGone:
            return Response(status_code=499)
        return JSONBody({
            "id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": gen.finish_reason}],
            "usage": gen.usage(),
        }, headers={"X-Request-Id": request_id})


def _check_stop_ids(engine: Any, params: SamplingParams) -> None:
    vocab = _vocab_size(engine)
    if vocab is None:
        return
    bad = next((t for t in params.stop_token_ids if t >= vocab), None)
    if bad is not None:
        raise ApiError(400, f"stop_token_ids: {bad} is outside the vocabulary (0..{vocab - 1})",
                       param="stop_token_ids")


__all__ = ["ApiError", "ServerState", "create_app"]
