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
  in small chunks beside running streams and in full-budget chunks when nothing decodes. Beside
  decode rows a chunk deep in its context also pays for the keys it reads (`ChunkCost`): there
  its chunks shrink, so the step stays about as long as a shallow chunk's.

A step with prompt chunks is a *mixed* step (packed at a token bucket's width and replayed on
its graph once captured, or the unpacked eager forward: `server.mixed_graph_policy`); one
without is decode-only (run on a captured graph).

Waiting sequences are admitted while a table row is free and the block pool holds their whole
prompt (less what the prefix cache already has). When a running sequence needs
a block and none is left, the most recently admitted sequence is preempted: its blocks go back
to the pool (full ones stay in the prefix cache), it returns to the front of the queue and is
recomputed from its prompt and the tokens it has produced so far. Nothing is lost and no request
fails for lack of memory; sampling keys on (seed, step), so a resumed sequence draws the same
tokens it would have drawn.

Decode runs one step ahead of the host (see `server.engine`): a sequence can have a token "in
flight", sampled on the device and not yet read. `Sequence.in_flight` counts those; a sequence
that the in-flight token surely ends (length limits) is left out of the next step, and a token
computed for a sequence that finished meanwhile is dropped and counted.

A request asking for `n` choices becomes `n` sequences (`Sequence.index`). The first is
admitted alone; the others wait until its prompt is prefilled (its full blocks committed to
the prefix cache), then hit the cache and recompute at most one partial block each: one
prefill for all choices.

Constrained sequences (a grammar, `server.structured.grammar`) carry a handle to a matcher in
the grammar process. The engine advances it with each token right after reading the step,
before it fills the next step's masks (`advance_and_fill`, one round trip to that process;
`advance_grammars` or `fill_masks` alone where only one is due): the matcher has always
consumed exactly the tokens read. A constrained sequence ends only where its grammar accepts
(EOS is allowed only there) or at its token budget ("length"). A grammar process that dies
fails the constrained sequences it held; the others run on.

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
from server.errors import EngineNotReadyError, InvalidRequestError, QueueFullError
from server.request import RequestOutput, SamplingParams, TokenLogprob, validate_prompt
from server.seeds import choice_key
from server.structured.grammar import GrammarWorkerError

# Prompt chunks of a sequence that wants prompt logprobs: every position's logits are kept,
# so the chunk bounds that memory (256 x 128k vocabulary x 4 bytes = 128 MB).
PROMPT_LOGPROBS_CHUNK = 256
MIN_DEEP_CHUNK = 16  # a step's first chunk beside decode rows is at least this (or its budget)


@dataclass(frozen=True)
class ChunkCost:
    """What a prompt chunk beside decode rows costs, in prompt tokens at context 0.

    A chunk of `take` tokens starting at context `start` runs its linear layers once per token
    and its attention once per (token, key) pair; `depth_unit` is the context depth at which a
    token's attention costs as much as its linear layers. So the chunk costs
    `take * (1 + mean_depth / depth_unit)`, where the mean depth is `start + take / 2` (bounded
    by a sliding `window`). The running streams wait for the whole step, so the step's prompt
    chunks together cost at most `decode_prefill_tokens`; a deep chunk is then smaller and the
    step about as long as a shallow one (measured: `docs/benchmarks.md` section 8d).
    `depth_unit` 0 disables this: every token costs 1.
    """

    depth_unit: float = 0.0
    window: int | None = None

    def _depth(self, position: float) -> float:
        """Keys a query at `position` reads (all earlier ones, or the window's)."""
        return min(position, self.window) if self.window else position

    def cost(self, start: int, take: int) -> float:
        if not self.depth_unit:
            return float(take)
        return take * (1.0 + self._depth(start + take / 2) / self.depth_unit)

    def affordable(self, start: int, budget: float) -> int:
        """The most tokens from `start` whose cost fits `budget`."""
        if not self.depth_unit:
            return int(budget)
        u = self.depth_unit
        if self.window and start >= self.window:  # the depth is flat: linear in take
            take = budget / (1.0 + self.window / u)
        else:  # take^2 / 2u + take (1 + start/u) = budget
            b = 1.0 + start / u
            take = u * ((b * b + 2.0 * budget / u) ** 0.5 - b)
        return int(take)


