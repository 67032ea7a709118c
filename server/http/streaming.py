"""Answers that take time: server-sent events for streamed requests, the collected text for
the others, and the race of either against the client going away.

A queued request produces nothing for a while; watching `receive()` for `http.disconnect`
alongside the work frees the request's engine slot as soon as the client goes away, instead of
at the next chunk the server tries to send. Event-loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive

from server.http.errors import dumps, error_body
from server.http.generation import Generation

logger = logging.getLogger("graphserve.api")


class ClientGone(Exception):
    """The client disconnected before a non-streamed answer was ready."""


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def race_disconnect(receive: Receive, work: Awaitable[Any]) -> tuple[bool, Any]:
    """Run `work` until it ends or the client disconnects, whichever comes first.

    Returns (client_gone, outcome): the result or exception `work` ended with (a
    CancelledError if the client left first). Both tasks are finished on return.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone = not task.done()
        for t in (task, watcher):
            t.cancel()
        outcome, _ = await asyncio.gather(task, watcher, return_exceptions=True)
    return gone, outcome


class EventStreamResponse(StreamingResponse):
    """Server-sent events whose generation is aborted the moment the client disconnects."""

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

        gone, outcome = True, None
        try:
            gone, outcome = await race_disconnect(receive, pump())
        finally:
            if isinstance(outcome, OSError):  # ASGI >= 2.4 servers raise on a closed socket
                gone = True
            if gone:
                self._generation.abort("client_disconnect")
            with contextlib.suppress(Exception):
                await self._events.aclose()  # type: ignore[attr-defined]
            self._generation.close()
        if isinstance(outcome, Exception) and not isinstance(outcome, OSError):
            raise outcome


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


_SSE_DONE = b"data: [DONE]\n\n"
_TEXT_MARK = "\x00graphserve-text\x00"


def _sse_text_template(base: dict[str, Any], chat: bool) -> tuple[bytes, bytes]:
    """The bytes before and after the JSON string of a token's text in a streamed chunk.

    Rendered from the same dict a full chunk is, with a marker as the text, so a template chunk
    and `sse({**base, "choices": [choice]})` are byte-identical for the same text.
    """
    if chat:
        choice = {"index": 0, "delta": {"content": _TEXT_MARK}, "logprobs": None,
                  "finish_reason": None}
    else:
        choice = {"index": 0, "text": _TEXT_MARK, "logprobs": None, "finish_reason": None}
    rendered = sse({**base, "choices": [choice]})
    prefix, suffix = rendered.split(dumps(_TEXT_MARK), 1)
    return prefix, suffix


async def stream_events(gen: Generation, chat: bool, request_id: str, model: str,
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
        return sse({**base, "choices": [choice]})

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
                    yield text_prefix + dumps(out.text) + text_suffix
                if final:
                    yield chunk({"index": 0, "delta": {}, "logprobs": None,
                                 "finish_reason": out.finish_reason})
            elif final:
                yield chunk({"index": 0, "text": out.text, "logprobs": None,
                             "finish_reason": out.finish_reason})
            elif out.text:
                yield text_prefix + dumps(out.text) + text_suffix
        failure = gen.failure()
        if failure is not None:
            logger.warning("request %s ended with an error: %s", request_id, failure.message)
            yield sse(failure.body())
        elif include_usage:
            yield sse({**base, "choices": [], "usage": gen.usage()})
    except Exception as exc:
        # A bug here must not cut the stream mid-way without a word: tell the client, then end.
        logger.exception("request %s: stream failed", request_id)
        yield sse(error_body(f"internal error while streaming: {exc}", "server_error",
                              code="internal_error"))
    yield _SSE_DONE


async def collect(gen: Generation) -> str:
    parts = [out.text async for out in gen.outputs() if out.text]
    failure = gen.failure()
    if failure is not None:
        raise failure
    return "".join(parts)


async def collect_or_disconnect(receive: Receive, gen: Generation) -> str:
    """Collect a non-streamed answer; raise ClientGone (the request aborted) if the client
    leaves first."""
    try:
        gone, outcome = await race_disconnect(receive, collect(gen))
    finally:
        gen.close()  # aborts the engine request unless it finished
    if gone:
        raise ClientGone
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
