"""CUDA graphs of the decode step: capture, replay, and the static buffers they read.

Sits beside the model runner: `server.step_executor.StepExecutor` calls `run` for every
decode-only step with the batch size to replay (decided on rank 0 by the capture policy,
`server.graph_warmup.CapturePolicy`), and `capture` when the policy says so. This module holds
no policy: it captures what it is told and reports a `CaptureResult`, so the same code runs on
rank 0 and on tensor-parallel workers, which only follow rank 0's decisions.

Engine thread (or a worker's main thread) only: graphs are captured and replayed on the thread
that runs every other CUDA call, so a capture never races another thread's kernel launch.
Under tensor parallelism torch's NCCL watchdog thread polls CUDA events meanwhile; captures
then use the "thread_local" error mode, which leaves other threads' calls alone.

Test seam: `emulate=True` (on CPU, `GRAPHSERVE_EMULATE_GRAPHS=1`) makes a "graph" of size s the
eager step at width s (padding rows on the scratch row), so CI exercises capture scheduling,
padded dispatch and the ranks' capture agreement without a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from dataclasses import dataclass

import torch

from server import ops
from server.gc_control import no_collection
from server.warm_start import check, load_driver

logger = logging.getLogger(__name__)

# Throwaway instantiations of the first graph, where the others come while serving (lazy
# capture, one GPU). On the H200 (8B), one instantiation among a process's 11th-13th graphs
# took 7-10.4 ms instead of 1-3 ms, whichever bucket it was (48; 32 once 48 was left out),
# and the driver held back kernel launches from every thread meanwhile (the engine's next
# launch waited 10.75 ms; its event waits did not, nor did moving the instantiation off the
# GIL help). A batch-1 stream at ready got one 9.5-11 ms gap (over 2x its 4.3 ms p50) in
# every run. With the first graph instantiated 14 more times at startup (all kept until the
# last, then destroyed), no later instantiation took over 3.3 ms and no such gap came
# (docs/benchmarks.md, 8o). Why the driver does this is not known; 14 covers the graphs a
# lazy server captured after ready in those runs.
THROWAWAY_INSTANTIATIONS = 14
# `keep_graph`, `instantiate` and `raw_cuda_graph` are recent in torch (2.11 has them; the
# project allows 2.4+): without them the first graph is captured as it always was.
_KEEPS_GRAPHS = all(hasattr(torch.cuda.CUDAGraph, name)
                    for name in ("instantiate", "raw_cuda_graph"))


@dataclass
class CaptureResult:
    """What one capture on one rank did: `ok`, how long the thread stalled, the graph pool's
    size after it, and the first line of the error when it failed."""

    size: int
    ok: bool
    seconds: float
    pool_bytes: int
    error: str | None = None

    def to_json(self) -> dict:
        return {"size": self.size, "ok": self.ok, "seconds": self.seconds,
                "pool_bytes": self.pool_bytes, "error": self.error}  # fmt: skip


def timed_capture(what: str, size: int, capture, pool_bytes) -> tuple[object | None,
                                                                       CaptureResult]:
    """Run `capture()` (it returns the graph) and time it; an error never escapes, it makes a
    failed result (the graph is then None). `what` names the graph in the log lines;
    `pool_bytes()` is read after the capture either way. Shared by the decode and the
    mixed-step graphs."""
    t0 = time.perf_counter()
    try:
        graph = capture()
    except Exception as exc:  # OOM, CUDA error, injected fault
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        logger.warning("capture of %s failed: %s", what, reason)
        return None, CaptureResult(size, False, time.perf_counter() - t0, pool_bytes(), reason)
    seconds = time.perf_counter() - t0
    pool = pool_bytes()
    logger.info("captured %s in %.1f ms (graph pool %.1f MiB)", what, seconds * 1e3,
                pool / 2**20)
    return graph, CaptureResult(size, True, seconds, pool)


def throwaway_instantiations(graph, count: int) -> list[float]:
    """Instantiate a graph recorded with `keep_graph=True` `count` times through the driver,
    every executable kept until the last is made, then all destroyed (why: above); returns
    each one's milliseconds. An error ends it early with a warning: it is an optimisation."""
    lib = load_driver()
    if lib is None:
        return []
    raw = ctypes.c_void_p(graph.raw_cuda_graph())
    handles: list[ctypes.c_void_p] = []
    times: list[float] = []
    try:
        for _ in range(count):
            handle = ctypes.c_void_p()
            t0 = time.perf_counter()
            # Flag 1, cudaGraphInstantiateFlagAutoFreeOnLaunch: what torch passes.
            check(lib.cuGraphInstantiateWithFlags(ctypes.byref(handle), raw,
                                                  ctypes.c_ulonglong(1)),
                  "cuGraphInstantiateWithFlags")  # fmt: skip
            handles.append(handle)
            times.append((time.perf_counter() - t0) * 1e3)
    except RuntimeError as exc:
        logger.warning("throwaway graph instantiations stopped after %d: %s", len(handles), exc)
    finally:
        for handle in handles:
            lib.cuGraphExecDestroy(handle)
    return times


