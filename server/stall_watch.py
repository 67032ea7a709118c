"""Name the thread behind a process-wide stall.

When one thread holds the GIL inside a long C call (a tokenizer build, a big allocation, a
library's first use), every other thread stops: engine steps, graph captures, the event loop,
health probes. The engine's slow-step warning (`server.engine`) only sees stalls inside a step;
the intermittent 0.3-1.3 s pause right after ready (docs/benchmarks.md 9c, 9d) was outside any.

`StallWatch` is one daemon thread that sleeps in short periods and notices when a wake-up comes
far later than asked: nothing could run Python meanwhile (or the process got no CPU). Right
then it records where every thread is (`sys._current_frames`): the thread that held the GIL has
only just let go, so it is still at (or next to) the call that held it. One WARNING line per
stall, at most every `min_interval_s` (1 s), names each thread with its innermost frames in the
server (else its innermost frame): a WARNING while serving, INFO before (a start has a few).

A stall of one thread is not one of the process: the engine thread can wait in the CUDA driver
or on a lock while Python runs on everywhere else, and a first request after ready has waited
0.6-1.1 s that way in rare launches with no line from either watch (docs/benchmarks.md 9c, 9d,
8p). So a thread may also hold a `Heartbeat`: it marks when its current unit of work began
(`begin`) and when it waits for work (`idle`); a unit running past the threshold (and ten times
the thread's recent units) is logged once, while it is still running, with where every thread
is at that moment (at most one such line every `HEARTBEAT_LOG_EVERY_S`). The engine loop and
the capture thread hold one (`server.engine`, `server.background_capture`).

Torch-free and cheap: 20 wake-ups a second, each a few microseconds of Python. Started by
`server.launch` for the process's life. Thread ownership: its own thread only; `stop()` from any;
a `Heartbeat`'s marks from the thread it watches.
"""

from __future__ import annotations

import logging
import sys
import sysconfig
import threading
import time
import traceback

log = logging.getLogger("graphserve.stall")

PERIOD_S = 0.05
THRESHOLD_S = 0.25  # late by more than this: a stall worth a line
MIN_INTERVAL_S = 1.0
HEARTBEAT_LOG_EVERY_S = 10.0  # a slow unit of work: one line per this, like a slow engine step
HEARTBEAT_FACTOR = 10.0  # ... and slow means this many times the thread's recent units too


class Heartbeat:
    """When the watched thread's current unit of work began (`since`), None while it waits,
    and a moving average of the units' lengths (`average`): a unit counts as slow past
    `HEARTBEAT_FACTOR` times that as well as past the watch's threshold, as a slow engine step
    does (a CPU server's steps take tenths of a second every time; that is no news).

    A few attribute writes per unit from the watched thread; the watch only reads them (a
    stale read costs at most one period of lateness in a log line, never a wrong one:
    `reported` remembers which unit was logged)."""

    __slots__ = ("name", "ident", "since", "reported", "average")

    def __init__(self, name: str):
        self.name = name
        self.ident = threading.get_ident()
        self.since: float | None = None
        self.reported: float | None = None
        self.average = 0.0

    def begin(self) -> None:
        now = time.perf_counter()
        self._end_unit(now)  # the previous unit, if any, ends here
        self.since = now

    def idle(self) -> None:
        self._end_unit(time.perf_counter())
        self.since = None

    def _end_unit(self, now: float) -> None:
        if self.since is not None:
            self.average = 0.9 * self.average + 0.1 * (now - self.since)


_heartbeats: list[Heartbeat] = []
_heartbeats_lock = threading.Lock()


def heartbeat(name: str) -> Heartbeat:
    """A heartbeat for the calling thread, watched until `forget(hb)`."""
    hb = Heartbeat(name)
    with _heartbeats_lock:
        _heartbeats.append(hb)
    return hb


def forget(hb: Heartbeat) -> None:
    with _heartbeats_lock:
        if hb in _heartbeats:
            _heartbeats.remove(hb)


