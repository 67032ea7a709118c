"""The generation engine: an async front (`AsyncEngine`) and the engine thread's scheduler loop.

One engine thread owns every torch and CUDA call — loading, the KV cache, prefill and decode
steps, sampling and graph captures — so CUDA graph capture never races another thread's kernel
launch, and the asyncio event loop never blocks on the model. The event loop talks to it through
a thread-safe command queue; outputs come back, one batch per step, via
`loop.call_soon_threadsafe` into each request's `asyncio.Queue`.

Scheduling is continuous batching over a slot KV cache (one slot per running sequence): each
loop iteration admits waiting requests into free slots, runs at most one prefill chunk (a token
budget shared by the sequences still reading their prompt), then one decode step for every
sequence that is generating, then offers the gap to the graph-capture policy.

Decode runs one step ahead of the host: step N+1 is launched, its input tokens taken on the
device from step N's output, before the host reads step N's tokens and does the per-token
bookkeeping (stop checks, detokenisation, delivery). The device never waits for that Python
work; the price is one wasted row when a sequence stops on a token the host had not seen yet.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.config import EngineConfig
from server.detokenizer import IncrementalDetokenizer
from server.request import (
    EngineNotReadyError,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
)

log = logging.getLogger("graphserve.engine")

PhaseCallback = Callable[[str, "str | None"], None]


# ---------------------------------------------------------------------------------------------
# Event-loop side
# ---------------------------------------------------------------------------------------------


class RequestStream:
    """Async iterator over one request's `RequestOutput` increments (last one finished)."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def _put(self, out: RequestOutput) -> None:
        self._queue.put_nowait(out)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        if out.finished:
            self.finished = True
        return out


class _Admission:
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


class AsyncEngine:
    """Asyncio front of the engine. Constructing it is cheap and imports no torch.

    `start()` launches the engine thread, which loads the model, allocates the KV cache, captures
    the startup graphs and then serves. Phases are reported through `on_phase(phase, detail)`.
    """

    def __init__(self, config: EngineConfig, on_phase: PhaseCallback | None = None):
        config.validate()
        self.config = config
        self._on_phase = on_phase
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._admission = _Admission(config.max_queue)
        self._seed_rng = random.Random(config.seed)
        self._thread: threading.Thread | None = None
        self._core: EngineCore | None = None
        self._accepting = False
        self.phase = "starting"
        self.error: str | None = None
        self.ready = threading.Event()
        # Filled in once the model is loaded:
        self.model_name: str | None = None
        self.max_model_len: int | None = None
        self.tokenizer = None
        self.vocab_size: int | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(
            target=self._thread_main, name="graphserve-engine", daemon=True
        )
        self._thread.start()

    def _set_phase(self, phase: str, detail: str | None = None) -> None:
        self.phase = phase
        if phase == "failed":
            self.error = detail
        if self._on_phase is not None:
            try:
                self._on_phase(phase, detail)
            except Exception:  # a broken observer must not kill the engine
                log.exception("phase callback failed")

    def _thread_main(self) -> None:
        try:
            core = EngineCore(self.config, self._set_phase)
            core.load()
        except Exception as exc:  # startup failure: report it, the server decides to exit
            reason = str(exc) or type(exc).__name__
            log.error(
                "engine startup failed: %s", reason, exc_info=not _is_expected_startup_error(exc)
            )
            self._set_phase("failed", reason)
            return
        self._core = core
        self.model_name = core.checkpoint.name
        self.max_model_len = core.max_model_len
        self.tokenizer = core.checkpoint.api_tokenizer
        self.vocab_size = core.vocab_size
        self._accepting = True
        self.ready.set()
        self._set_phase("ready")
        core.serve(self._commands, self._deliver, self._admission)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; unfinished requests end with finish_reason 'abort'."""
        self._accepting = False
        self._commands.put(("shutdown", None))
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    def stop_accepting(self) -> None:
        """New requests are refused from now on (draining); running ones continue."""
        self._accepting = False

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> RequestStream:
        """Submit a request; call on the event loop that will consume the returned stream.

        Raises InvalidRequestError, QueueFullError or EngineNotReadyError before anything is
        queued, so the caller can still answer with a plain HTTP error.
        """
        if not self._accepting:
            raise EngineNotReadyError(f"engine is not accepting requests (phase: {self.phase})")
        params.validate()
        self._validate_prompt(prompt_ids)
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        if not self._admission.try_enter():
            raise QueueFullError(
                f"the waiting queue is full ({self.config.max_queue} requests); retry later"
            )
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(64)
        stream = RequestStream(request_id, asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._commands.put(("add", _NewRequest(request_id, list(prompt_ids), params, seed)))
        return stream

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's increments; abort it if the consumer stops early."""
        stream = self.add_request(request_id, prompt_ids, params)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Thread-safe and idempotent; the slot is freed before the engine's next step."""
        self._commands.put(("abort", request_id))

    def _validate_prompt(self, prompt_ids) -> None:
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        vocab = self.vocab_size or 0
        for t in prompt_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise InvalidRequestError(
                    f"prompt token ids must be integers in [0, {vocab}); got {t!r}", "prompt"
                )
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model's maximum context is "
                f"{self.max_model_len} tokens (prompt + completion), so at most "
                f"{self.max_model_len - 1} prompt tokens fit",
                "prompt",
            )

    # -- outputs (called on the engine thread) ----------------------------------------------

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                self._streams.pop(out.request_id, None)
            by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    # -- introspection ----------------------------------------------------------------------

    def stats(self) -> dict:
        core = self._core
        out = {"running": 0, "waiting": self._admission.waiting, "phase": self.phase}
        if core is not None:
            out.update(core.counters())
            out["waiting"] = self._admission.waiting
        return out

    def graph_report(self) -> dict:
        core = self._core
        if core is None:
            return {"phase": self.phase, "mode": self.config.graph_capture, "complete": False}
        return {"phase": self.phase, **core.graph_report()}


