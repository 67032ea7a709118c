"""Answer health probes from the moment the port is bound, before the HTTP stack is imported.

The CLI binds its listening socket first, but uvicorn only starts accepting after `import
fastapi, uvicorn` (and pydantic, starlette), which took 0.9-1.2 s on the GPU machine's Python.
Until then a liveness probe would sit in the kernel's accept queue. This stdlib-only responder
accepts on a duplicate of the listening socket and answers `/health`, `/health/ready` and
`/health/graphs` with the same bodies the app gives in the `starting` phase (built by the same
`Lifecycle`), and every other path with a 503 + `Retry-After` (401 for `/v1` without the right
key, as the app answers). `stop()` is called right before uvicorn takes over the socket: it stops
accepting, finishes the answers in flight and closes only its duplicate, so the listening socket
and the connections queued on it pass to uvicorn untouched.
"""

from __future__ import annotations

import hmac
import json
import logging
import selectors
import socket
import threading
import time

from server.health import Lifecycle, graphs_body

logger = logging.getLogger("graphserve.early_health")

_MAX_HEAD = 16 * 1024  # request head limit; a probe sends ~100 bytes
_CLIENT_TIMEOUT_S = 2.0  # a client that has not sent its head by then is dropped
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 503: "Service Unavailable"}  # fmt: skip
_RETRY_AFTER = "5"


def _error(message: str, type_: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class EarlyHealthResponder:
    """A one-thread, non-blocking HTTP/1.x responder for the seconds before uvicorn serves."""

    def __init__(self, sock: socket.socket, lifecycle: Lifecycle, api_key: str | None = None):
        self._listener = sock.dup()  # closing the duplicate leaves the original listening
        self._listener.setblocking(False)
        self._lifecycle = lifecycle
        self._api_key = api_key.encode() if api_key else None
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="graphserve-early-health", daemon=True
        )
        self._clients: dict[socket.socket, tuple[bytearray, float]] = {}
        self.answered = 0

    def start(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop accepting, answer what was already read, close the duplicate socket."""
        self._stop.set()
        self._thread.join(timeout)
        logger.debug("early health responder answered %d requests", self.answered)

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        listening = True
        try:
            # After stop(): no more accepts (uvicorn takes new connections), but clients already
            # accepted here still get their answer, or are dropped at their deadline.
            while listening or self._clients:
                if listening and self._stop.is_set():
                    self._selector.unregister(self._listener)
                    listening = False
                    continue
                for key, _ in self._selector.select(timeout=0.05):
                    if key.fileobj is self._listener:
                        self._accept()
                    else:
                        self._read(key.fileobj)
                self._expire(time.monotonic())
        except Exception:  # never take the process down: uvicorn will answer soon anyway
            logger.exception("early health responder failed; uvicorn will answer once started")
        finally:
            self._listener.close()
            for conn in list(self._clients):
                self._close(conn)
            self._selector.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. the peer reset before accept: nothing to answer
                return
            conn.setblocking(False)
            self._clients[conn] = (bytearray(), time.monotonic() + _CLIENT_TIMEOUT_S)
            self._selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        buf = self._clients[conn][0]
        try:
            chunk = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not chunk:
            self._close(conn)
            return
        buf += chunk
        if b"\r\n\r\n" in buf or b"\n\n" in buf:
            self._answer(conn, bytes(buf))
        elif len(buf) > _MAX_HEAD:
            self._respond(
                conn, 400, _error("request head too large", "invalid_request_error", "bad_request")
            )

    def _expire(self, now: float) -> None:
        for conn, (_, deadline) in list(self._clients.items()):
            if now > deadline:
                self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        self._clients.pop(conn, None)
        try:
            self._selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    # -- answers ----------------------------------------------------------------------------

    def _answer(self, conn: socket.socket, head: bytes) -> None:
        lines = head.split(b"\n")
        parts = lines[0].strip().split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._respond(
                conn, 400, _error("malformed request line", "invalid_request_error", "bad_request")
            )
            return
        method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1")
        path = target.split("?", 1)[0]
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        head_only = method == "HEAD"
        if path in ("/health", "/health/ready", "/health/graphs", "/metrics"):
            if method not in ("GET", "HEAD"):
                self._respond(
                    conn, 405, _error("Method Not Allowed", "invalid_request_error", None)
                )
                return
            if path == "/health":
                status, body = self._lifecycle.liveness()
            elif path == "/health/ready":
                status, body = self._lifecycle.readiness()
            elif path == "/health/graphs":
                status, body = 200, graphs_body(self._lifecycle, None)
            else:  # no registry yet: nothing to export for the fraction of a second this runs
                status = 503
                body = _error("metrics are not available yet (phase: starting)",
                              "service_unavailable_error", self._lifecycle.phase)  # fmt: skip
            self._respond(conn, status, body, head_only)
        elif not path.startswith("/v1/"):
            self._respond(conn, 404, _error("Not Found", "not_found_error", None), head_only)
        elif not self._authorized(headers):
            self._respond(
                conn, 401,
                _error("Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                       "authentication_error", "invalid_api_key"),
                head_only, {"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        else:
            phase = self._lifecycle.phase
            body = _error(f"The model is not ready yet (phase: {phase}); retry shortly.",
                          "service_unavailable_error", phase)  # fmt: skip
            self._respond(conn, 503, body, head_only, {"Retry-After": _RETRY_AFTER})

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self._api_key is None:
            return True
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        supplied = token.strip() if scheme.lower() == b"bearer" else b""
        return hmac.compare_digest(supplied, self._api_key)

    def _respond(self, conn, status: int, body: dict, head_only: bool = False, extra=None) -> None:
        payload = json.dumps(body, separators=(",", ":")).encode()
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}",
            "content-type: application/json",
            f"content-length: {len(payload)}",
            "connection: close",
            *(f"{k}: {v}" for k, v in (extra or {}).items()),
        ]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else payload)
        try:
            conn.setblocking(True)
            conn.settimeout(_CLIENT_TIMEOUT_S)
            conn.sendall(data)
        except OSError:
            pass
        self.answered += 1
        self._close(conn)
