"""The HTTP rules every answer follows, in one place: OpenAI's error body, JSON encoding, the
API-key check and the standard refusals (401, 503 not ready, 429 queue full).

Standard library only: the early health responder (`server.early_health`) answers with these
before FastAPI is imported, and the app (`server.api`) answers with the same ones afterwards,
so a client sees one behaviour across the handover.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

RETRY_AFTER_UNAVAILABLE = "5"  # seconds a client should wait on a 503 (not ready, draining)
RETRY_AFTER_QUEUE_FULL = "1"  # ... and on a 429 (the waiting queue is full)


class ApiError(Exception):
    """An error answer in OpenAI's shape; raised anywhere in a request's handling."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None  # noqa: A002
) -> dict[str, Any]:
    """OpenAI's error object: `{"error": {message, type, param, code}}`."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def dumps(obj: Any) -> bytes:
    """Strict, compact JSON that can encode any string a client sent.

    ensure_ascii: client-supplied strings may hold lone surrogates (legal in JSON escapes, not
    encodable as UTF-8); escaping keeps every answer encodable. allow_nan=False: strict JSON.
    """
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


# -- authentication ----------------------------------------------------------------------------


def api_key_ok(api_key: bytes | None, authorization: bytes | None) -> bool:
    """Whether an `Authorization` header value carries `Bearer <api_key>` (always, with no key).

    Constant-time comparison; the scheme is case-insensitive, the token is taken verbatim after
    one space, surrounding whitespace trimmed.
    """
    if api_key is None:
        return True
    scheme, _, token = (authorization or b"").partition(b" ")
    supplied = token.strip() if scheme.lower() == b"bearer" else b""
    return hmac.compare_digest(supplied, api_key)


def unauthorized() -> ApiError:
    return ApiError(
        401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
        type="authentication_error", code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


# -- refusals ----------------------------------------------------------------------------------


def not_ready_message(phase: str, detail: str | None) -> str:
    """Why `/v1` answers 503 in `phase`."""
    if phase == "draining":
        return "The server is shutting down; send the request elsewhere."
    if phase == "failed":
        return f"The server failed to start: {detail}"
    return f"The model is not ready yet (phase: {phase}); retry shortly."


def not_ready(phase: str, detail: str | None) -> ApiError:
    """The 503 for `/v1` while the server is starting, draining or failed."""
    return ApiError(
        503, not_ready_message(phase, detail), type="service_unavailable_error", code=phase,
        headers={"Retry-After": RETRY_AFTER_UNAVAILABLE},
    )


def queue_full(detail: str) -> ApiError:
    return ApiError(
        429, f"The server is at capacity, retry later ({detail})".replace(" ()", ""),
        type="rate_limit_error", code="queue_full",
        headers={"Retry-After": RETRY_AFTER_QUEUE_FULL},
    )


# -- limits (docs/deployment.md, "Reliability") --------------------------------------------------


def request_too_large(limit: int, size: int | None) -> ApiError:
    """413: the body is larger than `--max-request-bytes` (`size` when declared up front)."""
    got = f" ({size} bytes declared)" if size is not None else ""
    return ApiError(
        413, f"The request body is larger than this server's limit of {limit} bytes{got}; "
        "send a shorter prompt (the limit is set with --max-request-bytes).",
        code="request_too_large", headers={"Connection": "close"},
    )


def request_timeout(what: str, seconds: float) -> ApiError:
    """408: the client did not send `what` within `seconds`."""
    return ApiError(
        408, f"The {what} did not arrive within {seconds:g} s.", code="request_timeout",
        headers={"Connection": "close"},
    )


def server_busy(detail: str) -> ApiError:
    """429 for capacity that is not the engine's queue: bodies in flight, connections."""
    return ApiError(
        429, f"The server is at capacity, retry later ({detail})", type="rate_limit_error",
        code="server_busy", headers={"Retry-After": RETRY_AFTER_QUEUE_FULL, "Connection": "close"},
    )


_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
            429: "Too Many Requests", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


def raw_response(error: ApiError) -> bytes:
    """`error` as a complete HTTP/1.1 response that closes the connection, for answers written
    below the ASGI app (a request head that never completes, a connection over the cap)."""
    payload = dumps(error.body())
    headers = {"Content-Type": "application/json", "Content-Length": str(len(payload)),
               **error.headers, "Connection": "close"}
    head = [f"HTTP/1.1 {error.status} {_REASONS.get(error.status, '')}",
            *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload
