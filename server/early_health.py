"""Answer health probes from the moment the port is bound, before the HTTP stack is imported.

The CLI binds its listening socket before any heavy import, but uvicorn can only accept once
`import fastapi, uvicorn` (with pydantic and starlette) is done: 0.9-1.2 s on the GPU machine's
Python, longer than the 1 s the product promises for `/health`. Until then a probe would wait in
the kernel's accept queue. This responder closes that gap with the standard library only (one
thread, `selectors`, non-blocking sockets): it accepts on a duplicate of the listening socket and
answers with the bodies, status codes and headers the app gives in the same phase (from the same
`Lifecycle` object the app will use, so uptime and phase history carry over):

* `/health` 200, `/health/ready` 503, `/health/graphs` 200 "engine not created yet";
* `/v1*`: 401 without the right API key (the app checks the key first), else 503 + Retry-After;
* `/metrics` and the OpenAPI pages: 503 + Retry-After (their content needs the app); else 404.

Every answer says `Connection: close`; the socket is then shut down for writing and drained
until the peer closes, so unread request bytes never turn the close into a reset. A client that
sends nothing is dropped after a short timeout and never holds up the handover.

Under TLS (`--ssl-certfile`) it speaks HTTPS with the server's own context: each accepted socket
is wrapped and its handshake driven without blocking, within the same per-client deadline, so
an HTTPS probe is answered from the first moment too and sees the same certificate as after
the handover. The answer is followed by a plain close (probes send no body to linger for).

`stop()` is the handover, called right before uvicorn takes the socket: on return this thread
no longer accepts (connections still queued belong to uvicorn) and its duplicate is closed, so
the original keeps listening. Connections it had accepted are still answered to the end, in the
background if a client is slow.
"""

from __future__ import annotations

import json
import logging
import selectors
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from server.health import Lifecycle, graphs_body
from server.http.errors import (
    RETRY_AFTER_UNAVAILABLE,
    ApiError,
    api_key_ok,
    error_body,
    not_ready,
    unauthorized,
)

logger = logging.getLogger("graphserve.early_health")

MAX_HEAD_BYTES = 16 * 1024  # request line + headers; a probe sends ~100 bytes
CLIENT_TIMEOUT_S = 2.0  # to send a complete request head (or to take the answer)
LINGER_S = 1.0  # after the answer: how long to discard request bytes until the peer closes
MAX_CLIENTS = 256  # more connections wait in the kernel's queue (for uvicorn, if need be)

