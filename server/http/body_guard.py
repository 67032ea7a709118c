"""ASGI middleware that reads a request body under limits before the app parses it.

For every request that carries a body (FastAPI would otherwise read it whole, then parse it on
the event loop):

1. a declared `Content-Length` above `--max-request-bytes` is refused with 413 before one byte
   of the body is read; a chunked body is cut off with 413 the moment it passes the limit;
2. the bytes are reserved against the budget for bodies in progress (`ServerState.
   reserve_body_bytes`), 429 when a flood of large bodies would exceed it;
3. the body must arrive within `--body-timeout` seconds (else 408), so a client trickling a
   byte at a time does not hold a connection and its buffer forever;
4. the complete body must be UTF-8 and nest at most `MAX_JSON_DEPTH` deep (else 400), checked
   on the bytes before any parser recurses into them;
5. the app then receives the body in one message, and the real `receive` after it (so
   disconnects are still seen while the request runs).

Refusals before the body was read say `Connection: close`: the connection is not reusable
while unread bytes are in flight, and the server's connection guard lingers before closing so
the client reads the answer instead of a reset. Event-loop thread only; sits inside
`V1Middleware`, so a request without the API key or before readiness never gets this far.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.config import format_bytes
from server.http.errors import (
    ApiError,
    request_timeout,
    request_too_large,
    server_busy,
)
from server.http.limits import MAX_JSON_DEPTH, json_depth_over, utf8_error
from server.http.responses import error_response
from server.http.state import ServerState

logger = logging.getLogger("graphserve.api")

# Bodies at most this large are checked for nesting on the event loop (~1 ms at worst); larger
# ones on a prompt worker (~25 ms a MiB of brackets).
_INLINE_DEPTH_CHECK_BYTES = 64 * 1024


class _Refused(Exception):
    def __init__(self, error: ApiError):
        super().__init__(error.message)
        self.error = error


class _ClientGone(Exception):
    """The client disconnected before its body was complete: nothing to answer."""


class BodyGuard:
    """Reads request bodies under the size, time and shape limits, then replays them."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, chunked = _body_framing(scope["headers"])
        if not chunked and not declared:  # no body (GET, HEAD, empty POST): nothing to guard
            await self.app(scope, receive, send)
            return
        state = self.state
        limit = state.max_request_bytes()
        if declared is not None and declared > limit:
            await error_response(request_too_large(limit, declared))(scope, receive, send)
            return
        reserved = limit if declared is None else declared
        if not state.reserve_body_bytes(reserved):
            busy = server_busy(f"{format_bytes(state.body_bytes_held)} of request bodies in "
                               "progress")
            await error_response(busy)(scope, receive, send)
            return
        try:
            try:
                body = await _read_body(receive, limit, state.config.body_timeout)
                await self._check_shape(body)
            except _Refused as refused:
                await error_response(refused.error)(scope, receive, send)
                return
            except _ClientGone:
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            state.release_body_bytes(reserved)

    async def _check_shape(self, body: bytes) -> None:
        problem = utf8_error(body)
        if problem is not None:
            raise _Refused(ApiError(400, f"Malformed request body: {problem}.",
                                    code="invalid_encoding"))
        if len(body) <= _INLINE_DEPTH_CHECK_BYTES:
            depth = json_depth_over(body)
        else:
            depth = await self.state.prompt_workers.run(json_depth_over, body)
        if depth is not None:
            raise _Refused(ApiError(
                400, f"Malformed request body: JSON nested {depth} levels deep; at most "
                f"{MAX_JSON_DEPTH} are accepted.", code="json_too_deep"))


def _body_framing(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """(declared Content-Length or None, whether the body is chunked)."""
    declared, chunked = None, False
    for name, value in headers:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:  # the HTTP server refuses these first; be safe anyway
                declared = None
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return declared, chunked


async def _read_body(receive: Receive, limit: int, timeout: float) -> bytes:
    """The whole body, or `_Refused` (413 past `limit`, 408 past `timeout`) / `_ClientGone`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - loop.time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(receive(), remaining)
        except asyncio.TimeoutError:
            logger.info("request body not complete after %.0f s (%d bytes in); refused",
                        timeout, size)
            raise _Refused(request_timeout("request body", timeout)) from None
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _Refused(request_too_large(limit, None))
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the whole body once, then passes through (disconnects)."""
    pending: list[bytes] = [body]

    async def replay() -> Message:
        if pending:
            # Handed over, not kept: the app owns the only reference from here on.
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replay
