"""What the routes share: config, lifecycle, metrics, the engine and the requests in flight.

`ServerState` boots the engine in the background once the app serves (so `/health` answers
from the first moment), gates `/v1` on the API key and readiness, admits requests, and drains
on SIGTERM. Event-loop thread only, except the engine's phase callback, which arrives on the
engine thread and is handed to the lifecycle (thread-safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from server.config import ServerConfig
from server.engine_protocol import EngineProtocol
from server.errors import EngineNotReadyError, InvalidRequestError, QueueFullError
from server.health import DRAINING, FAILED, READY, Lifecycle
from server.http.errors import (
    RETRY_AFTER_UNAVAILABLE,
    ApiError,
    api_key_ok,
    not_ready,
    queue_full,
    unauthorized,
)
from server.http.generation import Generation
from server.http.limits import BODY_BUDGET_REQUESTS, default_max_request_bytes
from server.http.loop_lag import watch_loop_lag
from server.http.workers import WorkerPool
from server.metrics import ServerMetrics
from server.request import SamplingParams

logger = logging.getLogger("graphserve.api")

DEFAULT_ENGINE_CLASS = "server.engine:AsyncEngine"
ENGINE_SHUTDOWN_TIMEOUT = 15.0  # seconds we wait for engine.shutdown() before giving up on it


class ServerState:
    """Everything the routes share: config, lifecycle, metrics, the engine, in-flight requests."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        lifecycle: Lifecycle | None = None,
        engine_factory: Callable[..., Any] | None = None,
        engine_class: str = DEFAULT_ENGINE_CLASS,
        on_exit: Callable[[int], None] | None = None,
    ):
        self.config = config
        self.lifecycle = lifecycle or Lifecycle()
        self.metrics = ServerMetrics(self.lifecycle, lambda: self.engine)
        self.engine: EngineProtocol | None = None
        self.inflight: dict[str, Generation] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._engine_factory = engine_factory
        self._engine_class = engine_class
        self._on_exit = on_exit
        self._boot_task: asyncio.Task | None = None
        self._lag_task: asyncio.Task | None = None  # server.http.loop_lag
        self._exit_handle: asyncio.TimerHandle | None = None
        self._was_ready = False
        self._api_key = config.api_key.encode() if config.api_key else None
        # Prompt rendering and tokenisation run here, off the event loop (see http.workers).
        self.prompt_workers = WorkerPool()
        self.body_bytes_held = 0  # request-body bytes reserved by requests in progress

    # ------------------------------------------------------------- limits
    def max_request_bytes(self) -> int:
        """The body limit now: the flag, else sized from the engine's context length."""
        if self.config.max_request_bytes is not None:
            return self.config.max_request_bytes
        max_len = getattr(self.engine, "max_model_len", None) or self.config.engine.max_model_len
        return default_max_request_bytes(max_len)

    def reserve_body_bytes(self, n: int) -> bool:
        """Take `n` bytes of the budget for request bodies in progress (a flood of maximal
        bodies is refused instead of held in memory); False when it would overflow. A lone
        request never overflows, whatever its size. Event loop only."""
        budget = BODY_BUDGET_REQUESTS * self.max_request_bytes()
        if self.body_bytes_held and self.body_bytes_held + n > budget:
            return False
        self.body_bytes_held += n
        return True

    def release_body_bytes(self, n: int) -> None:
        self.body_bytes_held -= n

    # ------------------------------------------------------------- lifecycle
    async def startup(self) -> None:
        """Called from the app's lifespan: returns at once, the engine boots in the background."""
        loop = asyncio.get_running_loop()
        self.prompt_workers = WorkerPool()  # anew: a lifespan may run again after a shutdown
        self.lifecycle.bind_loop(loop)
        self.lifecycle.add_listener(self._on_phase_change)
        self._boot_task = loop.create_task(self._boot(), name="graphserve-engine-boot")
        self._lag_task = loop.create_task(watch_loop_lag(self.metrics.loop_lag.observe),
                                          name="graphserve-loop-lag")

    async def _boot(self) -> None:
        try:
            factory = self._engine_factory
            if factory is None:
                # Off the event loop: importing the engine module may import torch (seconds of
                # CPU), and /health must keep answering meanwhile.
                factory = await in_thread(resolve, self._engine_class)
            if self.lifecycle.phase in (DRAINING, FAILED):
                return
            engine = factory(self.config.engine, on_phase=self._on_engine_phase)
            self.engine = engine
            engine.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("engine failed to start")
            self.lifecycle.fail(f"engine failed to start: {type(exc).__name__}: {exc}")

    def _on_engine_phase(self, phase: str, detail: Any = None) -> None:
        # Called on the engine thread.
        self.lifecycle.set_phase(phase, None if detail is None else str(detail))

    def _on_phase_change(self, phase: str, detail: str | None) -> None:
        # Called on the event loop.
        if phase == READY:
            self._was_ready = True
        if phase == FAILED and self._exit_handle is None:
            grace = self.config.startup_failure_grace
            logger.error(
                "engine failed: %s; exiting in %.1fs (readiness reports the reason until then)",
                detail, grace,
            )
            loop = asyncio.get_running_loop()
            self._exit_handle = loop.call_later(grace, self.request_exit, 1)

    def request_exit(self, code: int) -> None:
        if self._on_exit is not None:
            self._on_exit(code)
        else:
            logger.warning("exit with code %d requested, but no exit hook is installed", code)

    async def shutdown(self) -> None:
        """Lifespan shutdown: stop the boot task and the engine thread (bounded wait)."""
        if self._boot_task is not None and not self._boot_task.done():
            self._boot_task.cancel()
            with contextlib.suppress(BaseException):
                await self._boot_task
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(BaseException):
                await self._lag_task
            self._lag_task = None
        if self._exit_handle is not None:
            self._exit_handle.cancel()
        for gen in list(self.inflight.values()):
            gen.abort("shutdown")
        self.prompt_workers.close()
        engine, self.engine = self.engine, None
        if engine is None:
            return
        # An engine that never got ready holds no requests: waiting for its thread to finish
        # loading a model (minutes, on a big GPU model) would only delay the exit.
        timeout = ENGINE_SHUTDOWN_TIMEOUT if self._was_ready else 2.0
        try:
            await asyncio.wait_for(in_thread(engine.shutdown), timeout)
            logger.info("engine shut down")
        except asyncio.TimeoutError:
            if self._was_ready:
                logger.error("engine.shutdown() did not return within %.0fs", timeout)
            else:
                logger.info("engine still starting; exiting without waiting for it")
        except Exception:
            logger.exception("engine.shutdown() failed")

    async def drain(self, timeout: float) -> None:
        """SIGTERM: refuse new work at once, let in-flight requests finish for up to `timeout`
        seconds, then abort the rest and give their handlers a moment to answer."""
        self.lifecycle.set_phase(DRAINING, "shutdown requested")
        stop_accepting = getattr(self.engine, "stop_accepting", None)
        if callable(stop_accepting):
            stop_accepting()
        if self.inflight:
            logger.info("draining %d in-flight request(s), up to %.1fs",
                        len(self.inflight), timeout)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        if self.inflight:
            logger.warning(
                "drain timeout (%.1fs): aborting %d request(s)", timeout, len(self.inflight)
            )
            for gen in list(self.inflight.values()):
                gen.abort("drain")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 5.0)
        logger.info("drain complete")

    # ------------------------------------------------------------- requests
    def gate(self, headers: list[tuple[bytes, bytes]]) -> ApiError | None:
        """Auth first (nothing leaks to a caller without the key), then readiness."""
        if self._api_key is not None:
            authorization = next((v for k, v in headers if k == b"authorization"), None)
            if not api_key_ok(self._api_key, authorization):
                return unauthorized()
        return self.not_ready_error()

    def not_ready_error(self) -> ApiError | None:
        phase = self.lifecycle.phase
        if phase == READY and self.engine is not None:
            return None
        return not_ready(phase, self.lifecycle.detail)

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               arrival: float) -> Generation:
        err = self.not_ready_error()  # SIGTERM may have come while the body was read
        if err is not None:
            raise err
        try:
            stream = self.engine.add_request(request_id, prompt_ids, params)
        except InvalidRequestError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        except QueueFullError as exc:
            raise queue_full(str(exc)) from None
        except EngineNotReadyError as exc:
            raise ApiError(503, f"The engine is not accepting requests: {exc}",
                           type="service_unavailable_error", code="engine_not_ready",
                           headers={"Retry-After": RETRY_AFTER_UNAVAILABLE}) from None
        gen = Generation(request_id, prompt_ids, stream, arrival, engine=self.engine,
                         metrics=self.metrics, on_close=self.release, choices=params.n)
        self.inflight[request_id] = gen
        self._idle.clear()
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        return gen

    def release(self, request_id: str) -> None:
        self.inflight.pop(request_id, None)
        if not self.inflight:
            self._idle.set()


def in_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future:
    """Run `fn(*args)` on a fresh daemon thread; await the result on the loop.

    Not `asyncio.to_thread`: its executor cannot start during interpreter shutdown (a lifespan
    stopped from an atexit hook), and its non-daemon workers would keep a stuck call alive.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    def run() -> None:
        try:
            result = (True, fn(*args))
        except BaseException as exc:  # handed to the awaiting coroutine
            result = (False, exc)
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle, *result)

    threading.Thread(target=run, name=f"graphserve-{getattr(fn, '__name__', 'call')}",
                     daemon=True).start()
    return future


def resolve(spec: str) -> Any:
    """'package.module:Name' -> the object (used for the engine class)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"engine class must look like 'module:Name', got {spec!r}")
    return getattr(importlib.import_module(module_name), attr)
