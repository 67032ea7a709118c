"""uvicorn's `Config` and `Server` as graphserve runs them: the guarded connection protocol,
the shared TLS context, signal handling and the socket handover.

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
import ssl
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from server.config import ServerConfig
from server.connection_guard import ConnectionLimits, ConnectionRegistry, guarded_protocol
from server.early_health import EarlyHealthResponder
from server.http.state import ServerState

logger = logging.getLogger("graphserve.cli")


def uvicorn_config(app: Any, config: ServerConfig, host: str, port: int, *,
                   access_log: bool = True, tls: ssl.SSLContext | None = None,
                   ) -> tuple[uvicorn.Config, ConnectionRegistry]:
    """The uvicorn configuration for `app`, and the registry of its guarded connections."""
    connections = ConnectionRegistry(ConnectionLimits(
        max_connections=config.max_connections, header_timeout=config.header_timeout))
    uv_config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=access_log,
        timeout_graceful_shutdown=5, lifespan="on",
        timeout_keep_alive=config.keep_alive_timeout,
        # The guarded httptools protocol: head deadline, head size, connection cap and
        # lingering close (server/connection_guard.py). uvicorn's limit_concurrency is left
        # off on purpose: it would answer health probes 503 under load.
        http=guarded_protocol(connections), ws="none",
    )
    if tls is not None:
        uv_config.load()
        uv_config.ssl = tls  # the context the early responder used (launch.tls_context)
    return uv_config, connections


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
