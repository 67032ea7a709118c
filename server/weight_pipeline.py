"""Checkpoint weights read by parallel threads straight into their final device tensors.

`PipelinedWeights` is the fast loader's weight source (`take(name, shape)`, as in
`server.weights`). It parses the safetensors headers itself (`server.safetensors_index`) and
keeps a window of tensors in flight, in the order `DecoderModel` takes them:

* The engine thread, inside `take`, allocates each upcoming tensor's final device memory once
  (raw bytes in the checkpoint's dtype) and queues its byte ranges, split into pieces of at most
  `chunk_bytes`, for the readers. It keeps scheduling until `window_bytes` of tensors are queued
  ahead of the one it is waiting for.
* `threads` reader threads pread the pieces. On CUDA each reader owns a CUDA stream and two
  pinned staging buffers of `chunk_bytes` (allocated by the reader itself, so the pinning
  overlaps the engine thread's tokenizer load): it reads a piece into one buffer and copies it
  to its place in the destination with a non-blocking copy on its stream while it reads the
  next piece into the other; a buffer is reused only after the event of its last copy has
  completed (the probe's read -> pinned -> GPU technique). On the CPU the pieces are read
  straight into the destination tensor (no staging, no streams).
* `take` waits for the tensor's pieces, makes the engine thread's stream wait for their copy
  events (no host sync), views the bytes as the checkpoint dtype and converts to the target
  dtype on the device if they differ (the raw copy is freed right after).

Tensor-parallel slices (`take_part`, `parts=`): a rank reads only its slice of a sharded tensor.
`parts(name, shape)` names the slice each tensor will be asked for
(`server.distributed.sharding.planned_slice`), so the window schedules the slice's bytes, not
the tensor's: a slice along dim 0 (q/k/v, gate/up, vocabulary rows) is one contiguous byte
range; a slice along dim 1 (o_proj, down) is strided, one run per row, and a piece then covers
as many whole runs as fit in `chunk_bytes`, read run by run into consecutive bytes of the
staging buffer and copied to the device in one copy. Either way the destination holds the dense
slice. A take that does not match what was scheduled is still right: the slice is cut from the
whole tensor on the device, or the tensor is read again (`stats.part_misses` counts both).

Memory: device peak = the weights taken so far (fused) + the window + one tensor being
converted; DecoderModel frees each layer's q/k/v and gate/up parts once fused, and since every
layer has the same part sizes, the caching allocator hands the freed blocks to the next
layers' parts. Host: the staging buffers only, `2 x threads x chunk_bytes` (1 GiB at 16 x 32
MiB), released at `close()`; the checkpoint is never copied whole into host memory.

GPU ordering: a destination is allocated on the engine thread's current stream, which may
reuse a block that stream is still reading (a part being fused). An event recorded there after
the allocation is waited on by the reader's stream before the copy, and the copy's event is
waited on by the engine thread's stream before the tensor is used, so neither side needs a
host sync.

Thread ownership: everything but the reader loop runs on the engine thread (the one that
constructs the pipeline). The readers only touch their pieces, their own staging buffers and
stream, and the slot bookkeeping under `_cv`. `close()` (always called, also after an error)
stops them, waits for their streams and frees what was not taken.
"""

from __future__ import annotations

import collections
import ctypes
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from server.errors import ModelLoadError
from server.prefetch import usable_cpus
from server.safetensors_index import (
    DTYPES,
    FLOAT_DTYPES,
    TensorEntry,
    check_shape,
    load_plan,
    read_checkpoint,
)

DEFAULT_CHUNK_BYTES = 32 * 2**20
MIN_WINDOW_BYTES = 1 * 2**30
# On the H200 box the probe's read -> pinned -> GPU pipeline ran 13.6 GB/s with 8 threads and
# 15.2 with 16; a CPU load is a plain read into the tensors, for which a few threads suffice.
DEFAULT_THREADS = {"cuda": 16, "cpu": 4}


def default_threads(device_type: str) -> int:
    return max(2, min(DEFAULT_THREADS.get(device_type, 4), usable_cpus()))


class _ShortRead(OSError):
    """The file ended before the bytes its header promised (it changed under us)."""