def capture_and_install(runner, size: int) -> CaptureResult:
    """A runner's `capture_detached` on the engine thread, then its `install` when it
    succeeded (the decode and the mixed-step runners' `capture`)."""
    graph, result = runner.capture_detached(size, background=False)
    if result.ok:
        runner.install(size, graph)
    return result


def segment_bytes_of_pool(pool, device) -> int | None:
    """Bytes of the caching allocator's segments on `device` that belong to graph pool `pool`
    (the id `CUDAGraph.pool()` returns); None where the snapshot has no pool ids. Read once
    per capture (the snapshot lists every segment and block; its cost is inside the capture
    times the logs report)."""
    total, tagged = 0, False
    index = device.index if device.index is not None else torch.cuda.current_device()
    for seg in torch.cuda.memory_snapshot():
        pool_id = seg.get("segment_pool_id")
        if pool_id is None:
            continue
        tagged = True
        if seg.get("device") == index and tuple(pool_id) == tuple(pool):
            total += seg["total_size"]
    return total if tagged else None


class _EmulatedGraph:
    """A CPU stand-in for a captured graph (test seam): replaying it runs the step eagerly at
    the captured width, as a real replay computes the padded rows too."""

    def __init__(self, size: int):
        self.size = size


class DecodeGraphRunner:
    """Runs decode steps from static input buffers, replaying a captured graph when it can.

    One buffer set serves every batch size: graph for size s reads `inputs[:, :s]` and writes
    `logits[:s]`. Logits go into a buffer allocated outside the graph pool, so the pool holds
    only each graph's transient activations, which smaller graphs reuse (largest captured
    first): full coverage costs little more memory than the largest graph alone.

    All methods run on the engine thread, except `capture_detached(background=True)` and
    `pool_bytes`, which `server.background_capture`'s thread calls while the engine thread
    runs steps (it never calls `capture` or `install` meanwhile). Captures use
    `capture_begin`/`capture_end` directly rather than `torch.cuda.graph(...)`, whose entry
    empties the allocator's cache (device and pinned host): mid-serving that would force fresh
    cudaMallocs into the next steps. The caller captures the largest size first (the pool is
    sized by it) and never a size twice.
    """

    def __init__(
        self,
        model,
        kv_cache,
        block_tables,
        max_num_seqs: int,
        scratch_row: int,
        *,
        emulate: bool = False,
        capture_error_mode: str = "global",
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.block_tables = block_tables  # static: the graphs read it in place
        self.max_n = max_num_seqs
        self.scratch_row = scratch_row
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        self.emulate = emulate and not self.cuda
        self._error_mode = capture_error_mode
        # Instantiate the first graph THROWAWAY_INSTANTIATIONS more times (set by the model
        # runner under lazy capture on one GPU: see there).
        self.throwaways = False
        self.vocab = model.shape.vocab_size
        # Rows: token ids, positions, block-table rows (what the graphs read; padding rows and
        # warm-up runs use the scratch row, whose blocks are all the scratch block 0), and, for
        # `run`, the row of the previous step's output each token comes from (-1: the id in
        # row 0 is already right).
        self.inputs = torch.zeros(4, self.max_n, dtype=torch.int64, device=self.device)
        # Under tensor parallelism the width is the padded vocabulary the ranks' slices gather
        # into; `run` returns the real vocabulary's columns.
        self.logits = torch.empty(
            self.max_n, model.logits_width, dtype=model.dtype, device=self.device
        )
        self.graphs: dict[int, object] = {}
        self._failed_graphs: list[object] = []  # never freed: see capture()
        self._pool = None
        self._stream = torch.cuda.Stream() if self.cuda else None
        self._reserved_before: int | None = None
        # Tests inject faults here: called inside a capture with the size being captured.
        self.fault_injector = None

    # -- warm-up ----------------------------------------------------------------------------

    def warm(self, n: int) -> None:
        """Run the step of `n` padding rows eagerly on the capture stream.

        Before the first capture, at the largest size and at 1: cuBLAS creates its workspace
        and Triton compiles its kernels outside any graph pool (captures then skip per-size
        warm-up runs). On CPU it still exercises the step once, so the first request is fast.
        """
        self._fill_padding()
        ctx = torch.cuda.stream(self._stream) if self.cuda else contextlib.nullcontext()
        with ctx:
            self._decode_static(n)
        if self.cuda:
            torch.cuda.current_stream().wait_stream(self._stream)

    def _fill_padding(self) -> None:
        self.inputs[0].zero_()
        self.inputs[1].zero_()
        self.inputs[2].fill_(self.scratch_row)

    def _decode_static(self, n: int) -> None:
        self.model.decode(
            self.inputs[0, :n],
            self.inputs[1, :n],
            self.inputs[2, :n],
            self.kv_cache,
            self.block_tables,
            self.logits[:n],
        )

    # -- capture ----------------------------------------------------------------------------

    def capture(self, size: int) -> CaptureResult:
        """Capture the graph for `size`; errors never escape, they make a failed result.

        No garbage collection runs during it (`server.gc_control.no_collection`). A failed
        capture may leave its graph holding blocks of the shared pool; freeing it (or any graph
        of the pool) and capturing again into that pool trips an allocator assert, so failed
        graphs are kept alive, and the caller never retries a size.
        """
        return capture_and_install(self, size)

    def capture_detached(self, size: int, background: bool) -> tuple[object | None,
                                                                       CaptureResult]:
        """Capture `size` without installing it (`install`, engine thread): `capture`'s work.

        `background`: called from `server.background_capture`'s thread while the engine
        thread keeps replaying the other graphs from the same static buffers. The capture then
        leaves those buffers alone (no padding fill: recording runs no kernel, so their
        contents do not matter to it) and uses the thread-local capture mode, so the engine
        thread's syncs and allocations stay legal meanwhile.
        """
        if size in self.graphs or not 1 <= size <= self.max_n:
            raise ValueError(f"cannot capture batch size {size}: captured already or out of "
                             f"1..{self.max_n}")
        if not (self.cuda or self.emulate):
            raise RuntimeError("CUDA graphs need a CUDA device")
        if background and self.cuda and self._pool is None:
            raise RuntimeError("a background capture needs the pool of a startup capture")

        def capture() -> object:
            with no_collection():
                if self.emulate:
                    return self._capture_emulated(size)
                return self._capture_cuda(size, background)

        where = " (background)" if background else ""
        return timed_capture(f"decode graph for batch size {size}{where}", size, capture,
                             self.pool_bytes)

    def prepare_capture_thread(self) -> None:
        """Ready the calling thread to capture (`server.background_capture`'s worker, once):
        the engine's device as its current one (CUDA's is per thread), and its own cuBLAS
        handle with a workspace for the capture stream, made by small GEMMs outside any
        capture (made inside one, the workspace would be a block of the graph pool): one on
        cuBLAS and one on the cuBLASLt route of `ops.linear`."""
        if not self.cuda:
            return
        torch.cuda.set_device(self.device)
        with torch.cuda.stream(self._stream):
            a = torch.zeros(ops.LT_ROWS[1], 64, dtype=self.model.dtype, device=self.device)
            torch.matmul(a, a.t())
            ops.linear(a, a, None, self.model.zero_bias)
        self._stream.synchronize()

    def install(self, size: int, graph) -> None:
        """Make a captured graph replayable (engine thread: `run` reads `graphs`)."""
        self.graphs[size] = graph

    def _capture_cuda(self, size: int, background: bool = False):
        if self._reserved_before is None:
            # Warm-ups are done by now: what the allocator holds beyond this is graph pool.
            torch.cuda.synchronize()
            self._reserved_before = torch.cuda.memory_reserved()
        # No per-size warm-up run: startup already ran the step eagerly on this stream, so
        # cuBLAS has its workspace and Triton its kernels (compiled once for every batch
        # size). Skipping it halves the stall a busy-time capture adds to one step.
        if not background:
            self._fill_padding()
        torch.cuda.synchronize()
        mode = "thread_local" if background else self._error_mode
        first = self._pool is None and self.throwaways and _KEEPS_GRAPHS
        throwaways = THROWAWAY_INSTANTIATIONS if first else 0
        graph = self.record(lambda: self._decode_static(size), size, self._failed_graphs, mode,
                            throwaways)
        if self._pool is None:
            self._pool = graph.pool()
        return graph

    def record(self, forward, fault_arg: int, failed: list, error_mode: str | None = None,
               throwaways: int = 0):
        """Capture `forward()` on the capture stream into this runner's pool (the mixed-step
        graphs share it) and return the graph. On an error the graph goes to `failed` (kept
        alive: see `capture`), the device is checked and the error re-raised. `fault_arg` is
        what the tests' fault injector is called with inside the capture; `error_mode` the
        capture mode (default: the runner's); `throwaways`: instantiate it that many more
        times first (`throwaway_instantiations`)."""
        # `keep_graph` only when asked for: torch before 2.11 takes no arguments here.
        graph = torch.cuda.CUDAGraph(keep_graph=True) if throwaways else torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(self._stream):
                graph.capture_begin(pool=self._pool,
                                    capture_error_mode=error_mode or self._error_mode)
                try:
                    if self.fault_injector is not None:
                        self.fault_injector(fault_arg)
                    forward()
                finally:
                    graph.capture_end()
            if throwaways:
                times = throwaway_instantiations(graph, throwaways)
                logger.info("instantiated the first graph %d more times and dropped them "
                            "(%.1f ms, slowest %.1f)", len(times), sum(times),
                            max(times, default=0.0))  # fmt: skip
                graph.instantiate()
            torch.cuda.synchronize()
        except Exception:
            failed.append(graph)
            self._recover_from_failed_capture()
            raise
        return graph

    def _capture_emulated(self, size: int) -> _EmulatedGraph:
        if self.fault_injector is not None:
            self.fault_injector(size)
        return _EmulatedGraph(size)

    def release(self) -> None:
        """Drop the captured graphs, their pool and the static buffers (engine shutdown).
        Failed graphs stay referenced: see `capture`."""
        self.graphs.clear()
        self._pool = None
        self.model = self.kv_cache = self.block_tables = None
        self.inputs = self.logits = None

    def pool_bytes(self) -> int:
        """Device memory the graph pool holds: the allocator's segments tagged with its id.

        Not reserved-memory growth since the warm-ups: that also counts what eager steps leave
        cached outside the pool (a first eager prefill between two idle captures read as the
        pool growing 26 -> 54 MiB on the 8B). The growth is the fallback before the pool
        exists (a failed first capture) or where the snapshot carries no pool ids.
        """
        if not self.cuda or self._reserved_before is None:
            return 0
        if self._pool is not None:
            held = segment_bytes_of_pool(self._pool, self.device)
            if held is not None:
                return held
        return max(0, torch.cuda.memory_reserved() - self._reserved_before)

    def _recover_from_failed_capture(self) -> None:
        """Check the capture stream left capture mode and the device is still healthy.

        cudaStreamEndCapture ends a capture even when it fails, so this normally only confirms;
        an error here means the failure went deeper than the graph and is logged as such.
        """
        try:
            with torch.cuda.stream(self._stream):
                if torch.cuda.is_current_stream_capturing():
                    logger.error("the capture stream is still capturing after a failed capture")
            torch.cuda.synchronize()
        except Exception:
            logger.exception("the device reported an error after a failed capture")

    # -- running ----------------------------------------------------------------------------

    def run(
        self,
        ids: list[int],
        positions: list[int],
        rows: list[int],
        prev_tokens=None,
        prev_rows: list[int] | None = None,
        size: int | None = None,
    ):
        """Decode one token for each row; returns the logits view `[n, vocab]`.

        `size`: the captured batch size to replay, padding the rows beyond n onto the scratch
        row (None: run eagerly at n). Without a host sync, a row's input token may come from
        the device: where `prev_rows[i]` is >= 0, row i reads `prev_tokens[prev_rows[i]]` (the
        previous step's sampled tokens, which the host has not seen yet) instead of `ids[i]`.
        Nothing here waits for the device.
        """
        n = len(ids)
        graph = self.graphs.get(size) if size is not None else None
        if size is not None and graph is None:
            raise ValueError(f"no graph captured for batch size {size} on this rank")
        width = size if graph is not None else n
        pad = width - n
        src = prev_rows if prev_tokens is not None and prev_rows is not None else [-1] * n
        # A fresh pinned tensor per step from torch's caching host allocator, which reuses a
        # block only after the copy reading it has run: one persistent buffer rewritten while
        # the previous step's copy is still queued behind the device would race.
        host = torch.tensor(
            (
                ids + [0] * pad,
                positions + [0] * pad,
                rows + [self.scratch_row] * pad,
                src + [-1] * pad,
            ),
            dtype=torch.int64,
            pin_memory=self.cuda,
        )
        self.inputs[:, :width].copy_(host, non_blocking=True)
        if prev_tokens is not None and any(r >= 0 for r in src):
            ids_dev, src_dev = self.inputs[0, :n], self.inputs[3, :n]
            carried = prev_tokens.index_select(0, src_dev.clamp(min=0))
            ids_dev.copy_(torch.where(src_dev >= 0, carried, ids_dev))
        if isinstance(graph, _EmulatedGraph):
            self._decode_static(graph.size)
        elif graph is not None:
            graph.replay()
        else:
            self._decode_static(n)
        return self.logits[:n, : self.vocab]

    def device_info(self) -> dict:
        info = {"type": self.device.type, "torch": str(torch.__version__)}  # a plain str
        if self.cuda:
            info["name"] = torch.cuda.get_device_name(self.device)
            info["total_memory_bytes"] = torch.cuda.get_device_properties(self.device).total_memory
        info["kernels"] = "triton" if ops.triton_enabled() else "torch"
        if self.emulate:
            info["graphs"] = "emulated on CPU (test seam)"
        return info
