"""The model runner: loads the checkpoint, owns the paged KV cache, runs each scheduled step.

Everything that touches a tensor happens here or below (`server.step_executor`, `server.model`,
`server.ops`, `server.graph_runner`, `server.sampling`); the scheduler above sees sequences,
blocks and token ids. A step goes in as a `ScheduledStep`, becomes a `StepPlan` (plain
integers: tokens, positions, block-table edits, the graph size to replay) and comes out as
sampled token ids.

* A decode-only step runs on a captured CUDA graph (`server.graph_runner`), padded to the
  smallest captured batch size, reading the block table from a static device buffer.
* A mixed step (decode rows plus prompt chunks) that fits a token bucket runs in the packed
  form at the bucket's width (`server.mixed_graph_runner`: decode rows as one-token chunks of
  one attention launch), replaying the bucket's graph once captured; a larger one (or one with
  prompt logprobs, or a very deep decode row) runs the unpacked eager forward: attention split
  into the decode kernel for the decode rows and one varlen prefill launch for the chunks.

The device stays one step ahead of the host: `run_step` queues step N+1 (decode inputs carried
on the device from step N's samples, host inputs staged through pinned memory, no synchronising
copy) and returns a `PendingStep`; `read` waits for that step's tokens later, after the host has
done step N's bookkeeping.

A step is queued in two parts, `launch` (the forward: graph replay or mixed step) and `sample`
(logits processing and the draw, `server.logits_processors`). `run_step` does both at once;
the engine splits them when the step has constrained rows: their grammar masks need step N's
tokens, which the host reads while step N+1's forward is already queued, so the device stays
busy while the host advances the matchers and fills the masks.

Logprobs and prompt logprobs are computed on the device with the draw and copied back with the
tokens; a mixed step keeps the logits of every prompt position of the sequences that want
prompt logprobs (`StepPlan.logit_rows` lists them after the sampled rows).

Block table sync: each admitted sequence owns one row of the device block table; before a step,
only the entries a sequence gained since the last sync are written (one small scatter per step,
planned by `server.step_plan.StepPlanner`).

Tensor parallelism (`--tensor-parallel-size N`): this process is rank 0. It starts ranks
1..N-1 (`server.distributed.launcher`), each loading its shard, and keeps them in lockstep: the
KV pool is the smallest any rank fits, every step's plan is sent to all ranks before rank 0
runs it, every warm-up and capture is an order in the same stream, and each capture ends in an
agreement (all ranks captured, or the size is failed everywhere). Rank 0 alone schedules,
samples and decides: the logits processors, logprobs and grammar masks run on rank 0's full
logits (the LM head's slices are all-gathered), and its sampled tokens go to the workers by a
broadcast at the end of each sampling step (`sample`). A failure in the forward after a step
was sent, or in a collective (a worker gone), cannot be stepped past, since the ranks'
collectives would no longer pair up: it raises `FatalEngineError` and the engine fails. A
failure between `launch` and the broadcast on rank 0's host side (a logits processor, a
grammar) is settled instead (`settle`: the workers get a broadcast of zeros they never read)
and only that step's requests fail.

Thread ownership: engine thread only. `load` reports its phases through `set_phase`; the
launcher's watch threads report a dead worker through it too (`failed`).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass

import torch

from server import ops
from server.background_capture import BackgroundCapture, CaptureJob
from server.config import EngineConfig
from server.distributed.launcher import TPLauncher, start_workers
from server.distributed.protocol import Kind
from server.distributed.report import tensor_parallel_report
from server.distributed.sharding import TPShard
from server.engine_protocol import PhaseCallback
from server.errors import FatalEngineError, StartupError
from server.gc_control import no_collection
from server.graph_warmup import CapturePolicy
from server.kv_cache import KVPlan, agree, plan_kv_cache
from server.logits_processors import PenaltyState, process_and_sample, prompt_logprobs
from server.mixed_graph_policy import MixedGraphPolicy
from server.model_loader import load_checkpoint
from server.request import token_logprobs
from server.scheduler import ChunkCost, ScheduledStep, Sequence, StepResult, prefill_depth_unit
from server.step_executor import StepExecutor
from server.step_plan import StepPlan, StepPlanner, warmup_plans

log = logging.getLogger("graphserve.engine")

# Test seam: on CPU, "capture" graphs that replay the eager step (graph_runner's docstring).
EMULATE_GRAPHS_ENV = "GRAPHSERVE_EMULATE_GRAPHS"


@dataclass
class Launched:
    """A step whose forward is queued and whose draw is not (`ModelRunner.launch`)."""

    sampled: list[Sequence]  # rows of `logits`, in order; prompt rows follow
    logits: torch.Tensor | None
    prompt_rows: list[tuple[Sequence, int]]  # (sequence, position of the target token)
    prompt_targets: list[int]


@dataclass
class PendingStep:
    """A step launched on the device whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]  # the sequences it samples for, in row order
    tokens: torch.Tensor  # int64 [n] on the device: the next step reads its inputs from here
    host: dict[str, torch.Tensor]  # host copies ("tokens", logprobs...), valid once `ready`
    ready: torch.cuda.Event | None  # recorded after the copies (None on CPU: already valid)
    prompt_rows: list[tuple[Sequence, int]]


