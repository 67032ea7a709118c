"""A request's generation settings: what we refuse, the token budget, `SamplingParams`.

Event-loop thread; every problem a client can cause is an `ApiError` 400 naming the parameter.
"""

from __future__ import annotations

from typing import Any

from server.errors import InvalidRequestError
from server.http.errors import ApiError
from server.http.limits import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from server.http.prompts import Room, check_room, check_text, vocab_size
from server.http.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.request import SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default


def refuse_unsupported(body: SamplingFields) -> None:
    def refuse(param: str, message: str) -> None:
        raise ApiError(400, message, param=param, code="unsupported_parameter")

    if body.stream_options is not None and not body.stream:
        refuse("stream_options", "stream_options is only allowed when stream is true.")
    if isinstance(body, CompletionRequest):
        if body.suffix:
            refuse("suffix", "suffix is not supported.")
        if body.best_of is not None:
            if body.best_of < body.n:
                raise ApiError(400, f"best_of ({body.best_of}) must be >= n ({body.n}).",
                               param="best_of")
            if body.stream and body.best_of > body.n:
                raise ApiError(400, "best_of > n cannot be streamed (the best choices are "
                               "known only at the end).", param="best_of")
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens must be >= 1 (0 only with echo: scoring the "
                           "prompt).", param="max_tokens")
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")


def stop_strings(body: SamplingFields) -> list[str]:
    return body.stop if isinstance(body.stop, list) else ([body.stop] if body.stop else [])


def sampling_params(body: SamplingFields, max_tokens: int, **extra: Any) -> SamplingParams:
    """The engine's settings for `body`; `extra` (from `http.surface`) sets n, logprobs,
    grammars and the like."""
    stop = stop_strings(body)
    check_stop_limits(stop, body.stop_token_ids or [])
    for s in stop:
        check_text(s, "stop")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        seed=body.seed,
        stop=stop,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        **extra,
    )
    try:
        params.validate()
    except InvalidRequestError as exc:
        raise ApiError(400, str(exc), param=exc.param) from None
    return params


def max_tokens_for(requested: int | None, default: int | None, prompt_len: int, max_len: int,
                   param: str, prompt_param: str) -> int:
    """The generation budget: explicit values must fit the context; defaults are clipped to it.
    0 (scoring the prompt with echo, refused before this point otherwise) needs only the prompt
    to fit."""
    if requested == 0:
        if prompt_len > max_len:
            raise ApiError(400, f"The prompt is {prompt_len} tokens; this model's context is "
                           f"{max_len} tokens.", param=prompt_param,
                           code="context_length_exceeded")
        return 0
    check_room(prompt_len, Room(max_len, requested, param, prompt_param))
    room = max_len - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    return requested


def check_stop_limits(stop: list[str], stop_token_ids: list[int]) -> None:
    """Stop conditions cost the engine thread work on every generated token: bound them."""
    if len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings are supported, got "
                       f"{len(stop)}", param="stop")
    longest = max(stop, key=len, default="")
    if len(longest) > MAX_STOP_STRING_CHARS:
        raise ApiError(400, f"stop: a stop string may be at most {MAX_STOP_STRING_CHARS} "
                       f"characters, got one of {len(longest)}", param="stop")
    if len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ApiError(400, f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids are supported, "
                       f"got {len(stop_token_ids)}", param="stop_token_ids")


def check_stop_ids(engine: Any, params: SamplingParams) -> None:
    vocab = vocab_size(engine)
    if vocab is None:
        return
    bad = next((t for t in params.stop_token_ids if t >= vocab), None)
    if bad is not None:
        raise ApiError(400, f"stop_token_ids: {bad} is outside the vocabulary (0..{vocab - 1})",
                       param="stop_token_ids")