class _Slot:
    """One scheduled tensor: its destination bytes and the state of its pieces (under `_cv`)."""

    __slots__ = ("entry", "index", "raw", "host_view", "left", "events", "error", "alloc_event",
                 "part")

    def __init__(self, entry: TensorEntry, index: int, raw: torch.Tensor, pieces: int,
                 part: tuple[int, int, int] | None = None):
        self.entry = entry
        self.part = part  # the (dim, start, stop) slice `raw` holds; None: the whole tensor
        self.index = index  # position in the load plan (-1: taken out of plan order)
        self.raw = raw  # uint8 [nbytes] on the device: the final tensor's storage
        self.host_view = _host_view(raw) if raw.device.type == "cpu" else None
        self.left = pieces
        self.events: list = []  # CUDA events of the piece copies (empty on the CPU)
        self.error: BaseException | None = None
        self.alloc_event = None  # CUDA event after the allocation, on the engine's stream


@dataclass(frozen=True)
class _Piece:
    """`runs` runs of `length` bytes at file offsets `offset + i * stride`, read into
    consecutive bytes of the destination from `dest` on (one run: a plain byte range)."""

    slot: _Slot
    offset: int  # in the file
    length: int  # bytes per run
    dest: int  # byte offset in the destination
    runs: int = 1
    stride: int = 0

    @property
    def nbytes(self) -> int:
        return self.runs * self.length


class _Staging:
    __slots__ = ("tensor", "view", "event")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.view = _host_view(tensor)
        self.event = None


@dataclass
class PipelineStats:
    """Counters for the loader's log line and the benchmarks (engine thread reads them)."""

    threads: int
    chunk_bytes: int
    window_bytes: int
    staging_bytes: int = 0
    staging_alloc_s: float = 0.0
    bytes_read: int = 0
    wait_s: float = 0.0  # engine thread blocked in take() waiting for reads
    part_misses: int = 0  # takes that did not match the slice scheduled for them (`parts`)


