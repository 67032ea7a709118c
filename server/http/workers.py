"""A small pool of daemon threads for the CPU work of preparing a prompt (chat-template rendering,
tokenisation), so that the event loop keeps answering `/health` and streaming tokens meanwhile.

Why threads help: the `tokenizers` library releases the GIL while it encodes, so encoding runs
truly beside the loop. Jinja rendering is Python and holds the GIL, but the interpreter hands
the GIL back to the loop thread every switch interval (5 ms), so a long render delays the loop by
milliseconds instead of by its whole duration.

Why not `asyncio.to_thread` / `ThreadPoolExecutor`: their workers are not daemons, and the
interpreter joins them at exit, so a 2-second tokenisation would hold up a drained shutdown; the
same reason `server.http.state.in_thread` gives.

Thread ownership: `submit` and `close` are called on the event loop that awaits the results;
the worker threads only run the submitted functions and hand results back to that loop.
The functions must be safe to run concurrently with each other (tokenizer `encode` and chat
rendering are: they read the tokenizer, never configure it).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

PROMPT_WORKERS = 2  # beside the event loop and the engine thread; enough for 2-core CI boxes

_STOP = object()


class WorkerPool:
    """`n` daemon threads fed from one queue; started on the first `submit`."""

    def __init__(self, n: int = PROMPT_WORKERS, name: str = "graphserve-prompt"):
        if n < 1:
            raise ValueError(f"a worker pool needs at least one thread, got {n}")
        self._n = n
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run `fn(*args)` on a worker; the returned future resolves on the calling loop."""
        if self._closed:
            raise RuntimeError("worker pool is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._threads:
            for i in range(self._n):
                thread = threading.Thread(target=self._work, name=f"{self._name}-{i}",
                                          daemon=True)
                thread.start()
                self._threads.append(thread)
        self._jobs.put((fn, args, loop, future))
        return future

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.submit(fn, *args)

    def close(self) -> None:
        """Let the workers end after the jobs already queued; does not wait for them."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(_STOP)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, loop, future = job
            if future.cancelled():  # the request went away while queued: skip its work
                continue
            try:
                result = (True, fn(*args))
            except BaseException as exc:  # handed to the awaiting coroutine, like in_thread
                result = (False, exc)
            try:
                loop.call_soon_threadsafe(_settle, future, *result)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass


def _settle(future: asyncio.Future, ok: bool, value: Any) -> None:
    if not future.done():
        (future.set_result if ok else future.set_exception)(value)
