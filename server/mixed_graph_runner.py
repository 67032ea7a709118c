"""CUDA graphs of mixed steps: decode rows and prompt chunks as one packed batch per bucket.

Beside `server.graph_runner` (the decode graphs), whose memory pool, capture stream and error
mode these graphs share. A mixed step is replayed in its packed form (`DecoderModel.
forward_packed`): every sequence is a chunk and a decode row a chunk of one token, so one
attention launch per layer serves any mix, its grid fixed by the bucket's shapes. A graph for
bucket T reads T tokens and S = min(T, max_seqs) sequences from static buffers:

* tokens `[0, n)` are the step's (decode rows first, then the chunks, as in the `StepPlan`);
  tokens `[n, T)` are padding on the scratch row (KV written to the scratch block 0, outputs
  never read);
* sequences `[0, s)` are the step's; the rest are empty chunks that compute nothing;
* `logit_rows` `[0, S)` names the tokens whose logits are kept (the sampled ones first,
  padding rows point at token 0), into a logits buffer outside the pool.

A step whose bucket has no graph yet (the plan's bucket is negative) runs the same packed
forward eagerly, at the bucket's width on the same buffers: the numbers do not depend on
whether the graph exists. Under tensor parallelism every rank follows the plan: a bucket is
replayed only once every rank captured it. Which steps
use which bucket, and when buckets are captured, is
`server.mixed_graph_policy.MixedGraphPolicy`'s call; this module captures what it is told.

Engine thread only, except `capture_detached(background=True)`, which
`server.background_capture`'s thread runs while the engine thread steps on.
Test seam: with the decode runner emulating graphs (CPU), a "graph" of bucket T is the packed
forward at width T, so CI runs the padding and dispatch without a GPU.
"""

from __future__ import annotations

import torch

from server.gc_control import no_collection
from server.graph_runner import (
    CaptureResult,
    DecodeGraphRunner,
    capture_and_install,
    timed_capture,
)
from server.step_plan import StepPlan


