"""Answers that take time: the server-sent-event response, the SSE encoding, and the race of
an answer against the client going away (the answers themselves: `http.relay`).

A queued request produces nothing for a while; watching `receive()` for `http.disconnect`
alongside the work frees the request's engine slot as soon as the client goes away, instead of
at the next chunk the server tries to send. Event-loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

from starlette.responses import StreamingResponse
from starlette.types import Receive

from server.http.errors import dumps

logger = logging.getLogger("graphserve.api")


class Abortable(Protocol):
    """What a streamed answer aborts and closes: a `Generation`, or a request's group of them
    (`http.relay.GenerationGroup`)."""

    def abort(self, cause: str) -> None: ...

    def close(self) -> None: ...


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

    def __init__(self, events: AsyncIterator[bytes], generation: Abortable, request_id: str):
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
