"""Client prompts to token ids: text checks, tokenisation, chat-template rendering.

Event-loop thread; every problem a client can cause is an `ApiError` 400 naming the parameter.
"""

from __future__ import annotations

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


def completion_prompt(engine: Any, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(
                400, f"Batched prompts are not supported ({len(prompt)} prompts given); "
                "send one request per prompt.", param="prompt", code="batch_not_supported",
            )
        prompt = prompt[0]
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


def chat_prompt(engine: Any, messages: list[ChatMessage]) -> list[int]:
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