class StallWatch(threading.Thread):
    """Logs wake-ups later than `threshold_s` (see the module docstring). `stalls` keeps
    `(seconds late, description)` of the last few, for tests and diagnostics."""

    def __init__(self, period_s: float = PERIOD_S, threshold_s: float = THRESHOLD_S,
                 min_interval_s: float = MIN_INTERVAL_S, serving=None,
                 beat_interval_s: float = HEARTBEAT_LOG_EVERY_S):
        super().__init__(name="graphserve-stall-watch", daemon=True)
        # `serving()`: True once requests may be waiting (WARNING); before that a stall only
        # delays readiness and is logged at INFO (every start has a few: docs 9d).
        self._serving = serving or (lambda: True)
        self.period_s = period_s
        self.threshold_s = threshold_s
        self.min_interval_s = min_interval_s
        self.beat_interval_s = beat_interval_s
        self.stalls: list[tuple[float, str]] = []
        self._stop_event = threading.Event()
        self._logged_at = float("-inf")
        self._beat_logged_at = float("-inf")
        # (heartbeat name, seconds running when seen, description) of the last few slow units
        self.slow_units: list[tuple[str, float, str]] = []

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        expected = time.perf_counter() + self.period_s
        while not self._stop_event.wait(max(0.0, expected - time.perf_counter())):
            now = time.perf_counter()
            late = now - expected
            expected = now + self.period_s
            self._check_heartbeats(now)
            if late < self.threshold_s:
                continue
            where = describe_threads(sys._current_frames(), threading.get_ident())
            self.stalls = [*self.stalls[-9:], (late, where)]
            if now - self._logged_at >= self.min_interval_s:
                self._logged_at = now
                level = logging.WARNING if self._serving() else logging.INFO
                log.log(level, "process stalled %.2f s (no thread ran Python, or no CPU); "
                        "threads right after: %s", late, where)

    def _check_heartbeats(self, now: float) -> None:
        """Log a heartbeat's unit of work that has run past the threshold, once, while it runs."""
        with _heartbeats_lock:
            beats = list(_heartbeats)
        for hb in beats:
            since = hb.since
            if since is None or since == hb.reported:
                continue
            if now - since < max(self.threshold_s, HEARTBEAT_FACTOR * hb.average):
                continue
            hb.reported = since
            where = describe_threads(sys._current_frames(), threading.get_ident())
            self.slow_units = [*self.slow_units[-9:], (hb.name, now - since, where)]
            if now - self._beat_logged_at < self.beat_interval_s:
                continue
            self._beat_logged_at = now
            level = logging.WARNING if self._serving() else logging.INFO
            log.log(level, "%s: one unit of work running for %.2f s (Python runs elsewhere: "
                    "the thread waits or computes); threads now: %s", hb.name, now - since, where)


def describe_threads(frames: dict[int, object], skip: int) -> str:
    """`name at file:line (function)` for every thread but `skip`: its innermost frame in the
    server, else its innermost frame outside the standard library, else its innermost frame;
    followed by the innermost frame when that is another."""
    names = {t.ident: t.name for t in threading.enumerate()}
    stdlib = sysconfig.get_paths()["stdlib"]
    parts = []
    for ident, frame in frames.items():
        if ident == skip:
            continue
        stack = traceback.extract_stack(frame)
        ours = [f for f in stack if "/server/" in f.filename.replace("\\", "/")]
        outside = [f for f in stack
                   if not f.filename.startswith((stdlib, "<frozen"))]  # fmt: skip
        pick = (ours or outside or stack)[-1]
        inner = stack[-1]
        text = f"{names.get(ident, ident)} at {_short(pick.filename)}:{pick.lineno} ({pick.name})"
        if inner is not pick:
            text += f" in {_short(inner.filename)}:{inner.lineno} ({inner.name})"
        parts.append(text)
    return "; ".join(sorted(parts))


def _short(path: str) -> str:
    path = path.replace("\\", "/")
    for marker in ("/server/", "/site-packages/", "/dist-packages/", "/lib/python"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + 1:]
    return path


def start(serving=None) -> StallWatch:
    watch = StallWatch(serving=serving)
    watch.start()
    return watch