# How much slower per FLOP a prompt chunk's attention runs than its linear layers in a step
# beside decode rows (chunks of 64-256 tokens: the GEMMs near peak, the attention over a paged
# cache far from it). Fitted on an H200 with the 8B: mixed-step graph times over chunk lengths
# and depths (bench.decode's depth grid) give a depth unit of ~6,400 tokens against the 26,600
# that equal per-FLOP speed would give (docs/benchmarks.md 8i; 5,740-5,900 before the prefill
# kernel's full tiles lost their masks, 8d).
ATTENTION_FLOP_SLOWDOWN = 4.2


def prefill_depth_unit(shape) -> int:
    """The context depth at which a prompt token's attention costs as much as its linear
    layers (`ChunkCost.depth_unit`), from the model's shape: a token does 2 FLOPs per
    linear weight and 4 per (key, query-head dimension), scaled by the measured slowdown."""
    q = shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    weights = shape.hidden_size * (2 * q + 2 * kv + 3 * shape.intermediate_size)
    return round(2 * weights / (4 * q) / ATTENTION_FLOP_SLOWDOWN)


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

    def admit(self, request_id: str, prompt_ids, params: SamplingParams, *, accepting: bool,
              phase: str, in_use, vocab_size: int | None, max_model_len: int | None) -> None:
        """Every submission's checks, in this order, before anything is queued: accepting
        (else EngineNotReadyError), the parameters and the prompt (InvalidRequestError), the id
        not `in_use`, then a place in the waiting queue (QueueFullError). On success the request
        counts as waiting until `leave`. Both engine fronts call this (`server.engine`, and
        `server.engine_process` for an engine in its own process)."""
        if not accepting:
            raise EngineNotReadyError(f"engine is not accepting requests (phase: {phase})")
        params.validate()
        validate_prompt(prompt_ids, vocab_size, max_model_len)
        if request_id in in_use:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        if not self.try_enter():
            raise QueueFullError(
                f"the waiting queue is full ({self.limit} requests); retry later"
            )


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
    key: int  # sampling noise key derived from the seed and the choice index
    detok: IncrementalDetokenizer
    max_len: int  # prompt + completion may not exceed this
    index: int = 0  # choice index within the request
    grammar: object | None = None  # SequenceGrammar of a constrained sequence
    followers: list = field(default_factory=list)  # choices waiting for this one's prefill
    cumulative_logprob: float = 0.0
    prompt_lps: list | None = None  # prompt logprobs by position (prompt_logprobs requests)
    prompt_lps_sent: bool = False
    counts_admission: bool = True  # the request's one entry in `Admission` (choice 0)
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
class StepResult:
    """What the host reads back from a launched step (`ModelRunner.read`).

    `tokens[i]` and `logprobs[i]` belong to the step's i-th sampled sequence (`logprobs` None
    when no row asked for them); `prompt` holds (sequence, position, entry) for each prompt
    position whose logprob the step computed.
    """

    tokens: list[int]
    logprobs: list[TokenLogprob | None] | None = None
    prompt: list[tuple[Sequence, int, TokenLogprob]] = field(default_factory=list)


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


