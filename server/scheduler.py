"""Continuous batching: queues, KV slots and the per-token bookkeeping of every sequence.

The scheduler decides *what* runs; `server.model_runner` decides *how* (tensors, kernels,
graphs). Torch-free: it sees sequences, slots and token ids, never a tensor.

A sequence moves `waiting -> prefilling -> running -> finished`:

* `admit()` gives waiting sequences a free KV slot (one slot per sequence);
* `schedule_prefill()` hands out one prefill chunk per step under the token budget
  (`--max-num-batched-tokens`), shared in arrival order by the sequences still reading their
  prompt; `complete_prefill()` takes the first sampled token of those whose prompt is done;
* `decode_batch()` lists the running sequences for the next decode step, `launched()` records
  that the step is in flight, and `complete_decode()` takes its tokens a step later.

Decode runs one step ahead of the host (see `server.engine`), so a sequence can have a token
"in flight": sampled on the device, not yet read. `Sequence.in_flight` counts those; a sequence
that the in-flight token surely ends (length limits) is left out of the next step, and a token
computed for a sequence that finished meanwhile (stop token, abort) is dropped and counted.

Thread ownership: everything here runs on the engine thread, except `Admission`, which the
event loop's `add_request` enters and the engine thread leaves.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

from server.detokenizer import IncrementalDetokenizer
from server.request import RequestOutput, SamplingParams
from server.seeds import seed_to_key


class Admission:
    """Counts requests submitted but not yet given a slot, to bound the waiting queue."""

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


@dataclass
class Sequence:
    """A request inside the engine thread."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    key: int  # sampling noise key derived from the seed
    detok: IncrementalDetokenizer
    max_len: int  # prompt + completion may not exceed this
    slot: int = -1
    num_prefilled: int = 0  # prompt tokens already in the KV cache
    output_ids: list[int] = field(default_factory=list)  # tokens the host has read
    in_flight: int = 0  # tokens sampled on the device that the host has not read yet
    finished: bool = False

    @property
    def num_cached(self) -> int:
        """Tokens whose K/V are in the cache (the newest sampled token is not yet)."""
        return self.num_prefilled + max(0, len(self.output_ids) + self.in_flight - 1)

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


@dataclass
class PrefillItem:
    """Prompt tokens `[start, start + length)` of `seq`, part of one prefill step."""

    seq: Sequence
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length == len(self.seq.prompt_ids)


class Scheduler:
    """Waiting / prefilling / running sequences over `max_num_seqs` KV slots.

    `outputs` collects the `RequestOutput` increments of the current iteration; the engine
    takes them with `take_outputs()` and delivers them in one batch.
    """

    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_model_len: int,
        max_batched_tokens: int,
        eos_ids: frozenset[int],
        tokenizer,
        admission: Admission,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_batched_tokens = max_batched_tokens
        self.eos_ids = eos_ids
        self._tokenizer = tokenizer  # the engine thread's own instance (detokenisation)
        self._admission = admission
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.by_id: dict[str, Sequence] = {}
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.outputs: list[RequestOutput] = []
        self.steps = {"prefill": 0, "decode": 0}
        self.tokens = {"prompt": 0, "generated": 0}
        self.discarded_tokens = 0  # computed one step ahead for sequences that had finished

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
        if seq is None:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._admission.leave()
        self.finish(seq, reason, error=error)

    def abort_all(self, why: str) -> None:
        for seq in list(self.by_id.values()):
            self.abort(seq.request_id, "abort", error=why)

    def fail(self, seqs: list[Sequence], error: str) -> None:
        """A step serving `seqs` raised: end them with finish_reason "error"."""
        for seq in list(seqs):
            self.finish(seq, "error", error=error)

    def take_outputs(self) -> list[RequestOutput]:
        outputs, self.outputs = self.outputs, []
        return outputs

    # -- scheduling -------------------------------------------------------------------------

    def admit(self) -> None:
        """Give waiting sequences free slots, in arrival order."""
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            self._admission.leave()
            seq.slot = self.free_slots.pop()
            self.prefilling.append(seq)

    def schedule_prefill(self) -> list[PrefillItem]:
        """The next prefill chunk: prompt tokens of prefilling sequences, in arrival order,
        up to the token budget (a long prompt takes several steps)."""
        budget = self.max_batched_tokens
        items = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            take = min(len(seq.prompt_ids) - seq.num_prefilled, budget)
            items.append(PrefillItem(seq, seq.num_prefilled, take))
            budget -= take
        return items

    def complete_prefill(self, items: list[PrefillItem], first_tokens: list[int]) -> None:
        """`first_tokens`: one sampled token per item that completes its prompt, in order."""
        self.steps["prefill"] += 1
        self.tokens["prompt"] += sum(item.length for item in items)
        for item in items:
            item.seq.num_prefilled += item.length
        done = [item.seq for item in items if item.completes_prompt]
        for seq, token in zip(done, first_tokens, strict=True):
            self.prefilling.remove(seq)
            self.running.append(seq)
            self.append_token(seq, token)

    def decode_batch(self) -> list[Sequence]:
        """Running sequences for the next decode step (those the in-flight token surely ends
        are left out: their last token is already being computed)."""
        return [s for s in self.running if not (s.in_flight and s.ends_with_in_flight_token())]

    def launched(self, seqs: list[Sequence]) -> None:
        """A decode step for `seqs` is in flight on the device."""
        self.steps["decode"] += 1
        for s in seqs:
            s.in_flight += 1

    def complete_decode(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """The tokens of a decode step launched for `seqs`, now read by the host."""
        for seq, token in zip(seqs, tokens, strict=True):
            seq.in_flight -= 1
            if seq.finished:
                self.discarded_tokens += 1
            else:
                self.append_token(seq, token)

    # -- per-token bookkeeping --------------------------------------------------------------

    def append_token(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
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
        """End `seq`: free its slot, emit its last output. A token still in flight for it is
        dropped when it arrives."""
        seq.finished = True
        if reason in ("stop", "length"):
            text += seq.detok.flush()
        for group in (self.prefilling, self.running):
            if seq in group:
                group.remove(seq)
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1
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
                error=error,
            )
        )

    # -- introspection (read from other threads: plain ints only) ---------------------------

    def counters(self) -> dict:
        return {
            "running": len(self.running) + len(self.prefilling),
            "decoding": len(self.running),
            "prefilling": len(self.prefilling),
            "free_slots": len(self.free_slots),
            "max_num_seqs": self.max_num_seqs,
            "prefill_steps": self.steps["prefill"],
            "decode_steps": self.steps["decode"],
            "prompt_tokens": self.tokens["prompt"],
            "generated_tokens": self.tokens["generated"],
            "discarded_tokens": self.discarded_tokens,
        }
