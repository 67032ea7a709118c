"""A request's generation settings: what we refuse, the token budget, `SamplingParams`.

Event-loop thread; every problem a client can cause is an `ApiError` 400 naming the parameter.
"""

from __future__ import annotations

from typing import Any

from server.errors import InvalidRequestError
from server.http.errors import ApiError
from server.http.prompts import check_text, vocab_size
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


def sampling_params(body: SamplingFields, max_tokens: int, **extra: Any) -> SamplingParams:
    """The engine's settings for `body`; `extra` (from `http.surface`) sets n, logprobs,
    grammars and the like."""
    stop = body.stop if isinstance(body.stop, list) else ([body.stop] if body.stop else [])
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
    """The generation budget: explicit values must fit the context; defaults are clipped to it."""
    room = max_len - prompt_len
    if requested == 0:
        return 0  # scoring the prompt (echo): refused before this point otherwise
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


def check_stop_ids(engine: Any, params: SamplingParams) -> None:
    vocab = vocab_size(engine)
    if vocab is None:
        return
    bad = next((t for t in params.stop_token_ids if t >= vocab), None)
    if bad is not None:
        raise ApiError(400, f"stop_token_ids: {bad} is outside the vocabulary (0..{vocab - 1})",
                       param="stop_token_ids")
