"""Runs a `StepPlan` on this process's device: block-table edits, inputs, graph or eager forward.

The same code runs a step on rank 0 (`server.model_runner`) and on every tensor-parallel worker
(`server.distributed.worker`): given the same plan and the same previous tokens, each rank
writes the same KV positions (its own heads), replays the same graph size or runs the same
eager forward, and so issues the same collectives in the same order.

Nothing here waits for the device: host inputs go through pinned staging tensors and
non-blocking copies, and a decode row whose input token is still on the device takes it from
the previous step's sampled tokens (`prev_tokens`) on the device.

Thread ownership: the engine thread (rank 0) or the worker's main thread.
"""

from __future__ import annotations

import torch

from server.graph_runner import DecodeGraphRunner
from server.kv_cache import allocate_kv_cache
from server.mixed_graph_runner import MixedGraphRunner
from server.model import StepBatch
from server.sampling import to_device
from server.step_plan import StepPlan


class StepExecutor:
    """The model, its KV cache, the device block table and the decode and mixed-step graphs
    of one rank (`mixed` is None where mixed steps always run eagerly)."""

    def __init__(self, model, kv_cache, block_tables: torch.Tensor, graphs: DecodeGraphRunner,
                 mixed: MixedGraphRunner | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.block_tables = block_tables
        self.graphs = graphs
        self.mixed = mixed
        self.device = block_tables.device

    @classmethod
    def build(cls, model, num_blocks: int, block_size: int, max_model_len: int,
              max_num_seqs: int, *, emulate: bool, tensor_parallel: bool,
              mixed_tokens: int = 0) -> StepExecutor:
        """The KV cache, the block table and the graph runners of one rank, the same on every
        rank of a group (the agreed block count and context length). `mixed_tokens`: the
        largest mixed-step graph bucket (0: no mixed-step graphs)."""
        device = model.device
        kv_cache = allocate_kv_cache(model.shape, num_blocks, block_size, model.dtype, device)
        # One row per sequence that can be admitted, plus the scratch row (all block 0) that
        # padding rows and warm-up runs use.
        block_tables = torch.zeros(
            max_num_seqs + 1, -(-max_model_len // block_size), dtype=torch.int32, device=device
        )
        graphs = DecodeGraphRunner(
            model, kv_cache, block_tables, max_num_seqs, max_num_seqs, emulate=emulate,
            # NCCL's watchdog thread polls events while this thread captures (graph_runner).
            capture_error_mode="thread_local" if tensor_parallel else "global",
        )  # fmt: skip
        mixed = MixedGraphRunner(graphs, mixed_tokens, max_num_seqs) if mixed_tokens else None
        return cls(model, kv_cache, block_tables, graphs, mixed)

    def execute(self, plan: StepPlan, prev_tokens: torch.Tensor | None) -> torch.Tensor | None:
        """Queue the step; returns its logits `[num_logits, vocab]` (None if it has none).

        `prev_tokens`: the last sampling step's tokens on the device, which rows with
        `plan.src >= 0` read their input from (None when the previous step sampled nothing).
        """
        self._apply_table_edits(plan)
        if plan.mixed:
            if plan.graph:
                return self.mixed.run(plan, prev_tokens)
            return self._forward_mixed(plan, prev_tokens)
        if not plan.ids:
            return None
        return self.graphs.run(
            plan.ids, plan.positions, plan.rows, prev_tokens, plan.src, plan.graph or None
        )

    def _apply_table_edits(self, plan: StepPlan) -> None:
        if plan.table_values:
            idx = to_device(
                [plan.table_rows, plan.table_cols, plan.table_values], torch.int64, self.device
            )
            self.block_tables[idx[0], idx[1]] = idx[2].to(torch.int32)

    def _forward_mixed(self, plan: StepPlan, prev_tokens: torch.Tensor | None) -> torch.Tensor:
        dev, nd = self.device, plan.num_decode
        tok = to_device([plan.ids, plan.src, plan.positions, plan.rows], torch.int64, dev)
        meta = to_device([plan.seq_rows, plan.k_lens], torch.int64, dev)
        input_ids = tok[0]
        if prev_tokens is not None and nd and any(s >= 0 for s in plan.src[:nd]):
            carried = prev_tokens.index_select(0, tok[1, :nd].clamp(min=0))
            input_ids = input_ids.clone()
            input_ids[:nd] = torch.where(tok[1, :nd] >= 0, carried, tok[0, :nd])
        batch = StepBatch(
            input_ids=input_ids,
            positions=tok[2],
            rows=tok[3],
            logit_rows=to_device(plan.logit_rows, torch.int64, dev),
            num_decode=nd,
            seq_rows=meta[0],
            # int64 like the packed form's buffers (`server.mixed_graph_runner`): Triton
            # specialises on pointer dtypes, so both forms share one compiled variant.
            cu_seqlens_q=to_device(plan.cu_seqlens, torch.int64, dev),
            k_lens=meta[1],
            max_q_len=plan.max_q_len,
        )
        return self.model.forward(batch, self.kv_cache, self.block_tables)
