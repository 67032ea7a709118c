"""How the app turns exceptions into OpenAI-shaped answers: `ApiError` as itself, pydantic's
validation errors as one readable 400 naming the parameter (instead of FastAPI's 422), other
HTTP errors and unexpected exceptions in the same body shape."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from server.http.errors import ApiError, error_body
from server.http.responses import JSONBody, error_response
from server.http.schemas import REQUEST_MODELS

logger = logging.getLogger("graphserve.api")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        message, param = describe_validation(exc.errors())
        return error_response(ApiError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if exc.status_code == 400 and isinstance(exc.__cause__, ValueError):
            # FastAPI's "There was an error parsing the body" hides why, e.g. Python's limit of
            # 4300 digits for an integer: say it.
            message = f"Malformed JSON body: {str(exc.__cause__).split(';')[0]}"
        return JSONBody(error_body(message, kind), status_code=exc.status_code,
                        headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONBody(error_body(f"internal error: {type(exc).__name__}", "server_error",
                                   code="internal_error"), status_code=500)


_FIELD_NAMES = frozenset(name for model in REQUEST_MODELS for name in model.model_fields)


def describe_validation(errors: Any) -> tuple[str, str | None]:
    """Pydantic's error list -> (one readable message, OpenAI-style param path)."""
    errors = list(errors) or [{"msg": "invalid request", "loc": ()}]
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"Malformed JSON body: {ctx.get('error', 'could not parse')}", None

    def path(err: dict) -> list:
        # Drop 'body' and the type tags pydantic puts in the location of union members
        # ('str', 'list[int]'): keep field names and list indices.
        return [p for p in err.get("loc", ()) if isinstance(p, int) or p in _FIELD_NAMES]

    where = path(first)
    if not where and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        if isinstance(first.get("input"), (bytes, str)):
            return ("The request body must be JSON, sent with 'Content-Type: "
                    "application/json'.", None)
        return "The request body must be a JSON object.", None
    param = ".".join(str(p) for p in where) or None
    # Every alternative of a union fails separately; the deepest failure is the most specific.
    related = [e for e in errors if path(e)[: len(where)] == where]
    best = max(related, key=lambda e: len(e.get("loc", ())))
    if len(best.get("loc", ())) > len(first.get("loc", ())):
        first, where = best, path(best)
        param = ".".join(str(p) for p in where) or None
        msg = best.get("msg", "invalid value")
    elif len(related) > 1:
        depth = len(first.get("loc", ()))
        tags = [str(e["loc"][depth - 1]) for e in related if len(e.get("loc", ())) == depth]
        msg = "invalid type; expected " + " or ".join(dict.fromkeys(tags))
    else:
        msg = "field required" if first.get("type") == "missing" else first.get("msg", "invalid")
    others = len(errors) - len(related)
    extra = f" (and {others} more problem(s))" if others > 0 else ""
    return (f"{param}: {msg}{extra}" if param else f"{msg}{extra}"), param
