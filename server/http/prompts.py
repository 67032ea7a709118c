"""Client prompts to token ids: text checks, tokenisation, chat-template rendering.

Event-loop thread; every problem a client can cause is an `ApiError` 400 naming the parameter.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from server.http.errors import ApiError
from server.http.schemas import ChatMessage

logger = logging.getLogger("graphserve.api")


def check_text(value: str, param: str) -> None:
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


def vocab_size(engine: Any) -> int | None:
    size = getattr(engine, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    try:
        return len(engine.tokenizer)
    except TypeError:
        return None


MAX_PROMPTS = 128  # prompts of one batched /v1/completions request


def completion_prompts(engine: Any, prompt: Any) -> list[list[int]]:
    """A prompt, or a batch of them (a list of strings or of token lists), as token ids."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) > MAX_PROMPTS:
            raise ApiError(400, f"At most {MAX_PROMPTS} prompts per request ({len(prompt)} "
                           "given).", param="prompt")
        return [completion_prompt(engine, p) for p in prompt]
    return [completion_prompt(engine, prompt)]


def completion_prompt(engine: Any, prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        check_text(prompt, "prompt")
        ids = _encode(engine.tokenizer, prompt, add_special_tokens=True)
        if not ids:
            bos = getattr(engine.tokenizer, "bos_token_id", None)
            if not isinstance(bos, int):
                raise ApiError(400, "prompt is empty", param="prompt")
            ids = [bos]
        return ids
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    vocab = vocab_size(engine)
    if vocab is not None:
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})",
                           param="prompt")
    return list(prompt)


def chat_prompt(engine: Any, messages: list[ChatMessage],
                tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Render the conversation through the model's chat template (with `tools`, whose
    calls and results in the history are passed as the templates expect them: assistant
    `tool_calls` with arguments as JSON text, `tool` messages with `tool_call_id`)."""
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
        check_text(content, f"messages.{i}.content")
        # Most chat templates know 'system' but not OpenAI's newer 'developer' role.
        entry = {"role": "system" if msg.role == "developer" else msg.role, "content": content}
        if msg.name is not None:
            check_text(msg.name, f"messages.{i}.name")
            entry["name"] = msg.name
        if msg.tool_calls:
            if msg.role != "assistant":
                raise ApiError(400, f"messages.{i}.tool_calls is only allowed on assistant "
                               "messages", param=f"messages.{i}.tool_calls")
            entry["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": _arguments(c.function.arguments, i)}}
                for c in msg.tool_calls
            ]
        if msg.role == "tool":
            if msg.tool_call_id is None:
                raise ApiError(400, f"messages.{i}.tool_call_id is required for role 'tool'",
                               param=f"messages.{i}.tool_call_id")
            entry["tool_call_id"] = msg.tool_call_id
        conversation.append(entry)
    tokenizer = engine.tokenizer
    kwargs = {"tools": tools} if tools else {}
    try:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False, **kwargs
        )
    except Exception as exc:
        # Templates reject conversations they cannot render (e.g. roles not alternating).
        logger.info("chat template rejected the conversation: %s", exc)
        raise ApiError(400, f"The model's chat template rejected the messages: {exc}",
                       param="messages") from None
    # The rendered template already holds any BOS token; adding special tokens would double it.
    return _encode(tokenizer, text, add_special_tokens=False)


def _arguments(text: str, i: int) -> Any:
    """A call's arguments as templates expect them: most render a mapping with `tojson`
    (HF's convention), the others accept the JSON text, so parse it."""
    try:
        return json.loads(text)
    except ValueError:
        raise ApiError(400, f"messages.{i}.tool_calls: arguments are not valid JSON",
                       param=f"messages.{i}.tool_calls") from None
