"""CUDA-graph capture policy: which decode batch sizes to capture, when, and the books.

The engine decodes n running sequences by replaying a CUDA graph captured for a fixed batch
size, padding the extra rows. `CapturePolicy` decides which sizes to capture before the server
is ready, which to capture between engine steps while serving or idle, and which graph each
decode step runs on. It keeps the counters behind `GET /health/graphs`.

This module is pure Python and imports no torch, Triton or kernel module at any level (a test
checks it in a fresh interpreter): the HTTP layer reads `snapshot()` without the model stack.
Captures themselves are performed by `server.graph_runner.DecodeGraphRunner` on the engine
thread, which reports back through `begin` / `succeeded` / `failed`.

Engine thread, in order::

    policy = CapturePolicy.from_config(engine_config, max_num_seqs, disabled_reason=...)
    policy.set_memory(budget_bytes, kv_cache_bytes, weights_bytes)
    for size in policy.startup_plan():
        if not policy.active:        # the largest capture failed: serve eagerly
            break
        capture(size)                # begin(size), then succeeded(...) or failed(...)
    policy.mark_ready()
    loop:
        dispatch = policy.select(n)  # before every decode step of n sequences
        ...
        size = policy.next_capture(running, waiting)   # between steps
        if size is not None:
            capture(size)
        elif idle:
            wait for new requests at most policy.idle_wait_s() seconds

Event-loop thread: `policy.on_arrival()` whenever a request is submitted; `policy.snapshot()`
for the health endpoint.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from server.capture_records import CapturePhase, SizeRecord, SizeState
from server.config import GRAPH_CAPTURE_MODES, ConfigError, EngineConfig, default_capture_sizes
from server.graph_memory import GraphMemory

logger = logging.getLogger(__name__)

DispatchKind = Literal["exact", "padded", "eager"]

# Capture time is predicted as the (lower) median of the last few measured captures, of any
# size. Capture cost is dominated by recording one launch per kernel, which hardly depends on
# the batch size, so other sizes' measurements are good predictors and in steady conditions the
# median is close to the maximum. A maximum or an average would let one outlier (a GC pause,
# the first capture's pool growth and library warm-up) lift the prediction over the budget, and
# under sustained load nothing would ever correct it: busy capture only runs when the
# prediction fits, so no new measurement arrives until the server goes idle. With the median,
# an isolated slow capture costs at most one over-budget stall; once most recent captures are
# slow, the prediction exceeds the budget and the remaining sizes wait for idle time.
_PREDICTION_WINDOW = 5


class CaptureStateError(RuntimeError):
    """The engine or runner broke the capture protocol (an engine bug, never a user error)."""


@dataclass(frozen=True, slots=True)
class Dispatch:
    """How one decode step of n sequences runs.

    `size` is the captured graph to replay (None: run the model eagerly) and `padded_rows` the
    filler rows added to reach it (`size - n`). `kind` is "exact" when the graph is the step's
    exact size (the smallest configured size >= n, which may itself pad a few rows because
    configured sizes are discrete), "padded" when that size is not captured and a larger graph
    is used instead, and "eager" when no captured graph is large enough.
    """

    size: int | None
    kind: DispatchKind
    padded_rows: int


class CapturePolicy:
    """Decides which decode CUDA graphs to capture and when; dispatches steps onto them.

    Modes: `lazy` captures only the largest size before ready and the rest while serving (sizes
    that traffic needs, one per gap between steps, within a time budget and spaced by a minimum
    interval) and while idle (all remaining sizes, descending). `eager` captures every size
    before ready, descending. `off` never captures; the policy is also `off` when a
    `disabled_reason` is given (e.g. no CUDA device) or after `disable()`, and it turns itself
    off when the largest capture fails, because the other graphs would share its memory pool.

    Every size is captured at most once: a failed size is never retried and is skipped by
    `select`. Once every size is captured or failed the policy is `complete` and
    `next_capture` returns None forever.

    Thread safety: the engine thread calls everything except `on_arrival` and `snapshot`, which
    the event-loop thread may call at any time. One lock guards all state.
    """

    def __init__(
        self,
        sizes: Iterable[int],
        mode: str = "lazy",
        *,
        capture_budget_s: float = 0.05,
        min_interval_s: float = 0.25,
        idle_debounce_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        disabled_reason: str | None = None,
    ):
        sizes = list(sizes)
        if not sizes:
            raise ValueError("capture sizes must not be empty")
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"capture sizes must be positive integers, got {size!r}")
        if mode not in GRAPH_CAPTURE_MODES:
            raise ValueError(
                f"graph capture mode must be one of {', '.join(GRAPH_CAPTURE_MODES)}, got {mode!r}"
            )
        for name, value in (
            ("capture_budget_s", capture_budget_s),
            ("min_interval_s", min_interval_s),
            ("idle_debounce_s", idle_debounce_s),
        ):
            if not value >= 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

        self._sizes: tuple[int, ...] = tuple(sorted(set(sizes)))
        self._largest = self._sizes[-1]
        self._configured_mode = mode
        self._budget_s = float(capture_budget_s)
        self._min_interval_s = float(min_interval_s)
        self._idle_debounce_s = float(idle_debounce_s)
        self._busy_capture = "inline"  # or "background" (`set_busy_capture`)
        self._clock = clock
        self._lock = threading.Lock()

        self._records = {size: SizeRecord(size) for size in self._sizes}
        self._off_reason: str | None = None
        if disabled_reason:
            self._off_reason = disabled_reason
        elif mode == "off":
            self._off_reason = "graph capture disabled (--graph-capture off)"
        # `_done` is set once (off or complete) and never cleared, so `next_capture` may read it
        # without the lock.
        self._done = self._off_reason is not None
        self._complete = False

        self._created_at = clock()
        self._ready_at: float | None = None
        self._complete_at: float | None = None
        self._startup_capture_s = 0.0

        self._capturing: int | None = None
        self._capture_started_at = 0.0
        self._last_capture_end: float | None = None
        self._captured_since_step = False
        self._offer: tuple[int, CapturePhase] | None = None
        self._idle_since: float | None = None
        self._recent_capture_s: deque[float] = deque(maxlen=_PREDICTION_WINDOW)

        self._exact_steps = 0
        self._padded_steps = 0
        self._eager_steps = 0

        self._memory = GraphMemory(len(self._sizes))
        self._saved_demand: dict[int, float] = {}  # earlier runs' (apply_saved_plan)
        self._saved_info: dict[str, Any] | None = None

        # Dispatch tables indexed by batch size n (index 0 unused): `_exact_for[n]` is the
        # smallest configured size >= n, `_graph_for[n]` the smallest captured one (or None).
        # They make `select` O(1) on the hot path and are rebuilt only when coverage changes.
        self._exact_for: list[int] = [self._sizes[0]] + [
            self._sizes[bisect.bisect_left(self._sizes, n)] for n in range(1, self._largest + 1)
        ]
        self._graph_for: list[int | None] = [None] * (self._largest + 1)

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        max_num_seqs: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        disabled_reason: str | None = None,
    ) -> CapturePolicy:
        """Build the policy from the engine configuration and the resolved `max_num_seqs`.

        Configured sizes above `max_num_seqs` are dropped (no decode batch can use them) and
        `max_num_seqs` is always included, so every batch the scheduler forms has a graph to
        pad into, as with the default sizes.
        """
        if max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if config.cuda_graph_sizes is None:
            sizes = default_capture_sizes(max_num_seqs)
        else:
            sizes = sorted({s for s in config.cuda_graph_sizes if s <= max_num_seqs})
            dropped = sorted({s for s in config.cuda_graph_sizes if s > max_num_seqs})
            if dropped:
                logger.info(
                    "ignoring CUDA graph sizes %s above max_num_seqs=%d", dropped, max_num_seqs
                )
            if max_num_seqs not in sizes:
                logger.info(
                    "adding CUDA graph size %d (max_num_seqs) so every decode batch can pad "
                    "into a graph",
                    max_num_seqs,
                )
                sizes.append(max_num_seqs)
        return cls(
            sizes,
            config.graph_capture,
            capture_budget_s=config.capture_budget_ms / 1e3,
            min_interval_s=config.capture_min_interval_ms / 1e3,
            idle_debounce_s=config.idle_debounce_ms / 1e3,
            clock=clock,
            disabled_reason=disabled_reason,
        )

    # ----------------------------------------------------------------- read-only properties

    @property
    def sizes(self) -> tuple[int, ...]:
        """Configured capture sizes, ascending."""
        return self._sizes

    @property
    def max_size(self) -> int:
        """Largest configured size: the largest decode batch `select` accepts."""
        return self._largest

    @property
    def mode(self) -> str:
        """Effective mode: the configured one, or "off" once disabled for any reason."""
        return "off" if self._off_reason is not None else self._configured_mode

    @property
    def reason(self) -> str | None:
        """Why the policy is off (None while it is not)."""
        return self._off_reason

    @property
    def complete(self) -> bool:
        """True once every configured size is captured or failed."""
        return self._complete

    @property
    def active(self) -> bool:
        """True while captures may still happen (not off and not complete)."""
        return not self._done

    @property
    def memory_warning(self) -> str | None:
        with self._lock:
            return self._memory.warning

    def predicted_capture_s(self) -> float | None:
        """Predicted duration of the next capture; None before any capture was measured."""
        with self._lock:
            return self._predict_locked()

    def state(self, size: int) -> SizeState:
        with self._lock:
            return self._record(size).state

    # -------------------------------------------------------------------------- startup

    def startup_plan(self) -> list[int]:
        """Sizes to capture before the server reports ready, in capture order.

        lazy: the largest size only; eager: every size, descending; off: none. Capturing the
        largest first sizes the shared graph pool so smaller graphs reuse its blocks.
        """
        with self._lock:
            if self._off_reason is not None:
                return []
            plan = [self._largest] if self._configured_mode == "lazy" else list(self._sizes[::-1])
            return [s for s in plan if self._records[s].state == "pending"]

    def mark_ready(self) -> None:
        """Call once after the startup plan has run, right before the server reports ready.

        Captures reported before this count as startup captures; `next_capture` may only be
        called after it.
        """
        with self._lock:
            if self._capturing is not None:
                raise CaptureStateError(
                    f"mark_ready() while the capture of size {self._capturing} is in progress"
                )
            if self._ready_at is None:
                self._ready_at = self._clock()
                # No request can have been admitted before ready, so the idle debounce starts
                # now rather than at the engine's first next_capture(0, 0) after its first wait.
                self._idle_since = self._ready_at

    # ------------------------------------------------------------------------- dispatch

    def select(self, n: int) -> Dispatch:
        """Choose the graph for a decode step of `n` sequences and record the step.

        Call once before every decode step. The step runs on the smallest captured size >= n
        (padded) or eagerly if there is none. When the step's exact size (the smallest
        configured size >= n) is still pending, it gains one unit of demand, which is what
        busy-time capture prioritises.
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self._largest:
            raise ValueError(
                f"decode batch size must be an integer in 1..{self._largest}, got {n!r}"
            )
        with self._lock:
            self._captured_since_step = False
            exact = self._exact_for[n]
            graph = self._graph_for[n]
            self._records[exact].wanted += 1
            if graph is None:
                self._eager_steps += 1
                dispatch = Dispatch(None, "eager", 0)
            else:
                record = self._records[graph]
                record.replays += 1
                record.padded_tokens_wasted += graph - n
                if graph == exact:
                    self._exact_steps += 1
                    dispatch = Dispatch(graph, "exact", graph - n)
                else:
                    self._padded_steps += 1
                    dispatch = Dispatch(graph, "padded", graph - n)
            if graph != exact and not self._done:
                exact_record = self._records[exact]
                if exact_record.state == "pending":
                    exact_record.demand += 1
            return dispatch

    # ------------------------------------------------------------------- capture timing

    def next_capture(self, running: int, waiting: int) -> int | None:
        """Between two engine steps: the size to capture now, or None.

        `running` and `waiting` are the scheduler's current counts. With work present (busy),
        the answer is the pending size with the most demand (ties: the larger saved demand,
        then the larger size), only if no capture ran since the last `select`, at least
        `min_interval_s` has passed since the previous capture ended, and the predicted
        capture time fits `capture_budget_s`; sizes
        no step has asked for wait for idle time. With no work for `idle_debounce_s`, the
        answer is the largest pending size; call again after each capture, checking for new
        requests in between; with a saved plan (`apply_saved_plan`), the pending size the
        previous runs wanted most comes first instead. Cheap once the policy is complete or off.
        """
        if self._done:
            return None
        if running < 0 or waiting < 0:
            raise ValueError(f"running and waiting must be >= 0, got {running}, {waiting}")
        with self._lock:
            if self._done:
                return None
            if self._ready_at is None:
                raise CaptureStateError("next_capture() called before mark_ready()")
            if self._capturing is not None:
                raise CaptureStateError(
                    f"next_capture() while the capture of size {self._capturing} has not been "
                    "reported (call succeeded() or failed())"
                )
            now = self._clock()
            if running == 0 and waiting == 0:
                if self._idle_since is None:
                    self._idle_since = now
                if now - self._idle_since < self._idle_debounce_s:
                    return None
                size = self._idle_order_locked()[0]
                self._offer = (size, "idle")
                return size

            self._idle_since = None
            if self._captured_since_step:
                return None
            if (
                self._last_capture_end is not None
                and now - self._last_capture_end < self._min_interval_s
            ):
                return None
            predicted = self._predict_locked()
            if predicted is None or (self._busy_capture == "inline" and predicted > self._budget_s):
                return None  # (a background capture stalls no step: no budget to fit)
            wanted = [r for r in self._records.values() if r.state == "pending" and r.demand > 0]
            if not wanted:
                return None
            saved = self._saved_demand
            size = max(wanted, key=lambda r: (r.demand, saved.get(r.size, 0.0), r.size)).size
            self._offer = (size, "busy")
            return size

    def idle_wait_s(self) -> float | None:
        """While idle: how long the engine may block before calling `next_capture(0, 0)`.

        None when no capture will ever be offered (off, complete or not ready yet), so the
        engine can block until the next request.
        """
        if self._done:
            return None
        with self._lock:
            if self._done or self._ready_at is None:
                return None
            if self._idle_since is None:
                return self._idle_debounce_s
            return max(0.0, self._idle_debounce_s - (self._clock() - self._idle_since))

    def on_arrival(self) -> None:
        """A request was submitted (any thread): stop idle capture and restart the debounce."""
        if self._done:
            return
        with self._lock:
            self._idle_since = None

    # ----------------------------------------------------------------- capture protocol

    def begin(self, size: int) -> None:
        """The runner is about to capture `size`; exactly one of succeeded/failed must follow."""
        with self._lock:
            if self._off_reason is not None:
                raise CaptureStateError(
                    f"cannot capture size {size}: capture is off ({self._off_reason})"
                )
            record = self._record(size)
            if self._capturing is not None:
                raise CaptureStateError(
                    f"cannot begin size {size}: the capture of size {self._capturing} is still "
                    "in progress"
                )
            if record.state != "pending":
                raise CaptureStateError(
                    f"cannot begin size {size}: it is already {record.state} "
                    "(each size is captured at most once)"
                )
            if size != self._largest and self._records[self._largest].state != "captured":
                raise CaptureStateError(
                    f"cannot begin size {size}: the largest size {self._largest} must be "
                    "captured first, so smaller graphs reuse its memory pool"
                )
            if self._ready_at is None:
                phase: CapturePhase = "startup"
            elif self._offer is not None and self._offer[0] == size:
                phase = self._offer[1]
            else:
                phase = "unscheduled"
            self._offer = None
            record.state = "capturing"
            record.captured_in = phase
            self._capturing = size
            self._capture_started_at = self._clock()
            if self._ready_at is not None:
                self._captured_since_step = True

    def succeeded(self, size: int, seconds: float, pool_bytes: int,
                  off_thread_s: float | None = None) -> None:
        """The capture of `size` succeeded.

        `seconds` is how long the engine thread was stalled by it (warm-up plus capture: that
        is what the busy-time budget bounds); `pool_bytes` the total graph-pool memory after it;
        `off_thread_s` the capture's own time when it ran on the capture thread (it then stalled
        nothing, and the budget's prediction of inline stalls leaves it out).
        """
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not (0 <= seconds < math.inf)
        ):
            raise ValueError(f"capture seconds must be a finite number >= 0, got {seconds!r}")
        if isinstance(pool_bytes, bool) or not isinstance(pool_bytes, int) or pool_bytes < 0:
            raise ValueError(f"pool_bytes must be an integer >= 0, got {pool_bytes!r}")
        with self._lock:
            record = self._expect_capturing(size, "succeeded")
            record.state = "captured"
            record.capture_s = float(seconds)
            record.pool_bytes_after = pool_bytes
            record.off_thread_s = off_thread_s
            if off_thread_s is None:
                self._recent_capture_s.append(float(seconds))
            self._memory.record(pool_bytes, largest=size == self._largest)
            self._finish_capture_locked()
            self._rebuild_dispatch_locked()
            self._update_memory_locked()
            self._check_complete_locked()

    def failed(self, size: int, reason: str) -> None:
        """The capture of `size` failed; it is never retried and `select` skips it.

        A failure of the largest size (always the first capture) turns the policy off: the
        server serves eagerly, since a failed capture may have left the shared pool unusable.
        """
        with self._lock:
            record = self._expect_capturing(size, "failed")
            record.state = "failed"
            record.error = str(reason) or "unknown error"
            self._finish_capture_locked()
            logger.warning("CUDA graph capture of batch size %d failed: %s", size, record.error)
            if size == self._largest:
                self._disable_locked(
                    f"capture of the largest batch size {size} failed ({record.error}); serving "
                    "without CUDA graphs (eager), since a failed capture may have left the "
                    "shared graph pool unusable"
                )
            else:
                self._update_memory_locked()
                self._check_complete_locked()

    def set_busy_capture(self, mode: str) -> None:
        """Where busy-time captures run: "inline" (between steps, within the budget) or
        "background" (`server.background_capture`). Engine thread, before `mark_ready`."""
        if mode not in ("inline", "background"):
            raise ValueError(f"busy capture mode must be inline or background, got {mode!r}")
        with self._lock:
            self._busy_capture = mode

    def disable(self, reason: str) -> None:
        """Turn graphs off for good: nothing more is captured and every step runs eagerly.

        The first reason given is kept. A capture in flight may still be reported.
        """
        with self._lock:
            self._disable_locked(reason)

    # --------------------------------------------------------------------- saved plan
    def apply_saved_plan(self, demand: Mapping[int, float], info: Mapping | None = None) -> None:
        """Order idle captures by earlier runs' demand per size, most wanted first, the largest
        always first (pure: `server.state_dir` reads the file). Unconfigured sizes are ignored;
        `info` (source, status) is reported as `snapshot()["saved_plan"]`."""
        with self._lock:
            self._saved_demand = {s: float(d) for s, d in demand.items()
                                  if s in self._records and d > 0}
            self._saved_info = dict(info or {})

    def demand_histogram(self) -> dict[int, int]:
        """This run's decode steps per exact size (sizes no step wanted left out)."""
        with self._lock:
            return {s: r.wanted for s, r in self._records.items() if r.wanted}

    def _idle_order_locked(self, states: tuple[str, ...] = ("pending",)) -> list[int]:
        saved = self._saved_demand
        sizes = [r.size for r in self._records.values() if r.state in states]
        return sorted(sizes, key=lambda s: (s != self._largest, -saved.get(s, 0.0), -s))

    # ------------------------------------------------------------------------ memory

    def set_memory(self, budget_bytes: int | None, kv_cache_bytes: int, weights_bytes: int) -> None:
        """Record the device memory budget and what the KV cache and weights already take.

        After the largest capture succeeds the policy estimates the pool for the full size set
        and sets `memory_warning` if estimate + KV cache + weights exceed the budget.
        """
        with self._lock:
            self._memory.set_budget(budget_bytes, kv_cache_bytes, weights_bytes)
            self._update_memory_locked()

    # ------------------------------------------------------------------------ report

    def snapshot(self) -> dict[str, Any]:
        """A consistent, JSON-serialisable view (the body of /health/graphs minus device info)."""
        with self._lock:
            records = [self._records[s] for s in self._sizes]
            captured = sum(r.state == "captured" for r in records)
            steps = self._exact_steps + self._padded_steps + self._eager_steps
            pending = sorted((r for r in records if r.state == "pending"),
                             key=lambda r: (-r.demand, -r.size))  # fmt: skip
            predicted = self._predict_locked()
            return {
                "mode": self.mode,
                "configured_mode": self._configured_mode,
                "reason": self._off_reason,
                "ready": self._ready_at is not None,
                "complete": self._complete,
                "capturing": self._capturing,
                "sizes": [r.to_json() for r in records],
                "coverage": {"captured": captured, "total": len(records),
                             "ratio": captured / len(records)},  # fmt: skip
                "traffic": {
                    "exact_steps": self._exact_steps,
                    "padded_steps": self._padded_steps,
                    "eager_steps": self._eager_steps,
                    "hit_rate": self._exact_steps / steps if steps else None,
                },
                "pending_demand": [{"size": r.size, "demand": r.demand} for r in pending],
                "pool_bytes_total": self._memory.pool_total,
                "predicted_capture_ms": None if predicted is None else round(predicted * 1e3, 3),
                "settings": {
                    "capture_budget_ms": self._budget_s * 1e3,
                    "min_interval_ms": self._min_interval_s * 1e3,
                    "idle_debounce_ms": self._idle_debounce_s * 1e3,
                    "busy_capture": self._busy_capture,
                },
                "memory": self._memory.snapshot(),
                "saved_plan": None if self._saved_info is None else {
                    **self._saved_info,
                    "demand": {str(s): d for s, d in sorted(self._saved_demand.items())},
                    "idle_order": self._idle_order_locked(("pending", "capturing", "captured")),
                },
                "timings": {
                    "startup_capture_s": self._startup_capture_s,
                    "ready_after_s": self._since(self._created_at, self._ready_at),
                    "complete_after_s": self._since(self._created_at, self._complete_at),
                    "complete_after_ready_s": self._since(self._ready_at, self._complete_at),
                },
            }

    # ---------------------------------------------------------------------- internals

    def _record(self, size: int) -> SizeRecord:
        record = self._records.get(size)
        if record is None:
            raise ValueError(f"{size!r} is not a configured capture size {list(self._sizes)}")
        return record

    def _expect_capturing(self, size: int, event: str) -> SizeRecord:
        record = self._record(size)
        if self._capturing != size:
            current = ("no capture is in progress" if self._capturing is None
                       else f"the capture in progress is size {self._capturing}")  # fmt: skip
            raise CaptureStateError(f"{event}({size}) without begin({size}): {current}")
        return record

    def _finish_capture_locked(self) -> None:
        now = self._clock()
        if self._ready_at is None:
            self._startup_capture_s += now - self._capture_started_at
        self._capturing = None
        self._last_capture_end = now

    def _predict_locked(self) -> float | None:
        if not self._recent_capture_s:
            return None
        recent = sorted(self._recent_capture_s)
        return recent[(len(recent) - 1) // 2]

    def _rebuild_dispatch_locked(self) -> None:
        table: list[int | None] = [None] * (self._largest + 1)
        if self._off_reason is None:
            graph: int | None = None
            # Walk down from the largest size so each n maps to the smallest captured size >= n.
            for n in range(self._largest, 0, -1):
                if n in self._records and self._records[n].state == "captured":
                    graph = n
                table[n] = graph
        self._graph_for = table

    def _check_complete_locked(self) -> None:
        if self._complete or any(r.state in ("pending", "capturing")
                                 for r in self._records.values()):  # fmt: skip
            return
        self._complete = True
        self._done = True
        self._complete_at = self._clock()
        failed = [r.size for r in self._records.values() if r.state == "failed"]
        logger.info("CUDA graph capture complete: %d/%d sizes captured%s",
                    len(self._records) - len(failed), len(self._records),
                    f", failed: {failed}" if failed else "")  # fmt: skip

    def _disable_locked(self, reason: str) -> None:
        if self._off_reason is not None:
            return
        self._off_reason = reason or "graph capture disabled"
        self._done = True
        self._offer = None
        self._rebuild_dispatch_locked()
        logger.warning("CUDA graphs off: %s", self._off_reason)

    def _update_memory_locked(self) -> None:
        records = self._records.values()
        self._memory.update(captured=sum(r.state == "captured" for r in records),
                            usable=sum(r.state != "failed" for r in records))  # fmt: skip

    @staticmethod
    def _since(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else end - start

