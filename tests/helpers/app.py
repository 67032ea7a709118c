"""Shared helpers for the in-process API tests: an app on the fake engine, SSE parsing, raw ASGI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from server.api import create_app
from server.config import EngineConfig, ServerConfig
from tests.helpers.fake_engine import FakeEngine


@dataclass
class Harness:
    """An app built on a FakeEngine, its client, and what the app asked the process to do."""

    app: Any
    client: httpx.AsyncClient
    exits: list[int] = field(default_factory=list)

    @property
    def state(self):
        return self.app.state.graphserve

    @property
    def engine(self) -> FakeEngine:
        return self.state.engine


def make_app(
    *,
    api_key: str | None = None,
    startup_failure_grace: float = 5.0,
    engine_config: EngineConfig | None = None,
    exits: list[int] | None = None,
    **fake_kwargs: Any,
):
    config = ServerConfig(
        engine=engine_config or EngineConfig(max_model_len=256, max_num_seqs=4, max_queue=8),
        api_key=api_key,
        startup_failure_grace=startup_failure_grace,
    )
    exits = [] if exits is None else exits

    def factory(engine_config, on_phase):
        return FakeEngine(engine_config, on_phase, **fake_kwargs)

    return create_app(config, engine_factory=factory, on_exit=exits.append), exits


@contextlib.asynccontextmanager
async def serve_app(*, wait_ready: bool = True, **kwargs: Any) -> AsyncIterator[Harness]:
    """Run the app's lifespan (engine start/shutdown) around an httpx client bound to it."""
    app, exits = make_app(**kwargs)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            harness = Harness(app, client, exits)
            if wait_ready:
                await wait_for_phase(client, "ready")
            yield harness


async def wait_for_phase(client: httpx.AsyncClient, phase: str, timeout: float = 5.0) -> dict:
    """Poll /health/ready until it names `phase`; returns that body."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        body = (await client.get("/health/ready")).json()
        if body["phase"] == phase:
            return body
        await asyncio.sleep(0.005)
    raise AssertionError(f"phase {phase!r} not reached within {timeout}s; last: {body}")


async def wait_until(predicate, timeout: float = 5.0, interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def parse_sse(text: str) -> list[Any]:
    """SSE body -> list of decoded `data:` payloads ('[DONE]' kept as the string)."""
    events = []
    assert text.endswith("\n\n"), f"SSE body must end with a blank line: {text[-40:]!r}"
    for block in text.split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        assert all(line.startswith("data: ") for line in lines), f"unexpected SSE block {block!r}"
        payload = "\n".join(line[len("data: "):] for line in lines)
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(resp: httpx.Response, status: int, type_: str | None = None,
                 param: str | None = None) -> dict:
    """The response is an OpenAI-style error with this status (and type/param if given)."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if type_ is not None:
        assert err["type"] == type_, err
    if param is not None:
        assert err["param"] == param, err
    return err


class RawExchange:
    """Drive the ASGI app directly so the test decides when the client 'disconnects'."""

    def __init__(self, app: Any, path: str, body: dict[str, Any]):
        self.app = app
        self.scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
            "client": ("127.0.0.1", 1234), "server": ("test", 80),
        }
        self._body = json.dumps(body).encode()
        self._sent_body = False
        self.disconnect = asyncio.Event()
        self.messages: list[dict[str, Any]] = []
        self.first_body = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if not self._sent_body:
            self._sent_body = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            self.first_body.set()

    def run(self) -> asyncio.Task:
        return asyncio.ensure_future(self.app(self.scope, self.receive, self.send))

    @property
    def status(self) -> int | None:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        return starts[0]["status"] if starts else None
