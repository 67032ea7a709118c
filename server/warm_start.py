"""Startup work that needs no Python time, started early on threads so that it stops costing
readiness: the CUDA driver's initialisation and Triton's cache key, both beside `import torch`;
and `quick_gil_handoff`, a short switch interval while the model loads.

Both are fixed costs a fresh process pays once, and both run in C without the GIL, so on a
thread of their own they overlap the engine thread's own work instead of following it (timeline
of an 8B start on the H200 box, sampled with py-spy, docs/benchmarks.md 9d):

* `start_cuda_init(ordinal)`: `cuInit` and the device's primary context, through the driver
  API in ctypes (which drops the GIL for every foreign call). Torch does the same in
  `torch.cuda.is_available()` and `set_device()` right after its import, holding the GIL; when
  the driver and the primary context already exist, those calls only find them (the CUDA
  runtime uses the device's primary context, so it is the same context, not a second one).
* `start_triton_prime()`: `import triton` and `triton_key()`, which hashes the 415 MB
  `libtriton.so` (SHA-256 in 1 MiB reads, ~0.3 s, GIL released) the first time any kernel is
  looked up in the cache, plus the `ptxas --version` subprocess behind the backend's hash.
  Both are `functools.lru_cache`d in Triton, so computing them here means the startup warm-ups'
  first launch finds them. Started beside `import torch` (Triton imports no torch; its own
  import is ~0.15 s of the GIL, the hash none) and joined before the warm-ups.

Torch-free. Every failure is swallowed (logged at debug): the engine thread then pays the cost
itself, as before. Thread ownership: the threads started here touch only the driver, Triton's
own caches and their result attributes; callers join them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
import time

log = logging.getLogger("graphserve.warm_start")


class WarmStart(threading.Thread):
    """A daemon thread running `work`; `seconds` and `error` are set when it ends."""

    def __init__(self, name: str, work):
        super().__init__(name=name, daemon=True)
        self._work = work
        self.seconds: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            self._work()
        except Exception as exc:  # the engine thread pays the cost itself instead
            self.error = f"{type(exc).__name__}: {exc}"
            log.debug("%s failed: %s", self.name, self.error)
        finally:
            self.seconds = time.perf_counter() - t0

    def finish(self, timeout: float | None = None) -> None:
        """Join, then log what it did (debug: it is an optimisation, not an event)."""
        self.join(timeout)
        log.debug("%s: %s after %.3f s", self.name, self.error or "done", self.seconds or -1.0)


def load_driver():
    """The CUDA driver library through ctypes, or None where there is none (a CPU machine) or
    CUDA is hidden (`CUDA_VISIBLE_DEVICES=""`). Sets `CUDA_MODULE_LOADING` as torch would
    before its own CUDA init: the driver reads it in `cuInit`, so it must be set before any
    `cuInit` made here (lazy loading is the driver's default since CUDA 12.2 anyway)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return None
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    os.environ.setdefault("CUDA_MODULE_LOADING", "LAZY")
    return lib


def retain_primary_context(lib, ordinal: int) -> ctypes.c_void_p:
    """`cuInit`, then device `ordinal`'s primary context, retained (the one torch's runtime
    uses). The reference is kept for the process's life: nothing here releases it."""
    check(lib.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    check(lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    return ctx


def start_cuda_init(ordinal: int = 0) -> WarmStart | None:
    """Initialise the CUDA driver and retain device `ordinal`'s primary context on a thread.
    None where `load_driver` finds no driver."""
    lib = load_driver()
    if lib is None:
        return None
    thread = WarmStart("graphserve-cuda-init", lambda: retain_primary_context(lib, ordinal))
    thread.start()
    return thread


def start_triton_prime(ordinal: int = 0) -> WarmStart | None:
    """Import Triton and compute its cache key and device `ordinal`'s backend hash on a
    thread. None without Triton or where `load_driver` finds no driver."""
    try:
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return None
    except (ImportError, ValueError):
        return None
    lib = load_driver()
    if lib is None:
        return None

    def prime() -> None:
        from triton.runtime.cache import triton_key

        triton_key()
        arch = _capability(lib, ordinal)
        if arch is None:
            return
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        # What `triton.compile` asks for before its cache lookup: the backend's hash runs
        # `ptxas --version` once, its options the PTX version (both cached by Triton).
        backend = make_backend(GPUTarget("cuda", arch, 32))
        backend.hash()
        backend.parse_options({})

    thread = WarmStart("graphserve-triton-prime", prime)
    thread.start()
    return thread


def _capability(lib, ordinal: int) -> int | None:
    """Device `ordinal`'s compute capability as Triton writes it (90 for sm_90), or None."""
    if lib.cuInit(0) != 0:
        return None
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if lib.cuDeviceGet(ctypes.byref(dev), ordinal) != 0:
        return None
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
    if lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) != 0:
        return None
    if lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev) != 0:
        return None
    return major.value * 10 + minor.value


# While loading: a thread that wants the GIL asks the holder to drop it after this long (Python's
# default is 5 ms). The weight pipeline's readers need it for a moment after every read; with the
# default they waited up to 5 ms each time another thread was running Python (an import).
LOAD_SWITCH_INTERVAL_S = 0.0005


@contextlib.contextmanager
def quick_gil_handoff(interval: float = LOAD_SWITCH_INTERVAL_S):
    """Lower the interpreter's switch interval to `interval` for the duration (process-wide;
    never raised; the previous value comes back at the end). The engine thread holds it while
    the model loads; `server.background_capture`'s worker while it records a graph."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, interval))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def check(status: int, call: str) -> None:
    """Raise RuntimeError for a driver call's non-zero status."""
    if status != 0:
        raise RuntimeError(f"{call} returned CUDA error {status}")
