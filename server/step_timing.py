"""The engine's step cadence, as running streams see it: a histogram per step kind.

While the engine is busy, the step pipeline reads one step's tokens after another
(`server.engine.EngineCore._step`); the time between two reads is what every running stream
waits between two tokens on the engine's side: the device's step, the host's bookkeeping, a
capture or anything else that paused the engine thread in between (a garbage collection, a
lock). Compared with the inter-token latency that clients measure, it tells a stall of the
engine from one of the HTTP side. An interval is counted only between two reads of one busy
stretch: after the pipeline drains (nothing left in flight), the next read starts a new one.

`$GRAPHSERVE_TRACE_STEPS_MS` (a diagnostic, off by default): every interval longer than that
many milliseconds is logged with where it went (`trace_threshold_s`): from the previous read to
this step's start (delivering outputs, offering the gap to the capture policy, commands), the
launch of the next step, then the wait for this one and its read, plus what the caller adds
(the capture in flight). It is how the first second's ~2x gaps were told apart into engine
stalls and gaps that arise after the engine (docs/benchmarks.md 8m).

Thread ownership: `observe` on the engine thread; `snapshot` from any thread (a lock keeps
counts, sum and total consistent with each other).
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("graphserve.engine")
TRACE_ENV = "GRAPHSERVE_TRACE_STEPS_MS"


def trace_threshold_s(environ=os.environ) -> float | None:
    """`$GRAPHSERVE_TRACE_STEPS_MS` in seconds, or None (unset, empty, not a positive number:
    the latter logged once)."""
    raw = environ.get(TRACE_ENV, "").strip()
    if not raw:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
    if not ms > 0 or ms == float("inf"):
        log.warning("%s=%r is not a positive number of milliseconds; step tracing stays off",
                    TRACE_ENV, raw)
        return None
    return ms / 1e3

# Upper bounds in seconds: a decode step of a small model is ~1 ms, an 8B's 4-7 ms, a mixed
# step 7-20 ms; beyond 50 ms something paused the engine.
BUCKETS_S = (0.001, 0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.030, 0.050, 0.100,
             0.250, 0.500, 1.0, 2.5)
KINDS = ("decode", "mixed")


class StepIntervals:
    """Histograms of the time between consecutive step reads, by the kind of step read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {kind: [0] * (len(BUCKETS_S) + 1) for kind in KINDS}  # last: +Inf
        self._sums = dict.fromkeys(KINDS, 0.0)

    def observe(self, kind: str, seconds: float) -> None:
        i = bisect.bisect_left(BUCKETS_S, seconds)
        with self._lock:
            self._counts[kind][i] += 1
            self._sums[kind] += seconds

    def snapshot(self) -> dict[str, dict]:
        """{kind: {"buckets": [(upper bound, cumulative count)...], "sum": s, "count": n}},
        the last bucket's bound being +Inf (Prometheus' histogram layout)."""
        with self._lock:
            counts = {kind: list(c) for kind, c in self._counts.items()}
            sums = dict(self._sums)
        out = {}
        for kind in KINDS:
            running, buckets = 0, []
            for bound, n in zip((*BUCKETS_S, float("inf")), counts[kind], strict=True):
                running += n
                buckets.append((bound, running))
            out[kind] = {"buckets": buckets, "sum": sums[kind], "count": running}
        return out


class StepClock:
    """Feeds `StepIntervals` from the step pipeline (engine thread only); with a
    `trace_above_s`, logs each longer interval with its phases (see the module docstring)."""

    def __init__(self, intervals: StepIntervals, clock,
                 trace_above_s: float | None = None) -> None:
        self.intervals = intervals
        self._clock = clock
        self._last: float | None = None
        self.trace_above_s = trace_above_s

    def read(self, kind: str, more_in_flight: bool, started: float | None = None,
             launched: float | None = None, context: Callable[[], str] | None = None) -> None:
        """A step of `kind` was just read; `more_in_flight`: another step is already queued
        (the busy stretch goes on), else the next read starts a new stretch. For the trace:
        when the engine's step call `started` and when it had `launched` the next step (None:
        it launched none), and `context()` for the line."""
        now = self._clock()
        if self._last is not None:
            interval = now - self._last
            self.intervals.observe(kind, interval)
            if self.trace_above_s is not None and interval > self.trace_above_s:
                self._trace(kind, interval, now, started, launched, context)
        self._last = now if more_in_flight else None

    def _trace(self, kind: str, interval: float, now: float, started, launched,
               context) -> None:
        parts = []
        if started is not None:
            parts.append(f"to the step's start {(started - self._last) * 1e3:.2f}")
            if launched is not None:
                parts.append(f"launching the next {(launched - started) * 1e3:.2f}")
            parts.append(f"waiting and reading {(now - (launched or started)) * 1e3:.2f}")
        extra = context() if context is not None else ""
        log.info("step interval %.2f ms (%s)%s%s", interval * 1e3, kind,
                 ": " + ", ".join(parts) + " ms" if parts else "", f"; {extra}" if extra else "")

    def reset(self) -> None:
        """The pipeline was cut (a failed step): the next read starts a new stretch."""
        self._last = None
