"""CUDA graphs of the decode step: capture, replay, and the static buffers they read.

Sits beside the model runner: `server.model_runner.ModelRunner` calls `run` for every decode
step and `capture` when the capture policy (`server.graph_warmup.CapturePolicy`) says so; this
module does the torch side of that protocol (`begin` / `succeeded` / `failed`).

Engine thread only: graphs are captured and replayed on the thread that runs every other CUDA
call, so a capture never races another thread's kernel launch.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time

import torch

from server import ops
from server.graph_warmup import CapturePolicy

logger = logging.getLogger(__name__)


class DecodeGraphRunner:
    """Runs decode steps from static input buffers, replaying a captured graph when it can.

    One buffer set serves every batch size: graph for size s reads `inputs[:, :s]` and writes
    `logits[:s]`. Logits go into a buffer allocated outside the graph pool, so the pool holds
    only each graph's transient activations, which smaller graphs reuse (largest captured
    first): full coverage costs little more memory than the largest graph alone.

    All methods run on the engine thread. Captures use `capture_begin`/`capture_end` directly
    rather than `torch.cuda.graph(...)`, whose entry empties the allocator's cache (device and
    pinned host): mid-serving that would force fresh cudaMallocs into the next steps.
    """

    def __init__(
        self,
        model,
        kv_cache,
        block_tables,
        policy: CapturePolicy,
        max_num_seqs: int,
        scratch_row: int,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.block_tables = block_tables  # static: the graphs read it in place
        self.policy = policy
        self.max_n = max_num_seqs
        self.scratch_row = scratch_row
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        # Rows: token ids, positions, block-table rows (what the graphs read; padding rows and
        # warm-up runs use the scratch row, whose blocks are all the scratch block 0), and, for
        # `run`, the row of the previous step's output each token comes from (-1: the id in
        # row 0 is already right).
        self.inputs = torch.zeros(4, self.max_n, dtype=torch.int64, device=self.device)
        self.logits = torch.empty(
            self.max_n, model.shape.vocab_size, dtype=model.dtype, device=self.device
        )
        self.graphs: dict[int, object] = {}
        self._failed_graphs: list[object] = []  # never freed: see capture()
        self._pool = None
        self._stream = torch.cuda.Stream() if self.cuda else None
        self._reserved_before = 0
        # Tests inject faults here: called inside a capture with the size being captured.
        self.fault_injector = None

    # -- startup ----------------------------------------------------------------------------

    def startup(self) -> None:
        """Warm up, then capture the policy's startup sizes (lazy: the largest only)."""
        if not self.cuda:
            self._warm(self.max_n)  # still exercise the step once, so the first request is fast
            return
        plan = self.policy.startup_plan()
        # Eager runs at the largest size on the capture stream first: cuBLAS creates its
        # workspace and Triton compiles its kernels outside any graph pool.
        for n in sorted({self.max_n, 1}, reverse=True):
            self._warm(n)
        torch.cuda.synchronize()
        self._reserved_before = torch.cuda.memory_reserved()
        if not plan:
            return
        if len(plan) > 1:
            # One collection before a bulk, not per graph. Lazy startup captures a single
            # graph: a full collection of the torch + transformers heap (~0.2 s measured on
            # the H100 box) would only delay readiness.
            gc.collect()
        gc.freeze()
        try:
            for size in plan:
                if not self.policy.active:  # the largest failed: the policy is off, serve eagerly
                    break
                self.capture(size, bulk=True)
        finally:
            gc.unfreeze()

    def _warm(self, n: int) -> None:
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

    def capture(self, size: int, bulk: bool = False) -> bool:
        """Capture the graph for `size`; report to the policy.

        Capture errors never escape (they mark the size failed); only a broken protocol with
        the policy (e.g. capturing a size twice) raises, as a bug would.

        A failed capture may leave its graph holding blocks of the shared pool; freeing it (or
        any graph of the pool) and capturing again into that pool trips an allocator assert,
        so failed graphs are kept alive and never retried.
        """
        self.policy.begin(size)
        if not bulk:
            gc.freeze()  # no GC pass (and no tensor frees from __del__) during the capture
        graph = torch.cuda.CUDAGraph()
        t0 = time.perf_counter()
        try:
            # No per-size warm-up run: startup already ran the step eagerly on this stream, so
            # cuBLAS has its workspace and Triton its kernels (compiled once for every batch
            # size). Skipping it halves the stall a busy-time capture adds to one step.
            self._fill_padding()
            torch.cuda.synchronize()
            with torch.cuda.stream(self._stream):
                graph.capture_begin(pool=self._pool)
                try:
                    if self.fault_injector is not None:
                        self.fault_injector(size)
                    self._decode_static(size)
                finally:
                    graph.capture_end()
            torch.cuda.synchronize()
        except Exception as exc:  # OOM, CUDA error, injected fault
            self._failed_graphs.append(graph)
            self._recover_from_failed_capture()
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            logger.warning("graph capture for batch size %d failed: %s", size, reason)
            self.policy.failed(size, reason)
            return False
        finally:
            if not bulk:
                gc.unfreeze()
        seconds = time.perf_counter() - t0
        if self._pool is None:
            self._pool = graph.pool()
        self.graphs[size] = graph
        pool_bytes = max(0, torch.cuda.memory_reserved() - self._reserved_before)
        self.policy.succeeded(size, seconds, pool_bytes)
        logger.info(
            "captured decode graph for batch size %d in %.1f ms (graph pool %.1f MiB)",
            size,
            seconds * 1e3,
            pool_bytes / 2**20,
        )
        return True

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
    ):
        """Decode one token for each row; returns the logits view `[n, vocab]`.

        Without a host sync, a row's input token may come from the device: where `prev_rows[i]`
        is >= 0, row i reads `prev_tokens[prev_rows[i]]` (the previous step's sampled tokens,
        which the host has not seen yet) instead of `ids[i]`. Nothing here waits for the device.
        """
        n = len(ids)
        dispatch = self.policy.select(n)
        graph = self.graphs.get(dispatch.size) if dispatch.size is not None else None
        width = dispatch.size if graph is not None else n
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
        if graph is not None:
            graph.replay()
        else:
            self._decode_static(n)
        return self.logits[:n]

    def describe(self) -> str:
        snap = self.policy.snapshot()
        cov = snap.get("coverage", {})
        captured, total = cov.get("captured", 0), cov.get("total", 0)
        return f"mode={snap.get('mode')}, captured {captured}/{total} sizes"

    def device_info(self) -> dict:
        info = {"type": self.device.type, "torch": torch.__version__}
        if self.cuda:
            info["name"] = torch.cuda.get_device_name(self.device)
            info["total_memory_bytes"] = torch.cuda.get_device_properties(self.device).total_memory
        info["kernels"] = "triton" if ops.triton_enabled() else "torch"
        return info
