"""Which mixed steps run on CUDA graphs: the token buckets, when they are captured, the books.

A mixed step (decode rows plus prompt chunks) run eagerly costs one Python dispatch per
kernel, ~13 per layer: on the 8B that is ~13 ms of host time per step whatever the GPU needs
(H200: a 16-token chunk beside a stream, 13.2 ms eager, 8.4 ms replayed), and every running
stream waits that long for its next token while a prompt is prefilled. A mixed step replayed
from a CUDA graph costs its GPU time. Graphs are captured per *token bucket*: a step of T
tokens (decode rows and chunk tokens together) runs at the smallest bucket >= T, padded
(`server.mixed_graph_runner`).

Policy, beside the decode-graph policy (`server.graph_warmup.CapturePolicy`), which keeps
priority and the readiness contract (ready = the largest decode graph captured):

* `eager` (`--graph-capture eager`): every bucket before ready, largest first.
* `lazy`: buckets are captured in idle time, once every decode size is settled, largest
  first (the graphs share the decode graphs' memory pool; the largest sizes it), and, with a
  capture thread (`server.background_capture`: one GPU, `--busy-capture background`), also
  while busy: the pending bucket traffic ran eagerly most often, captured off the engine
  thread, then the other buckets, largest first, without waiting for traffic to want them
  (a bucket's first prompt step would otherwise run eagerly: 25-40 ms on the 8B that every
  running stream waits for; recording all buckets right after ready costs a batch-1 stream
  one gap of ~2x its median, 6-27 before startup made cuBLAS's first call at each bucket's
  row count, docs/benchmarks.md 8f, 8n). A mixed step arriving before its bucket is
  captured runs packed, eagerly. Without the thread nothing is captured while busy: an
  inline capture would stall every running stream for it (tens of ms on the 8B), exactly
  the gap these graphs exist to remove.
* `off`: nothing is captured (steps still run packed, eagerly).
* No CUDA device or `--no-mixed-graphs`: no packing, no graphs; every mixed step runs the
  unpacked eager forward.

Under tensor parallelism every capture is an order to all ranks with an agreement, as for the
decode sizes (`ModelRunner.capture`): a bucket is replayed only once every rank captured it.

A step that fits a bucket runs in the packed form at the bucket's width whether or not its
graph is captured yet (eagerly then, on the same buffers): the step computes the same numbers
either way, so greedy output does not depend on the capture mode or on when a bucket was
captured (whereas running it unpadded would: GEMMs of another row count round differently).
Steps keep the unpacked eager
forward (decode kernel for decode rows, varlen prefill for chunks) when they are larger than
the largest bucket, keep prompt logprobs (their logits rows are unbounded), or have a decode
row deeper than `max_decode_context`: in the packed kernel a decode row is one program per KV
head walking its whole context, while the decode kernel splits it.

Pure Python, no torch (the HTTP layer may read `snapshot()`). Thread safety: the engine thread
calls everything except `on_arrival` and `snapshot`; one lock guards the state.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# Decode rows deeper than this keep a mixed step eager (see the module docstring). Estimated,
# not measured: one program walking 16k tokens of a KV head at ~36 GB/s per SM (H200) is
# ~0.2 ms per layer, ~7 ms per 8B step, about what an eager mixed step costs on the host.
MAX_DECODE_CONTEXT = 16384

EAGER_REASONS = ("not_captured", "too_many_tokens", "prompt_logprobs", "long_context", "off")


def mixed_graph_sizes(max_num_seqs: int, decode_prefill_tokens: int,
                      max_batched_tokens: int) -> list[int]:
    """Token buckets: 16, 32, 48, 64, then every 32 up to 512 and every 64 beyond, up to the
    largest mixed step that has decode rows in it (`max_num_seqs` rows plus
    `decode_prefill_tokens` prompt tokens, within the step budget), rounded up to 16.

    Fine steps because a mixed step of a few hundred tokens is compute-bound on the GPU: the
    padding up to the bucket costs its share of the step (8B, H200: ~26 us per token), so
    the spacing is what a step may waste. Steps without decode rows may be larger: nothing
    waits on them, so they keep the eager forward (its launch cost amortised over the chunk).
    """
    top = min(max_batched_tokens, max_num_seqs + decode_prefill_tokens)
    top = max(16, -(-top // 16) * 16)
    sizes = [s for s in (16, 32, 48, 64) if s < top]
    sizes += [s for s in range(96, 513, 32) if s < top]
    sizes += list(range(576, top, 64))
    return sorted({*sizes, top})


class MixedGraphPolicy:
    """Bucket states (pending / capturing / captured / failed), dispatch and capture offers.

    `select` is called by the step planner for every mixed step and returns the bucket whose
    packed form runs it, signed: replayed (+) or eager (-), 0 for the unpacked eager forward;
    `next_capture` between steps returns a bucket to capture now, or None. A failed bucket is
    never retried: its steps run packed, eagerly. `packing` is fixed at construction; capture
    can be turned off later (`disable`).
    """

    def __init__(
        self,
        sizes: list[int],
        mode: str,
        *,
        disabled_reason: str | None = None,
        max_seqs: int,
        max_decode_context: int = MAX_DECODE_CONTEXT,
        idle_debounce_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"mixed-graph sizes must be positive, got {sizes!r}")
        self.sizes = tuple(sorted(set(sizes)))
        self.max_seqs = max_seqs
        self.max_decode_context = max_decode_context
        self.packing = disabled_reason is None  # packed dispatch (with or without graphs)
        self._mode = mode
        self._reason = disabled_reason or (
            "graph capture disabled (--graph-capture off)" if mode == "off" else None
        )
        self._debounce = idle_debounce_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = {s: "pending" for s in self.sizes}
        self._capture_ms: dict[int, float] = {}
        self._errors: dict[int, str] = {}
        self._pool_bytes: int | None = None
        self._captured: set[int] = set()
        self._off_thread: set[int] = set()  # captured by the capture thread while busy
        self._demand = dict.fromkeys(self.sizes, 0)  # steps run eagerly for want of the graph
        self._capturing: int | None = None
        self._idle_since: float | None = None
        self._graph_steps = 0
        self._eager = dict.fromkeys(EAGER_REASONS, 0)

    @classmethod
    def from_config(cls, config, max_num_seqs: int, decode_prefill_tokens: int,
                    max_batched_tokens: int, disabled_reason: str | None) -> MixedGraphPolicy:
        """The policy for an `EngineConfig` (`--graph-capture`, `--no-mixed-graphs`)."""
        if disabled_reason is None and not config.mixed_graphs:
            disabled_reason = "mixed-step graphs disabled (--no-mixed-graphs)"
        sizes = mixed_graph_sizes(max_num_seqs, decode_prefill_tokens, max_batched_tokens)
        return cls(sizes, config.graph_capture, disabled_reason=disabled_reason,
                   max_seqs=max_num_seqs, idle_debounce_s=config.idle_debounce_ms / 1e3)

    @property
    def max_tokens(self) -> int:
        """The largest bucket's width: the packed form's buffers (0 without packing)."""
        return self.sizes[-1] if self.packing else 0

    @property
    def capturing_allowed(self) -> bool:
        """Whether buckets may still be captured (packing on, capture not off)."""
        return self._reason is None

    def disable(self, reason: str) -> None:
        """Capture no more buckets (the decode graphs went off, say); captured ones stay."""
        with self._lock:
            if self._reason is None:
                self._reason = reason
                logger.info("mixed-step graph capture off: %s", reason)

    # -- dispatch (engine thread) -------------------------------------------------------------

    def select(self, num_tokens: int, num_seqs: int, extra_logits: bool,
               max_decode_context: int) -> int:
        """How a mixed step of `num_tokens` tokens over `num_seqs` sequences runs: +t replays
        the graph of bucket t (captured on every rank), -t runs bucket t's packed form
        eagerly (not captured), 0 the unpacked eager forward. `extra_logits`: it keeps
        prompt-logprob rows; `max_decode_context`: its deepest decode row's context (0
        without decode rows)."""
        with self._lock:
            if not self.packing:
                reason = "off"
            elif extra_logits:
                reason = "prompt_logprobs"
            elif num_tokens > self.sizes[-1] or num_seqs > self.max_seqs:
                reason = "too_many_tokens"
            elif max_decode_context > self.max_decode_context:
                reason = "long_context"
            else:
                # Bucket t holds min(t, max_seqs) sequences: enough, as num_seqs <= num_tokens.
                bucket = self.sizes[bisect.bisect_left(self.sizes, num_tokens)]
                if bucket in self._captured:
                    self._graph_steps += 1
                    return bucket
                self._eager["not_captured"] += 1
                self._demand[bucket] += 1
                return -bucket
            self._eager[reason] += 1
            return 0

    # -- capture offers (engine thread) -------------------------------------------------------

    def startup_plan(self) -> list[int]:
        """Buckets to capture before ready: all of them, largest first, in eager mode."""
        if self._reason is not None or self._mode != "eager":
            return []
        return [s for s in reversed(self.sizes) if self._state[s] == "pending"]

    def next_capture(self, idle: bool, decode_settled: bool, background: bool = False,
                     speculative: bool = False) -> int | None:
        """Between steps: the bucket to capture now, or None.

        Idle for `idle_debounce_s` and the decode policy with nothing left to capture
        (`decode_settled`): the largest pending bucket; call again after each capture (new
        requests stop it). Busy, with a capture thread (`background`): the pending bucket most
        steps ran eagerly for want of it (ties: the larger); with none wanted and
        `speculative`, the largest pending one (a bucket's first prompt step would otherwise
        run eagerly, tens of ms on the 8B that every running stream waits for)."""
        if self._reason is not None:
            return None
        with self._lock:
            pending = [s for s in self.sizes if self._state[s] == "pending"]
            if not idle:
                self._idle_since = None
                if not background:
                    return None
                wanted = [s for s in pending if self._demand[s]]
                if wanted:
                    return max(wanted, key=lambda s: (self._demand[s], s))
                return pending[-1] if speculative and pending else None
            if not decode_settled or not pending:
                return None
            now = self._clock()
            if self._idle_since is None:
                self._idle_since = now
            if now - self._idle_since < self._debounce:
                return None
            return pending[-1]

    def idle_wait_s(self) -> float | None:
        """While idle: how long the engine may block before offering idle time again (None:
        nothing left to capture)."""
        with self._lock:
            if self._reason is not None or "pending" not in self._state.values():
                return None
            if self._idle_since is None:
                return self._debounce
            return max(0.0, self._debounce - (self._clock() - self._idle_since))

    def on_arrival(self) -> None:
        """A request was submitted (any thread): idle capture stops, the debounce restarts."""
        with self._lock:
            self._idle_since = None

    # -- capture protocol (engine thread) -----------------------------------------------------

    def begin(self, size: int) -> None:
        with self._lock:
            if self._state.get(size) != "pending":
                raise RuntimeError(f"mixed-graph bucket {size} is not pending")
            self._state[size] = "capturing"
            self._capturing = size

    def succeeded(self, size: int, seconds: float, pool_bytes: int,
                  off_thread_s: float | None = None) -> None:
        """As `CapturePolicy.succeeded`: `seconds` the engine thread's stall, `off_thread_s`
        the capture's own time when the capture thread ran it. A bucket's `capture_ms` is
        the capture's time either way."""
        with self._lock:
            if off_thread_s is not None:
                self._off_thread.add(size)
                seconds = off_thread_s
            self._state[size] = "captured"
            self._capturing = None
            self._capture_ms[size] = round(seconds * 1e3, 3)
            self._pool_bytes = pool_bytes
            self._captured.add(size)

    def failed(self, size: int, reason: str) -> None:
        with self._lock:
            self._state[size] = "failed"
            self._capturing = None
            self._errors[size] = reason

    # -- reporting (any thread) ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The `mixed` section of /health/graphs."""
        with self._lock:
            captured = len(self._captured)
            eager = sum(self._eager.values())
            total = eager + self._graph_steps
            return {
                "packing": self.packing,
                "capture": "off" if self._reason is not None else self._mode,
                "reason": self._reason,
                "sizes": [
                    {"tokens": s, "state": self._state[s], "capture_ms": self._capture_ms.get(s),
                     "off_thread": s in self._off_thread, "demand": self._demand[s],
                     "error": self._errors.get(s)}
                    for s in self.sizes
                ],
                "coverage": {"captured": captured, "total": len(self.sizes)},
                "capturing": self._capturing,
                "max_decode_context": self.max_decode_context,
                "pool_bytes_after_last_capture": self._pool_bytes,
                "traffic": {
                    "graph_steps": self._graph_steps,
                    "eager_steps": eager,
                    "eager_by_reason": dict(self._eager),
                    "graph_rate": self._graph_steps / total if total else None,
                },
            }