def _put_all(items) -> None:
    for stream, out in items:
        stream._put(out)


def _is_expected_startup_error(exc: Exception) -> bool:
    from server.model_loader import ModelLoadError

    return isinstance(exc, (ModelLoadError, StartupError, ValueError))


# ---------------------------------------------------------------------------------------------
# Engine thread
# ---------------------------------------------------------------------------------------------


@dataclass
class _NewRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int


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

    def ends_with_in_flight_token(self) -> bool:
        """Whether the token in flight surely ends the sequence (length limits, not stops)."""
        produced = len(self.output_ids) + self.in_flight
        return (
            produced >= self.params.max_tokens
            or len(self.prompt_ids) + produced >= self.max_len
        )


@dataclass
class _PendingStep:
    """A decode step launched on the device whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]
    tokens: object  # int64 [n] on the device: the next step reads its inputs from here
    host: object  # int64 [n] host copy, valid once `ready` has fired
    ready: object  # torch.cuda.Event recorded after the copy (None on CPU: already valid)


class StartupError(RuntimeError):
    """The engine cannot start with this configuration (message says why)."""


class EngineCore:
    """Model, KV cache, scheduler and graph runner; every method runs on the engine thread."""

    def __init__(self, config: EngineConfig, set_phase: PhaseCallback):
        self.config = config
        self._set_phase = set_phase
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.by_id: dict[str, Sequence] = {}
        self.steps = {"prefill": 0, "decode": 0}
        self.tokens = {"prompt": 0, "generated": 0}
        self.step_errors = 0
        self.discarded_tokens = 0  # computed one step ahead for sequences that had finished
        self.timings: dict[str, float] = {}
        self._pending: _PendingStep | None = None

    # -- startup ----------------------------------------------------------------------------

    def load(self) -> None:
        t_start = time.perf_counter()
        self._set_phase("loading_weights")
        import torch

        from server import ops
        from server.model import allocate_kv_cache
        from server.model_loader import load_checkpoint

        cfg = self.config
        self.timings["import_s"] = time.perf_counter() - t_start
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise StartupError("--device cuda was requested but no CUDA GPU is available")
        device = (
            "cuda"
            if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
            else "cpu"
        )
        self.device = torch.device(device)
        if device == "cuda":
            torch.cuda.set_device(0)
            # cuDNN's SDPA failed intermittently under graph capture on the H100 (see notes).
            torch.backends.cuda.enable_cudnn_sdp(False)
        t0 = time.perf_counter()
        self.checkpoint = load_checkpoint(
            cfg.model, device, cfg.dtype, cfg.served_model_name, loader=cfg.loader
        )
        # A transformers fallback imports transformers inside the load: count that as import.
        self.timings["import_s"] += self.checkpoint.import_s
        self.timings["weights_s"] = time.perf_counter() - t0 - self.checkpoint.import_s
        hf_config = self.checkpoint.config
        self.eos_ids = self.checkpoint.eos_token_ids
        log.info(
            "loaded %s (%s, %.2f GB of weights) in %.2f s with the %s loader",
            self.checkpoint.path,
            hf_config.model_type,
            self.checkpoint.weight_bytes / 1e9,
            self.timings["weights_s"],
            self.checkpoint.loader,
        )

        self._set_phase("allocating_kv_cache")
        t0 = time.perf_counter()
        self.max_num_seqs = cfg.max_num_seqs or (64 if device == "cuda" else 8)
        self.max_batched_tokens = cfg.max_num_batched_tokens or (2048 if device == "cuda" else 256)
        model = self.checkpoint.model
        self.dtype = model.dtype
        plan = plan_kv_cache(
            cfg,
            hf_config,
            self.dtype,
            self.device,
            self.max_num_seqs,
            self.max_batched_tokens,
            self.checkpoint.weight_bytes,
        )
        self.max_model_len = plan.max_model_len
        model.init_rope(self.max_model_len)
        self.model = model
        self.checkpoint.model = None  # the engine owns the model from here on
        self.vocab_size = self.model.shape.vocab_size
        self.num_slots = self.max_num_seqs + 1
        self.scratch_slot = self.max_num_seqs  # padding rows and warm-up runs write here
        self.kv_cache = allocate_kv_cache(
            self.model.shape, self.num_slots, self.max_model_len, self.dtype, self.device
        )
        self.free_slots = list(range(self.max_num_seqs - 1, -1, -1))
        triton = ops.use_triton(device == "cuda")
        self.timings["kv_cache_s"] = time.perf_counter() - t0
        log.info(
            "KV cache: %d slots x %d tokens = %.2f GB (%s); decode kernels: %s",
            self.num_slots,
            self.max_model_len,
            plan.kv_bytes / 1e9,
            plan.note,
            "triton" if triton else "torch",
        )

        self._set_phase("capturing_graphs")
        t0 = time.perf_counter()
        from server.graph_warmup import CapturePolicy, DecodeRunner

        disabled = None
        if device != "cuda" and cfg.graph_capture != "off":
            disabled = "CUDA graphs need a CUDA device; running eagerly on CPU"
        policy = CapturePolicy.from_config(cfg, self.max_num_seqs, disabled_reason=disabled)
        if plan.budget_bytes is not None:
            policy.set_memory(plan.budget_bytes, plan.kv_bytes, self.checkpoint.weight_bytes)
        self.policy = policy
        self.runner = DecodeRunner(
            self.model, self.kv_cache, policy, self.max_num_seqs, self.scratch_slot
        )
        self.runner.startup()
        policy.mark_ready()
        self.timings["graphs_s"] = time.perf_counter() - t0
        self.timings["load_total_s"] = time.perf_counter() - t_start
        log.info(
            "startup graphs done in %.2f s (%s)", self.timings["graphs_s"], self.runner.describe()
        )

    # -- the loop ---------------------------------------------------------------------------

    def serve(self, commands: queue.SimpleQueue, deliver, admission: _Admission) -> None:
        self._deliver = deliver
        self._admission = admission
        self._outputs: list[RequestOutput] = []
        while True:
            busy = bool(self.waiting or self.prefilling or self.running or self._pending)
            if not self._drain(commands, block=not busy):
                break
            self._admit()
            if self.prefilling:
                self._guarded(self._prefill_step, self.prefilling)
            if self.running or self._pending:
                self._guarded(self._decode_step, self.running)
            self._flush()
            self._offer_capture(commands)
        self._abort_all("engine shut down")
        self._flush()

    def _drain(self, commands: queue.SimpleQueue, block: bool) -> bool:
        """Apply queued commands; block briefly when idle. Returns False on shutdown."""
        # While graphs remain to capture, wake up after the idle debounce to offer idle time.
        timeout = self.policy.idle_wait_s() if block else None
        while True:
            try:
                if block:
                    cmd, arg = commands.get(timeout=timeout)
                    block = False
                else:
                    cmd, arg = commands.get_nowait()
            except queue.Empty:
                return True
            if cmd == "add":
                self._add(arg)
            elif cmd == "abort":
                self._abort(arg, "abort")
            elif cmd == "shutdown":
                return False

    def _add(self, req: _NewRequest) -> None:
        from server.sampling import seed_to_key

        self.policy.on_arrival()
        if req.request_id in self.by_id:  # a stale id reused after abort raced: refuse it
            self._admission.leave()
            self._outputs.append(
                RequestOutput(
                    req.request_id,
                    finished=True,
                    finish_reason="error",
                    error="duplicate request id",
                )
            )
            return
        seq = Sequence(
            request_id=req.request_id,
            prompt_ids=req.prompt_ids,
            params=req.params,
            key=seed_to_key(req.seed),
            detok=IncrementalDetokenizer(
                self.checkpoint.tokenizer, req.prompt_ids, req.params.stop
            ),
            max_len=self.max_model_len,
        )
        self.by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def _abort(self, request_id: str, reason: str, error: str | None = None) -> None:
        seq = self.by_id.get(request_id)
        if seq is None:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._admission.leave()
        self._finish(seq, reason, error=error)

    def _abort_all(self, why: str) -> None:
        for seq in list(self.by_id.values()):
            self._abort(seq.request_id, "abort", error=why)

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            self._admission.leave()
            seq.slot = self.free_slots.pop()
            self.prefilling.append(seq)

    def _guarded(self, step, seqs: list[Sequence]) -> None:
        """Run a step; if it raises, fail the requests it served and keep serving the rest."""
        try:
            step()
        except Exception as exc:
            self.step_errors += 1
            log.exception("%s failed; failing its %d requests", step.__name__, len(seqs))
            for seq in list(seqs):
                self._finish(seq, "error", error=f"internal error during generation: {exc}")

    def _prefill_step(self) -> None:
        import torch

        from server.model import PrefillChunk
        from server.sampling import to_device

        budget = self.max_batched_tokens
        chunks, seqs, ids, positions = [], [], [], []
        for seq in self.prefilling:
            if budget <= 0:
                break
            take = min(len(seq.prompt_ids) - seq.num_prefilled, budget)
            start = seq.num_prefilled
            chunks.append(PrefillChunk(slot=seq.slot, start=start, length=take, offset=len(ids)))
            seqs.append(seq)
            ids.extend(seq.prompt_ids[start : start + take])
            positions.extend(range(start, start + take))
            budget -= take
        dev = self.device
        slots = [c.slot for c in chunks for _ in range(c.length)]
        inputs = to_device([ids, positions, slots], torch.int64, dev)
        logits = self.model.prefill(inputs[0], inputs[1], inputs[2], self.kv_cache, chunks)
        self.steps["prefill"] += 1
        self.tokens["prompt"] += len(ids)
        done = []
        for row, (seq, chunk) in enumerate(zip(seqs, chunks, strict=True)):
            seq.num_prefilled += chunk.length
            if seq.num_prefilled == len(seq.prompt_ids):
                done.append((row, seq))
        if not done:
            return
        rows = to_device([r for r, _ in done], torch.int64, dev)
        tokens = self._sample(logits[rows], [s for _, s in done]).tolist()
        for (_, seq), token in zip(done, tokens, strict=True):
            self.prefilling.remove(seq)
            self.running.append(seq)
            self._append_token(seq, token)

    def _decode_step(self) -> None:
        """Launch the next decode step, then read the previous one's tokens.

        The host stays one step ahead of the device: step N+1 is queued (its input tokens
        taken on the device from step N's output) before the host waits for step N and does
        its bookkeeping — stop checks, detokenisation, handing text to the event loop — so that
        host work overlaps the device's instead of adding to every inter-token gap. A sequence
        that step N finishes (a stop token, an abort) has had one more token computed in step
        N+1, which is dropped; sequences that step N's token surely ends (max_tokens, context
        length) are left out of step N+1.
        """
        # Taken first: if the launch raises, the step in flight is dropped together with the
        # running requests `_guarded` fails (its rows are all among them).
        prev, self._pending = self._pending, None
        self._pending = self._launch_decode(prev)
        if prev is not None:
            self._read_decode(prev)

    def _launch_decode(self, prev: _PendingStep | None) -> _PendingStep | None:
        import torch

        seqs = [s for s in self.running if not (s.in_flight and s.ends_with_in_flight_token())]
        if not seqs:
            return None
        prev_row = {id(s): i for i, s in enumerate(prev.seqs)} if prev is not None else {}
        ids, src = [], []
        for s in seqs:
            row = prev_row.get(id(s), -1) if s.in_flight else -1
            ids.append(s.output_ids[-1] if row < 0 else 0)
            src.append(row)
        positions = [s.num_cached for s in seqs]
        slots = [s.slot for s in seqs]
        logits = self.runner.run(
            ids, positions, slots, prev.tokens if prev is not None else None, src
        )
        self.steps["decode"] += 1
        tokens = self._sample(logits, seqs)
        for s in seqs:
            s.in_flight += 1
        if self.device.type != "cuda":
            return _PendingStep(seqs, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _PendingStep(seqs, tokens, host, ready)

    def _read_decode(self, step: _PendingStep) -> None:
        if step.ready is not None:
            step.ready.synchronize()  # releases the GIL while the device finishes
        for seq, token in zip(step.seqs, step.host.tolist(), strict=True):
            seq.in_flight -= 1
            if seq.finished:
                self.discarded_tokens += 1
            else:
                self._append_token(seq, token)

    def _sample(self, logits, seqs: list[Sequence]):
        """Sample one token per row; returns them on the device (no host sync)."""
        from server.sampling import SamplingBatch, sample

        batch = SamplingBatch(
            temperatures=[s.params.temperature for s in seqs],
            top_ps=[s.params.top_p for s in seqs],
            top_ks=[s.params.top_k for s in seqs],
            keys=[s.key for s in seqs],
            steps=[len(s.output_ids) + s.in_flight for s in seqs],
        )
        return sample(logits, batch)

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        self.tokens["generated"] += 1
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            self._finish(seq, "stop", new_token=token)
            return
        text = seq.detok.add_token(token)
        if seq.detok.stopped:
            self._finish(seq, "stop", new_token=token, text=text)
        elif (
            len(seq.output_ids) >= p.max_tokens
            or len(seq.prompt_ids) + len(seq.output_ids) >= seq.max_len
        ):
            self._finish(seq, "length", new_token=token, text=text)
        else:
            self._outputs.append(
                RequestOutput(
                    seq.request_id,
                    text=text,
                    token_ids=[token],
                    prompt_tokens=len(seq.prompt_ids),
                    completion_tokens=len(seq.output_ids),
                )
            )

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        new_token: int | None = None,
        text: str = "",
        error: str | None = None,
    ) -> None:
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
        self._outputs.append(
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

    def _flush(self) -> None:
        if self._outputs:
            outputs, self._outputs = self._outputs, []
            self._deliver(outputs)

    def _offer_capture(self, commands: queue.SimpleQueue) -> None:
        """Give the gap between steps (or idle time) to the capture policy."""
        while True:
            size = self.policy.next_capture(
                running=len(self.running) + len(self.prefilling),
                waiting=len(self.waiting) + commands.qsize(),
            )
            if size is None:
                return
            self.runner.capture(size)
            if self.running or self.prefilling or self.waiting or not commands.empty():
                return  # at most one capture per gap while serving

    # -- introspection (read from other threads: plain ints and copies only) -----------------

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
            "step_errors": self.step_errors,
            "discarded_tokens": self.discarded_tokens,
        }

    def graph_report(self) -> dict:
        report = self.policy.snapshot()
        report["device"] = self.runner.device_info()
        report["startup_timings_s"] = dict(self.timings)
        return report


# ---------------------------------------------------------------------------------------------
# KV cache sizing
# ---------------------------------------------------------------------------------------------


@dataclass
class KVPlan:
    max_model_len: int
    kv_bytes: int
    budget_bytes: int | None  # total GPU memory the server may hold (None on CPU)
    note: str


_CPU_DEFAULT_MAX_LEN = 4096
_GPU_SAFETY_BYTES = 512 * 2**20


def plan_kv_cache(
    cfg: EngineConfig,
    hf_config,
    dtype,
    device,
    max_num_seqs: int,
    max_batched_tokens: int,
    weight_bytes: int,
) -> KVPlan:
    """Choose max_model_len and size the slot cache to fit the GPU memory budget."""
    import torch

    head_dim = (
        getattr(hf_config, "head_dim", None)
        or hf_config.hidden_size // hf_config.num_attention_heads
    )
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = (
        2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * head_dim * itemsize
    )
    slots = max_num_seqs + 1
    limit = hf_config.max_position_embeddings
    from server.model import _sliding_window

    window = _sliding_window(hf_config)
    if window:
        limit = min(limit, window)  # within the window, full attention is exact
    if cfg.max_model_len is not None and cfg.max_model_len > limit:
        raise StartupError(
            f"--max-model-len {cfg.max_model_len} exceeds the model's limit of {limit} tokens"
            + (" (its sliding window)" if window and window == limit else "")
        )
    if device.type != "cuda":
        max_len = cfg.max_model_len or min(limit, _CPU_DEFAULT_MAX_LEN)
        return KVPlan(max_len, slots * max_len * per_token, None, "CPU")

    free, total = torch.cuda.mem_get_info()
    budget = int(total * cfg.gpu_memory_utilization)
    in_use = torch.cuda.memory_reserved()
    h, inter = hf_config.hidden_size, hf_config.intermediate_size
    qkv = (hf_config.num_attention_heads + 2 * hf_config.num_key_value_heads) * head_dim
    vocab = hf_config.vocab_size
    # Peak transient memory outside the KV cache: a prefill chunk's activations (x2 for the
    # allocator's slack), decode logits plus sampling temporaries (~40 B per logit), a margin.
    activations = 2 * max_batched_tokens * (5 * h + qkv + 3 * inter) * itemsize
    sampling = 40 * max(max_num_seqs, 1) * vocab
    reserve = activations + sampling + _GPU_SAFETY_BYTES
    available = min(budget - in_use, free) - reserve
    fit = max(0, available // (slots * per_token))
    gib = 2**30
    if cfg.max_model_len is not None:
        need = slots * cfg.max_model_len * per_token
        if cfg.max_model_len > fit:
            raise StartupError(
                f"KV cache for {max_num_seqs} sequences x {cfg.max_model_len} tokens needs "
                f"{need / gib:.1f} GiB but only {max(available, 0) / gib:.1f} GiB is available "
                f"(budget {budget / gib:.1f} GiB at --gpu-memory-utilization "
                f"{cfg.gpu_memory_utilization}, weights {weight_bytes / gib:.1f} GiB, reserve "
                f"{reserve / gib:.1f} GiB); lower --max-num-seqs or --max-model-len"
            )
        return KVPlan(cfg.max_model_len, need, budget, "as configured")
    max_len = min(limit, fit // 16 * 16)
    if max_len < 16:
        raise StartupError(
            f"no room for a KV cache: {max(available, 0) / gib:.2f} GiB left after weights "
            f"({weight_bytes / gib:.1f} GiB) and reserve; lower --max-num-seqs or raise "
            "--gpu-memory-utilization"
        )
    note = "model limit" if max_len == limit else f"shrunk to fit {budget / gib:.1f} GiB budget"
    return KVPlan(max_len, slots * max_len * per_token, budget, note)
