"""Continuous batching over a paged KV cache: queues, blocks and per-token bookkeeping.

The scheduler decides *what* runs; `server.model_runner` decides *how* (tensors, kernels,
graphs). Torch-free: it sees sequences, blocks and token ids, never a tensor.

A sequence moves `waiting -> prefilling -> running -> finished`, and back to `waiting` when it
is preempted. Each step (`schedule()`) carries, under one token budget
(`--max-num-batched-tokens`):

* one decode token for every running sequence (a new KV block when it crosses a block edge);
* prompt chunks of prefilling sequences, in admission order, with what the budget leaves — but
  at most `decode_prefill_tokens` while decode rows ride in the step: a step's time grows with
  its prompt tokens, and every running stream waits for the whole step, so a long prompt is fed
  in small chunks beside running streams and in full-budget chunks when nothing decodes.

A step with prompt chunks is a *mixed* step (run eagerly); one without is decode-only (run on
a captured graph). Waiting sequences are admitted while a table row is free and the block pool
holds their whole prompt (less what the prefix cache already has). When a running sequence needs
a block and none is left, the most recently admitted sequence is preempted: its blocks go back
to the pool (full ones stay in the prefix cache), it returns to the front of the queue and is
recomputed from its prompt and the tokens it has produced so far. Nothing is lost and no request
fails for lack of memory; sampling keys on (seed, step), so a resumed sequence draws the same
tokens it would have drawn.

Decode runs one step ahead of the host (see `server.engine`): a sequence can have a token "in
flight", sampled on the device and not yet read. `Sequence.in_flight` counts those; a sequence
that the in-flight token surely ends (length limits) is left out of the next step, and a token
computed for a sequence that finished meanwhile is dropped and counted.

Thread ownership: everything here runs on the engine thread, except `Admission`, which the
event loop's `add_request` enters and the engine thread leaves.
"""

from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass, field

from server.block_manager import BlockManager
from server.detokenizer import IncrementalDetokenizer
from server.request import RequestOutput, SamplingParams
from server.seeds import seed_to_key


class Admission:
    """Counts requests submitted but not yet admitted once, to bound the waiting queue."""

    def __init__(self, limit: int):
        self.limit = limit
        self._waiting = 0
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            if self._waiting >= self.limit:
                return False
            self._waiting += 1
            return True

    def leave(self, n: int = 1) -> None:
        with self._lock:
            self._waiting -= n

    @property
    def waiting(self) -> int:
        return self._waiting


@dataclass
class NewRequest:
    """A submission on its way from the event loop to the engine thread."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the request's seed, or one drawn for it at submission


@dataclass(eq=False)
class Sequence:
    """A request inside the engine thread (compared by identity)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    key: int  # sampling noise key derived from the seed
    detok: IncrementalDetokenizer
    max_len: int  # prompt + completion may not exceed this
    row: int = -1  # block-table row while admitted
    blocks: list[int] = field(default_factory=list)  # KV blocks, in position order
    fill_target: int = 0  # tokens to have in the cache before decoding (set at admission)
    num_computed: int = 0  # tokens whose K/V are in the cache or written by a launched step
    output_ids: list[int] = field(default_factory=list)  # tokens the host has read
    tokens: list[int] = field(default_factory=list)  # prompt + output_ids, kept appended
    in_flight: int = 0  # tokens sampled on the device that the host has not read yet
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied at first admission
    committed_blocks: int = 0  # leading blocks registered with the prefix cache
    admitted: int = -1  # admission order (the newest is preempted first); -1: never
    preemptions: int = 0
    finished: bool = False

    @property
    def num_sampled(self) -> int:
        """Tokens sampled so far, read or in flight: the sampler's step counter."""
        return len(self.output_ids) + self.in_flight

    def ends_with_in_flight_token(self) -> bool:
        """Whether the token in flight surely ends the sequence (length limits, not stops)."""
        produced = self.num_sampled
        return (
            produced >= self.params.max_tokens
            or len(self.prompt_ids) + produced >= self.max_len
        )

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)


@dataclass
class PrefillItem:
    """Tokens `[start, start + length)` of `seq`'s fill target, part of one step."""

    seq: Sequence
    start: int
    length: int

    @property
    def completes(self) -> bool:
        return self.start + self.length == self.seq.fill_target


@dataclass
class ScheduledStep:
    """One step's work: decode rows first, then prompt chunks."""

    decode: list[Sequence]
    prefill: list[PrefillItem]

    @property
    def sampled(self) -> list[Sequence]:
        """Sequences that get a token from this step, in the order the step samples them."""
        return self.decode + [item.seq for item in self.prefill if item.completes]

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(item.length for item in self.prefill)


