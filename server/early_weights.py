"""Checkpoint weights read into GPU memory while torch is still importing.

On one GPU, `import torch` (1.8-2.2 s on the H200 box) and reading the weights (16 GB at ~13 GB/s
for an 8B model) used to run one after the other, because the weight pipeline
(`server.weight_pipeline`) needs torch for its pinned buffers, streams and destination tensors.
This module does the same reading with the CUDA driver API through ctypes, so it starts at the
first moment of the engine thread, beside the torch import:

* `start()` (engine thread, before torch) plans one device allocation holding every tensor the
  model takes, in the model's take order: each tensor at a 256-byte-aligned offset, except that
  the parts the model fuses (q/k/v, gate/up, and their biases) follow each other with no gap,
  so the fused matrix is a view of the buffer, not a copy. A coordinator thread initialises the
  driver, retains the device's primary context (the one torch's runtime will use) and allocates
  the buffer; `threads` readers then pread 64 MiB pieces into two pinned buffers each and copy
  them to their place with `cuMemcpyHtoDAsync` on a stream of their own, reusing a buffer only
  after its copy's event completed. Every ctypes call and every pread drops the GIL; a reader
  needs it only between them.
* `claim(path)` (engine thread, in the loader, after torch) hands the reader over;
  `EarlyWeights` is the loader's weight source over it (`take`, `take_adjacent`, `names`,
  `close`, `stats`, as `server.weight_pipeline.PipelinedWeights`): a take waits until the
  tensor's pieces are on the device (host-synchronised, so torch's stream may use it at once)
  and returns a view of the buffer as the checkpoint's dtype.

Only where the raw bytes are the final tensors: one process (no tensor parallelism), a
safetensors checkpoint whose model tensors all have the serving dtype, a CUDA driver. Anything
else (or any failure before the first take) leaves the load to the pipeline, which then runs as
before. The buffer is the weights' storage for the process's life: it is freed when the last
view of it is (the model's), not by torch's caching allocator, so `external_bytes` tells the
KV planner that it is in use.

Thread ownership: `start`/`claim` and everything in `EarlyWeights` on the engine thread; the
coordinator and the readers touch only the driver, the files, their pinned buffers and the
slot bookkeeping under `_cv`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from server import prefetch
from server.errors import ModelLoadError
from server.safetensors_index import TensorEntry, check_shape, load_plan, read_checkpoint
from server.warm_start import check, load_driver, retain_primary_context

log = logging.getLogger("graphserve.loader")

PIECE_BYTES = 64 * 2**20
ALIGN = 256
# Few readers, niced, when the checkpoint is in the page cache: they finish inside the torch
# import anyway (4 x 64 MiB read the 8B's 16 GB with 0.00 s left to wait at the load, H200
# box), and every extra busy thread slows that import, which is on the path to ready (16
# readers: import 2.7-3.8 s vs 2.5-2.9 s with 4, one call). So only as many as the bytes need:
# one reader per `CACHED_BYTES_PER_READER`, up to `CACHED_THREADS`. Fresh processes on the H200
# box, median of 4 (twenty-first session's probe): the 1B's 2.5 GB were on the device at 1.72 s
# with 1 reader, 1.86 s with 2, 1.98 s with 4 (1 reader at ~4.8 GB/s still ends inside the
# import); the 8B's 16 GB at 2.22 s with 4, 2.88 s with 2. Exec -> ready, launches alternating
# with the other count in one call (bench/results/cold-start-{1b,8b}-h200-s22-readers-*.json):
# the 1B 3.26 s with 1 reader vs 3.46 s with 4; the 8B 3.59 s with 4 vs 4.44 s with 2 (weights
# phase 0.35 vs 1.08 s). From disk, reading is the longer part: more requests in flight (4
# readers: 8.8 s for the 8B from NVMe, 16 in the pipeline 7.8 s).
CACHED_THREADS = 4
CACHED_BYTES_PER_READER = 4 * 2**30
DISK_THREADS = 16
# Safetensors dtype of the raw bytes that are the served tensors, per `--dtype`.
RAW_DTYPE = {"auto": "BF16", "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Parts `DecoderModel` fuses, in its order (`take_adjacent` returns them as one view).
FUSED_GROUPS = (
    ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
)
_FOLLOWS = {g[i]: g[i - 1] for g in FUSED_GROUPS for i in range(1, len(g))}
_local = threading.local()


@dataclass
class EarlyStats:
    """What the reader did (the loader's log line reads these, as the pipeline's)."""

    threads: int
    bytes_planned: int
    bytes_read: int = 0
    wait_s: float = 0.0  # engine thread blocked in take()
    setup_s: float | None = None  # driver, context and buffer, on the coordinator
    read_s: float | None = None  # first piece to last copy done
    errors: list[str] = field(default_factory=list)


@dataclass
class _Slot:
    entry: TensorEntry
    offset: int  # in the device buffer
    pieces: int
    done: threading.Event = field(default_factory=threading.Event)


def layout(plan: list[TensorEntry]) -> tuple[dict[str, int], int]:
    """Byte offset of every tensor in the device buffer, and the buffer's size: 256-byte
    aligned, but a fused part right after the part it follows (same layer, plan order)."""
    offsets: dict[str, int] = {}
    end = 0
    prev: str | None = None
    for e in plan:
        suffix = e.name.rpartition(".layers.")[2].partition(".")[2]
        before = _FOLLOWS.get(suffix)
        if before is not None and prev == e.name.replace(suffix, before):
            offsets[e.name] = end  # adjacent: the fused view needs no gap
        else:
            offsets[e.name] = -(-end // ALIGN) * ALIGN
        end = offsets[e.name] + e.nbytes
        prev = e.name
    return offsets, -(-end // ALIGN) * ALIGN


class EarlyReader:
    """Reads `plan` into one device allocation with the driver API (`lib`, from
    `warm_start.load_driver`; see the module docstring)."""

    def __init__(self, model_dir: Path, plan: list[TensorEntry], raw_dtype: str, ordinal: int,
                 threads: int | None, lib):
        self.model_dir = model_dir
        self.raw_dtype = raw_dtype
        self.offsets, self.nbytes = layout(plan)
        self.slots: dict[str, _Slot] = {}
        self._jobs: deque[tuple[_Slot, int, int, int]] = deque()
        for e in plan:
            n = max(1, -(-e.nbytes // PIECE_BYTES))
            slot = _Slot(e, self.offsets[e.name], n)
            self.slots[e.name] = slot
            for i in range(n):
                start = e.start + i * PIECE_BYTES
                self._jobs.append((slot, start, min(PIECE_BYTES, e.end - start),
                                   slot.offset + i * PIECE_BYTES))
            if e.nbytes == 0:
                slot.pieces = 0
                slot.done.set()
        self.stats = EarlyStats(threads or 0, sum(e.nbytes for e in plan))
        self.error: str | None = None
        self.checkpoint_names: list[str] = [e.name for e in plan]  # every tensor in the files
        self.base = 0  # device pointer, once allocated
        self.ready = threading.Event()  # the buffer exists (or setup failed: see `error`)
        self._lib = lib
        self._ordinal = ordinal
        self._threads = threads
        self._cv = threading.Condition()
        self._stop = False
        self._ctx = ctypes.c_void_p()
        self._fds: dict[Path, int] = {}
        self._workers: list[threading.Thread] = []
        self._t_read: float | None = None
        self._running = 0
        self._coordinator = threading.Thread(target=self._setup, name="graphserve-early-weights",
                                             daemon=True)  # fmt: skip
        self._coordinator.start()

    # -- coordinator and readers (their own threads) ------------------------------------------

    def _setup(self) -> None:
        t0 = time.perf_counter()
        try:
            if self._threads is None:  # here, not on the engine thread: mincore takes a moment
                self._threads = default_threads([s.entry for s in self.slots.values()])
                self.stats.threads = self._threads
            lib = self._lib
            self._ctx = retain_primary_context(lib, self._ordinal)
            check(lib.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
            ptr = ctypes.c_uint64()
            check(lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(self.nbytes)),
                   f"cuMemAlloc({self.nbytes} bytes)")  # fmt: skip
            self.base = ptr.value
            for path in sorted({s.entry.path for s in self.slots.values()}):
                self._fds[path] = os.open(path, os.O_RDONLY)
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        finally:
            self.stats.setup_s = time.perf_counter() - t0
            self.ready.set()
        self._t_read = time.perf_counter()
        self._running = self._threads
        for i in range(self._threads):
            t = threading.Thread(target=self._reader, name=f"graphserve-early-weights-{i}",
                                 daemon=True)  # fmt: skip
            t.start()
            self._workers.append(t)

    def _reader(self) -> None:
        lib = self._lib
        host = [ctypes.c_void_p(), ctypes.c_void_p()]
        events = [ctypes.c_void_p(), ctypes.c_void_p()]
        stream = ctypes.c_void_p()
        pending: list[tuple[_Slot, int] | None] = [None, None]
        prefetch.lower_priority()  # where cores are scarce the torch import keeps its CPU
        try:
            check(lib.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
            check(lib.cuStreamCreate(ctypes.byref(stream), 1), "cuStreamCreate")  # non-blocking
            for i in range(2):
                check(lib.cuMemHostAlloc(ctypes.byref(host[i]), ctypes.c_size_t(PIECE_BYTES), 0),
                       "cuMemHostAlloc")  # fmt: skip
                check(lib.cuEventCreate(ctypes.byref(events[i]), 2), "cuEventCreate")  # no timing
            views = [memoryview((ctypes.c_char * PIECE_BYTES).from_address(h.value)).cast("B")
                     for h in host]  # fmt: skip
            i = 0
            while True:
                with self._cv:
                    if self._stop or not self._jobs:
                        break
                    slot, start, n, dest = self._jobs.popleft()
                if pending[i] is not None:  # this buffer's last copy must be done first
                    check(lib.cuEventSynchronize(events[i]), "cuEventSynchronize")
                    self._finished(*pending[i])
                    pending[i] = None
                _pread(self._fds[slot.entry.path], views[i][:n], start)
                check(lib.cuMemcpyHtoDAsync_v2(ctypes.c_uint64(self.base + dest), host[i],
                                                ctypes.c_size_t(n), stream),
                       "cuMemcpyHtoDAsync")  # fmt: skip
                check(lib.cuEventRecord(events[i], stream), "cuEventRecord")
                pending[i] = (slot, n)
                i ^= 1
            check(lib.cuStreamSynchronize(stream), "cuStreamSynchronize")
            for p in pending:
                if p is not None:
                    self._finished(*p)
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            if stream:
                lib.cuStreamSynchronize(stream)
                lib.cuStreamDestroy_v2(stream)
            for i in range(2):
                if events[i]:
                    lib.cuEventDestroy_v2(events[i])
                if host[i]:
                    lib.cuMemFreeHost(host[i])
            with self._cv:
                self._running -= 1
                if self._running == 0 and self._t_read is not None:
                    self.stats.read_s = time.perf_counter() - self._t_read
                    self._close_files()
                self._cv.notify_all()

    def _finished(self, slot: _Slot, n: int) -> None:
        with self._cv:
            self.stats.bytes_read += n
            slot.pieces -= 1
            if slot.pieces == 0:
                slot.done.set()

    def _fail(self, reason: str) -> None:
        with self._cv:
            self.stats.errors.append(reason)
            if self.error is None:
                self.error = reason
            self._stop = True
            self._cv.notify_all()
        for slot in self.slots.values():  # wake any waiting take; it sees `error`
            slot.done.set()

    def _close_files(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- engine thread --------------------------------------------------------------------------

    def wait(self, name: str) -> None:
        slot = self.slots[name]
        slot.done.wait()
        if self.error is not None:
            raise ModelLoadError(f"{self.model_dir}: reading {name!r} failed: {self.error}")

    def stop(self, free: bool) -> None:
        """Stop the readers and wait for them; `free`: give the device buffer back too (the
        loader fell back to the pipeline, or the start failed). Idempotent."""
        with self._cv:
            self._stop = True
            self._jobs.clear()
            self._cv.notify_all()
        self._coordinator.join()
        for t in self._workers:
            t.join()
        with self._cv:
            self._close_files()
        if free and self.base:
            self._lib.cuMemFree_v2(ctypes.c_uint64(self.base))
            self.base = 0


def start(model: str | None, dtype: str, *, ordinal: int = 0,
          threads: int | None = None, lib=None) -> EarlyReader | None:
    """Start reading `model`'s weights onto GPU `ordinal` for a later `claim()` on this thread.

    None (nothing started) where the raw bytes are not the served tensors or the checkpoint
    cannot be planned here: the loader then reads (and reports) as it always did.
    """
    raw = RAW_DTYPE.get(dtype)
    if model is None or raw is None:
        return None
    if lib is None:
        lib = load_driver()
        if lib is None:
            return None
    path = Path(model).expanduser()
    try:
        import json

        config = json.loads((path / "config.json").read_text())
        entries = read_checkpoint(path)
    except (OSError, ValueError, ModelLoadError):
        return None
    tied = bool(config.get("tie_word_embeddings", False))
    plan = load_plan(entries, frozenset({"lm_head.weight"}) if tied else frozenset())
    if not plan or any(e.dtype != raw for e in plan):
        return None
    reader = EarlyReader(path.resolve(), plan, raw, ordinal, threads, lib)
    reader.checkpoint_names = list(entries)  # for `names()`: what the model did not take
    _local.reader = reader
    return reader


def default_threads(plan: list[TensorEntry]) -> int:
    """Readers for `plan`: if the page cache holds it all (mincore), one per
    `CACHED_BYTES_PER_READER` bytes, at most `CACHED_THREADS` and a quarter of the usable
    CPUs; more if not."""
    cpus = prefetch.usable_cpus()
    if prefetch.not_resident(plan):
        return max(2, min(DISK_THREADS, cpus))
    wanted = -(-sum(e.nbytes for e in plan) // CACHED_BYTES_PER_READER)  # ceil
    return max(1, min(CACHED_THREADS, cpus // 4, wanted))


def claim(model_dir: Path) -> EarlyReader | None:
    """The reader `start()` began on this thread for `model_dir`, handed over once (else None,
    and one for another directory is stopped and freed)."""
    reader = getattr(_local, "reader", None)
    _local.reader = None
    if reader is None:
        return None
    if reader.model_dir != Path(model_dir).expanduser().resolve():
        reader.stop(free=True)
        return None
    return reader


def discard() -> None:
    """Stop and free this thread's reader, if any (startup failed before the loader ran)."""
    reader = getattr(_local, "reader", None)
    _local.reader = None
    if reader is not None:
        reader.stop(free=True)