class MixedGraphRunner:
    """Static buffers, captured graphs per token bucket, and the replay of a mixed plan."""

    def __init__(self, decode_graphs: DecodeGraphRunner, max_tokens: int, max_seqs: int):
        self.decode_graphs = decode_graphs
        self.model = decode_graphs.model
        self.device = decode_graphs.device
        self.max_tokens = max_tokens
        self.max_seqs = max_seqs
        self.scratch_row = decode_graphs.scratch_row
        self.vocab = self.model.shape.vocab_size
        # Tokens: ids, src (the previous step's output row a decode row takes its input from,
        # -1: none), positions, block-table rows. Sequences (one column more, for cu):
        # seq_rows, cu_seqlens, k_lens, logit_rows.
        self.tokens = torch.zeros(4, max_tokens, dtype=torch.int64, device=self.device)
        # Rows padded to 8 entries (64 bytes): Triton specialises on 16-byte pointer alignment,
        # and the eager form's rows are aligned (`sampling.to_device`): one compiled variant.
        width = -(-(max_seqs + 1) // 8) * 8
        self.seqs = torch.zeros(4, width, dtype=torch.int64, device=self.device)
        self.logits = torch.empty(
            max_seqs, self.model.logits_width, dtype=self.model.dtype, device=self.device
        )
        self.graphs: dict[int, object] = {}
        self._failed: list[object] = []  # never freed: see DecodeGraphRunner.capture

    def seqs_for(self, size: int) -> int:
        """Sequences (and logits rows) a graph of `size` tokens holds."""
        return min(size, self.max_seqs)

    # -- capture ------------------------------------------------------------------------------

    def capture(self, size: int) -> CaptureResult:
        """Capture bucket `size`: an eager run of the packed step at that width first (new
        GEMM shapes and any kernel variant get their first launch outside the capture), then
        the capture into the decode graphs' pool. Errors make a failed result."""
        return capture_and_install(self, size)

    def capture_detached(self, size: int, background: bool) -> tuple[object | None,
                                                                       CaptureResult]:
        """`capture`'s work without installing the graph (`install`, engine thread).

        `background`: on `server.background_capture`'s thread while the engine thread runs
        steps, packed ones included, on the static buffers: no eager run before the capture
        (on those buffers it would race the engine's packed steps, and it would compete with
        them for the GPU), and the thread-local capture mode (as
        `DecodeGraphRunner.capture_detached`). Startup ran the packed step once, so its
        kernels are compiled and cuBLAS has this thread's workspace
        (`DecodeGraphRunner.prepare_capture_thread`); on the H200 no background bucket
        capture failed without the eager run (docs/benchmarks.md, 8f)."""
        dg = self.decode_graphs
        if size in self.graphs or not 1 <= size <= self.max_tokens:
            raise ValueError(f"cannot capture mixed bucket {size}: captured or out of range")

        def capture() -> object:
            if not background:
                self._fill_padding()
            with no_collection():
                if dg.emulate:
                    if dg.fault_injector is not None:
                        dg.fault_injector(-size)  # negative: a mixed bucket (tests)
                    return size
                return self._capture_cuda(size, background)

        where = " (background)" if background else ""
        return timed_capture(f"mixed-step graph for {size} tokens{where}", size, capture,
                             dg.pool_bytes)

    def install(self, size: int, graph) -> None:
        """Make a captured bucket replayable (engine thread: `run` reads `graphs`)."""
        self.graphs[size] = graph

    def _capture_cuda(self, size: int, background: bool = False):
        dg = self.decode_graphs
        if dg._pool is None:
            raise RuntimeError("mixed-step graphs share the decode graphs' pool: none captured")
        if not background:
            with torch.cuda.stream(dg._stream):
                self._forward_static(size)
        torch.cuda.synchronize()
        # The fault injector sees a negative size: a mixed bucket (tests).
        mode = "thread_local" if background else None
        return dg.record(lambda: self._forward_static(size), -size, self._failed, mode)

    def _fill_padding(self) -> None:
        """Buffers that describe an empty step: every sequence empty, every token padding."""
        self.tokens[0].zero_()
        self.tokens[1].fill_(-1)
        self.tokens[2].zero_()
        self.tokens[3].fill_(self.scratch_row)
        self.seqs[0].fill_(self.scratch_row)
        self.seqs[1].zero_()
        self.seqs[2].fill_(1)
        self.seqs[3].zero_()

    def _forward_static(self, size: int) -> None:
        s = self.seqs_for(size)
        self.model.forward_packed(
            self.tokens[0, :size], self.tokens[2, :size], self.tokens[3, :size],
            self.seqs[0, :s], self.seqs[1, : s + 1], self.seqs[2, :s], self.seqs[3, :s],
            self.decode_graphs.kv_cache, self.decode_graphs.block_tables, self.logits[:s],
        )  # fmt: skip

    def release(self) -> None:
        """Drop the graphs and buffers (engine shutdown; the pool goes with the decode
        runner's)."""
        self.graphs.clear()
        self.model = self.tokens = self.seqs = self.logits = None

    # -- replay -------------------------------------------------------------------------------

    def run(self, plan: StepPlan, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        """Run a mixed plan in the packed form of bucket `abs(plan.graph)`: its graph's replay
        (`plan.graph` > 0, captured on every rank), or the same forward eagerly at that width
        (< 0): the same numbers either way. Returns the logits `[num_logits, vocab]`. The plan
        fits (`MixedGraphPolicy.select` chose the bucket): at most `size` tokens,
        `seqs_for(size)` sequences, no prompt-logprob rows. No host sync."""
        size = abs(plan.graph)
        if not 1 <= size <= self.max_tokens:
            raise ValueError(f"mixed bucket {size} out of 1..{self.max_tokens}")
        graph = self.graphs.get(size) if plan.graph > 0 else None
        if plan.graph > 0 and graph is None:
            raise ValueError(f"no mixed-step graph captured for {size} tokens on this rank")
        nd, n = plan.num_decode, len(plan.ids)
        s = self.seqs_for(size)
        pad_t = size - n
        pad_s = s - nd - len(plan.seq_rows)
        tokens = (
            plan.ids + [0] * pad_t,
            plan.src + [-1] * pad_t,
            plan.positions + [0] * pad_t,
            plan.rows + [self.scratch_row] * pad_t,
        )
        cu = [*range(nd), *(nd + c for c in plan.cu_seqlens), *([n] * pad_s)]
        seqs = (
            plan.rows[:nd] + plan.seq_rows + [self.scratch_row] * (pad_s + 1),
            cu,
            [p + 1 for p in plan.positions[:nd]] + plan.k_lens + [1] * (pad_s + 1),
            plan.logit_rows + [0] * (s + 1 - len(plan.logit_rows)),
        )
        pinned = self.device.type == "cuda"
        # Fresh pinned tensors per step (torch's caching host allocator reuses a block only
        # after the copy reading it ran): see DecodeGraphRunner.run.
        host_t = torch.tensor(tokens, dtype=torch.int64, pin_memory=pinned)
        host_s = torch.tensor(seqs, dtype=torch.int64, pin_memory=pinned)
        self.tokens[:, :size].copy_(host_t, non_blocking=True)
        self.seqs[:, : s + 1].copy_(host_s, non_blocking=True)
        if prev_tokens is not None and nd and any(r >= 0 for r in plan.src[:nd]):
            ids, src = self.tokens[0, :nd], self.tokens[1, :nd]
            carried = prev_tokens.index_select(0, src.clamp(min=0))
            ids.copy_(torch.where(src >= 0, carried, ids))
        if graph is None or isinstance(graph, int):  # not captured, or emulated (CPU seam)
            self._forward_static(size)
        else:
            graph.replay()
        return self.logits[: len(plan.logit_rows), : self.vocab]