class PipelinedWeights:
    """Tensors of the safetensors checkpoint in `model_dir`, on `device` as `dtype`.

    `exclude`: names the model will not take although it could (a tied `lm_head.weight`), so
    they are not read ahead. `prefetcher`: a `server.prefetch.PageCacheWarmer` for the same
    directory, told which tensors the readers have taken over and stopped at `close()`.
    `parts(name, shape)`: the `(dim, start, stop)` slice `take_part` will ask for, or None for
    the whole tensor (a tensor-parallel rank's shard; see the module docstring).
    """

    def __init__(
        self,
        model_dir: Path,
        device: str | torch.device,
        dtype: torch.dtype,
        *,
        threads: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        window_bytes: int | None = None,
        exclude: Iterable[str] = (),
        prefetcher=None,
        parts: Callable[[str, tuple[int, ...]], tuple[int, int, int] | None] | None = None,
    ):
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        if chunk_bytes < 4096:
            raise ValueError(f"chunk_bytes must be >= 4096, got {chunk_bytes}")
        self._device = target
        self._cuda = target.type == "cuda"
        self._dtype = dtype
        self._dir = Path(model_dir)
        self._prefetcher = prefetcher
        self._entries = read_checkpoint(self._dir)
        self._files = sorted({e.file for e in self._entries.values()})
        self._plan = load_plan(self._entries, frozenset(exclude))
        self._plan_index = {e.name: i for i, e in enumerate(self._plan)}
        self._parts: dict[str, tuple[int, int, int]] = {}
        if parts is not None:
            for e in self._plan:
                part = parts(e.name, e.shape)
                if part is not None and e.dtype in DTYPES:
                    self._parts[e.name] = part
        threads = threads or default_threads(target.type)
        # Two layers ahead keeps every reader busy while the model fuses the layer before.
        layer = sum(self._read_bytes(e) for e in self._plan
                    if e.name.startswith("model.layers.0."))
        window = window_bytes if window_bytes is not None else max(MIN_WINDOW_BYTES, 2 * layer)
        self.stats = PipelineStats(threads, chunk_bytes, window)
        self._chunk = chunk_bytes
        self._window = window
        self._slots: dict[str, _Slot] = {}  # scheduled, not yet taken
        self._taken: set[str] = set()
        self._next = 0  # next plan index to schedule
        self._cursor = -1  # plan index of the latest take
        self._jobs: collections.deque[_Piece] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._fds: dict[Path, int] = {}
        self._streams: list = []
        self._staged = False
        self._threads: list[threading.Thread] = []
        try:
            for path in sorted({e.path for e in self._entries.values()}):
                self._fds[path] = os.open(path, os.O_RDONLY)
            for i in range(threads):
                t = threading.Thread(target=self._reader, name=f"graphserve-weights-{i}",
                                     daemon=True)
                t.start()
                self._threads.append(t)
            self._top_up()
        except BaseException:
            self.close()
            raise

    # -- the weight-source interface (engine thread) --------------------------------------------

    def has(self, name: str) -> bool:
        return name in self._entries and name not in self._taken

    def names(self) -> list[str]:
        """Tensors not taken (yet)."""
        return [n for n in self._entries if n not in self._taken]

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor `name` as `dtype` on the device, checked against `shape`; forgotten here."""
        return self._take(name, shape, None)

    def take_part(self, name: str, shape: tuple[int, ...], dim: int, start: int, stop: int
                  ) -> torch.Tensor:
        """Indices `[start, stop)` along `dim` of the tensor `name` of full shape `shape`, dense,
        as `dtype` on the device; reads only those bytes when `parts` planned this slice (or
        the tensor was not scheduled yet). Forgotten here like `take`."""
        if not (0 <= dim < len(shape) and 0 <= start <= stop <= shape[dim]):
            raise ValueError(f"slice [{start}, {stop}) of dim {dim} is outside shape {shape}")
        return self._take(name, shape, (dim, start, stop))

    def _take(self, name: str, shape: tuple[int, ...], part: tuple[int, int, int] | None
              ) -> torch.Tensor:
        entry = self._entries.get(name)
        if entry is None or name in self._taken:
            raise ModelLoadError(
                f"{self._dir}: tensor {name!r} is missing from "
                f"{', '.join(self._files) or 'the safetensors files'}"
            )
        origin = str(entry.path)
        check_shape(entry, shape)
        torch_name = DTYPES.get(entry.dtype, (0, None))[1]
        if entry.dtype not in FLOAT_DTYPES or not hasattr(torch, torch_name or ""):
            shown = f"torch.{torch_name}" if torch_name else entry.dtype
            raise ModelLoadError(f"{origin}: tensor {name!r} has dtype {shown}, not float")
        slot = self._slots.get(name)
        index = self._plan_index.get(name, -1)
        if slot is not None and slot.part != part and slot.part is not None:
            # Scheduled as another slice: read what is asked for instead (after its copies).
            self.stats.part_misses += 1
            self._wait(slot)
            del self._slots[name]
            slot = None
        if slot is None:  # not in the plan (or not reached): read it now, ahead of the queue
            slot = self._schedule([(index, entry)], urgent=True, part=part)[0]
        if slot.index >= 0:
            self._cursor = max(self._cursor, slot.index)
        self._top_up()
        self._wait(slot)
        del self._slots[name]
        self._taken.add(name)
        if slot.error is not None:
            raise ModelLoadError(f"{origin}: cannot read tensor {name!r}: {slot.error}")
        if self._cuda:
            stream = torch.cuda.current_stream(self._device)
            for event in slot.events:
                stream.wait_event(event)
        tensor = slot.raw.view(getattr(torch, torch_name)).view(_sliced(entry.shape, slot.part))
        if slot.part != part:  # the whole tensor was read: cut the slice out on the device
            self.stats.part_misses += 1
            dim, start, stop = part
            # A copy in any case, so the whole tensor's bytes are freed on return.
            return tensor.narrow(dim, start, stop - start).to(
                self._dtype, copy=True, memory_format=torch.contiguous_format
            )
        if tensor.dtype != self._dtype:
            tensor = tensor.to(self._dtype)  # on the device: the raw bytes are freed after
        return tensor

    def close(self) -> None:
        """Stop the readers, wait for copies in flight, free what was not taken. Idempotent."""
        with self._cv:
            self._closed = True
            self._jobs.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []
        # Untaken destinations may still be written by a copy: wait before freeing them.
        for stream in self._streams:
            stream.synchronize()
        self._streams = []
        self._slots.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._staged:
            _empty_host_cache()
        if self._prefetcher is not None:
            self._prefetcher.stop()

    # -- scheduling (engine thread) -------------------------------------------------------------

    def _ahead_bytes(self) -> int:
        return sum(s.raw.numel() for s in self._slots.values() if s.index > self._cursor)

    def _read_bytes(self, entry: TensorEntry) -> int:
        """Bytes the plan reads of `entry`: its planned slice, or all of it."""
        shape = _sliced(entry.shape, self._parts.get(entry.name))
        return math.prod(shape) * DTYPES[entry.dtype][0] if entry.dtype in DTYPES else entry.nbytes

    def _top_up(self) -> None:
        """Schedule plan tensors until `window_bytes` are queued beyond the latest take."""
        batch = []
        ahead = self._ahead_bytes()
        while self._next < len(self._plan) and ahead < self._window:
            entry = self._plan[self._next]
            if entry.name not in self._slots and entry.name not in self._taken:
                batch.append((self._next, entry))
                ahead += self._read_bytes(entry)
            self._next += 1
        if batch:
            self._schedule(batch)

    def _schedule(self, batch: list[tuple[int, TensorEntry]], urgent: bool = False,
                  part: tuple[int, int, int] | None | bool = False) -> list[_Slot]:
        """Allocate and queue `batch`; each tensor's planned slice (`part=False`), or `part`."""
        slots, pieces = [], []
        for index, entry in batch:
            want = self._parts.get(entry.name) if part is False else part
            if want is not None and entry.dtype not in DTYPES:
                want = None  # no element size to slice by: take() reports the dtype
            runs = _runs(entry, want)
            total = sum(r[1] * r[2] for r in runs)
            raw = torch.empty(total, dtype=torch.uint8, device=self._device)
            mine = list(_pieces(runs, self._chunk))
            slot = _Slot(entry, index, raw, len(mine), want)
            pieces.extend(_Piece(slot, *p) for p in mine)
            slots.append(slot)
            self._slots[entry.name] = slot
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._device))
            for slot in slots:
                slot.alloc_event = event
        if self._prefetcher is not None:
            self._prefetcher.skip(e.name for _, e in batch)
        with self._cv:
            if urgent:
                self._jobs.extendleft(reversed(pieces))
            else:
                self._jobs.extend(pieces)
            self._cv.notify_all()
        return slots

    def _wait(self, slot: _Slot) -> None:
        t0 = time.perf_counter()
        with self._cv:
            while slot.left > 0:
                if not self._cv.wait(timeout=1.0) and not any(
                    t.is_alive() for t in self._threads
                ):
                    raise ModelLoadError(f"{self._dir}: the weight reader threads exited")
        self.stats.wait_s += time.perf_counter() - t0

    # -- reader threads -------------------------------------------------------------------------

    def _reader(self) -> None:
        stream, bufs = None, []
        if self._cuda:
            try:
                stream, bufs = self._staging()
            except BaseException as exc:  # e.g. pinned memory refused: fail every piece
                stream, bufs = exc, []
        turn = 0
        while True:
            with self._cv:
                while not self._jobs and not self._closed:
                    self._cv.wait()
                if self._closed:
                    break
                piece = self._jobs.popleft()
                failed = piece.slot.error is not None
            event = None
            error = None
            if not failed:
                try:
                    if isinstance(stream, BaseException):
                        raise stream
                    if stream is not None:
                        event = self._copy_through(piece, stream, bufs[turn % 2])
                        turn += 1
                    else:
                        dest = piece.slot.host_view[piece.dest : piece.dest + piece.nbytes]
                        self._read(piece, dest)
                except BaseException as exc:  # reported by take(); never kills the reader
                    error = exc
            with self._cv:
                slot = piece.slot
                slot.left -= 1
                if event is not None:
                    slot.events.append(event)
                if error is not None and slot.error is None:
                    slot.error = error
                if not failed and error is None:
                    self.stats.bytes_read += piece.nbytes
                if slot.left == 0:
                    self._cv.notify_all()
        if isinstance(stream, torch.cuda.Stream):
            stream.synchronize()  # the staging buffers are freed with this frame

    def _staging(self):
        t0 = time.perf_counter()
        torch.cuda.set_device(self._device)
        stream = torch.cuda.Stream(self._device)
        bufs = [_Staging(torch.empty(self._chunk, dtype=torch.uint8, pin_memory=True))
                for _ in range(2)]
        with self._cv:
            self._streams.append(stream)
            self._staged = True
            self.stats.staging_bytes += 2 * self._chunk
            self.stats.staging_alloc_s = max(self.stats.staging_alloc_s,
                                             time.perf_counter() - t0)
        return stream, bufs

    def _copy_through(self, piece: _Piece, stream, buf: _Staging):
        if buf.event is not None:
            buf.event.synchronize()  # its previous copy must have left the buffer
        n = piece.nbytes
        self._read(piece, buf.view[:n])
        slot = piece.slot
        with torch.cuda.stream(stream):
            stream.wait_event(slot.alloc_event)
            dest = slot.raw[piece.dest : piece.dest + n]
            dest.copy_(buf.tensor[:n], non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        buf.event = event
        return event

    def _read(self, piece: _Piece, dest: memoryview) -> None:
        fd = self._fds[piece.slot.entry.path]
        length = piece.length
        for i in range(piece.runs):
            at = piece.offset + i * piece.stride
            out = dest[i * length : (i + 1) * length]
            done = 0
            while done < length:
                n = os.preadv(fd, [out[done:]], at + done)
                if n <= 0:
                    raise _ShortRead(
                        f"file ended at byte {at + done}, before the tensor's end "
                        f"({piece.slot.entry.end})"
                    )
                done += n


def _sliced(shape: tuple[int, ...], part: tuple[int, int, int] | None) -> tuple[int, ...]:
    if part is None:
        return tuple(shape)
    dim, start, stop = part
    return tuple(stop - start if d == dim else n for d, n in enumerate(shape))


def _runs(entry: TensorEntry, part: tuple[int, int, int] | None) -> list[tuple[int, int, int, int]]:
    """The file bytes of `entry`'s slice `part` (None: all of it) in destination order, as
    `(offset, run_bytes, runs, stride)` groups: `runs` runs of `run_bytes` bytes, `stride`
    apart in the file."""
    if part is None:
        return [(entry.start, entry.nbytes, 1, 0)]
    dim, start, stop = part
    inner = math.prod(entry.shape[dim + 1 :]) * DTYPES[entry.dtype][0]  # bytes per index of dim
    outer = math.prod(entry.shape[:dim])
    run = (stop - start) * inner
    if run == 0 or outer == 0:
        return []
    stride = entry.shape[dim] * inner
    if outer == 1 or run == stride:  # contiguous: one range
        return [(entry.start + start * inner, run * outer, 1, 0)]
    return [(entry.start + start * inner, run, outer, stride)]


def _pieces(runs, chunk: int):
    """`runs` cut into pieces of at most `chunk` bytes (whole runs where one fits), as
    `_Piece` fields after the slot: (offset, length, dest, runs, stride)."""
    dest = 0
    for offset, length, count, stride in runs:
        if length > chunk or count == 1:  # each run on its own, cut into chunks
            for i in range(count):
                base = offset + i * stride
                for off in range(0, length, chunk):
                    yield base + off, min(chunk, length - off), dest, 1, 0
                    dest += min(chunk, length - off)
            continue
        per = chunk // length
        for first in range(0, count, per):
            k = min(per, count - first)
            yield offset + first * stride, length, dest, k, stride
            dest += k * length


def _host_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor for os.preadv (no numpy needed); valid
    while the tensor lives (its owner keeps both)."""
    n = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * n).from_address(tensor.data_ptr())).cast("B")


def _empty_host_cache() -> None:
    """Give the staging ring's pinned memory back (torch caches freed pinned blocks)."""
    for name in ("_host_emptyCache", "_accelerator_emptyHostCache"):
        fn = getattr(torch._C, name, None)
        if fn is not None:
            try:
                fn()
            except RuntimeError:
                pass
            return
