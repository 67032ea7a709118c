"""Server lifecycle: the phase the process is in, and the liveness/readiness answers built on it.

The phase moves `starting -> loading_weights -> allocating_kv_cache -> capturing_graphs -> ready`
as the engine thread reports progress, and ends in `draining` (SIGTERM) or `failed` (a startup
fault). Both end states are sticky: a late `ready` from the engine thread must not reopen a
server that is shutting down. The engine thread calls `Lifecycle.set_phase`; the event loop reads
the phase; a lock keeps the two consistent, and listeners are told on the event loop.

Torch-free and FastAPI-free on purpose: the CLI imports this right after binding the port, for
the early health responder; asyncio is imported only when listeners are notified (the app's
event loop has imported it by then), which keeps it off the path to the first `/health` answer.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

logger = logging.getLogger("graphserve.lifecycle")

STARTING = "starting"
LOADING_WEIGHTS = "loading_weights"
ALLOCATING_KV_CACHE = "allocating_kv_cache"
CAPTURING_GRAPHS = "capturing_graphs"
READY = "ready"
DRAINING = "draining"
FAILED = "failed"

PHASES = (STARTING, LOADING_WEIGHTS, ALLOCATING_KV_CACHE, CAPTURING_GRAPHS, READY, DRAINING, FAILED)
# Phases the engine may report through its on_phase callback.
ENGINE_PHASES = (LOADING_WEIGHTS, ALLOCATING_KV_CACHE, CAPTURING_GRAPHS, READY, FAILED)
_TERMINAL = (DRAINING, FAILED)


def process_uptime() -> float | None:
    """Seconds since this process was exec'd (Linux), or None where that cannot be read.

    Measured from the kernel's start time rather than from an import, so the interpreter's own
    start-up counts: that is what an orchestrator's liveness probe sees.
    """
    try:
        with open(f"/proc/{os.getpid()}/stat", "rb") as f:
            stat = f.read().decode()
        # Field 22 (starttime, clock ticks since boot); fields after the ')' of the command name.
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        ticks = os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / ticks
    except (OSError, ValueError, IndexError, AttributeError):
        return None


@dataclass(frozen=True)
class PhaseRecord:
    """One phase transition: which phase, entered when (monotonic seconds), and its detail."""

    phase: str
    at: float
    detail: str | None = None


class Lifecycle:
    """Thread-safe record of the server's phase, with timings and event-loop listeners."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._history: list[PhaseRecord] = [PhaseRecord(STARTING, self._t0)]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[Callable[[str, str | None], None]] = []

    # ------------------------------------------------------------------ state
    @property
    def phase(self) -> str:
        return self._history[-1].phase

    @property
    def detail(self) -> str | None:
        return self._history[-1].detail

    @property
    def ready(self) -> bool:
        return self.phase == READY

    @property
    def failed(self) -> bool:
        return self.phase == FAILED

    def history(self) -> list[PhaseRecord]:
        with self._lock:
            return list(self._history)

    # ---------------------------------------------------------------- changes
    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver listener calls on `loop` (set by the app at startup)."""
        self._loop = loop

    def add_listener(self, fn: Callable[[str, str | None], None]) -> None:
        """Call `fn(phase, detail)` on the event loop after every accepted transition."""
        self._listeners.append(fn)

    def set_phase(self, phase: str, detail: str | None = None) -> bool:
        """Move to `phase`; callable from any thread. Returns False if the move was refused.

        Refused: unknown phases, and anything after `failed`, or after `draining` except
        `failed` (a fault while draining is still worth reporting).
        """
        if phase not in PHASES:
            logger.warning("ignoring unknown lifecycle phase %r (detail %r)", phase, detail)
            return False
        now = time.monotonic()
        with self._lock:
            prev = self._history[-1]
            if prev.phase == FAILED or (prev.phase == DRAINING and phase != FAILED):
                if phase != prev.phase:
                    logger.debug("phase %s after %s ignored", phase, prev.phase)
                return False
            if phase == prev.phase:
                # Same phase, new detail (e.g. which graph is being captured): no transition.
                self._history[-1] = PhaseRecord(phase, prev.at, detail)
                return True
            self._history.append(PhaseRecord(phase, now, detail))
        self._log_transition(prev, phase, detail, now)
        self._notify(phase, detail)
        return True

    def fail(self, reason: str) -> bool:
        return self.set_phase(FAILED, reason)

    def _log_transition(self, prev: PhaseRecord, phase: str, detail: str | None, now: float):
        took = now - prev.at
        since = now - self._t0
        suffix = f": {detail}" if detail else ""
        if phase == FAILED:
            logger.error(
                "%s in phase %s after %.2fs (%.2fs since start)%s",
                "failed" if prev.phase in (READY, DRAINING) else "startup failed",
                prev.phase, took, since, suffix,
            )
        else:
            logger.info(
                "phase %s -> %s (%s took %.2fs; %.2fs since start)%s",
                prev.phase, phase, prev.phase, took, since, suffix,
            )

    def _notify(self, phase: str, detail: str | None) -> None:
        import asyncio

        loop = self._loop
        for fn in list(self._listeners):
            if loop is None or loop.is_closed():
                continue
            try:
                on_loop = asyncio.get_running_loop() is loop
            except RuntimeError:
                on_loop = False
            if on_loop:
                loop.call_soon(fn, phase, detail)
            else:
                loop.call_soon_threadsafe(fn, phase, detail)

    # ---------------------------------------------------------------- answers
    def liveness(self) -> tuple[int, dict[str, Any]]:
        """`/health`: 200 while the process can still become (or stay) useful, 503 once failed."""
        rec = self._history[-1]
        body: dict[str, Any] = {
            "status": "failed" if rec.phase == FAILED else "ok",
            "phase": rec.phase,
            "uptime_s": round(time.monotonic() - self._t0, 3),
        }
        if rec.phase == FAILED:
            body["reason"] = rec.detail
            return 503, body
        return 200, body

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """`/health/ready`: 200 once ready, else 503 naming the phase (and the failure reason)."""
        history = self.history()
        rec = history[-1]
        now = time.monotonic()
        body: dict[str, Any] = {
            "ready": rec.phase == READY,
            "phase": rec.phase,
            "phase_elapsed_s": round(now - rec.at, 3),
            "uptime_s": round(now - self._t0, 3),
            "phases": [
                {"phase": r.phase, "at_s": round(r.at - self._t0, 3)} for r in history
            ],
        }
        if rec.phase == FAILED:
            body["reason"] = rec.detail
        elif rec.detail:
            body["detail"] = rec.detail
        return (200 if rec.phase == READY else 503), body


def graphs_body(lifecycle: Lifecycle, engine: Any) -> dict[str, Any]:
    """`/health/graphs`: the engine's graph report plus the phase; valid without an engine."""
    body: dict[str, Any] = {"phase": lifecycle.phase}
    if engine is None:
        body["available"] = False
        body["message"] = "the engine has not been created yet"
        return body
    try:
        report = engine.graph_report()
    except Exception as exc:  # the report is diagnostics: never let it fail the probe
        logger.debug("graph_report() failed", exc_info=True)
        body["available"] = False
        body["message"] = f"graph report unavailable: {exc}"
        return body
    if not isinstance(report, dict):
        body["available"] = False
        body["message"] = "graph report unavailable: engine returned no mapping"
        return body
    out = {str(k): jsonable(v) for k, v in report.items()}
    out.update(body)
    out["available"] = True
    return out


def jsonable(value: Any) -> Any:
    """Make an engine-produced value strict-JSON safe (non-finite floats become None)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)