def raw_dtype(torch_dtype) -> str | None:
    """The safetensors spelling of a torch dtype the early path serves (None: not one)."""
    import torch

    return {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}.get(torch_dtype)


class EarlyWeights:
    """The loader's weight source over a claimed `EarlyReader` (engine thread, after torch).

    Raises ModelLoadError from the constructor if the reader's setup failed (the loader then
    falls back to the pipeline), and from `take` if a read failed afterwards.
    """

    def __init__(self, reader: EarlyReader, torch_dtype, device_buffer=None):
        import torch

        reader.ready.wait()
        if reader.error is not None or not reader.base:
            reason = reader.error or "no device buffer"
            reader.stop(free=True)
            raise ModelLoadError(f"early weight reader unusable: {reason}")
        self._reader = reader
        self._dtype = torch_dtype
        self.stats = reader.stats
        self.external_bytes = reader.nbytes
        # One uint8 tensor over the whole buffer; every weight is a view of it. The holder is
        # referenced by the tensor's storage and frees the buffer when the last view dies.
        # (`device_buffer`: the tests' stand-in for it.)
        self._buf = (torch.as_tensor(_DeviceBuffer(reader), device="cuda")
                     if device_buffer is None else device_buffer)
        self._taken: set[str] = set()

    def names(self) -> list[str]:
        """Tensors of the checkpoint not taken (yet), read or not (as the pipeline's)."""
        return [n for n in self._reader.checkpoint_names if n not in self._taken]

    def take(self, name: str, shape: tuple[int, ...]):
        slot = self._slot(name, shape)
        return self._view(slot.offset, slot.entry.nbytes, shape)

    def take_adjacent(self, parts: list[tuple[str, tuple[int, ...]]]):
        """Parts fused along dim 0, as one view when they lie back to back in the buffer
        (they do for `FUSED_GROUPS`); None otherwise (the caller then concatenates)."""
        if not parts or any(n not in self._reader.slots for n, _ in parts):
            return None
        slots = [self._reader.slots[n] for n, _ in parts]
        for a, b in zip(slots, slots[1:], strict=False):
            if b.offset != a.offset + a.entry.nbytes:
                return None
        for name, shape in parts:
            self._slot(name, shape)
        rows = sum(shape[0] for _, shape in parts)
        fused = (rows, *parts[0][1][1:])
        if any(tuple(shape[1:]) != fused[1:] for _, shape in parts):
            return None
        return self._view(slots[0].offset, sum(s.entry.nbytes for s in slots), fused)

    def close(self) -> None:
        self._reader.stop(free=False)  # the buffer is the weights' storage now

    def _slot(self, name: str, shape: tuple[int, ...]) -> _Slot:
        slot = self._reader.slots.get(name)
        if slot is None:
            raise ModelLoadError(f"{self._reader.model_dir}: tensor {name!r} is missing from "
                                 "the checkpoint")  # fmt: skip
        check_shape(slot.entry, shape)
        t0 = time.perf_counter()
        self._reader.wait(name)
        self.stats.wait_s += time.perf_counter() - t0
        self._taken.add(name)
        return slot

    def _view(self, offset: int, nbytes: int, shape: tuple[int, ...]):
        return self._buf[offset:offset + nbytes].view(self._dtype).view(shape)


class _DeviceBuffer:
    """`__cuda_array_interface__` of the reader's allocation; frees it when collected."""

    def __init__(self, reader: EarlyReader):
        self._lib = reader._lib
        self._ctx = reader._ctx
        self._ptr = reader.base
        self.__cuda_array_interface__ = {
            "shape": (reader.nbytes,), "typestr": "|u1", "data": (reader.base, False),
            "version": 3, "strides": None, "stream": None,
        }  # fmt: skip

    def __del__(self):
        try:  # any thread may collect it: make the (primary) context current there first
            self._lib.cuCtxSetCurrent(self._ctx)
            self._lib.cuMemFree_v2(ctypes.c_uint64(self._ptr))
        except Exception:  # interpreter shutdown: the process frees it
            pass


def _pread(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"file ended at byte {offset + done} (the checkpoint changed?)")
        done += n
