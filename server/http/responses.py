"""Starlette responses with the project's JSON rules (`server.http.errors.dumps`)."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

from server.http.errors import ApiError, dumps


class JSONBody(JSONResponse):
    """JSONResponse that can encode any string the client sent (see `errors.dumps`)."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


def error_response(error: ApiError) -> Response:
    return JSONBody(error.body(), status_code=error.status, headers=error.headers or None)
