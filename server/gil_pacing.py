"""The capture thread records between the engine thread's uses of the GIL.

Recording a CUDA graph is Python: every layer's launches go through the interpreter (13-60 ms
per capture on the 8B), and the engine thread needs the same GIL for each step's host work.
Measured on the H200 (docs/benchmarks.md 8g): while the capture thread recorded the mixed-step
buckets after ready, a batch-1 stream's engine steps went from 4.7 to 6-8.7 ms and its client
saw ~20 gaps over 2x its median in that second. Lowering the interpreter's switch interval
(`server.background_capture`) bounds one wait for the GIL, not how many a step makes: at 0.05
ms instead of 0.5 the gaps went from 22 to 17.

So recording yields at layer boundaries. The model's forward calls `pace()` before each layer;
on any thread but a paced capture thread (`paced()`) it returns at once. On the capture thread
it waits until the engine thread is blocked on the device (`device_wait()`: it needs no GIL
then, for most of a decode step), or at most `MAX_WAIT_S`, so a capture still finishes when
the engine is not stepping. The graph records the same launches, only later.

Thread ownership: `device_wait` on the engine thread (around its wait for a step's results);
`paced` and `pace` on the capture thread (`pace` is a no-op elsewhere). Process-wide: one
engine per process serves; concurrent engines (tests) only share this heuristic.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

MAX_WAIT_S = 0.002  # per layer: at most 64 ms more for a 32-layer capture while nothing steps

_engine_waiting = threading.Event()  # set while the engine thread waits on the device
_local = threading.local()


@contextlib.contextmanager
def device_wait() -> Iterator[None]:
    """Around the engine thread's blocking wait for the device (the GIL is free meanwhile)."""
    _engine_waiting.set()
    try:
        yield
    finally:
        _engine_waiting.clear()


@contextlib.contextmanager
def paced() -> Iterator[None]:
    """On the capture thread, around a recording: `pace` waits its turn inside."""
    _local.paced = True
    try:
        yield
    finally:
        _local.paced = False


def pace() -> None:
    """Between two layers of a forward: a paced thread waits for the engine's device wait."""
    if getattr(_local, "paced", False):
        _engine_waiting.wait(MAX_WAIT_S)