def _unconstrained(rows: int, words: int):
    """Masks that allow every token (the rows of sequences being failed are discarded)."""
    import numpy as np

    return np.full((rows, words), -1, dtype=np.int32)


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
        chunk_cost: ChunkCost | None = None,
        eos_ids: frozenset[int],
        tokenizer,
        admission: Admission,
        block_manager: BlockManager,
        grammars=None,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        # Decode rows take one token each out of the budget; keep room for a prompt chunk.
        self.max_batched_tokens = max(max_batched_tokens, max_num_seqs + 1)
        self.decode_prefill_tokens = decode_prefill_tokens or self.max_batched_tokens
        self.chunk_cost = chunk_cost or ChunkCost()
        self.eos_ids = eos_ids
        self.blocks = block_manager
        self.grammars = grammars  # GrammarBackend (None: grammars are refused)
        self._tokenizer = tokenizer  # the engine thread's own instance (detokenisation)
        self._admission = admission
        self._admissions = itertools.count()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.by_id: dict[str, list[Sequence]] = {}  # request id -> its unfinished choices
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
        def refuse(error: str) -> None:
            self._admission.leave()
            self.outputs.extend(
                RequestOutput(req.request_id, finished=True, finish_reason="error",
                              error=error, index=j)
                for j in range(req.params.n)
            )

        if req.request_id in self.by_id:  # a stale id reused after abort raced: refuse it
            refuse("duplicate request id")
            return
        p = req.params
        seqs = []
        for j in range(p.n):
            grammar = None
            if p.grammar is not None:
                try:
                    if self.grammars is None:
                        raise ValueError("this engine has no grammar support")
                    grammar = self.grammars.matcher(p.grammar)
                except ValueError as exc:  # GrammarError: reported, the engine serves on
                    refuse(f"grammar: {exc}")
                    return
            seqs.append(Sequence(
                request_id=req.request_id,
                prompt_ids=req.prompt_ids,
                params=p,
                key=choice_key(req.seed, j),
                detok=IncrementalDetokenizer(
                    self._tokenizer, req.prompt_ids, p.stop, p.skip_special_tokens
                ),
                max_len=self.max_model_len,
                index=j,
                counts_admission=j == 0,
                grammar=grammar,
                prompt_lps=[None] * len(req.prompt_ids) if p.prompt_logprobs is not None
                else None,
            ))
        self.by_id[req.request_id] = list(seqs)
        leader = seqs[0]
        if self.blocks.enable_prefix_caching:
            leader.followers = seqs[1:]
            self.waiting.append(leader)
        else:
            self.waiting.extend(seqs)

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> None:
        for seq in list(self.by_id.get(request_id, ())):
            self.finish(seq, reason, error=error)

    def abort_all(self, why: str) -> None:
        for request_id in list(self.by_id):
            self.abort(request_id, "abort", error=why)

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
        preempted_before = self.preemptions
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
        if self.preemptions == preempted_before:  # no admission right after a preemption:
            self._admit()  # the freed blocks go to the sequences still running first
        prefill = []
        # Beside decode rows the budget is in ChunkCost units (a deep chunk costs more than its
        # tokens); the step's token count stays within the token budget either way.
        cost_budget = float(budget) if decode else 0.0
        for seq in self.prefilling:
            if budget <= 0 or (decode and cost_budget <= 0):
                break
            take = min(seq.fill_target - seq.num_computed, budget)
            if decode:  # the step's first chunk always makes some progress
                fits = self.chunk_cost.affordable(seq.num_computed, cost_budget)
                take = min(take, max(fits, 0 if prefill else MIN_DEEP_CHUNK))
            if seq.prompt_lps is not None:
                take = min(take, PROMPT_LOGPROBS_CHUNK)
            if take > 0:
                prefill.append(PrefillItem(seq, seq.num_computed, take))
                budget -= take
                if decode:
                    cost_budget -= self.chunk_cost.cost(seq.num_computed, take)
        if not decode and not prefill:
            return None
        return ScheduledStep(decode, prefill)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for `num_tokens` tokens of `seq`, preempting the most recently admitted
        sequences (`seq` itself when it is the newest) until the pool has them. False if `seq`
        was preempted."""
        while not self.blocks.append_slot(seq.blocks, num_tokens):
            # Last in, first out: the most recently admitted sequence, `seq` itself if it is.
            victim = max(self.running + self.prefilling, key=lambda s: s.admitted)
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
            # Prompt logprobs need every prompt position's logits: no cache hits until all
            # of them have been computed once.
            cacheable = target - 1 if seq.prompt_lps is None or seq.prompt_lps_sent else 0
            alloc = self.blocks.allocate_prompt(seq.tokens, max_cached_tokens=cacheable)
            if alloc is None:
                return  # the pool is full: wait for running sequences to finish
            self.waiting.popleft()
            if seq.admitted < 0:
                if seq.counts_admission:
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
        self.waiting.appendleft(seq)  # choices held for its prefill stay held: it comes first

    def _release_followers(self, seq: Sequence) -> None:
        """The choices held for `seq`'s prefill join the front of the queue, in order."""
        followers, seq.followers = seq.followers, []
        for follower in reversed(followers):
            if not follower.finished:
                self.waiting.appendleft(follower)

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
                # Its full prompt blocks are committed: the other choices now hit them.
                self._release_followers(seq)

    def complete(self, seqs: list[Sequence], result: StepResult) -> None:
        """What a launched step computed for `seqs` (its `sampled` list), now read."""
        for seq, pos, entry in result.prompt:
            if seq.prompt_lps is not None and not seq.prompt_lps_sent:
                seq.prompt_lps[pos] = entry
        lps = result.logprobs or [None] * len(seqs)
        for seq, token, lp in zip(seqs, result.tokens, lps, strict=True):
            seq.in_flight -= 1
            if seq.finished:
                self.discarded_tokens += 1
            elif seq.params.max_tokens == 0:  # scoring only: the prompt logprobs were the point
                self.finish(seq, "length")
            else:
                self.append_token(seq, token, lp)
                if not seq.finished and seq.row >= 0:
                    self._commit(seq)

    # -- grammars (see the module docstring for the order of calls) ---------------------------

    def has_constrained(self, seqs: list[Sequence]) -> bool:
        return any(s.grammar is not None for s in seqs)

    def advance_grammars(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Feed the tokens just read to the matchers of the constrained sequences among `seqs`
        (a step's sampled list) when no masks are due next (else `advance_and_fill`)."""
        self._grammar_step(seqs, tokens, [], 0)

    def fill_masks(self, seqs: list[Sequence], words: int):
        """The token bitmasks of a step's sampled rows (numpy int32 `[len(seqs), words]`):
        each constrained row's grammar, every other row all ones. None if none is
        constrained."""
        return self._grammar_step([], [], seqs, words)

    def advance_and_fill(self, read_seqs: list[Sequence], tokens: list[int],
                         seqs: list[Sequence], words: int):
        """`advance_grammars(read_seqs, tokens)` then `fill_masks(seqs, words)`, in one round
        trip to the grammar process."""
        return self._grammar_step(read_seqs, tokens, seqs, words)

    def _grammar_step(self, read_seqs: list[Sequence], tokens: list[int],
                      seqs: list[Sequence], words: int):
        advance = [(seq.grammar, token) for seq, token in zip(read_seqs, tokens, strict=True)
                   if seq.grammar is not None and not seq.finished]
        constrained = self.has_constrained(seqs)
        fill = [(seq.grammar, row) for row, seq in enumerate(seqs)
                if seq.grammar is not None and not seq.finished]
        if not advance and not constrained:
            return None
        try:
            rejected, lost, masks = self.grammars.step(
                advance, fill, len(seqs) if constrained else 0)
        except GrammarWorkerError as exc:  # every constrained sequence here fails; others run
            for seq in dict.fromkeys((*read_seqs, *seqs)):
                if seq.grammar is not None and not seq.finished:
                    self.finish(seq, "error", error=f"grammar: {exc}")
            return _unconstrained(len(seqs), words) if constrained else None
        for seq in (*read_seqs, *seqs):
            if seq.grammar is None or seq.finished:
                continue
            if seq.grammar in lost:
                self.finish(seq, "error", error=f"grammar: {lost[seq.grammar]}")
            elif seq.grammar in rejected:
                self.finish(seq, "error", error="internal error: the grammar rejected a token "
                            f"it had allowed ({rejected[seq.grammar]})")
        return masks

    def _commit(self, seq: Sequence) -> None:
        """Full blocks whose tokens are all known and computed join the prefix cache (checked
        per token, so only a newly filled block costs anything)."""
        known = min(seq.num_computed, len(seq.tokens))
        full = known // self.blocks.block_size
        if full > seq.committed_blocks:
            self.blocks.commit_full_blocks(seq.blocks, seq.tokens, known)
            seq.committed_blocks = full

    # -- per-token bookkeeping --------------------------------------------------------------

    def append_token(self, seq: Sequence, token: int, lp: TokenLogprob | None = None) -> None:
        seq.output_ids.append(token)
        seq.tokens.append(token)
        self.tokens["generated"] += 1
        if lp is not None:
            seq.cumulative_logprob += lp.logprob
        p = seq.params
        # A constrained sequence can sample EOS only where its grammar accepts: it ends there
        # even with ignore_eos (the grammar allows nothing else).
        eos = token in self.eos_ids and (not p.ignore_eos or seq.grammar is not None)
        if token in p.stop_token_ids or eos:
            self.finish(seq, "stop", new_token=token, lp=lp)
            return
        text = seq.detok.add_token(token)
        if seq.detok.stopped:
            self.finish(seq, "stop", new_token=token, text=text, lp=lp)
        elif (
            len(seq.output_ids) >= p.max_tokens
            or len(seq.prompt_ids) + len(seq.output_ids) >= seq.max_len
        ):
            self.finish(seq, "length", new_token=token, text=text, lp=lp)
        else:
            self.outputs.append(
                RequestOutput(
                    seq.request_id,
                    text=text,
                    token_ids=[token],
                    prompt_tokens=len(seq.prompt_ids),
                    completion_tokens=len(seq.output_ids),
                    index=seq.index,
                    logprobs=None if p.logprobs is None else [lp],
                    prompt_logprobs=self._take_prompt_logprobs(seq),
                )
            )

    @staticmethod
    def _take_prompt_logprobs(seq: Sequence) -> list | None:
        """The prompt logprobs, with the choice's first output only."""
        if seq.prompt_lps is None or seq.prompt_lps_sent:
            return None
        seq.prompt_lps_sent = True
        return seq.prompt_lps

    def finish(
        self,
        seq: Sequence,
        reason: str,
        new_token: int | None = None,
        text: str = "",
        error: str | None = None,
        lp: TokenLogprob | None = None,
    ) -> None:
        """End `seq`: free its blocks and row, emit its last output. A token still in flight
        for it is dropped when it arrives."""
        seq.finished = True
        self._release_followers(seq)
        if reason in ("stop", "length"):
            text += seq.detok.flush()
        if seq in self.waiting:
            self.waiting.remove(seq)
            if seq.admitted < 0 and seq.counts_admission:
                self._admission.leave()
        for group in (self.prefilling, self.running):
            if seq in group:
                group.remove(seq)
        self._release(seq)
        choices = self.by_id.get(seq.request_id)
        if choices is not None and seq in choices:
            choices.remove(seq)
            if not choices:
                del self.by_id[seq.request_id]
        p = seq.params
        ok = reason in ("stop", "length")
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
                index=seq.index,
                logprobs=None if p.logprobs is None or new_token is None else [lp],
                prompt_logprobs=self._take_prompt_logprobs(seq) if ok else None,
                cumulative_logprob=seq.cumulative_logprob if p.logprobs is not None else None,
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
