"""Python's garbage collector around startup, graph captures and serving.

Three rules, all about pauses nobody asked for:

* **Nothing collects from the process's start until ready** (`pause_until_ready`): importing
  the HTTP stack, torch and the model leaves ~2-3x10^5 tracked objects, and with collection on,
  each time the heap grows by a quarter Python runs a full collection over all of it, holding the
  GIL; young collections come every 700 allocations on top. Startup is GIL-bound (the engine's
  imports, the HTTP thread's, the tokenizer builds take turns), so every collection lengthens
  the path to ready: on this repo's CPU test box 0.2 s of a 1.3 s start. What a start leaves as
  cyclic garbage is small (~8x10^3 objects, no tensors, measured at ready) and the freeze below
  keeps it; a failed start turns collection back on (`end_startup_pause`).
* **Nothing collects during a graph capture** (`no_collection`): a collection there could run
  a tensor's `__del__` and free memory the capture is recording into. Collection is switched
  off, not frozen: freezing and unfreezing would also undo `freeze_startup_heap`.
* **The startup heap is frozen once the engine is ready** (`freeze_startup_heap`): torch,
  transformers, the model's modules and the tokenizer leave ~2x10^5 tracked objects behind,
  and a full (oldest-generation) collection scans all of them, 171 ms on the H200 box, with the
  GIL held: every running stream and the HTTP thread wait. Python runs one whenever enough
  objects have survived since the last, so under traffic it comes now and then as a lone long
  gap (the sweeps before this change had lone ITL maxima of 172-177 ms against a 14-29 ms p99,
  which matches; after it, 90 ms). Frozen objects sit in the permanent
  generation that collections never scan; serving's own objects are still collected as before.
  No collection runs first (it would delay readiness by that same ~0.2 s), so startup garbage in
  reference cycles stays allocated: a one-time, bounded cost.

Process-wide state: `pause_until_ready` from the process's entry (`server.cli.main`, a TP
worker's `main`), the rest from the thread that owns startup (the engine thread, a TP worker's
main thread).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)

# Set once by `pause_until_ready` when it switched collection off; cleared by whoever turns it
# back on. Collection that something else switched off is left alone.
_paused = False


def pause_until_ready() -> None:
    """Switch automatic collection off until `freeze_startup_heap` (or a failed start) turns it
    back on. Call first thing in a serving process, before the heavy imports."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def end_startup_pause() -> bool:
    """Collection back on if `pause_until_ready` is still in force (the ready freeze, a start
    that failed and lives on a while answering health probes, a server that returned); True
    if it was."""
    global _paused
    if not _paused:
        return False
    _paused = False
    gc.enable()
    return True


@contextlib.contextmanager
def no_collection() -> Iterator[None]:
    """No automatic collection inside the block (restores the previous state; nests)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def freeze_startup_heap() -> int:
    """Move every object tracked now to the permanent generation, then end a
    `pause_until_ready`; returns how many objects are frozen."""
    gc.freeze()
    frozen = gc.get_freeze_count()
    resumed = end_startup_pause()
    log.info("froze the startup heap: %d objects no collection will scan%s", frozen,
             "; collection on again" if resumed else "")
    return frozen
