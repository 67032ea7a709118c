"""Connection limits below the ASGI app: uvicorn's httptools protocol, guarded.

uvicorn bounds neither the time a client may take to send a request head nor the number of
connections it keeps open (its `limit_concurrency` answers 503 to *every* request above the
limit, health probes included, so a crowd of idle sockets would fail the liveness probe and get
the pod restarted). This protocol adds, per server:

* a **head deadline** (`--header-timeout`): from the moment a connection opens, or its previous
  answer was sent, the next request head must be complete within it. A connection that sent
  nothing is closed quietly (as an idle keep-alive one is); one stuck in a head gets a 408. A
  head trickled a byte at a time therefore holds a socket for seconds, not forever;
* a **head size cap** (`MAX_HEAD_BYTES`): 431 beyond it, as soon as a read leaves the head
  incomplete past the cap or a complete head is over it (httptools itself has no cap, and
  uvicorn keeps every header in memory);
* a **connection cap** (`--max-connections`) that never refuses a probe while some connection
  is merely waiting: a new connection over the cap closes the one that has been waiting for a
  request head longest (idle keep-alive, slow head or lingering); only when every connection is
  in the middle of a request is the newcomer answered 503 and closed;
* a **lingering close**: when the server answers before the request body was read (413, 408,
  429), the connection stops being reused, the answer is flushed and the write side shut, and
  what the client still sends is read and dropped until it stops (`LINGER_IDLE_S` of silence,
  `LINGER_MAX_S` at most) before the socket closes. Closing at once with unread bytes makes the
  kernel send a reset, and most clients then report "connection reset" instead of the answer.

Event-loop thread only (protocol callbacks and timers run on uvicorn's loop). Relies on
uvicorn's `HttpToolsProtocol` internals that have been stable since 0.2x (`cycle`,
`on_headers_complete`, `on_response_complete`, `transport`); `tests/test_hardening.py` drives
them against the installed version.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.http.errors import (
    RETRY_AFTER_UNAVAILABLE,
    ApiError,
    dumps,
    raw_response,
    request_timeout,
)

logger = logging.getLogger("graphserve.connections")

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; nginx allows 32 KiB, node 16 KiB
LINGER_IDLE_S = 2.0  # after an early answer: close once the client has been silent this long
LINGER_MAX_S = 30.0  # ... or after this long in any case
REFUSED_LINGER_S = 1.0  # a connection refused over the cap lingers this long at most


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 4096
    header_timeout: float = 10.0


class ConnectionRegistry:
    """The open connections of one server, and those waiting for a request head, oldest first.

    Event-loop thread only. `stats` counts what the guard did, for logs and tests.
    """

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.open: set[GuardedProtocol] = set()
        self._waiting: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self.stats = {"evicted": 0, "refused": 0, "head_timeouts": 0, "heads_too_large": 0,
                      "lingered": 0}

    def opened(self, conn: GuardedProtocol) -> bool:
        """Register a new connection; False if it must be refused (every other one is busy)."""
        self.open.add(conn)
        if len(self.open) <= self.limits.max_connections:
            return True
        if self._waiting:
            victim, _ = self._waiting.popitem(last=False)
            self.open.discard(victim)
            self.stats["evicted"] += 1
            victim.evict()
            return True
        self.open.discard(conn)
        self.stats["refused"] += 1
        return False

    def waiting(self, conn: GuardedProtocol, *, first: bool = False) -> None:
        """`conn` waits for a request head (or lingers: `first`, evicted before the rest)."""
        if conn in self.open:
            self._waiting[conn] = None
            self._waiting.move_to_end(conn, last=not first)

    def busy(self, conn: GuardedProtocol) -> None:
        self._waiting.pop(conn, None)

    def closed(self, conn: GuardedProtocol) -> None:
        self._waiting.pop(conn, None)
        self.open.discard(conn)


class _GuardedTransport:
    """The transport uvicorn's protocol and its request cycles see: `close()` lingers when the
    client may still be sending, and `is_closing()` is true from then on."""

    def __init__(self, transport: Any, protocol: GuardedProtocol):
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.close_gracefully()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the head deadline, head cap, connection cap and
    lingering close of this module. `registry` is set per server by `guarded_protocol`."""

    registry: ConnectionRegistry

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self._raw = transport
        self._head_timer: Any = None
        self._head_bytes = 0
        self.lingering = False
        self._linger_timer: Any = None
        self._linger_until = self._last_data = 0.0
        super().connection_made(_GuardedTransport(transport, self))
        if not self.registry.opened(self):
            logger.warning("connection cap (%d) reached with every connection busy: refusing "
                           "one", self.registry.limits.max_connections)
            busy = ApiError(503, "The server has too many connections open; retry shortly.",
                            type="service_unavailable_error", code="too_many_connections",
                            headers={"Retry-After": RETRY_AFTER_UNAVAILABLE})
            # A short linger only: the client may have sent its request already (closing on
            # it would reset the answer away), but this socket is over the cap.
            self._answer_and_linger(busy, max_s=REFUSED_LINGER_S)
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self.registry.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:  # we answered and are closing: read and drop
            self._last_data = time.monotonic()
            return
        waiting = self._head_timer is not None
        super().data_received(data)
        if waiting and self._head_timer is not None and not self.lingering:
            self._head_bytes += len(data)  # still no complete head after this chunk
            if self._head_bytes > MAX_HEAD_BYTES:
                self.registry.stats["heads_too_large"] += 1
                self._answer_and_linger(_HEAD_TOO_LARGE)

    def eof_received(self) -> bool | None:
        if self.lingering:
            self._raw.close()  # the client is done sending: nothing left to protect
        return super().eof_received()

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.registry.busy(self)
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size <= MAX_HEAD_BYTES:
            super().on_headers_complete()
            return
        # The whole head came in one read (up to 256 KiB): answer through uvicorn's own request
        # cycle, with an app that only says 431, so the rest of the request is handled as usual.
        self.registry.stats["heads_too_large"] += 1
        app, self.app = self.app, _head_too_large
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # no pipelined request started
            self._await_head()

    # ------------------------------------------------------------------ head deadline
    def _await_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.registry.limits.header_timeout,
                                                self._head_timed_out)
        self.registry.waiting(self)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.lingering or self._raw.is_closing():
            return
        self.registry.stats["head_timeouts"] += 1
        if self._head_bytes:
            # A 408, then close at once: lingering would let a client that trickles bytes
            # keep the socket for the whole linger time, which is what the deadline prevents.
            self._raw.write(raw_response(request_timeout(
                "request head", self.registry.limits.header_timeout)))
        self._raw.close()  # a connection that sent nothing is closed without a word

    # ------------------------------------------------------------------ closing
    def shutdown(self) -> None:
        """Server shutdown: a lingering connection has nothing more to give; close it now."""
        if self.lingering:
            self._cancel_timers()
            self._raw.close()
            return
        super().shutdown()

    def evict(self) -> None:
        """Over the connection cap: close this waiting connection to make room."""
        self._cancel_timers()
        self._raw.close()

    def close_gracefully(self) -> None:
        """What `transport.close()` means here: linger if request bytes may still come."""
        if self.lingering or self._raw.is_closing():
            return
        if self.cycle is not None and self.cycle.more_body:
            self._linger()
        else:
            self._raw.close()

    def _answer_and_linger(self, error: ApiError, max_s: float = LINGER_MAX_S) -> None:
        if self._raw.is_closing():
            return
        self._raw.write(raw_response(error))
        self._linger(max_s)

    def _linger(self, max_s: float = LINGER_MAX_S) -> None:
        self.lingering = True
        self.registry.stats["lingered"] += 1
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.registry.waiting(self, first=True)
        if self._raw.can_write_eof():  # TLS cannot half-close; it just keeps reading
            self._raw.write_eof()  # after the answer is flushed
        self._raw.resume_reading()  # uvicorn pauses reading while a body waits unread
        now = time.monotonic()
        self._last_data, self._linger_until = now, now + max_s
        self._linger_timer = self.loop.call_later(min(LINGER_IDLE_S, max_s), self._linger_check)

    def _linger_check(self) -> None:
        now = time.monotonic()
        if now - self._last_data >= LINGER_IDLE_S or now >= self._linger_until:
            self._linger_timer = None
            self._raw.close()
            return
        wait = min(LINGER_IDLE_S - (now - self._last_data), self._linger_until - now)
        self._linger_timer = self.loop.call_later(max(wait, 0.05), self._linger_check)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._linger_timer = None


_HEAD_TOO_LARGE = ApiError(431, f"The request head is larger than {MAX_HEAD_BYTES} bytes.",
                           code="request_header_too_large", headers={"Connection": "close"})


async def _head_too_large(scope: Any, receive: Any, send: Any) -> None:
    """ASGI app for a request whose head passed `MAX_HEAD_BYTES` in a single read."""
    payload = dumps(_HEAD_TOO_LARGE.body())
    await send({"type": "http.response.start", "status": 431, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def guarded_protocol(registry: ConnectionRegistry) -> type[GuardedProtocol]:
    """The protocol class to give `uvicorn.Config(http=...)`, bound to `registry`."""
    return type("GuardedProtocol", (GuardedProtocol,), {"registry": registry})
