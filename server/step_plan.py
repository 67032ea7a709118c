"""One engine step's inputs as plain integers: what every rank needs to run it, and its bytes.

The model runner turns a `ScheduledStep` (sequences, blocks) into a `StepPlan` on rank 0 and
runs it (`server.step_executor`). Under tensor parallelism the same plan is sent to every other
rank (`server.distributed`) and run there too, so all ranks write the same KV positions, replay
the same graph size and issue the same collectives in the same order: the plan is the only
thing that decides what a rank does in a step.

Torch-free: a plan is built, encoded and decoded without the model stack (the encoding is a
fixed header of counts followed by one int64 array, decoded in microseconds).
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field

_HEADER = struct.Struct("<8q")


@dataclass
class StepPlan:
    """A step's tokens, how they attend, which rows are sampled, and the block-table edits.

    Tokens `[0, num_decode)` are decode rows (one per sequence); the rest are prompt chunks,
    one per sequence, as in `server.model.StepBatch`. For a decode row whose input token is
    still on the device, `src` names the row of the previous step's sampled tokens to take it
    from (`ids` holds 0 there); every other token has `src == -1`.

    Invariants: `ids`, `src`, `positions`, `rows` have one entry per token; a decode-only step
    (`seq_rows` empty) computes logits for every row and replays graph `graph` (0: eager); a
    mixed step computes logits for `logit_rows` only. `num_sampled` rows get a token (0 for
    warm-up steps, which compute logits but sample nothing).
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
        """Whether prompt chunks ride in this step (then it runs eagerly)."""
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
