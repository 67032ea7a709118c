"""Busy-time captures on a thread of their own, so running streams do not wait for them.

Captured between two steps (`--busy-capture inline`), a capture that traffic asks for stalls
every running stream for its whole length: 27-43 ms per size on the 8B under load (issue 14)
against a 4.5 ms step. Here the engine thread hands the size to this module's worker and goes
on stepping; batches of that size keep replaying the next larger graph (padded), as they did
before the capture was offered. When the worker is done, the engine thread installs the graph
at a step boundary (`poll`) and only then reports it to the capture policy, so no step is
dispatched to a graph that is not installed. Mixed-step buckets (`server.mixed_graph_runner`)
go the same way, wanted ones first and then the rest (`MixedGraphPolicy.next_capture`):
before, a lazy server captured them only in idle time, so under traffic from the first second
every prompt's step ran eagerly (tens of ms of host time on the 8B, which every running stream
waited for) until the traffic paused.

Why this is safe:

* Recording runs no kernel. The worker's capture only takes the static buffers' addresses
  while the engine thread's replays keep writing them (a background capture does not fill
  the padding rows, and a mixed bucket gets no eager run first: the `capture_detached`s).
* Thread-local capture mode: the engine thread's syncs, copies and allocations stay legal
  while the worker captures on the capture stream; torch's allocator routes the capture
  stream's allocations into the shared graph pool and every other stream's elsewhere.
* The shared pool: the new graph reuses blocks the other graphs' replays write, as every
  capture into a shared pool does; all replays are ordered on the engine thread's stream, and
  the new graph joins them only once installed.
* One capture at a time, and the engine thread starts none of its own (idle or mixed-step)
  while one is in flight.
* The worker's preparation (a GEMM and a stream sync) finishes before the constructor
  returns, so before ready: an idle capture on the engine thread runs in global capture mode,
  and a sync from any thread during it invalidates that capture (seen on the H200 when the
  preparation raced the first idle capture: that size failed, and the allocator stayed
  recording into the pool, failing every later capture).
* Not under tensor parallelism: the capture would record collectives on the group's
  communicator while the engine thread issues the step's collectives on it from another
  stream, which NCCL does not allow; TP captures stay inline, with the ranks' agreement.

The GIL: recording a decode step is Python (a few hundred launches, 15-20 ms on the 8B), and
the engine thread needs the GIL between its device waits. While the worker captures, the
interpreter's switch interval drops from 5 ms to `SWITCH_INTERVAL_S`, so the engine thread
waits that long for the GIL at most instead of a whole default interval per wait.

Thread ownership: `start`, `poll` and `close` on the engine thread; the worker runs only
`DecodeGraphRunner.prepare_capture_thread` and the jobs' `capture` (a runner's
`capture_detached`) and hands the result back through a queue; `install` runs in `poll`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from server import stall_watch
from server.graph_runner import CaptureResult
from server.warm_start import quick_gil_handoff

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005


@dataclass
class CaptureJob:
    """One capture: `capture()` runs on the worker and returns (graph or None, result);
    `install(graph)` runs on the engine thread once it succeeded."""

    size: int
    mixed: bool  # a mixed-step bucket (else a decode batch size)
    capture: Callable[[], tuple[object | None, CaptureResult]]
    install: Callable[[object], None]


class BackgroundCapture:
    """The worker thread and the one capture it may have in flight."""

    def __init__(self, prepare: Callable[[], None], prepare_timeout_s: float = 30.0):
        """`prepare`: run first on the worker (`DecodeGraphRunner.prepare_capture_thread`);
        returns once it has (a preparation that fails or overruns the timeout stops the worker:
        `start` then raises and the caller captures inline)."""
        self._prepare = prepare
        self._prepared = threading.Event()
        self._usable = False  # set by the worker once prepared
        self._gave_up = False  # set by the constructor when the preparation overran
        self._jobs: queue.SimpleQueue[CaptureJob | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[CaptureJob, object, CaptureResult]] = (
            queue.SimpleQueue()
        )
        self._in_flight: CaptureJob | None = None
        self._thread = threading.Thread(target=self._work, name="graph-capture", daemon=True)
        self._thread.start()
        if not self._prepared.wait(prepare_timeout_s):
            log.error("the capture thread did not prepare within %.0f s; busy captures run "
                      "inline", prepare_timeout_s)
            self._gave_up = True
            self._jobs.put(None)  # the worker stops once its preparation returns

    @property
    def usable(self) -> bool:
        """Whether the worker is prepared and running (else captures belong inline)."""
        return self._usable and not self._gave_up and self._thread.is_alive()

    @property
    def in_flight(self) -> CaptureJob | None:
        """The capture in flight, or None."""
        return self._in_flight

    def start(self, job: CaptureJob) -> None:
        """Hand `job` to the worker; returns at once."""
        if self._in_flight is not None:
            raise RuntimeError(f"the capture of size {self._in_flight.size} is still in flight")
        if not self.usable:
            raise RuntimeError("the capture thread has stopped")
        self._in_flight = job
        self._jobs.put(job)

    def poll(self, timeout: float = 0.0) -> tuple[CaptureJob, CaptureResult] | None:
        """If the capture in flight has ended (waiting up to `timeout` seconds for it):
        install its graph when it succeeded and return `(job, result)`; else None."""
        if self._in_flight is None:
            return None
        try:
            job, graph, result = self._done.get(timeout=timeout) if timeout > 0 else (
                self._done.get_nowait()
            )
        except queue.Empty:
            return None
        if result.ok:
            job.install(graph)
        self._in_flight = None
        return job, result

    def close(self, timeout_s: float = 30.0) -> tuple[CaptureJob, CaptureResult] | None:
        """Let a capture in flight end (returning it as `poll` does), then stop the worker."""
        finished = self.poll(timeout_s) if self._in_flight is not None else None
        self._jobs.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the capture thread did not stop within %.0f s", timeout_s)
        return finished

    def _work(self) -> None:
        try:
            self._prepare()
            self._usable = True
        except Exception:
            log.exception("the capture thread could not prepare; busy captures run inline")
            return
        finally:
            self._prepared.set()
        # A capture takes 10-40 ms; one held far longer is named while it lasts (stall_watch).
        beat = stall_watch.heartbeat("capture thread")
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                beat.begin()
                try:
                    with quick_gil_handoff(SWITCH_INTERVAL_S):
                        graph, result = job.capture()
                except Exception as exc:  # capture_detached turns capture errors into results
                    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                    graph, result = None, CaptureResult(job.size, False, 0.0, 0, reason)
                beat.idle()
                self._done.put((job, graph, result))
        finally:
            stall_watch.forget(beat)
