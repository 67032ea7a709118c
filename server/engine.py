"""The generation engine: an async front (`AsyncEngine`) and the engine thread's loop.

One engine thread owns every torch and CUDA call — loading, the KV cache, prefill and decode
steps, sampling and graph captures — so CUDA graph capture never races another thread's kernel
launch, and the asyncio event loop never blocks on the model. The event loop talks to it through
a thread-safe command queue; outputs come back, one batch per step, via
`loop.call_soon_threadsafe` into each request's `RequestStream`.

Each loop iteration (`EngineCore.serve`): apply queued commands (add, abort, shutdown), let the
scheduler plan one step (a decode token for every generating sequence plus prompt chunks under
the token budget, admitting waiting requests as KV blocks allow), launch it, read the previous
step's tokens, deliver the outputs, and offer the gap to the graph-capture policy.

Decode runs one step ahead of the host: step N+1 is launched, its input tokens taken on the
device from step N's output, before the host reads step N's tokens and does the per-token
bookkeeping (stop checks, detokenisation, delivery). The device never waits for that Python
work; the price is one wasted row when a sequence stops on a token the host had not seen yet.

Constrained rows (structured outputs, forced tool calls) need step N's token to build step
N+1's grammar mask. Such a step is queued in two parts: its forward first (inputs still taken on
the device), then the host reads step N, advances the matchers, fills the masks of the
constrained rows and queues the draw. The device computes N+1's forward meanwhile, so the
host's grammar work hides behind it instead of sitting between two device steps; the rest of
step N's bookkeeping (detokenisation, delivery) follows as usual.

A step that raises fails the requests it carried and the engine serves on (under tensor
parallelism, after settling the token broadcast the other ranks wait for). A
`FatalEngineError` (a tensor-parallel rank died or the ranks lost step) cannot be stepped past:
every request fails, the other ranks are stopped, and the engine reports `failed`, after which
the server exits non-zero.

This module imports no torch: `AsyncEngine` is built cheaply on any thread, and the model
runner (which imports torch) is imported on the engine thread, inside the "loading_weights"
phase it belongs to.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from server import early_weights, prefetch, stall_watch, torch_import, warm_start
from server.block_manager import BlockManager
from server.config import EngineConfig
from server.engine_protocol import PhaseCallback, RequestStream, route
from server.errors import (
    FatalEngineError,
    StartupError,
)
from server.gc_control import end_startup_pause, freeze_startup_heap
from server.kernel_cache import start_seeding
from server.request import RequestOutput, SamplingParams
from server.scheduler import Admission, NewRequest, ScheduledStep, Scheduler, StepResult
from server.step_timing import StepClock, StepIntervals, trace_threshold_s
from server.structured.grammar import GrammarBackend, tokenizer_json

if TYPE_CHECKING:
    from server.model_runner import ModelRunner, PendingStep
    from server.state_dir import PlanKeeper

log = logging.getLogger("graphserve.engine")

# A step that holds the engine thread past SLOW_STEP_S and SLOW_STEP_FACTOR times the recent
# average is logged (an 8B's decode step is ~5 ms, a mixed one ~10-20, a 2048-token prompt step
# ~50: past this something else held it; the average keeps a model whose steps are all long,
# on a CPU, from warning at every step).
SLOW_STEP_S = 0.25
SLOW_STEP_FACTOR = 10.0
SLOW_STEP_LOG_EVERY_S = 10.0

# While a background capture is in flight and the engine idles: how often to look for its end.
CAPTURE_POLL_S = 0.002

# Longest that readiness waits for the grammar tokenizer's build (0.3-0.7 s for a 128k
# vocabulary, started while the weights load, so normally over by then); past it the server
# becomes ready and constrained requests wait for the build instead.
GRAMMAR_BUILD_WAIT_S = 10.0


def reads_early(cfg: EngineConfig) -> bool:
    """Whether the engine thread starts `server.early_weights` before importing torch: one
    process on a GPU (or `auto`), real weights, the fast loader, and not `--no-early-weights`.
    (`early_weights.start` itself still declines what it cannot read as served.)"""
    return (cfg.device != "cpu" and cfg.early_weights and cfg.tensor_parallel_size == 1
            and cfg.load_format != "dummy" and cfg.loader != "transformers")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Event-loop side
# ---------------------------------------------------------------------------------------------


class AsyncEngine:
    """Asyncio front of the engine (implements `server.engine_protocol.EngineProtocol`).

    Constructing it is cheap and imports no torch. `start()` launches the engine thread, which
    loads the model, allocates the KV cache, captures the startup graphs and then serves.
    Phases are reported through `on_phase(phase, detail)` from the engine thread.
    """

    def __init__(self, config: EngineConfig, on_phase: PhaseCallback | None = None):
        config.validate()
        self.config = config
        self._on_phase = on_phase
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._admission = Admission(config.max_queue)
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
        launcher = None
        grammars: list[GrammarBackend] = []
        try:
            t_start = time.perf_counter()
            # Before anything imports torch: what its import does for features the engine never
            # uses waits for their first use (`server.torch_import`).
            torch_import.defer_unused()
            # Torch-free, beside the torch import; joined before any Triton lookup (the
            # workers' come later still: they warm up when rank 0 tells them to).
            seeding = start_seeding(self.config.kernel_cache)
            # GIL-free: the CUDA driver and the primary context come up while torch imports, and
            # Triton's cache key is computed (both joined later).
            gpu = self.config.device != "cpu"
            cuda_init = warm_start.start_cuda_init(0) if gpu else None
            # Beside the torch import too: with the weights read meanwhile
            # (`server.early_weights`), the load after it is too short to hide the key's hash.
            triton_prime = warm_start.start_triton_prime(0) if gpu else None
            cfg = self.config
            # Torch-free: on one GPU the weights go straight to the device while torch imports
            # (`server.early_weights`); where that does not apply, the checkpoint at least
            # streams into the page cache meanwhile.
            early = early_weights.start(cfg.model, cfg.dtype) if reads_early(cfg) else None
            if early is None and cfg.load_format != "dummy" and cfg.prefetch_threads > 0:
                prefetch.start(cfg.model, cfg.prefetch_threads)
            self._set_phase("loading_weights")
            if self.config.tensor_parallel_size > 1:
                # Torch-free: the other ranks import torch and read their weights meanwhile.
                from server.distributed.launcher import start_workers

                launcher = start_workers(self.config, on_failure=self._on_worker_failure)
            from server.model_runner import ModelRunner  # torch: part of loading, see above

            def build_grammars(tokenizer, eos_ids, vocab_size: int) -> None:
                # Started while the weights stream, in a process of its own: llguidance builds
                # its tokenizer holding the GIL (0.3-0.6 s for a 128k vocabulary). Started at
                # ready in this process it froze the first requests (8e: 560-712 ms TTFT);
                # here in this process it sat on the path to ready (8p).
                grammars.append(GrammarBackend(tokenizer_json(tokenizer), vocab_size, eos_ids))

            runner = ModelRunner(self.config, self._set_phase, launcher, build_grammars)
            if seeding is not None:
                seeding.join()
            if cuda_init is not None:
                cuda_init.finish()
            with warm_start.quick_gil_handoff():
                runner.load(t_start, triton_prime=triton_prime)
        except Exception as exc:  # startup failure: report it, the server decides to exit
            if launcher is not None:
                launcher.kill()
            prefetch.discard()
            early_weights.discard()
            for backend in grammars:
                backend.close()
            reason = str(exc) or type(exc).__name__
            expected = isinstance(exc, (StartupError, ValueError))
            log.error("engine startup failed: %s", reason, exc_info=not expected)
            end_startup_pause()  # the process lives on a while, failed: collect as usual
            self._set_phase("failed", reason)
            return
        plan = runner.kv_plan
        state = self._open_state(runner)
        scheduler = Scheduler(
            max_num_seqs=runner.max_num_seqs,
            max_model_len=runner.max_model_len,
            max_batched_tokens=runner.max_batched_tokens,
            decode_prefill_tokens=runner.decode_prefill_tokens,
            chunk_cost=runner.chunk_cost,
            eos_ids=runner.eos_ids,
            tokenizer=runner.checkpoint.tokenizer,
            admission=self._admission,
            block_manager=BlockManager(
                plan.num_blocks, plan.block_size, self.config.enable_prefix_caching
            ),
            # Its tokenizer is built on a thread of its own, started while the weights streamed
            # (`build_grammars`); readiness waits for the end of it below. The transformers
            # loader has no early hook: then it starts here, after the load.
            grammars=grammars[0] if grammars else GrammarBackend(
                tokenizer_json(runner.checkpoint.tokenizer), runner.vocab_size, runner.eos_ids
            ),
        )
        core = EngineCore(runner, scheduler, state)
        self._core = core
        self.model_name = runner.checkpoint.name
        self.max_model_len = runner.max_model_len
        self.tokenizer = runner.checkpoint.api_tokenizer
        self.vocab_size = runner.vocab_size
        self._accepting = True
        # Normally built long ago; one still building would hold the GIL into the first
        # requests (GrammarBackend.wait_built).
        scheduler.grammars.wait_built(GRAMMAR_BUILD_WAIT_S)
        freeze_startup_heap()  # no full collection scans the startup heap while serving
        self.ready.set()
        self._set_phase("ready")
        try:
            core.serve(self._commands, self._deliver)
        except FatalEngineError as exc:
            self._accepting = False
            reason = str(exc)
            log.error("engine failed: %s", reason)
            core.fail_everything(self._commands, self._deliver, reason)
            runner.close(kill=True)
            runner.release()
            self._set_phase("failed", reason)
            return
        except BaseException:
            runner.close(kill=True)
            raise
        finally:
            scheduler.grammars.close()  # its process ends with the engine
        runner.close()
        runner.release()

    def _on_worker_failure(self, reason: str) -> None:
        """A tensor-parallel worker exited on its own (a launcher watch thread calls this):
        the group is broken for good. Report `failed` now, whatever the engine thread is doing;
        its next message or collective to the dead rank raises, and the server exits
        non-zero."""
        self._accepting = False
        self._set_phase("failed", reason)

    def _open_state(self, runner: ModelRunner) -> PlanKeeper | None:
        """The saved capture plan (`--state-dir`); a problem there never fails the start."""
        from server.state_dir import open_plan_keeper

        try:
            return open_plan_keeper(self.config, runner)
        except Exception:
            log.exception("capture plan state unavailable; continuing without it")
            return None

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
        self._admission.admit(request_id, prompt_ids, params, accepting=self._accepting,
                              phase=self.phase, in_use=self._streams, vocab_size=self.vocab_size,
                              max_model_len=self.max_model_len)  # fmt: skip
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(64)
        stream = RequestStream(request_id, asyncio.get_running_loop(), choices=params.n)
        self._streams[request_id] = stream
        self._commands.put(("add", NewRequest(request_id, list(prompt_ids), params, seed)))
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

    # -- outputs (called on the engine thread) ----------------------------------------------

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        route(outputs, self._streams)

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
        report = core.runner.graph_report()
        steps = core.scheduler.steps
        report.setdefault("traffic", {})["mixed_steps"] = steps["mixed"]
        return {"phase": self.phase, **report}


# ---------------------------------------------------------------------------------------------
# Engine thread
# ---------------------------------------------------------------------------------------------


class EngineCore:
    """The engine thread's loop over a loaded `ModelRunner` and its `Scheduler`.

    Engine thread only, except `counters` (plain ints, read by other threads).
    """

    def __init__(self, runner: ModelRunner, scheduler: Scheduler,
                 state: PlanKeeper | None = None):
        self.runner = runner
        self.scheduler = scheduler
        self.state = state  # saves the capture plan (file IO: only while idle, and at exit)
        self.step_errors = 0
        self._pending: PendingStep | None = None  # the step in flight
        self._pending_kind = "decode"  # its kind, for the step cadence
        self.step_intervals = StepIntervals()  # read by other threads (snapshot)
        self._clock = StepClock(self.step_intervals, time.perf_counter, trace_threshold_s())
        self._slow_logged_at = -SLOW_STEP_LOG_EVERY_S  # when a slow step was last logged
        self._step_avg = 0.0  # moving average of a step's seconds (`_log_if_slow`)
        # Set by `serve`: `server.stall_watch` logs, while it lasts, a loop iteration (or one
        # idle capture) holding this thread past its threshold, wherever the time goes.
        self._beat: stall_watch.Heartbeat | None = None

    def serve(self, commands: queue.SimpleQueue, deliver_outputs) -> None:
        """Run until a shutdown command; raises FatalEngineError when the engine cannot go on
        (the caller then calls `fail_everything`)."""
        sched = self.scheduler
        beat = self._beat = stall_watch.heartbeat("engine loop")
        try:
            while True:
                busy = sched.busy or self._pending is not None
                beat.idle()
                if not self._apply_commands(commands, block=not busy):
                    break
                beat.begin()
                if sched.busy or self._pending is not None:
                    self._step()
                outputs = sched.take_outputs()
                if outputs:
                    deliver_outputs(outputs)
                self._offer_capture(commands)
                if self.state is not None and not sched.busy and self._pending is None:
                    self.state.maybe_save(idle=True)
        finally:
            stall_watch.forget(beat)
            self._beat = None
        sched.abort_all("engine shut down")
        deliver_outputs(sched.take_outputs())
        if self.state is not None:
            self.state.close()

    def fail_everything(self, commands: queue.SimpleQueue, deliver_outputs, reason: str) -> None:
        """After a fatal error: every request, queued ones included, ends with an error."""
        self._pending = None
        sched = self.scheduler
        while True:
            try:
                cmd, arg = commands.get_nowait()
            except queue.Empty:
                break
            if cmd == "add":
                sched.add(arg)
        every = [seq for choices in sched.by_id.values() for seq in choices]
        sched.fail(every, f"the engine failed: {reason}")
        deliver_outputs(sched.take_outputs())

    def _apply_commands(self, commands: queue.SimpleQueue, block: bool) -> bool:
        """Apply queued commands; block briefly when idle. Returns False on shutdown."""
        # While graphs remain to capture, wake up after the idle debounce to offer idle time.
        timeout = None
        if block:
            waits = [w for w in (self.runner.policy.idle_wait_s(),
                                 self.runner.mixed_policy.idle_wait_s()) if w is not None]
            if self.runner.background is not None and self.runner.background.in_flight is not None:
                waits.append(CAPTURE_POLL_S)  # report it soon, then go on capturing idle
            timeout = min(waits) if waits else None
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
                self.runner.policy.on_arrival()  # idle capture stops, the debounce restarts
                self.runner.mixed_policy.on_arrival()
                self.scheduler.add(arg)
            elif cmd == "abort":
                self.scheduler.abort(arg)
            elif cmd == "shutdown":
                return False

    def _step(self) -> None:
        """Launch the next step, then read the previous one's tokens.

        The host stays one step ahead of the device: step N+1 is queued (decode inputs taken
        on the device from step N's output) before the host waits for step N and does its
        bookkeeping — stop checks, detokenisation, handing text to the event loop — so that
        host work overlaps the device's instead of adding to every inter-token gap. A sequence
        that step N finishes (a stop token, an abort) has had one more token computed in step
        N+1, which is dropped; sequences that step N's token surely ends (max_tokens, context
        length) are left out of step N+1.

        If anything raises, the requests of both steps fail (their tokens are lost) and the
        engine serves on with the rest; a FatalEngineError propagates instead.
        """
        prev, self._pending = self._pending, None
        prev_kind = self._pending_kind
        step: ScheduledStep | None = None
        sched, runner = self.scheduler, self.runner
        t0 = time.perf_counter()
        launched_at: float | None = None
        try:
            step = sched.schedule()
            read: StepResult | None = None
            if step is not None:
                sampled = step.sampled
                if sched.has_constrained(sampled):
                    launched = runner.launch(step, prev)
                    if prev is not None:
                        read = runner.read(prev)  # N+1's forward keeps the device busy
                        masks = sched.advance_and_fill(prev.seqs, read.tokens, sampled,
                                                       runner.mask_words)
                    else:
                        masks = sched.fill_masks(sampled, runner.mask_words)
                    self._pending = runner.sample(launched, masks)
                else:
                    self._pending = runner.run_step(step, prev)
                self._pending_kind = "mixed" if step.prefill else "decode"
                sched.launched(step)
                # For the step trace; a constrained step has read the previous one by now.
                launched_at = time.perf_counter()
            if prev is not None:
                if read is None:
                    read = runner.read(prev)
                    sched.advance_grammars(prev.seqs, read.tokens)
                self._clock.read(prev_kind, more_in_flight=self._pending is not None,
                                 started=t0, launched=launched_at, context=self._trace_context)
                sched.complete(prev.seqs, read)
            self._log_if_slow(time.perf_counter() - t0, step)
        except FatalEngineError:
            raise
        except Exception as exc:
            self._clock.reset()
            # A step whose draw was never queued still owes the other tensor-parallel ranks
            # its token broadcast; settling it keeps their collectives paired (it raises
            # FatalEngineError when it cannot).
            runner.settle()
            self.step_errors += 1
            failed = list(prev.seqs) if prev is not None else []
            if step is not None:
                failed += step.decode + [item.seq for item in step.prefill]
            if self._pending is not None:
                failed += self._pending.seqs
                self._pending = None
            failed = list({id(s): s for s in failed}.values())
            log.exception("engine step failed; failing its %d requests", len(failed))
            self.scheduler.fail(failed, f"internal error during generation: {exc}")

    def _trace_context(self) -> str:
        """What a traced step interval adds to its line: the capture in flight, if any."""
        background = self.runner.background
        job = background.in_flight if background is not None else None
        if job is None:
            return ""
        return f"capturing {'bucket' if job.mixed else 'size'} {job.size} on the capture thread"

    def _log_if_slow(self, seconds: float, step: ScheduledStep | None) -> None:
        """One warning (at most every SLOW_STEP_LOG_EVERY_S) for a step that held the engine
        thread past SLOW_STEP_S and SLOW_STEP_FACTOR x the recent average: every running
        stream waited that long, and the log says when and what the step carried (a kernel
        compiled at first use, a stall of the process)."""
        average, self._step_avg = self._step_avg, 0.9 * self._step_avg + 0.1 * seconds
        if seconds < max(SLOW_STEP_S, SLOW_STEP_FACTOR * average):
            return
        now = time.perf_counter()
        if now - self._slow_logged_at < SLOW_STEP_LOG_EVERY_S:
            return
        self._slow_logged_at = now
        what = "no new step" if step is None else (
            f"{len(step.decode)} decode rows and "
            f"{sum(item.length for item in step.prefill)} prompt tokens")
        log.warning("engine step took %.2f s (launching %s, reading the previous step)",
                    seconds, what)

    def _offer_capture(self, commands: queue.SimpleQueue) -> None:
        """Give the gap between steps (or idle time) to the capture policy.

        A busy-time capture goes to the capture thread where there is one
        (`server.background_capture`): the steps go on meanwhile, and nothing else is
        captured until it has been reported here, at a later step boundary.
        """
        sched, runner = self.scheduler, self.runner
        if runner.poll_capture():
            return
        while True:
            running = len(sched.running) + len(sched.prefilling)
            waiting = len(sched.waiting) + commands.qsize()
            busy = running + waiting > 0
            size, mixed = self._next_capture(running, waiting)
            if size is None:
                return
            if self._beat is not None and not busy:
                self._beat.begin()  # idle captures follow one another: each is its own unit
            runner.capture(size, mixed=mixed, background=busy)
            if runner.poll_capture():
                return
            if sched.busy or not commands.empty():
                return  # at most one capture per gap while serving

    def _next_capture(self, running: int, waiting: int) -> tuple[int | None, bool]:
        """What to capture in this gap: (size, whether a mixed-step bucket) or (None, False).

        Decode sizes first, then mixed-step buckets (idle: after the decode sizes; busy: on the
        capture thread only, wanted ones first, then the rest speculatively, largest first).
        Decode sizes are never captured speculatively: a padded decode step costs about what
        an exact one does, while a bucket's first prompt step without its graph runs eagerly.
        """
        runner = self.runner
        busy = running + waiting > 0
        size = runner.policy.next_capture(running=running, waiting=waiting)
        if size is not None:
            return size, False
        size = runner.next_mixed_capture(idle=not busy, speculative=busy)
        return size, size is not None

    def counters(self) -> dict:
        grammars = self.scheduler.grammars
        return {**self.scheduler.counters(), "step_errors": self.step_errors,
                "step_intervals": self.step_intervals.snapshot(),
                "grammar_restarts": grammars.restarts if grammars is not None else 0}
