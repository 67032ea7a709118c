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