HEALTH_PATHS = ("/health", "/health/ready", "/health/graphs")
# Routes the app serves that need the app itself: "not yet" rather than "not found".
APP_ONLY_PATHS = ("/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
_ALLOW = "GET, HEAD"
_REASONS = {200: "OK", 307: "Temporary Redirect", 400: "Bad Request", 401: "Unauthorized",
            404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}  # fmt: skip

_HANDSHAKE, _READING, _WRITING, _LINGERING = "handshake", "reading", "writing", "lingering"
# Non-blocking TLS: the operation must wait for the socket to become readable / writable.
_TLS_WAIT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _Answer:
    """Status, JSON body and extra headers of one response."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: dict[str, Any] | None,
                 headers: dict[str, str] | None = None):
        self.status, self.body, self.headers = status, body, headers or {}  # None: no body

    @classmethod
    def of(cls, error: ApiError) -> _Answer:
        return cls(error.status, error.body(), error.headers)


class _Client:
    """One accepted connection: what it sent so far, what is left to send, and its deadline."""

    __slots__ = ("sock", "stage", "inbuf", "out", "deadline")

    def __init__(self, sock: socket.socket, deadline: float, stage: str = _READING):
        self.sock = sock
        self.stage = stage
        self.inbuf = bytearray()
        self.out = b""
        self.deadline = deadline


class EarlyHealthResponder:
    """A one-thread, non-blocking HTTP/1.x responder for the seconds before uvicorn serves."""

    def __init__(self, sock: socket.socket, lifecycle: Lifecycle, api_key: str | None = None,
                 tls: ssl.SSLContext | None = None):
        # A duplicate shares the listening socket's queue; closing it leaves the original open.
        # (It also shares O_NONBLOCK: the CLI's socket is non-blocking already, as uvicorn wants.)
        self._listener: socket.socket | None = sock.dup()
        self._listener.setblocking(False)
        self._lifecycle = lifecycle
        self._api_key = api_key.encode() if api_key else None
        self._tls = tls
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._clients: dict[socket.socket, _Client] = {}
        self._listening = False  # listener registered with the selector
        self._stopping = threading.Event()
        self._not_accepting = threading.Event()  # set once the duplicate is closed for good
        self._thread = threading.Thread(target=self._run, name="graphserve-early-health",
                                        daemon=True)
        self._started_at = self._stopped_at = 0.0
        self.answered = 0  # complete responses sent (written by the responder thread only)

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._started_at = time.monotonic()
        self._thread.start()

    def stop(self, wait: float = 0.25) -> None:
        """Hand the socket over: on return nothing is accepted here any more.

        Answers in flight get up to `wait` seconds; a slower client is still answered (or
        dropped at its own deadline) on the responder thread, which ends by itself.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._stopped_at = time.monotonic()
        if self._thread.ident is None:  # never started: nothing to hand over but the duplicate
            self._close_listener()
            self._cleanup()
            return
        self._wake()
        if not self._not_accepting.wait(5.0):  # the loop never blocks: only a wedged thread
            logger.warning("early health responder did not stop accepting within 5 s")
        self._thread.join(wait)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # buffer full (already woken) or closed (thread gone): either is fine
            pass

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            self._set_listening(True)
            while True:
                if self._stopping.is_set() and self._listener is not None:
                    self._close_listener()
                if self._listener is None and not self._clients:
                    break
                for key, events in self._selector.select(self._select_timeout()):
                    if key.fileobj is self._wake_r:
                        self._drain_wakeups()
                    elif key.fileobj is self._listener:
                        self._accept()
                    else:
                        self._service_safely(key.data, events)
                self._expire(time.monotonic())
        except Exception:  # never take the process down: uvicorn answers once it has started
            logger.exception("early health responder failed; probes wait for uvicorn")
        finally:
            self._close_listener()
            self._cleanup()

    def _select_timeout(self) -> float | None:
        if not self._clients:
            return None  # woken by a connection or by stop()
        return max(0.0, min(c.deadline for c in self._clients.values()) - time.monotonic())

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except OSError:
            pass

    def _set_listening(self, on: bool) -> None:
        if self._listener is None or on == self._listening:
            return
        if on:
            self._selector.register(self._listener, selectors.EVENT_READ)
        else:
            # Unregister before any close: epoll keeps watching a duplicate's description until
            # every descriptor of it is closed, and the original stays open for uvicorn.
            self._selector.unregister(self._listener)
        self._listening = on

    def _close_listener(self) -> None:
        if self._listener is not None:
            try:
                self._set_listening(False)
            except (KeyError, ValueError, OSError):
                pass
            self._listener.close()
            self._listener = None
        self._not_accepting.set()

    def _cleanup(self) -> None:
        for client in list(self._clients.values()):
            self._close(client)
        for closable in (self._selector, self._wake_r, self._wake_w):
            try:
                closable.close()
            except OSError:
                pass
        if self._started_at:  # the count shows how often probes beat the HTTP stack
            stopped = self._stopped_at or time.monotonic()  # not stopped: the loop failed
            logger.debug("early health responder: %d request(s) answered; stopped accepting "
                         "%.3f s after it started", self.answered, stopped - self._started_at)

    def _accept(self) -> None:
        while self._listener is not None and len(self._clients) < MAX_CLIENTS:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # reset while still queued: nothing to answer
                continue
            except OSError as exc:
                # Out of descriptors or memory: pause (a level-triggered listener would spin)
                # until one of ours closes; with none, the queue waits for uvicorn.
                logger.warning("early health responder cannot accept (%s); pausing", exc)
                self._set_listening(False)
                return
            conn.setblocking(False)
            stage = _READING
            if self._tls is not None:
                try:
                    conn = self._tls.wrap_socket(conn, server_side=True,
                                                 do_handshake_on_connect=False)
                except (OSError, ValueError):
                    conn.close()
                    continue
                stage = _HANDSHAKE
            client = _Client(conn, time.monotonic() + CLIENT_TIMEOUT_S, stage)
            self._clients[conn] = client
            self._selector.register(conn, selectors.EVENT_READ, client)
        # Full: leave further connections queued in the kernel until a slot frees up.
        self._set_listening(len(self._clients) < MAX_CLIENTS)

    def _expire(self, now: float) -> None:
        for client in [c for c in self._clients.values() if now >= c.deadline]:
            if client.stage == _READING:
                logger.debug("early health: dropping a client that sent no complete request")
            self._close(client)

    def _close(self, client: _Client) -> None:
        if self._clients.pop(client.sock, None) is None:
            return
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        if self._listener is not None and not self._listening:
            self._set_listening(True)  # a slot is free again

    # ------------------------------------------------------------------ one connection
    def _service_safely(self, client: _Client, events: int) -> None:
        try:
            self._service(client, events)
        except Exception:  # a fault with one connection must not end the others
            logger.exception("early health responder: error on one connection; closing it")
            self._close(client)

    def _service(self, client: _Client, events: int) -> None:
        if client.stage == _HANDSHAKE:
            self._handshake(client)
            return
        if client.stage == _WRITING:
            if events & selectors.EVENT_WRITE:
                self._flush(client)
            return
        self._read(client)
        # TLS may hold decrypted bytes the OS socket no longer signals: read them out too.
        while (client.stage == _READING and client.sock in self._clients
               and isinstance(client.sock, ssl.SSLSocket) and client.sock.pending()):
            self._read(client)

    def _handshake(self, client: _Client) -> None:
        sock = client.sock
        try:
            sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            self._selector.modify(sock, selectors.EVENT_READ, client)
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_WRITE, client)
            return
        except (OSError, ValueError):  # not TLS, bad handshake, reset: nothing to answer
            self._close(client)
            return
        client.stage = _READING
        self._selector.modify(sock, selectors.EVENT_READ, client)
        self._service(client, selectors.EVENT_READ)  # the request may already be buffered

    def _read(self, client: _Client) -> None:
        try:
            chunk = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError, *_TLS_WAIT):
            return
        except OSError:
            self._close(client)
            return
        if not chunk:  # the peer closed: before sending a request, or after reading ours
            self._close(client)
            return
        if client.stage == _LINGERING:
            return  # request body or pipelined requests: read and dropped, we said close
        client.inbuf += chunk
        while client.inbuf[:2] == b"\r\n":  # empty lines before a request line are allowed
            del client.inbuf[:2]
        end = _head_end(client.inbuf)
        if end is not None:
            head = bytes(client.inbuf[:end])
            answer, head_only = self._route(head)
            self._reply(client, answer, head_only)
        elif len(client.inbuf) > MAX_HEAD_BYTES:
            answer = _Answer(431, error_body("Request header fields too large",
                                             "invalid_request_error"))
            self._reply(client, answer, False)

    def _reply(self, client: _Client, answer: _Answer, head_only: bool) -> None:
        client.out = _encode(answer, head_only)
        client.stage = _WRITING
        client.deadline = time.monotonic() + CLIENT_TIMEOUT_S
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.out)
        except (BlockingIOError, InterruptedError, *_TLS_WAIT):
            sent = 0
        except OSError:
            self._close(client)
            return
        client.out = client.out[sent:]
        if client.out:  # the peer is not reading: wait for room (rare: answers are < 1 KiB)
            self._selector.modify(client.sock, selectors.EVENT_WRITE, client)
            return
        self.answered += 1
        if isinstance(client.sock, ssl.SSLSocket):
            # A TLS socket cannot be half-closed (no close_notify without a blocking unwrap);
            # probes send no body whose unread bytes would turn the close into a reset.
            self._close(client)
            return
        # Lingering close: end our side, then read until the peer closes. Closing with unread
        # request bytes (a POST body) would send a reset, which can destroy the answer.
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(client)
            return
        client.stage = _LINGERING
        client.deadline = time.monotonic() + LINGER_S
        self._selector.modify(client.sock, selectors.EVENT_READ, client)

    # ------------------------------------------------------------------ routing
    def _route(self, head: bytes) -> tuple[_Answer, bool]:
        """The answer to one request head, and whether it goes without a body (HEAD)."""
        request = _parse_head(head)
        if isinstance(request, _Answer):
            return request, False
        method, path, query, headers = request
        head_only = method == "HEAD"
        lifecycle = self._lifecycle
        if path.startswith("/v1"):  # the app's middleware gates every /v1 path, known or not
            authorization = headers.get("authorization", "").encode("latin-1")
            if not api_key_ok(self._api_key, authorization):
                return _Answer.of(unauthorized()), head_only
            return _Answer.of(not_ready(lifecycle.phase, lifecycle.detail)), head_only
        if path not in HEALTH_PATHS + APP_ONLY_PATHS:
            target = path.rstrip("/")
            if target != path and target in HEALTH_PATHS + APP_ONLY_PATHS:
                # As the app does (Starlette's redirect_slashes); a relative Location is valid.
                location = f"{target}?{query}" if query else target
                return _Answer(307, None, {"Location": location}), head_only
            return _Answer(404, error_body("Not Found", "not_found_error")), head_only
        if method not in ("GET", "HEAD"):
            return _Answer(405, error_body("Method Not Allowed", "invalid_request_error"),
                           {"Allow": _ALLOW}), head_only
        if path == "/health":
            status, body = lifecycle.liveness()
        elif path == "/health/ready":
            status, body = lifecycle.readiness()
        elif path == "/health/graphs":
            status, body = 200, graphs_body(lifecycle, None)  # the app creates the engine
        else:
            return _Answer(
                503,
                error_body(f"{path} is served once the HTTP stack has started; retry shortly.",
                           "service_unavailable_error", code=lifecycle.phase),
                {"Retry-After": RETRY_AFTER_UNAVAILABLE},
            ), head_only
        return _Answer(status, body), head_only


# ---------------------------------------------------------------------- HTTP helpers
def _head_end(buf: bytearray) -> int | None:
    """Index just past the blank line that ends the request head, if it arrived."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := buf.find(sep)) >= 0]
    return min(ends) if ends else None


def _bad_request(message: str) -> _Answer:
    return _Answer(400, error_body(message, "invalid_request_error"))


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]] | _Answer:
    """(method, decoded path, raw query, lower-cased headers: first value wins), or a 400."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return _bad_request("Invalid HTTP request: non-ASCII bytes in the request head")
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        return _bad_request("Invalid HTTP request line")
    method, target, _ = parts
    if target.startswith("/"):
        raw_path, _, query = target.partition("?")
    elif target.startswith(("http://", "https://")):  # absolute form (sent to proxies)
        url = urlsplit(target)
        raw_path, query = url.path or "/", url.query
    else:
        return _bad_request("Invalid HTTP request target")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        # No colon, whitespace before it, or a folded continuation line: malformed (RFC 9112).
        if not sep or not name or name != name.strip():
            return _bad_request("Invalid HTTP header line")
        headers.setdefault(name.lower(), value.strip(" \t"))
    return method, unquote(raw_path), query, headers


def _encode(answer: _Answer, head_only: bool) -> bytes:
    payload = b""
    if answer.body is not None:
        payload = json.dumps(answer.body, separators=(",", ":")).encode()
    lines = [
        f"HTTP/1.1 {answer.status} {_REASONS.get(answer.status, '')}",
        *(["Content-Type: application/json"] if answer.body is not None else []),
        f"Content-Length: {len(payload)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in answer.headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else payload)