class ModelRunner:
    """Model, paged KV cache, decode graphs, the mixed-step forward, sampling, and (under
    tensor parallelism) the other ranks.

    After `load()`: `max_model_len`, `max_num_seqs`, `max_batched_tokens`, `vocab_size`,
    `eos_ids`, `kv_plan` (blocks), `checkpoint` (tokenizers, name), `policy`, `graphs`,
    `executor` and, with N > 1 ranks, `tp` (the launcher) and `comm` are set.
    """

    def __init__(self, config: EngineConfig, set_phase: PhaseCallback,
                 launcher: TPLauncher | None = None, on_tokenizer=None):
        """`launcher`: the workers, already started (`launcher.start_workers`, which the engine
        thread calls before it imports torch); started by `load` when not given.
        `on_tokenizer`: see `model_loader.load_checkpoint`."""
        self.config = config
        self._on_tokenizer = on_tokenizer
        self._set_phase = set_phase
        self.timings: dict[str, float] = {}
        self.world = config.tensor_parallel_size
        self.tp: TPLauncher | None = launcher
        self.comm = None
        self._rank_devices: list[dict] = []
        self.tp_allreduce: str | None = None  # nccl | symm-mem, once rank 0 has chosen
        self._rank_captures: dict[int, list[dict]] = {}  # size -> each rank's CaptureResult
        self._stopped_tp: TPLauncher | None = None
        self._owed = 0  # tokens a launched step owes the workers' broadcast (see `settle`)
        self.background: BackgroundCapture | None = None  # busy captures' thread (one GPU)
        self._triton_prime = None  # a server.warm_start thread, joined before the warm-ups

    # -- startup ----------------------------------------------------------------------------

    def load(self, t_start: float | None = None, *, triton_prime=None) -> None:
        """Weights, KV cache, startup graphs; raises StartupError (or ModelLoadError).

        The caller has reported "loading_weights" already: importing this module (torch) is
        part of loading. `t_start`: when that import began, so `timings["import_s"]` holds it.
        A failing start stops any workers it started. `triton_prime`: a
        `server.warm_start.WarmStart` computing Triton's cache key, joined before the warm-ups.
        """
        self._triton_prime = triton_prime
        try:
            self._load(time.perf_counter() if t_start is None else t_start)
        except FatalEngineError as exc:  # a worker failed or missed a deadline while starting
            self.close(kill=True)
            raise StartupError(str(exc)) from exc
        except BaseException:
            self.close(kill=True)
            raise

    def _load(self, t_start: float) -> None:
        cfg = self.config
        self.timings["import_s"] = time.perf_counter() - t_start
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise StartupError("--device cuda was requested but no CUDA GPU is available")
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        device = "cuda" if cuda else "cpu"
        self.device = torch.device(device)
        if cuda:
            torch.cuda.set_device(0)
            # cuDNN's SDPA failed intermittently under graph capture on the H100 (see notes).
            torch.backends.cuda.enable_cudnn_sdp(False)
        emulate = not cuda and os.environ.get(EMULATE_GRAPHS_ENV) == "1"
        if not cuda and self.world > 1:
            from server.distributed.comm import share_cpu_threads
            share_cpu_threads(self.world)
        if self.world > 1:
            self._check_workers(device)
        t0 = time.perf_counter()
        self.checkpoint = load_checkpoint(
            cfg.model, device, cfg.dtype, cfg.served_model_name, loader=cfg.loader,
            load_format=cfg.load_format, shard=TPShard(0, self.world),
            on_tokenizer=self._on_tokenizer,
        )  # fmt: skip
        # A transformers fallback imports transformers inside the load: count that as import.
        self.timings["import_s"] += self.checkpoint.import_s
        self.timings["weights_s"] = time.perf_counter() - t0 - self.checkpoint.import_s
        hf_config = self.checkpoint.config
        self.eos_ids = self.checkpoint.eos_token_ids
        log.info(
            "loaded %s (%s, %.2f GB of weights%s) in %.2f s with the %s loader",
            self.checkpoint.path,
            hf_config.model_type,
            self.checkpoint.weight_bytes / 1e9,
            f" on rank 0 of {self.world}" if self.world > 1 else "",
            self.timings["weights_s"],
            self.checkpoint.loader,
        )

        self._set_phase("allocating_kv_cache", None)
        t0 = time.perf_counter()
        self.max_num_seqs = cfg.max_num_seqs_for(device)
        self.max_batched_tokens = cfg.max_num_batched_tokens_for(device)
        self.decode_prefill_tokens = cfg.decode_prefill_tokens_for(device)
        model = self.checkpoint.model
        depth = cfg.decode_prefill_depth
        if depth is None:
            depth = prefill_depth_unit(model.shape) if cuda else 0
        self.chunk_cost = ChunkCost(float(depth), model.shape.sliding_window)
        disabled = None
        if not (cuda or emulate) and cfg.graph_capture != "off":
            disabled = "CUDA graphs need a CUDA device; running eagerly on CPU"
        # Mixed steps stay unpacked and eager on a CPU: padding to a bucket would cost real
        # compute there, with no graph to win back.
        self.mixed_policy = MixedGraphPolicy.from_config(
            cfg, self.max_num_seqs, self.decode_prefill_tokens, self.max_batched_tokens,
            None if cuda or emulate else "no CUDA device: mixed steps run eagerly",
        )  # fmt: skip
        plan = plan_kv_cache(
            cfg,
            hf_config,
            model.dtype,
            self.device,
            self.max_num_seqs,
            self.max_batched_tokens,
            self.checkpoint.weight_bytes,
            self.world,
            self.mixed_policy.max_tokens,
            external_bytes=getattr(model, "external_weight_bytes", 0),
        )
        if self.tp is not None:
            plan = self._join_workers(plan, model, emulate)
        self.kv_plan: KVPlan = plan
        self.max_model_len = plan.max_model_len
        model.init_rope(self.max_model_len)
        self.model = model
        self.checkpoint.model = None  # the runner owns the model from here on
        self.vocab_size = model.shape.vocab_size
        self.executor = StepExecutor.build(
            model, plan.num_blocks, plan.block_size, plan.max_model_len, self.max_num_seqs,
            emulate=emulate, tensor_parallel=self.tp is not None,
            mixed_tokens=self.mixed_policy.max_tokens,
        )  # fmt: skip
        self.kv_cache = self.executor.kv_cache
        self.block_tables = self.executor.block_tables
        self.graphs = self.executor.graphs
        self.scratch_row = self.graphs.scratch_row
        self.penalties = PenaltyState(self.max_num_seqs, self.vocab_size, self.device)
        triton = ops.use_triton(cuda)
        self.timings["kv_cache_s"] = time.perf_counter() - t0
        log.info(
            "KV cache: %d blocks x %d tokens = %.2f GB%s, context %d tokens (%s); kernels: %s",
            plan.num_blocks,
            plan.block_size,
            plan.kv_bytes / 1e9,
            " per rank" if self.world > 1 else "",
            plan.max_model_len,
            plan.note,
            "triton" if triton else "torch",
        )

        self._set_phase("capturing_graphs", None)
        t0 = time.perf_counter()
        self.policy = CapturePolicy.from_config(cfg, self.max_num_seqs, disabled_reason=disabled)
        if plan.budget_bytes is not None:
            self.policy.set_memory(plan.budget_bytes, plan.kv_bytes, self.checkpoint.weight_bytes)
        self.planner = StepPlanner(self.max_num_seqs, lambda n: self.policy.select(n).size or 0,
                                   self.mixed_policy.select)  # fmt: skip
        # Lazy on one GPU: the other graphs are instantiated while serving (graph_runner).
        self.graphs.throwaways = cfg.graph_capture == "lazy" and self.tp is None
        self._startup_graphs(cuda or emulate)
        # Busy-time captures off the engine thread (`server.background_capture`): one GPU only.
        if self.tp is None and cfg.busy_capture == "background" and self.policy.reason is None:
            self.background = BackgroundCapture(self.graphs.prepare_capture_thread)
            if not self.background.usable:
                self.background = None
        self.policy.set_busy_capture("background" if self.background else "inline")
        self.policy.mark_ready()
        self.timings["graphs_s"] = time.perf_counter() - t0
        self.timings["load_total_s"] = time.perf_counter() - t_start
        log.info("startup graphs done in %.2f s (%s)", self.timings["graphs_s"], self._describe())

    # -- tensor-parallel startup ------------------------------------------------------------

    def _check_workers(self, device: str) -> None:
        """Start the workers unless the engine thread did, and check there is a GPU each."""
        if self.tp is None:
            self.tp = start_workers(self.config, on_failure=self._on_worker_failure)
        if device != "cuda" and self.config.tp_allreduce == "symm-mem":
            raise StartupError("--tp-allreduce symm-mem needs CUDA GPUs; use nccl (gloo on CPU)")
        if device == "cuda" and torch.cuda.device_count() < self.world:
            raise StartupError(
                f"--tensor-parallel-size {self.world} needs {self.world} GPUs; this host has "
                f"{torch.cuda.device_count()}"
            )

    def _join_workers(self, plan: KVPlan, model, emulate: bool) -> KVPlan:
        """Agree on the KV pool (the smallest any rank fits), join the process group, and
        wait until every worker has its cache; returns the agreed plan."""
        from server.distributed.comm import choose_allreduce, create_store, init_group

        cfg, tp = self.config, self.tp
        self.tp_allreduce = choose_allreduce(cfg.tp_allreduce, self.device.type, self.world)
        # Workers started loading before rank 0 did; a generous multiple of the agreement
        # deadline covers a slower disk under one of them.
        loaded = tp.collect(Kind.LOADED, 0, timeout_s=10 * cfg.tp_timeout_s)
        plan = agree(plan, min(r["num_blocks"] for r in loaded), cfg)
        store = create_store(self.world, cfg.tp_timeout_s)
        seq = tp.send_json(Kind.SETUP, {
            "num_blocks": plan.num_blocks, "max_model_len": plan.max_model_len,
            "store_port": store.port, "emulate_graphs": emulate,
            "mixed_tokens": self.mixed_policy.max_tokens, "tp_allreduce": self.tp_allreduce,
        })  # fmt: skip
        self.comm = init_group(0, self.world, self.device, cfg.tp_timeout_s, store=store)
        if self.tp_allreduce == "symm-mem":  # every rank, right after joining (collective)
            self.comm.enable_symm_mem(self.max_num_seqs, model.shape.hidden_size, model.dtype,
                                      self.device, cfg.tp_timeout_s)  # fmt: skip
        model.attach_comm(self.comm)
        self._rank_devices = [r["device"] for r in tp.collect(Kind.READY, seq)]
        log.info("tensor-parallel group of %d ranks ready (workers: %s)", self.world,
                 ", ".join(f"pid {p}" for p in tp.pids()))
        return plan

    def _on_worker_failure(self, reason: str) -> None:
        """See `server.engine.AsyncEngine._on_worker_failure` (the same, for runners built
        without an engine)."""
        self._set_phase("failed", reason)

    # -- startup graphs ---------------------------------------------------------------------

    def _startup_graphs(self, graphs_possible: bool) -> None:
        """Warm-ups on every rank, then the policy's startup captures (lazy: the largest)."""
        if self._triton_prime is not None:  # the warm-ups' first kernel looks Triton's key up
            self._triton_prime.finish()
            self._triton_prime = None
        self._warm_mixed_step()
        if not graphs_possible:
            self._warm(self.max_num_seqs)  # still exercise the step, so the first one is fast
            return
        self._warm_gemm_rows()
        # Eager runs at the largest size on the capture stream first: cuBLAS creates its
        # workspace and Triton compiles its kernels outside any graph pool.
        for n in sorted({self.max_num_seqs, 1}, reverse=True):
            self._warm(n)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        plan = self.policy.startup_plan()
        if not plan:
            return
        if len(plan) > 1:
            # One collection before a bulk, not per graph. Lazy startup captures a single
            # graph: a full collection of the torch + transformers heap (~0.2 s measured on
            # the H100 box) would only delay readiness.
            gc.collect()
        with no_collection():
            for size in plan:
                if not self.policy.active:  # the largest failed: the policy is off, serve eagerly
                    break
                self.capture(size)
        if self.policy.reason is not None:  # off: the largest decode capture failed
            self.mixed_policy.disable(self.policy.reason)
        for size in self.mixed_policy.startup_plan():  # eager mode: every bucket before ready
            self.capture(size, mixed=True)

    def _warm(self, n: int) -> None:
        if self.tp is not None:
            self.tp.send_json(Kind.WARM, {"n": n})
        self.graphs.warm(n)

    def _warm_gemm_rows(self) -> None:
        """cuBLAS's first call at a row count holds every thread for ~2 steps
        (`DecoderModel.warm_gemms`): make it here, before ready and with no stream running, at
        every row count a graph runs its projections at (each decode size, each bucket)."""
        mixed = self.mixed_policy.sizes if self.mixed_policy.packing else ()
        rows = sorted({*self.policy.sizes, *mixed})
        t0 = time.perf_counter()
        if self.tp is not None:  # (on CPU too, where the ranks' warm_gemms do nothing)
            self.tp.send_json(Kind.WARM, {"gemm_rows": rows, "logits_rows": self.max_num_seqs})
        for n in rows:
            self.model.warm_gemms(n, self.max_num_seqs)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            log.info("GEMMs warmed at %d row counts in %.3f s", len(rows),
                     time.perf_counter() - t0)

    def _warm_mixed_step(self) -> None:
        """Run the `warmup_plans` mixed steps so their kernels (both prefill attention tiles
        and the split-KV merge among them) compile now, not in a request's time to first
        token."""
        buckets = self.mixed_policy.sizes if self.mixed_policy.packing else ()
        for plan in warmup_plans(self.scratch_row, self.max_model_len, self.max_batched_tokens,
                                 buckets):  # fmt: skip
            self._execute(plan, None)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- steps ------------------------------------------------------------------------------

    def run_step(self, step: ScheduledStep, prev: PendingStep | None,
                 masks=None) -> PendingStep | None:
        """Queue `step` on the device (forward and draw); nothing here waits for it. None if
        it computes nothing the host reads (prompt chunks that complete no prompt)."""
        return self.sample(self.launch(step, prev), masks)

    def launch(self, step: ScheduledStep, prev: PendingStep | None) -> Launched:
        """Queue the step's forward on every rank; nothing here waits for it.

        A decode row whose input token is still in flight takes it from `prev.tokens` on the
        device; every other token comes from the host.
        """
        if prev is not None and not prev.seqs:
            prev = None  # a step that sampled nothing (prompt logprobs only) carries no tokens
        planned = self.planner.plan(step, prev.seqs if prev is not None else None)
        for seq in planned.new_rows:
            if seq.params.penalized:  # nothing is in flight for it: the host's view is whole
                self.penalties.init_row(seq.row, seq.prompt_ids, seq.output_ids)
        logits = self._execute(planned.plan, prev.tokens if prev is not None else None)
        return Launched(step.sampled, logits, planned.prompt_rows, planned.prompt_targets)

    def _execute(self, plan: StepPlan, prev_tokens) -> torch.Tensor | None:
        """Run `plan`'s forward on every rank; returns rank 0's full logits."""
        if self.tp is None:
            return self.executor.execute(plan, prev_tokens)
        self.tp.send(Kind.STEP, plan.encode())
        try:
            logits = self.executor.execute(plan, prev_tokens)
        except Exception as exc:
            raise self._fatal(exc) from exc
        self._owed = plan.num_sampled  # the workers now wait for these tokens (`sample`)
        return logits

    def sample(self, launched: Launched, masks=None) -> PendingStep | None:
        """Queue the draw (and logprobs) of a launched step, the token broadcast to the other
        ranks, and the copies back to the host. `masks`: grammar bitmasks of the sampled rows
        (numpy int32), or None."""
        sampled = launched.sampled
        if not sampled and not launched.prompt_rows:
            return None
        out: dict[str, torch.Tensor] = {}
        tokens = torch.empty(0, dtype=torch.int64, device=self.device)
        if sampled:
            result = process_and_sample(
                launched.logits[: len(sampled)],
                [s.params for s in sampled],
                [s.row for s in sampled],
                [s.key for s in sampled],
                [s.num_sampled for s in sampled],
                self.penalties,
                self.eos_ids,
                masks,
            )
            tokens = result.tokens
            if self._owed:
                self._broadcast(tokens)
            out["tokens"] = tokens
            if result.logprobs is not None:
                out["lp"] = result.logprobs
            if result.top_ids is not None:
                out["top_ids"], out["top_lp"] = result.top_ids, result.top_logprobs
        if launched.prompt_rows:
            k = max(seq.params.prompt_logprobs or 0 for seq, _ in launched.prompt_rows)
            chosen, top_ids, top_lp = prompt_logprobs(
                launched.logits[len(sampled):], launched.prompt_targets, k
            )
            out["p_lp"] = chosen
            if top_ids is not None:
                out["p_top_ids"], out["p_top_lp"] = top_ids, top_lp
        if self.device.type != "cuda":
            return PendingStep(sampled, tokens, out, None, launched.prompt_rows)
        host = {}
        for name, t in out.items():
            host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host[name].copy_(t, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return PendingStep(sampled, tokens, host, ready, launched.prompt_rows)

    def _broadcast(self, tokens: torch.Tensor) -> None:
        """Rank 0's sampled tokens to the workers (the next step's carried inputs there)."""
        self._owed = 0
        try:
            self.comm.broadcast_from_rank0(tokens)
        except Exception as exc:
            raise self._fatal(exc) from exc

    def settle(self) -> None:
        """After a step failed on the host between `launch` and its broadcast: send the
        workers the broadcast they wait for (zeros, which no later step reads: the engine
        drops the failed step), so every rank's collectives still pair up. Nothing to do in
        one process or when nothing is owed; raises FatalEngineError if the broadcast fails."""
        if self._owed and self.tp is not None:
            self._broadcast(torch.zeros(self._owed, dtype=torch.int64, device=self.device))
        self._owed = 0

    def _fatal(self, exc: Exception) -> FatalEngineError:
        """A failure after the other ranks started a step: their collectives can no longer
        pair up. A collective that raised usually means a peer died: name that."""
        cause = self._peer_failure(wait_s=2.0)
        return FatalEngineError(cause or (
            "a tensor-parallel step failed on rank 0 after the other ranks had started it "
            f"(their collectives can no longer pair up): {type(exc).__name__}: {exc}"
        ))

    def _peer_failure(self, wait_s: float) -> str | None:
        """The launcher's account of a dead worker, waiting up to `wait_s` for its watcher."""
        deadline = time.monotonic() + wait_s
        while self.tp.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.tp.failure

    def read(self, step: PendingStep) -> StepResult:
        """What the step computed for the host (blocks until the device has produced it)."""
        if step.ready is not None:
            step.ready.synchronize()  # releases the GIL while the device finishes
        host = step.host
        tokens = host["tokens"].tolist() if "tokens" in host else []
        result = StepResult(tokens)
        if "lp" in host:
            result.logprobs = token_logprobs(
                [s.params.logprobs for s in step.seqs], tokens, host["lp"].tolist(),
                host["top_ids"].tolist() if "top_ids" in host else None,
                host["top_lp"].tolist() if "top_lp" in host else None,
            )
        if step.prompt_rows:
            entries = token_logprobs(
                [seq.params.prompt_logprobs for seq, _ in step.prompt_rows],
                [seq.prompt_ids[pos] for seq, pos in step.prompt_rows],
                host["p_lp"].tolist(),
                host["p_top_ids"].tolist() if "p_top_ids" in host else None,
                host["p_top_lp"].tolist() if "p_top_lp" in host else None,
            )
            result.prompt = [
                (seq, pos, entry) for (seq, pos), entry in zip(step.prompt_rows, entries,
                                                               strict=True)
            ]
        return result

    @property
    def mask_words(self) -> int:
        """Width of a grammar bitmask row (int32 words) for this vocabulary."""
        return (self.vocab_size + 31) // 32

    # -- graphs -----------------------------------------------------------------------------

    def capture(self, size: int, mixed: bool = False, background: bool = False) -> None:
        """Capture decode batch size `size` (or, `mixed`, the mixed-step bucket of `size`
        tokens) on every rank at this step boundary and record the agreement.

        `background` (a busy-time capture): hand it to the capture thread when there is one and
        return at once; `poll_capture` reports it once it has ended.

        It counts as captured only if every rank captured it; a failure on any rank marks it
        failed for all (rank 0 never dispatches a step onto it, so the workers' own graph is
        never replayed; a mixed step of that bucket runs packed, eagerly, on every rank). A
        worker that is gone, errs or stays silent past `--tp-timeout` raises
        FatalEngineError after the size is marked failed.
        """
        policy = self.mixed_policy if mixed else self.policy
        runner = self.executor.mixed if mixed else self.graphs
        policy.begin(size)
        if background and self.background is not None:
            try:
                self.background.start(CaptureJob(
                    size, mixed, lambda: runner.capture_detached(size, background=True),
                    lambda graph: runner.install(size, graph),
                ))  # fmt: skip
            except RuntimeError as exc:  # the thread is gone: this size fails, the rest inline
                log.error("capture thread unavailable (%s); capturing between steps", exc)
                self.background = None
                self.policy.set_busy_capture("inline")
                policy.failed(size, f"capture thread unavailable: {exc}")
            return
        t0 = time.perf_counter()
        try:
            order = {"size": size, "mixed": mixed}
            seq = self.tp.send_json(Kind.CAPTURE, order) if self.tp else None
            local = runner.capture(size)
            results = [local.to_json()]
            if self.tp is not None:
                results += self.tp.collect(Kind.CAPTURED, seq)
            if any(r.get("size") != size for r in results):
                raise FatalEngineError(f"the ranks captured different sizes: {results}")
        except FatalEngineError as exc:
            policy.failed(size, str(exc))
            raise
        if not mixed:
            self._rank_captures[size] = results
        failed = [f"rank {r}: {res['error']}" for r, res in enumerate(results) if not res["ok"]]
        if failed:
            policy.failed(size, "; ".join(failed))
        else:
            # What the busy-time budget bounds: rank 0's whole stall, waiting for peers included.
            policy.succeeded(size, time.perf_counter() - t0, local.pool_bytes)

    def poll_capture(self, timeout: float = 0.0) -> bool:
        """Report a background capture that has ended (engine thread, between steps; waiting
        up to `timeout` seconds for it); True while one is still in flight."""
        if self.background is None or self.background.in_flight is None:
            return False
        done = self.background.poll(timeout)
        if done is None:
            return True
        self._report_background(*done)
        return False

    def _report_background(self, job: CaptureJob, result) -> None:
        policy = self.mixed_policy if job.mixed else self.policy
        if not job.mixed:
            self._rank_captures[job.size] = [result.to_json()]
        if result.ok:
            # The engine thread stalled for none of it: it only handed the size over and
            # installed the graph. The capture's own time is reported beside that.
            policy.succeeded(job.size, 0.0, result.pool_bytes, off_thread_s=result.seconds)
        else:
            policy.failed(job.size, result.error or "unknown error")

    def next_mixed_capture(self, idle: bool, speculative: bool = False) -> int | None:
        """The mixed-step bucket to capture now, or None: in idle time once the decode sizes
        are settled, while busy only with a capture thread; never without the decode graphs'
        pool (the policy turns itself off)."""
        if self.policy.reason is not None:
            self.mixed_policy.disable(self.policy.reason)
            return None
        return self.mixed_policy.next_capture(idle, decode_settled=self.policy.complete,
                                              background=self.background is not None,
                                              speculative=speculative)  # fmt: skip

    # -- shutdown ---------------------------------------------------------------------------

    def close(self, kill: bool = False) -> None:
        """Stop the other ranks (engine thread, after the last step; idempotent).

        `kill`: the group is broken (or never formed): no SHUTDOWN, the workers are killed
        and rank 0 aborts its side of the group instead of the collective teardown.
        """
        background, self.background = self.background, None
        if background is not None:  # a capture in flight ends first (release frees its pool)
            done = background.close()
            if done is not None:
                self._report_background(*done)
        tp, self.tp = self.tp, None
        if tp is None:
            return
        self._stopped_tp = tp  # /health/graphs still shows how each worker ended
        broken = kill or tp.failure is not None
        if broken:
            tp.kill()
        else:
            tp.shutdown()  # the workers leave the group as rank 0 does, below
        if self.comm is not None:
            self.comm = None
            from server.distributed.comm import leave_group

            if not leave_group(broken, wait_s=10.0):
                log.warning("leaving the tensor-parallel group did not finish in 10 s")
        tp.join()

    def release(self) -> None:
        """Give the device memory back (engine thread, after `close`): weights, KV pool, graphs
        and staging buffers. Without it a second engine in the same process (the GPU tests, an
        in-process restart) finds the first one's pool still reserved and cannot size its own.
        Reports still work afterwards: they read plans and policy state, not tensors."""
        if self.device.type != "cuda":
            return
        self.graphs.release()
        if self.executor.mixed is not None:
            self.executor.mixed.release()
        self.executor = self.model = self.kv_cache = self.block_tables = self.penalties = None
        gc.collect()
        torch.cuda.empty_cache()

    # -- introspection ----------------------------------------------------------------------

    def _describe(self) -> str:
        cov = self.policy.snapshot().get("coverage", {})
        return (f"mode={self.policy.mode}, captured {cov.get('captured', 0)}/"
                f"{cov.get('total', 0)} sizes")  # fmt: skip

    def graph_report(self) -> dict:
        report = self.policy.snapshot()
        report["mixed"] = self.mixed_policy.snapshot()
        report["device"] = self.graphs.device_info()
        report["startup_timings_s"] = dict(self.timings)
        report["weights_bytes"] = self.checkpoint.weight_bytes  # per rank under TP
        report["kv_cache"] = {
            "num_blocks": self.kv_plan.num_blocks - 1,
            "block_size": self.kv_plan.block_size,
            "bytes": self.kv_plan.kv_bytes,
            "max_model_len": self.kv_plan.max_model_len,
            "note": self.kv_plan.note,
        }
        if self.world > 1:
            report["tensor_parallel"] = self._tp_report(report["sizes"])
        return report

    def _tp_report(self, sizes: list[dict]) -> dict:
        """Each rank's process, device and captures (`server.distributed.report`). Called on
        the event loop while the engine thread may record a capture: it reads a copy
        (dict.copy is atomic under the GIL; each size's results list is never mutated)."""
        procs = [{"rank": 0, "pid": os.getpid(), "alive": True, "returncode": None}]
        tp = self.tp or self._stopped_tp
        procs += tp.describe() if tp is not None else []
        devices = [self.graphs.device_info(), *self._rank_devices]
        return tensor_parallel_report(sizes, self._rank_captures.copy(), procs, devices,
                                      self.world, tp.failure if tp else None,
                                      self.tp_allreduce)  # fmt: skip
