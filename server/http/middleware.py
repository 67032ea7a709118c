"""ASGI middleware for `/v1/*`: stamps the arrival time, enforces the API key and readiness
before a body is read, and counts requests by endpoint and status for /metrics."""

from __future__ import annotations

import time

from server.http.responses import error_response
from server.http.state import ServerState

V1_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


class V1Middleware:
    """For `/v1/*`: stamps arrival, enforces auth and readiness, counts requests by status."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["arrival"] = time.perf_counter()
        path = scope["path"].rstrip("/")
        endpoint = path if path in V1_ENDPOINTS else "other"
        status: list[int] = []

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        code = "499"  # nothing sent: the client went away (or the server is force-exiting)
        try:
            err = self.state.gate(scope["headers"])
            if err is not None:
                await error_response(err)(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        except Exception:
            code = "500"
            raise
        finally:
            if status:
                code = str(status[0])
            self.state.metrics.requests.labels(endpoint, code).inc()
