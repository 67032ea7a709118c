"""The engine contract the HTTP layer relies on, and the stream type both sides share.

`EngineProtocol` is what `server.api` may call on an engine; `server.engine.AsyncEngine`
implements it, so does `server.engine_process.EngineProcess` (the HTTP side of an engine in a
process of its own, the default), and so does the torch-free fake the API tests use
(`tests/helpers/fake_engine.py`).
`RequestStream` is the one stream type: the engine puts a request's `RequestOutput` increments
into it (from its own thread, through `loop.call_soon_threadsafe`), the HTTP layer iterates it.

Torch-free and FastAPI-free on purpose: the API imports it before any model stack exists.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, runtime_checkable

from server.request import RequestOutput, SamplingParams

# on_phase(phase, detail), called from the engine's own thread: phase is one of
# server.health.ENGINE_PHASES ("failed" carries the reason as detail).
PhaseCallback = Callable[[str, "str | None"], None]


class RequestStream:
    """Async iterator over one request's `RequestOutput` increments (the last one finished).

    Owned by the event loop it was created on; producers on other threads hand outputs over
    with `deliver(streams_and_outputs)` (or `loop.call_soon_threadsafe(stream.put, out)`).

    A request with `choices` > 1 (n) interleaves its choices' outputs (`RequestOutput.index`);
    the stream ends after the last choice's finished output. `open_choices` is the producer's
    own set of the choices not finished yet (only the producer's thread touches it: `route`).
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, choices: int = 1):
        self.request_id = request_id
        self.loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False
        self.open_choices = set(range(choices))
        self._unfinished = choices

    def put(self, out: RequestOutput) -> None:
        """Event-loop thread only."""
        self._queue.put_nowait(out)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        if out.finished:
            self._unfinished -= 1
            if self._unfinished <= 0:
                self.finished = True
        return out


def route(outputs: list[RequestOutput], streams: dict[str, RequestStream]) -> None:
    """The producer's thread: hand each output to its request's stream in `streams` (outputs
    of requests not there are dropped); a stream leaves `streams` with its last choice's
    finished output."""
    items = []
    for out in outputs:
        stream = streams.get(out.request_id)
        if stream is None:
            continue
        if out.finished:
            stream.open_choices.discard(out.index)
            if not stream.open_choices:
                streams.pop(out.request_id, None)
        items.append((stream, out))
    deliver(items)


def deliver(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    """From any thread: hand each output to its stream on that stream's event loop.

    One `call_soon_threadsafe` per loop and batch, not per output: a decode step of 64 rows
    wakes the loop once. Outputs for a closed loop are dropped (nobody is listening).
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
    for stream, out in items:
        by_loop.setdefault(stream.loop, []).append((stream, out))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # that loop is closed
            pass


def _put_all(batch: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in batch:
        stream.put(out)


@runtime_checkable
class EngineProtocol(Protocol):
    """What the HTTP layer uses of an engine. Construction: `factory(config, on_phase=cb)`.

    Thread ownership: `add_request` runs on the event loop that consumes the returned stream;
    `abort`, `stop_accepting`, `stats` and `graph_report` may be called from any thread;
    `start` and `shutdown` from the app's lifecycle. The attributes below are valid once the
    engine reported "ready" through `on_phase`.
    """

    model_name: str | None
    max_model_len: int | None
    vocab_size: int | None
    tokenizer: Any  # for the event-loop thread: encode, decode, len, bos/eos ids, chat template

    def start(self) -> None:
        """Start loading in the background; phases are reported through `on_phase`."""

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request; raises InvalidRequestError, QueueFullError or EngineNotReadyError
        (server.errors) before anything is queued. The stream carries the outputs of the
        `params.n` choices (`RequestOutput.index`) and ends after the last choice's finished
        output."""

    def abort(self, request_id: str) -> None:
        """Idempotent; the request ends with finish_reason "abort" if it had not finished."""

    def stop_accepting(self) -> None:
        """Draining: refuse new requests from now on, keep serving running ones."""

    def stats(self) -> dict[str, Any]:
        """Counters for /metrics: at least "running" and "waiting"."""

    def graph_report(self) -> dict[str, Any]:
        """The body of /health/graphs (policy, device, sizes, coverage, ...)."""

    def shutdown(self) -> None:
        """Stop the engine; unfinished requests end with finish_reason "abort"."""
