"""One engine step's inputs as plain integers: what every rank needs to run it, and its bytes.

The model runner turns a `ScheduledStep` (sequences, blocks) into a `StepPlan` on rank 0
(`StepPlanner`) and runs it (`server.step_executor`). Under tensor parallelism the same plan
is sent to every other rank (`server.distributed`) and run there too, so all ranks write the
same KV positions, replay the same graph size and issue the same collectives in the same
order: the plan is the only thing that decides what a rank does in a step.

Torch-free: a plan is built, encoded and decoded without the model stack (the encoding is a
fixed header of counts followed by one int64 array, decoded in microseconds).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.scheduler import ScheduledStep, Sequence

_HEADER = struct.Struct("<8q")


@dataclass
class StepPlan:
    """A step's tokens, how they attend, which rows are sampled, and the block-table edits.

    Tokens `[0, num_decode)` are decode rows (one per sequence); the rest are prompt chunks,
    one per sequence, as in `server.model.StepBatch`. For a decode row whose input token is
    still on the device, `src` names the row of the previous step's sampled tokens to take it
    from (`ids` holds 0 there); every other token has `src == -1`.

    Invariants: `ids`, `src`, `positions`, `rows` have one entry per token; a decode-only step
    (`seq_rows` empty) computes logits for every row and replays the decode graph of batch
    size `graph` (0: eager); a mixed step computes logits for `logit_rows` only, in the
    packed form of the `abs(graph)`-token bucket, replaying its graph if `graph` > 0 and
    eagerly if < 0 (0: the unpacked eager forward; `server.mixed_graph_runner`). The first
    `num_sampled` logits rows get a token (0 for warm-up steps, which compute logits but
    sample nothing, and for steps that only compute prompt logprobs); the logit rows after
    them are prompt positions whose
    logprobs rank 0 reads (prompt logprobs), sampled by no one. Every rank computes the same
    logits rows (the LM head's gather is a collective); the tokens rank 0 samples reach the
    other ranks by a broadcast of `num_sampled` ids.
    """

    ids: list[int]
    src: list[int]
    positions: list[int]
    rows: list[int]
    num_decode: int
    num_sampled: int
    graph: int = 0
    logit_rows: list[int] = field(default_factory=list)
    seq_rows: list[int] = field(default_factory=list)
    cu_seqlens: list[int] = field(default_factory=list)  # len(seq_rows) + 1 entries when mixed
    k_lens: list[int] = field(default_factory=list)
    max_q_len: int = 0
    table_rows: list[int] = field(default_factory=list)
    table_cols: list[int] = field(default_factory=list)
    table_values: list[int] = field(default_factory=list)

    @property
    def mixed(self) -> bool:
        """Whether prompt chunks ride in this step (a mixed step)."""
        return bool(self.seq_rows)

    @property
    def num_logits(self) -> int:
        return len(self.logit_rows) if self.mixed else len(self.ids)

    def encode(self) -> bytes:
        """The plan as bytes: a header of counts, then every list as one int64 array."""
        n, t, s = len(self.ids), len(self.table_values), len(self.seq_rows)
        header = _HEADER.pack(
            n, self.num_decode, self.graph, len(self.logit_rows), self.num_sampled, s,
            self.max_q_len, t,
        )  # fmt: skip
        body = array("q", self.ids)
        for part in (
            self.src, self.positions, self.rows, self.logit_rows, self.seq_rows,
            self.cu_seqlens, self.k_lens, self.table_rows, self.table_cols, self.table_values,
        ):  # fmt: skip
            body.extend(part)
        return header + body.tobytes()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> StepPlan:
        """Inverse of `encode`; raises ValueError for bytes that are not a whole plan."""
        if len(data) < _HEADER.size:
            raise ValueError(f"step plan of {len(data)} bytes is shorter than its header")
        n, nd, graph, nl, ns, s, max_q, t = _HEADER.unpack_from(data)
        values = array("q")
        values.frombytes(bytes(data[_HEADER.size :]))
        sizes = (n, n, n, n, nl, s, s + 1 if s else 0, s, t, t, t)
        if len(values) != sum(sizes) or min(sizes) < 0:
            raise ValueError(f"step plan body holds {len(values)} values, expected {sum(sizes)}")
        parts, at = [], 0
        for size in sizes:
            parts.append(values[at : at + size].tolist())
            at += size
        ids, src, positions, rows, logit_rows, seq_rows, cu, k_lens, tr, tc, tv = parts
        return cls(
            ids=ids, src=src, positions=positions, rows=rows, num_decode=nd, num_sampled=ns,
            graph=graph, logit_rows=logit_rows, seq_rows=seq_rows, cu_seqlens=cu, k_lens=k_lens,
            max_q_len=max_q, table_rows=tr, table_cols=tc, table_values=tv,
        )  # fmt: skip


@dataclass
class PlannedStep:
    """A `StepPlan` and what rank 0 alone needs to read the step back."""

    plan: StepPlan
    # Logits rows after the sampled ones: (sequence, prompt position of the target token),
    # and the target token ids, for prompt logprobs.
    prompt_rows: list[tuple[Sequence, int]] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    # Sequences that took their block-table row with this step (the plan writes the whole row).
    new_rows: list[Sequence] = field(default_factory=list)


class StepPlanner:
    """Rank 0's translation of scheduler steps into plans (host work only: nothing is sent or
    launched here).

    Keeps, per block-table row, which admitted sequence owns it and how many of its entries
    the device has, so a plan carries only the entries a sequence gained since (one small
    scatter per step). `select_graph(n)`: the captured batch size a decode-only step of `n`
    rows replays (0: eager), the capture policy's decision; `select_mixed(tokens, seqs,
    prompt_logprobs, deepest_decode_context)`: the mixed-step bucket, signed (+ replay, - eager,
    0: unpacked), the
    mixed-graph policy's (`server.mixed_graph_policy`).

    Thread ownership: the engine thread.
    """

    def __init__(self, max_num_seqs: int, select_graph: Callable[[int], int],
                 select_mixed: Callable[[int, int, bool, int], int] | None = None):
        self._select_graph = select_graph
        self._select_mixed = select_mixed
        self._row_owner = [-1] * max_num_seqs  # admission number of the row's sequence
        self._row_synced = [0] * max_num_seqs  # table entries already on the device

    def plan(self, step: ScheduledStep, prev_seqs: list[Sequence] | None) -> PlannedStep:
        """`step` as a plan. A decode row whose input token is still in flight (sampled by the
        previous step, listed in `prev_seqs`, not read yet) takes it from that step's tokens
        on the device (`src`)."""
        table, new_rows = self._table_edits(step)
        prev_row = {id(s): i for i, s in enumerate(prev_seqs or ())}
        ids, src, positions, rows = [], [], [], []
        for s in step.decode:
            pos = s.num_computed
            known = pos < len(s.tokens)
            ids.append(s.tokens[pos] if known else 0)
            src.append(-1 if known else prev_row[id(s)])
            positions.append(pos)
            rows.append(s.row)
        nd = len(ids)
        if not step.prefill:
            plan = StepPlan(ids, src, positions, rows, num_decode=nd, num_sampled=nd,
                            graph=self._select_graph(nd), **table)  # fmt: skip
            return PlannedStep(plan, new_rows=new_rows)
        seq_rows, cu, k_lens, logit_rows = [], [0], [], list(range(nd))
        prompt_rows: list[tuple[Sequence, int]] = []
        targets: list[int] = []
        extra: list[int] = []  # prompt positions whose logits are kept, after the sampled rows
        for item in step.prefill:
            seq = item.seq
            ids.extend(seq.tokens[item.start : item.start + item.length])
            src.extend([-1] * item.length)
            positions.extend(range(item.start, item.start + item.length))
            rows.extend([seq.row] * item.length)
            seq_rows.append(seq.row)
            cu.append(cu[-1] + item.length)
            k_lens.append(item.start + item.length)
            if item.completes:
                logit_rows.append(nd + cu[-1] - 1)
            if seq.prompt_lps is not None and not seq.prompt_lps_sent:
                # Position p's logits give the logprob of prompt token p + 1.
                last = min(item.start + item.length, len(seq.prompt_ids) - 1)
                for p in range(item.start, last):
                    extra.append(nd + cu[-2] + p - item.start)
                    prompt_rows.append((seq, p + 1))
                    targets.append(seq.prompt_ids[p + 1])
        graph = 0
        if self._select_mixed is not None:
            deepest = max(positions[:nd]) + 1 if nd else 0
            graph = self._select_mixed(len(ids), nd + len(seq_rows), bool(extra), deepest)
        plan = StepPlan(
            ids, src, positions, rows, num_decode=nd, num_sampled=len(logit_rows), graph=graph,
            logit_rows=logit_rows + extra, seq_rows=seq_rows, cu_seqlens=cu, k_lens=k_lens,
            max_q_len=max(item.length for item in step.prefill), **table,
        )  # fmt: skip
        return PlannedStep(plan, prompt_rows, targets, new_rows)

    def _table_edits(self, step: ScheduledStep) -> tuple[dict[str, list[int]], list[Sequence]]:
        """The block-table entries the step's sequences gained since they were last synced,
        and the sequences new to their row."""
        r_idx, c_idx, values, new_rows = [], [], [], []
        for seq in step.decode + [item.seq for item in step.prefill]:
            row = seq.row
            if self._row_owner[row] != seq.admitted:  # a new occupant: write its whole row
                self._row_owner[row] = seq.admitted
                self._row_synced[row] = 0
                new_rows.append(seq)
            done, n = self._row_synced[row], len(seq.blocks)
            if n > done:
                r_idx.extend([row] * (n - done))
                c_idx.extend(range(done, n))
                values.extend(seq.blocks[done:n])
                self._row_synced[row] = n
        return {"table_rows": r_idx, "table_cols": c_idx, "table_values": values}, new_rows


# Mixed steps at startup compile the prefill kernels before the server reports ready: one
# chunk at most `triton_attention.SHORT_CHUNK` tokens (the per-query-head kernel a prefix hit
# runs) and one above it (the GQA-packed kernel of long prompts). With only the short one, the
# first long prompt after ready paid the other kernel's JIT in its time to first token.
WARMUP_PROMPT_CHUNKS = (32, 128)


def warmup_plans(scratch_row: int, max_model_len: int, max_batched_tokens: int,
                 buckets: tuple[int, ...] | list[int] = ()) -> list[StepPlan]:
    """The mixed steps startup runs on the scratch row: one decode row and a prompt chunk of
    each `WARMUP_PROMPT_CHUNKS` size (capped by the context and the step budget), unpacked and,
    given the mixed-step `buckets`, packed at the smallest bucket that holds it (its first
    eager run: cuBLAS's shapes, and any kernel variant it would need). Also what
    `server.kernel_precompile` drives to compile the same kernel variants ahead."""
    plans = []
    for n in WARMUP_PROMPT_CHUNKS:
        # The scratch row's table is max_model_len wide; a step holds the token budget.
        n = min(n, max_model_len - 1, max_batched_tokens)
        plans.append(StepPlan(
            ids=[0] * (n + 1), src=[-1] * (n + 1), positions=[n, *range(n)],
            rows=[scratch_row] * (n + 1), num_decode=1, num_sampled=0, logit_rows=[0, n],
            seq_rows=[scratch_row], cu_seqlens=[0, n], k_lens=[n], max_q_len=n,
        ))  # fmt: skip
        fits = [b for b in buckets if b >= n + 1]
        if fits:
            plans.append(replace(plans[-1], graph=-min(fits)))  # packed, eagerly
    return plans
