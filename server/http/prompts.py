"""Client prompts to token ids: text checks, the early context check, tokenisation and
chat-template rendering.

Split by cost and thread. The cheap parts run on the event loop: splitting a batch of prompts,
token-id prompts (length first, then the vocabulary), building the conversation (tool calls and
tool results included).
The parts whose cost grows with the text run on a prompt worker (`server.http.workers`):
`encode_text` and `encode_chat`. Both first refuse a text that provably cannot fit the context
(`server.http.token_bounds`), so an oversized prompt costs a length check, not a tokenisation.
`completion_prompt` and `chat_prompt` chain the parts synchronously for callers without a
pool. Every problem a client can cause is an `ApiError` 400 naming the parameter.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from server.http.errors import ApiError
from server.http.schemas import ChatMessage
from server.http.token_bounds import max_chars_per_token, min_tokens

logger = logging.getLogger("graphserve.api")


@dataclass(frozen=True)
class Room:
    """What the prompt must leave room for: the context, the requested generation budget (None:
    whatever is left) and the parameters to name when it does not fit."""

    max_len: int
    requested: int | None
    param: str  # max_tokens or max_completion_tokens
    prompt_param: str  # prompt or messages


def check_room(prompt_tokens: int, room: Room, *, at_least: bool = False) -> None:
    """Raise the `context_length_exceeded` 400 if a prompt of `prompt_tokens` tokens (exactly,
    or at least when `at_least`) leaves no room for one token, or for the requested budget."""
    free = room.max_len - prompt_tokens
    size = f"at least {prompt_tokens}" if at_least else str(prompt_tokens)
    if free < 1:
        raise ApiError(
            400, f"The prompt is {size} tokens; this model's context is {room.max_len} tokens, "
            "which leaves no room to generate.", param=room.prompt_param,
            code="context_length_exceeded",
        )
    if room.requested is not None and room.requested > free:
        raise ApiError(
            400, f"{room.param}={room.requested} plus the {size}-token prompt exceeds the "
            f"model's {room.max_len}-token context (at most {free} new tokens fit).",
            param=room.param, code="context_length_exceeded",
        )


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


def _refuse_if_cannot_fit(tokenizer: Any, text: str, room: Room | None) -> None:
    if room is not None:
        fewest = min_tokens(text, max_chars_per_token(tokenizer))
        if fewest:
            check_room(fewest, room, at_least=True)


def vocab_size(engine: Any) -> int | None:
    size = getattr(engine, "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    try:
        return len(engine.tokenizer)
    except TypeError:
        return None


# -------------------------------------------------------------------------- completions
MAX_PROMPTS = 128  # prompts of one batched /v1/completions request


def select_prompts(engine: Any, prompt: Any, room: Room | None = None) -> list[str | list[int]]:
    """Event loop: the request's prompts (one, or a batch: a list of strings or of token lists),
    each as text (to encode) or as checked token ids."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) > MAX_PROMPTS:
            raise ApiError(400, f"At most {MAX_PROMPTS} prompts per request ({len(prompt)} "
                           "given).", param="prompt")
        return [_select_one(engine, p, room) for p in prompt]
    return [_select_one(engine, prompt, room)]


def _select_one(engine: Any, prompt: Any, room: Room | None) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    if room is not None:  # before the vocabulary scan, whose cost grows with the list
        check_room(len(prompt), room)
    vocab = vocab_size(engine)
    if vocab is not None:
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})",
                           param="prompt")
    return list(prompt)


def encode_text(tokenizer: Any, text: str, room: Room | None = None) -> list[int]:
    """Prompt worker: a completion prompt's token ids (BOS alone for an empty text)."""
    check_text(text, "prompt")
    _refuse_if_cannot_fit(tokenizer, text, room)
    ids = _encode(tokenizer, text, add_special_tokens=True)
    if not ids:
        bos = getattr(tokenizer, "bos_token_id", None)
        if not isinstance(bos, int):
            raise ApiError(400, "prompt is empty", param="prompt")
        ids = [bos]
    return ids


def completion_prompt(engine: Any, prompt: Any, room: Room | None = None) -> list[int]:
    """One prompt through `select_prompts` then `encode_text`, on the calling thread."""
    (selected,) = select_prompts(engine, prompt, room)
    if isinstance(selected, str):
        return encode_text(engine.tokenizer, selected, room)
    return selected


# -------------------------------------------------------------------------- chat
def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Event loop: the messages as the dicts a chat template takes, checked: assistant
    `tool_calls` with their arguments parsed (templates render them with `tojson`), `tool`
    messages with their `tool_call_id`."""
    entries = []
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
        entries.append(entry)
    return entries


def _arguments(text: str, i: int) -> Any:
    """A call's arguments as templates expect them: most render a mapping with `tojson`
    (HF's convention), the others accept the JSON text, so parse it."""
    try:
        return json.loads(text)
    except ValueError:
        raise ApiError(400, f"messages.{i}.tool_calls: arguments are not valid JSON",
                       param=f"messages.{i}.tool_calls") from None


def encode_chat(tokenizer: Any, entries: list[dict[str, Any]], room: Room | None = None,
                tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Prompt worker: render the chat template (with `tools` when given), refuse what cannot
    fit, tokenise."""
    kwargs = {"tools": tools} if tools else {}
    try:
        text = tokenizer.apply_chat_template(
            entries, add_generation_prompt=True, tokenize=False, **kwargs
        )
    except Exception as exc:
        # Templates reject conversations they cannot render (e.g. roles not alternating).
        logger.info("chat template rejected the conversation: %s", exc)
        raise ApiError(400, f"The model's chat template rejected the messages: {exc}",
                       param="messages") from None
    # The rendered text is what gets tokenised (a template may drop or add text), so the
    # bound applies to it, not to the messages.
    _refuse_if_cannot_fit(tokenizer, text, room)
    # The rendered template already holds any BOS token; adding special tokens would double it.
    return _encode(tokenizer, text, add_special_tokens=False)


def chat_prompt(engine: Any, messages: list[ChatMessage], room: Room | None = None,
                tools: list[dict[str, Any]] | None = None) -> list[int]:
    """`conversation` then `encode_chat`, on the calling thread."""
    return encode_chat(engine.tokenizer, conversation(messages), room, tools)
