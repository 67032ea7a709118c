"""uvicorn's `Server` with graphserve's signal handling and socket handover.

Imported only after the early health responder is answering (uvicorn's import is part of what
the responder covers). The first SIGTERM/SIGINT drains (`ServerState.drain`) and then exits 0;
a second one exits at once. Signals that arrived while the HTTP stack was importing are
replayed as soon as the event loop handles signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable

import uvicorn

from server.early_health import EarlyHealthResponder
from server.http.state import ServerState

logger = logging.getLogger("graphserve.cli")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server with drain-on-SIGTERM instead of close-at-once."""

    def __init__(self, config: uvicorn.Config, *, state: ServerState, drain_timeout: float,
                 held_signals: Callable[[], list[int]],
                 early: EarlyHealthResponder | None) -> None:
        super().__init__(config)
        self.exit_code = 0
        self._signals = 0
        self._state = state
        self._drain_timeout = drain_timeout
        self._held_signals = held_signals
        self._early = early

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)
        for sig in self._held_signals():  # came during the imports: handle it now
            self.on_signal(sig)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def on_signal(self, sig: int) -> None:
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals > 1:
            logger.warning("%s again: exiting without waiting", name)
            self.should_exit = self.force_exit = True
            return
        logger.info("%s: draining (up to %.1fs), then exiting", name, self._drain_timeout)
        task = asyncio.get_running_loop().create_task(self._state.drain(self._drain_timeout))
        task.add_done_callback(lambda _t: setattr(self, "should_exit", True))

    def request_exit(self, code: int) -> None:
        self.exit_code = code
        self.should_exit = True

    async def startup(self, sockets=None) -> None:
        # Hand the socket over: the responder stops accepting before uvicorn starts to.
        # Queued connections stay in the kernel's queue for uvicorn; none is dropped. A
        # slow client the responder accepted is finished on its thread, not waited for.
        if self._early is not None:
            self._early.stop(wait=0.1)
        await super().startup(sockets=sockets)