class Scheduler:
    """Waiting / prefilling / running sequences over `max_num_seqs` table rows and a pool of
    KV blocks (`block_manager`).

    `outputs` collects the `RequestOutput` increments of the current iteration; the engine
    takes them with `take_outputs()` and delivers them in one batch.
    """

    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_model_len: int,
        max_batched_tokens: int,
        decode_prefill_tokens: int | None = None,
        eos_ids: frozenset[int],
        tokenizer,
        admission: Admission,
        block_manager: BlockManager,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        # Decode rows take one token each out of the budget; keep room for a prompt chunk.
        self.max_batched_tokens = max(max_batched_tokens, max_num_seqs + 1)
        self.decode_prefill_tokens = decode_prefill_tokens or self.max_batched_tokens
        self.eos_ids = eos_ids
        self.blocks = block_manager
        self._tokenizer = tokenizer  # the engine thread's own instance (detokenisation)
        self._admission = admission
        self._admissions = itertools.count()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.by_id: dict[str, Sequence] = {}
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.outputs: list[RequestOutput] = []
        self.steps = {"decode": 0, "mixed": 0}
        self.tokens = {"prompt": 0, "generated": 0, "scheduled": 0}
        self.discarded_tokens = 0  # computed one step ahead for sequences that had finished
        self.preemptions = 0

    # -- requests in and out ----------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def add(self, req: NewRequest) -> None:
        if req.request_id in self.by_id:  # a stale id reused after abort raced: refuse it
            self._admission.leave()
            self.outputs.append(
                RequestOutput(
                    req.request_id, finished=True, finish_reason="error",
                    error="duplicate request id",
                )
            )
            return
        seq = Sequence(
            request_id=req.request_id,
            prompt_ids=req.prompt_ids,
            params=req.params,
            key=seed_to_key(req.seed),
            detok=IncrementalDetokenizer(self._tokenizer, req.prompt_ids, req.params.stop),
            max_len=self.max_model_len,
        )
        self.by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> None:
        seq = self.by_id.get(request_id)
        if seq is not None:
            self.finish(seq, reason, error=error)

    def abort_all(self, why: str) -> None:
        for seq in list(self.by_id.values()):
            self.abort(seq.request_id, "abort", error=why)

    def fail(self, seqs: list[Sequence], error: str) -> None:
        """A step serving `seqs` raised: end them with finish_reason "error"."""
        for seq in seqs:
            if not seq.finished:
                self.finish(seq, "error", error=error)

    def take_outputs(self) -> list[RequestOutput]:
        outputs, self.outputs = self.outputs, []
        return outputs

    # -- scheduling -------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep | None:
        """The next step, with blocks allocated for every token it writes (None: nothing to
        run). Preempts when decode rows need blocks the pool no longer has."""
        decode = []
        for seq in list(self.running):
            if seq.in_flight and seq.ends_with_in_flight_token():
                continue  # its last token is already being computed
            if seq.finished or seq.row < 0:  # preempted while making room for an earlier row
                continue
            if self._reserve(seq, seq.num_computed + 1):
                decode.append(seq)
        decode = [s for s in decode if s.row >= 0]  # drop rows preempted for later ones
        budget = self.max_batched_tokens - len(decode)
        if decode:
            budget = min(budget, self.decode_prefill_tokens)
        self._admit()
        prefill = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            take = min(seq.fill_target - seq.num_computed, budget)
            if take > 0:
                prefill.append(PrefillItem(seq, seq.num_computed, take))
                budget -= take
        if not decode and not prefill:
            return None
        return ScheduledStep(decode, prefill)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for `num_tokens` tokens of `seq`, preempting newer sequences (or, when
        none is left, `seq` itself) until the pool has them. False if `seq` was preempted."""
        while not self.blocks.append_slot(seq.blocks, num_tokens):
            victim = max(
                (s for s in self.running + self.prefilling if s is not seq),
                key=lambda s: s.admitted,
                default=seq,
            )
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _admit(self) -> None:
        """Admit waiting sequences, in queue order, while a row and their blocks are free.

        A sequence with a token still in flight (preempted just now) waits until it is read:
        its fill target must be known on the host.
        """
        while self.waiting and self.free_rows:
            seq = self.waiting[0]
            if seq.in_flight:
                return
            target = len(seq.tokens)
            alloc = self.blocks.allocate_prompt(seq.tokens, max_cached_tokens=target - 1)
            if alloc is None:
                return  # the pool is full: wait for running sequences to finish
            self.waiting.popleft()
            if seq.admitted < 0:
                self._admission.leave()
                seq.cached_tokens = alloc.num_cached_tokens
            seq.admitted = next(self._admissions)
            seq.blocks = alloc.block_table
            seq.num_computed = alloc.num_cached_tokens
            seq.fill_target = target
            seq.row = self.free_rows.pop()
            seq.committed_blocks = alloc.num_cached_tokens // self.blocks.block_size
            self.prefilling.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Give `seq`'s blocks and row back; it goes to the front of the queue and will be
        recomputed from prompt + output (its full blocks likely still in the prefix cache)."""
        self.preemptions += 1
        seq.preemptions += 1
        self._release(seq)
        for group in (self.running, self.prefilling):
            if seq in group:
                group.remove(seq)
        seq.num_computed = 0
        seq.fill_target = 0
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.blocks:
            self.blocks.free(seq.blocks)
            seq.blocks = []
        if seq.row >= 0:
            self.free_rows.append(seq.row)
            seq.row = -1

    def launched(self, step: ScheduledStep) -> None:
        """The step is queued on the device: advance what it computes, count in-flight
        tokens, register newly full blocks with the prefix cache."""
        self.steps["mixed" if step.prefill else "decode"] += 1
        self.tokens["scheduled"] += step.num_tokens
        for seq in step.decode:
            seq.num_computed += 1
            seq.in_flight += 1
        for item in step.prefill:
            seq = item.seq
            seq.num_computed += item.length
            self.tokens["prompt"] += item.length
            self._commit(seq)
            if item.completes:
                self.prefilling.remove(seq)
                self.running.append(seq)
                seq.in_flight += 1

    def complete(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """The tokens a launched step sampled for `seqs` (its `sampled` list), now read."""
        for seq, token in zip(seqs, tokens, strict=True):
            seq.in_flight -= 1
            if seq.finished:
                self.discarded_tokens += 1
            else:
                self.append_token(seq, token)
                if not seq.finished and seq.row >= 0:
                    self._commit(seq)

    def _commit(self, seq: Sequence) -> None:
        """Full blocks whose tokens are all known and computed join the prefix cache (checked
        per token, so only a newly filled block costs anything)."""
        known = min(seq.num_computed, len(seq.tokens))
        full = known // self.blocks.block_size
        if full > seq.committed_blocks:
            self.blocks.commit_full_blocks(seq.blocks, seq.tokens, known)
            seq.committed_blocks = full

    # -- per-token bookkeeping --------------------------------------------------------------

    def append_token(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        seq.tokens.append(token)
        self.tokens["generated"] += 1
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            self.finish(seq, "stop", new_token=token)
            return
        text = seq.detok.add_token(token)
        if seq.detok.stopped:
            self.finish(seq, "stop", new_token=token, text=text)
        elif (
            len(seq.output_ids) >= p.max_tokens
            or len(seq.prompt_ids) + len(seq.output_ids) >= seq.max_len
        ):
            self.finish(seq, "length", new_token=token, text=text)
        else:
            self.outputs.append(
                RequestOutput(
                    seq.request_id,
                    text=text,
                    token_ids=[token],
                    prompt_tokens=len(seq.prompt_ids),
                    completion_tokens=len(seq.output_ids),
                )
            )

    def finish(
        self,
        seq: Sequence,
        reason: str,
        new_token: int | None = None,
        text: str = "",
        error: str | None = None,
    ) -> None:
        """End `seq`: free its blocks and row, emit its last output. A token still in flight
        for it is dropped when it arrives."""
        seq.finished = True
        if reason in ("stop", "length"):
            text += seq.detok.flush()
        if seq in self.waiting:
            self.waiting.remove(seq)
            if seq.admitted < 0:
                self._admission.leave()
        for group in (self.prefilling, self.running):
            if seq in group:
                group.remove(seq)
        self._release(seq)
        self.by_id.pop(seq.request_id, None)
        self.outputs.append(
            RequestOutput(
                seq.request_id,
                text=text,
                token_ids=[] if new_token is None else [new_token],
                finished=True,
                finish_reason=reason,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.output_ids),
                cached_tokens=seq.cached_tokens,
                error=error,
            )
        )

    # -- introspection (read from other threads: plain ints only) ---------------------------

    def counters(self) -> dict:
        return {
            "running": len(self.running) + len(self.prefilling),
            "decoding": len(self.running),
            "prefilling": len(self.prefilling),
            "free_slots": len(self.free_rows),
            "max_num_seqs": self.max_num_seqs,
            "decode_steps": self.steps["decode"],
            "mixed_steps": self.steps["mixed"],
            "prompt_tokens": self.tokens["prompt"],
            "generated_tokens": self.tokens["generated"],
            "scheduled_tokens": self.tokens["scheduled"],
            "discarded_tokens": self.discarded_tokens,
            "preemptions": self.preemptions,
            **self.blocks.counters(),
        }
