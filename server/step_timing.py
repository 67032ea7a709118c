"""The engine's step cadence, as running streams see it: a histogram per step kind.

While the engine is busy, the step pipeline reads one step's tokens after another
(`server.engine.EngineCore._step`); the time between two reads is what every running stream
waits between two tokens on the engine's side: the device's step, the host's bookkeeping, a
capture or anything else that paused the engine thread in between (a garbage collection, a
lock). Compared with the inter-token latency that clients measure, it tells a stall of the
engine from one of the HTTP side. An interval is counted only between two reads of one busy
stretch: after the pipeline drains (nothing left in flight), the next read starts a new one.

Thread ownership: `observe` on the engine thread; `snapshot` from any thread (a lock keeps
counts, sum and total consistent with each other).
"""

from __future__ import annotations

import bisect
import threading

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
    """Feeds `StepIntervals` from the step pipeline (engine thread only)."""

    def __init__(self, intervals: StepIntervals, clock) -> None:
        self.intervals = intervals
        self._clock = clock
        self._last: float | None = None

    def read(self, kind: str, more_in_flight: bool) -> None:
        """A step of `kind` was just read; `more_in_flight`: another step is already queued
        (the busy stretch goes on), else the next read starts a new stretch."""
        now = self._clock()
        if self._last is not None:
            self.intervals.observe(kind, now - self._last)
        self._last = now if more_in_flight else None

    def reset(self) -> None:
        """The pipeline was cut (a failed step): the next read starts a new stretch."""
        self._last = None
