"""Warm the page cache with the checkpoint while the engine thread imports torch.

The engine thread spends seconds importing torch (4.1 s in a fresh container on the H200 box)
before it can read a single weight. `start()` is called first thing on that thread: a few
threads pull the checkpoint's tensors, in the order the model will take them, into the page
cache, so that by the time the weight pipeline (`server.weight_pipeline`) runs, its reads hit
memory instead of the disk. Pages already cached are found with mincore(2) and skipped, so a
warm start costs nothing but the check (milliseconds).

The pulling is pread into one reused 64 MiB scratch buffer per thread (the GIL is released
for each read) by threads at nice 10, so that where cores are scarce the import keeps its CPU
(on the 2-core dev VM, under other load, four readers at nice 0 doubled `import torch`).
`sendfile(2)` to /dev/null would skip the copy to user space, but on the dev VM's kernel (6.18)
the first read of pages cached that way ran at 0.6 GB/s (4.0 s for 2.5 GB, twice in three
tries) against 0.3-0.5 s after a pread warm-up.

Why the page cache and not buffers handed over to the pipeline: a handover needs a full
anonymous copy of the checkpoint (16 GB for an 8B model), and populating fresh anonymous memory
page by page is slow and contends with the import's own mmaps (measured on the 2-core dev VM:
two threads filling anonymous memory stretched `import torch` from 0.7 to 2.7 s; 8 threads
filling 2.5 GB, 0.8 to 1.7 s). The pipeline's second read from the page cache runs at memory
speed (4.8 GB/s per thread on the H200 box). `bench/load_speed.py` measures both on the GPU box.

Torch-free (checked by tests/test_weight_pipeline.py in a fresh interpreter). Thread ownership:
`start` and `claim` on the engine thread (the handover is thread-local, so two engines in one
process never see each other's prefetcher); `skip` and `stop` on any thread; the reader threads
are this module's own daemons and touch nothing but the files and their scratch buffers.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import ModelLoadError
from server.safetensors_index import TensorEntry, load_plan, read_checkpoint

log = logging.getLogger("graphserve.loader")

READ_BYTES = 64 * 2**20  # per pread: large, so the threads seldom need the GIL
DEFAULT_THREADS = 4
NICE = 10  # reader threads' nice value (see lower_priority)
_local = threading.local()


@dataclass
class PrefetchStats:
    """What the prefetcher did (read by the loader's log line and the benchmarks)."""

    planned_bytes: int = 0
    resident_bytes: int = 0  # already in the page cache when it started
    read_bytes: int = 0  # read from disk by this prefetcher
    skipped_bytes: int = 0  # left to the pipeline, which got there first
    seconds: float | None = None  # start to last read (None while running)
    error: str | None = None
    files: list[str] = field(default_factory=list)


class PageCacheWarmer:
    """Reads the byte ranges of `model_dir`'s tensors once, in load order, with `threads` threads.

    Never raises out of its threads: a problem (missing files, a bad header) is recorded in
    `stats.error` and left for the real loader to report properly.
    """

    def __init__(self, model_dir: Path, threads: int = DEFAULT_THREADS, *, start: bool = True):
        self.model_dir = Path(model_dir)
        self.stats = PrefetchStats()
        self._threads = max(1, threads)
        self._lock = threading.Lock()
        self._queue: list[TensorEntry] = []
        self._skip: set[str] = set()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._running = 0
        self._t0 = time.perf_counter()
        self._entries: dict[str, TensorEntry] | None = None
        if start:
            # The plan (header reads, the mincore check) is made on a thread of its own too:
            # the engine thread must go straight on to the torch import.
            threading.Thread(target=self.run, name="graphserve-prefetch", daemon=True).start()

    # -- engine-thread API ----------------------------------------------------------------------

    def skip(self, names) -> None:
        """The pipeline reads these itself now: do not spend disk time on them any more."""
        with self._lock:
            self._skip.update(names)

    def stop(self) -> None:
        """Stop after the reads in progress (each at most `READ_BYTES`)."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every planned range is read or skipped (or it stopped); True if done."""
        return self._done.wait(timeout)

    @property
    def entries(self) -> dict[str, TensorEntry] | None:
        """The parsed headers, once the plan is made (the pipeline may reuse them)."""
        return self._entries

    # -- reader threads -------------------------------------------------------------------------

    def run(self) -> None:
        """Plan (headers, residency) on the calling thread, then start the readers."""
        try:
            entries = read_checkpoint(self.model_dir)
            plan = load_plan(entries)
            self._entries = entries
            self.stats.files = sorted({e.file for e in entries.values()})
            self.stats.planned_bytes = sum(e.nbytes for e in plan)
            cold = not_resident(plan)
            self.stats.resident_bytes = self.stats.planned_bytes - sum(e.nbytes for e in cold)
        except (ModelLoadError, OSError) as exc:
            self.stats.error = str(exc)
            self._finish()
            return
        if not cold:
            self._finish()
            return
        with self._lock:
            self._queue = list(reversed(cold))  # pop() from the end = load order
            self._running = min(self._threads, len(cold))
        for i in range(self._running):
            threading.Thread(
                target=self._reader, name=f"graphserve-prefetch-{i}", daemon=True
            ).start()

    def _reader(self) -> None:
        lower_priority()
        fds: dict[Path, int] = {}
        scratch = memoryview(bytearray(READ_BYTES))
        try:
            while not self._stop.is_set():
                with self._lock:
                    entry = self._queue.pop() if self._queue else None
                    if entry is not None and entry.name in self._skip:
                        self.stats.skipped_bytes += entry.nbytes
                        continue
                if entry is None:
                    break
                fd = fds.get(entry.path)
                if fd is None:
                    fd = fds[entry.path] = os.open(entry.path, os.O_RDONLY)
                pos = entry.start
                while pos < entry.end and not self._stop.is_set():
                    n = os.preadv(fd, [scratch[: min(READ_BYTES, entry.end - pos)]], pos)
                    if n <= 0:
                        break  # truncated under us: the pipeline will say so
                    pos += n
                with self._lock:
                    self.stats.read_bytes += pos - entry.start
        except OSError as exc:
            self.stats.error = str(exc)
        finally:
            for fd in fds.values():
                os.close(fd)
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self._finish()

    def _finish(self) -> None:
        self.stats.seconds = time.perf_counter() - self._t0
        self._done.set()


def start(model: str | None, threads: int = DEFAULT_THREADS) -> PageCacheWarmer | None:
    """Start warming `model`'s checkpoint for a later `claim()` on this same thread.

    None (nothing started) for the embedded default model (built on first use, tiny) or a path
    that is not a directory; the loader reports such problems itself.
    """
    if model is None:
        return None
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    warmer = PageCacheWarmer(path.resolve(), threads)
    _local.warmer = warmer
    return warmer


def claim(model_dir: Path) -> PageCacheWarmer | None:
    """The warmer `start()` began on this thread for `model_dir`, handed over once (else None)."""
    warmer = getattr(_local, "warmer", None)
    if warmer is None:
        return None
    _local.warmer = None
    if warmer.model_dir != Path(model_dir).expanduser().resolve():
        warmer.stop()
        return None
    return warmer


def discard() -> None:
    """Stop and forget this thread's warmer, if any (startup failed before the loader ran)."""
    warmer = getattr(_local, "warmer", None)
    _local.warmer = None
    if warmer is not None:
        warmer.stop()


def lower_priority() -> None:
    """Nice this thread (Linux nice values are per thread) so that on a box with fewer idle
    cores than readers the import that runs meanwhile keeps its CPU; idle cores still run the
    reads at full speed. The checkpoint readers here and in `server.early_weights` call it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    except (AttributeError, OSError):
        pass


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the platform has one); what the
    checkpoint readers' thread counts are capped by."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 2


# -- mincore(2): which pages of a file are in the page cache ---------------------------------


def not_resident(plan: list[TensorEntry]) -> list[TensorEntry]:
    """The entries of `plan` with at least one page not in the page cache (all of them when
    residency cannot be checked: reading a cached page again is only wasted memory bandwidth)."""
    by_file: dict[Path, bytes | None] = {}
    page = mmap.PAGESIZE
    out = []
    for entry in plan:
        if entry.path not in by_file:
            by_file[entry.path] = _residency(entry.path)
        vec = by_file[entry.path]
        if entry.nbytes == 0:
            continue
        if vec is None or 0 in vec[entry.start // page : (entry.end - 1) // page + 1]:
            out.append(entry)
    return out


_ODD = bytes(i & 1 for i in range(256))  # mincore only defines the lowest bit of each byte


def _residency(path: Path) -> bytes | None:
    """One byte per page of `path`, 1 if cached, or None where mincore is unavailable."""
    libc = _libc()
    if libc is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return b""
        # A mapping only to ask about it: mmap touches no page, mincore reads none.
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = ctypes.create_string_buffer((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
            if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                return None
            return vec.raw.translate(_ODD)
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)


_LIBC: list = []


def _libc():
    if not _LIBC:
        lib = None
        try:
            # The process's own symbols include libc (find_library would run ldconfig).
            if sys.platform.startswith("linux"):
                lib = ctypes.CDLL(None, use_errno=True)
                lib.mmap.restype = ctypes.c_void_p
                lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_int, ctypes.c_long]
                lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
                lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        except (OSError, AttributeError):
            lib = None
        _LIBC.append(lib)
    return _LIBC[0]
