"""The model runner: loads the checkpoint, owns the paged KV cache, runs each scheduled step.

Everything that touches a tensor happens here or below (`server.step_executor`, `server.model`,
`server.ops`, `server.graph_runner`, `server.sampling`); the scheduler above sees sequences,
blocks and token ids. A step goes in as a `ScheduledStep`, becomes a `StepPlan` (plain
integers: tokens, positions, block-table edits, the graph size to replay) and comes out as
sampled token ids.

* A decode-only step runs on a captured CUDA graph (`server.graph_runner`), padded to the
  smallest captured batch size, reading the block table from a static device buffer.
* A mixed step (decode rows plus prompt chunks) runs eagerly: one packed forward, attention
  split into the decode kernel for the decode rows and one varlen prefill launch for the chunks.

The device stays one step ahead of the host: `run_step` queues step N+1 (decode inputs carried
on the device from step N's samples, host inputs staged through pinned memory, no synchronising
copy) and returns a `PendingStep`; `read` waits for that step's tokens later, after the host has
done step N's bookkeeping.

Block table sync: each admitted sequence owns one row of the device block table; before a step,
only the entries a sequence gained since the last sync are written (one small scatter per step).

Tensor parallelism (`--tensor-parallel-size N`): this process is rank 0. It starts ranks
1..N-1 (`server.distributed.launcher`), each loading its shard, and keeps them in lockstep: the
KV pool is the smallest any rank fits, every step's plan is sent to all ranks before rank 0
runs it, every warm-up and capture is an order in the same stream, and each capture ends in an
agreement (all ranks captured, or the size is failed everywhere). Rank 0 alone schedules,
samples and decides; its sampled tokens go to the workers by a broadcast at the end of each
step. A failure after a step was sent (a worker gone, a collective that raised) cannot be
stepped past, since the ranks' collectives would no longer pair up: it raises
`FatalEngineError` and the engine fails.

Thread ownership: engine thread only. `load` reports its phases through `set_phase`; the
launcher's watch threads report a dead worker through it too (`failed`).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from server import ops
from server.config import EngineConfig
from server.distributed.launcher import TPLauncher, start_workers
from server.distributed.protocol import Kind
from server.distributed.sharding import TPShard
from server.engine_protocol import PhaseCallback
from server.errors import FatalEngineError, StartupError
from server.graph_warmup import CapturePolicy
from server.kv_cache import KVPlan, agree, plan_kv_cache
from server.model_loader import load_checkpoint
from server.sampling import SamplingBatch, sample
from server.scheduler import ScheduledStep, Sequence
from server.step_executor import StepExecutor
from server.step_plan import StepPlan

log = logging.getLogger("graphserve.engine")

# A mixed step at startup compiles the prefill kernels before the server reports ready.
_WARMUP_PROMPT_TOKENS = 32
# Test seam: on CPU, "capture" graphs that replay the eager step (graph_runner's docstring).
EMULATE_GRAPHS_ENV = "GRAPHSERVE_EMULATE_GRAPHS"


def share_cpu_threads(world: int) -> None:
    """CPU ranks split the cores: with each rank's torch using every core, ranks that wait in
    a collective while their peer computes oversubscribe them (20x slower steps measured on
    a 2-core box)."""
    torch.set_num_threads(max(1, torch.get_num_threads() // world))


@dataclass
class PendingStep:
    """A step launched on the device whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]  # the sequences it samples for, in row order
    tokens: torch.Tensor  # int64 [n] on the device: the next step reads its inputs from here
    host: torch.Tensor  # int64 [n] host copy, valid once `ready` has fired
    ready: torch.cuda.Event | None  # recorded after the copy (None on CPU: already valid)


class ModelRunner:
    """Model, paged KV cache, decode graphs, the mixed-step forward, sampling, and (under
    tensor parallelism) the other ranks.

    After `load()`: `max_model_len`, `max_num_seqs`, `max_batched_tokens`, `vocab_size`,
    `eos_ids`, `kv_plan` (blocks), `checkpoint` (tokenizers, name), `policy`, `graphs`,
    `executor` and, with N > 1 ranks, `tp` (the launcher) and `comm` are set.
    """

    def __init__(self, config: EngineConfig, set_phase: PhaseCallback,
                 launcher: TPLauncher | None = None):
        """`launcher`: the workers, already started (`launcher.start_workers`, which the engine
        thread calls before it imports torch); started by `load` when not given."""
        self.config = config
        self._set_phase = set_phase
        self.timings: dict[str, float] = {}
        self.world = config.tensor_parallel_size
        self.tp: TPLauncher | None = launcher
        self.comm = None
        self._rank_devices: list[dict] = []
        self._rank_captures: dict[int, list[dict]] = {}  # size -> each rank's CaptureResult
        self._stopped_tp: TPLauncher | None = None

    # -- startup ----------------------------------------------------------------------------

    def load(self, t_start: float | None = None) -> None:
        """Weights, KV cache, startup graphs; raises StartupError (or ModelLoadError).

        The caller has reported "loading_weights" already: importing this module (torch) is
        part of loading. `t_start`: when that import began, so `timings["import_s"]` holds it.
        A failing start stops any workers it started.
        """
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
            share_cpu_threads(self.world)
        if self.world > 1:
            self._check_workers(device)
        t0 = time.perf_counter()
        self.checkpoint = load_checkpoint(
            cfg.model, device, cfg.dtype, cfg.served_model_name, loader=cfg.loader,
            load_format=cfg.load_format, shard=TPShard(0, self.world),
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
        plan = plan_kv_cache(
            cfg,
            hf_config,
            model.dtype,
            self.device,
            self.max_num_seqs,
            self.max_batched_tokens,
            self.checkpoint.weight_bytes,
            self.world,
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
        )  # fmt: skip
        self.kv_cache = self.executor.kv_cache
        self.block_tables = self.executor.block_tables
        self.graphs = self.executor.graphs
        self.scratch_row = self.graphs.scratch_row
        self._row_owner = [-1] * self.max_num_seqs  # admission number of the row's sequence
        self._row_synced = [0] * self.max_num_seqs  # table entries already on the device
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
        disabled = None
        if not (cuda or emulate) and cfg.graph_capture != "off":
            disabled = "CUDA graphs need a CUDA device; running eagerly on CPU"
        self.policy = CapturePolicy.from_config(cfg, self.max_num_seqs, disabled_reason=disabled)
        if plan.budget_bytes is not None:
            self.policy.set_memory(plan.budget_bytes, plan.kv_bytes, self.checkpoint.weight_bytes)
        self._startup_graphs(cuda or emulate)
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
        from server.distributed.comm import create_store, init_group

        cfg, tp = self.config, self.tp
        # Workers started loading before rank 0 did; a generous multiple of the agreement
        # deadline covers a slower disk under one of them.
        loaded = tp.collect(Kind.LOADED, 0, timeout_s=10 * cfg.tp_timeout_s)
        plan = agree(plan, min(r["num_blocks"] for r in loaded), cfg)
        store = create_store(self.world, cfg.tp_timeout_s)
        seq = tp.send_json(Kind.SETUP, {
            "num_blocks": plan.num_blocks, "max_model_len": plan.max_model_len,
            "store_port": store.port, "emulate_graphs": emulate,
        })  # fmt: skip
        self.comm = init_group(0, self.world, self.device, cfg.tp_timeout_s, store=store)
        if cfg.tp_allreduce == "symm-mem":  # every rank, right after joining (collective)
            self.comm.enable_symm_mem(self.max_num_seqs, model.shape.hidden_size, model.dtype,
                                      self.device)  # fmt: skip
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
        self._warm_mixed_step()
        if not graphs_possible:
            self._warm(self.max_num_seqs)  # still exercise the step, so the first one is fast
            return
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
        gc.freeze()
        try:
            for size in plan:
                if not self.policy.active:  # the largest failed: the policy is off, serve eagerly
                    break
                self.capture(size, bulk=True)
        finally:
            gc.unfreeze()

    def _warm(self, n: int) -> None:
        if self.tp is not None:
            self.tp.send_json(Kind.WARM, {"n": n})
        self.graphs.warm(n)

    def _warm_mixed_step(self) -> None:
        """Run one mixed step on the scratch row so its kernels (the varlen prefill attention
        among them) compile now, not in the first request's time to first token."""
        n, row = _WARMUP_PROMPT_TOKENS, self.scratch_row
        plan = StepPlan(
            ids=[0] * (n + 1), src=[-1] * (n + 1), positions=[n, *range(n)],
            rows=[row] * (n + 1), num_decode=1, num_sampled=0, logit_rows=[0, n],
            seq_rows=[row], cu_seqlens=[0, n], k_lens=[n], max_q_len=n,
        )  # fmt: skip
        self._launch(plan, None, [])
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- steps ------------------------------------------------------------------------------

    def run_step(self, step: ScheduledStep, prev: PendingStep | None) -> PendingStep | None:
        """Queue `step` on the device; nothing here waits for it. None if it samples nothing
        (prompt chunks that complete no prompt).

        A decode row whose input token is still in flight takes it from `prev.tokens` on the
        device; every other token comes from the host.
        """
        plan = self._plan(step, prev)
        sampled = step.sampled
        tokens = self._launch(plan, prev.tokens if prev is not None else None, sampled)
        if tokens is None:
            return None
        if self.device.type != "cuda":
            return PendingStep(sampled, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return PendingStep(sampled, tokens, host, ready)

    def _launch(self, plan: StepPlan, prev_tokens, seqs: list[Sequence]) -> torch.Tensor | None:
        """Run `plan` on every rank; rank 0 samples `seqs` and broadcasts the tokens."""
        if self.tp is None:
            logits = self.executor.execute(plan, prev_tokens)
            return self._sample(logits, seqs) if plan.num_sampled else None
        self.tp.send(Kind.STEP, plan.encode())
        try:
            logits = self.executor.execute(plan, prev_tokens)
            if not plan.num_sampled:
                return None
            return self.comm.broadcast_from_rank0(self._sample(logits, seqs))
        except Exception as exc:
            # A collective that raised usually means a peer died: name that, not the symptom.
            cause = self._peer_failure(wait_s=2.0)
            raise FatalEngineError(cause or (
                "a tensor-parallel step failed on rank 0 after the other ranks had started it "
                f"(their collectives can no longer pair up): {type(exc).__name__}: {exc}"
            )) from exc

    def _peer_failure(self, wait_s: float) -> str | None:
        """The launcher's account of a dead worker, waiting up to `wait_s` for its watcher."""
        deadline = time.monotonic() + wait_s
        while self.tp.failure is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.tp.failure

    def _plan(self, step: ScheduledStep, prev: PendingStep | None) -> StepPlan:
        """The step as plain integers (host work only: nothing is sent or launched yet)."""
        table = self._table_edits(step)
        prev_row = {id(s): i for i, s in enumerate(prev.seqs)} if prev is not None else {}
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
            dispatch = self.policy.select(nd)
            return StepPlan(ids, src, positions, rows, num_decode=nd, num_sampled=nd,
                            graph=dispatch.size or 0, **table)  # fmt: skip
        seq_rows, cu, k_lens, logit_rows = [], [0], [], list(range(nd))
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
        return StepPlan(
            ids, src, positions, rows, num_decode=nd, num_sampled=len(logit_rows),
            logit_rows=logit_rows, seq_rows=seq_rows, cu_seqlens=cu, k_lens=k_lens,
            max_q_len=max(item.length for item in step.prefill), **table,
        )  # fmt: skip

    def _table_edits(self, step: ScheduledStep) -> dict[str, list[int]]:
        """The block-table entries the step's sequences gained since they were last synced."""
        r_idx, c_idx, values = [], [], []
        for seq in step.decode + [item.seq for item in step.prefill]:
            row = seq.row
            if self._row_owner[row] != seq.admitted:  # a new occupant: write its whole row
                self._row_owner[row] = seq.admitted
                self._row_synced[row] = 0
            done, n = self._row_synced[row], len(seq.blocks)
            if n > done:
                r_idx.extend([row] * (n - done))
                c_idx.extend(range(done, n))
                values.extend(seq.blocks[done:n])
                self._row_synced[row] = n
        return {"table_rows": r_idx, "table_cols": c_idx, "table_values": values}

    def read(self, step: PendingStep) -> list[int]:
        """The step's sampled tokens (blocks until the device has produced them)."""
        if step.ready is not None:
            step.ready.synchronize()  # releases the GIL while the device finishes
        return step.host.tolist()

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row, on the device (no host sync)."""
        batch = SamplingBatch(
            temperatures=[s.params.temperature for s in seqs],
            top_ps=[s.params.top_p for s in seqs],
            top_ks=[s.params.top_k for s in seqs],
            keys=[s.key for s in seqs],
            steps=[s.num_sampled for s in seqs],
        )
        return sample(logits, batch)

    # -- graphs -----------------------------------------------------------------------------

    def capture(self, size: int, bulk: bool = False) -> None:
        """Capture `size` on every rank at this step boundary and record the agreement.

        The size counts as captured only if every rank captured it; a failure on any rank
        marks it failed for all (rank 0 never dispatches a step onto it, so the workers' own
        graph of that size is never replayed). A worker that is gone, errs or stays silent
        past `--tp-timeout` raises FatalEngineError after the size is marked failed.
        """
        self.policy.begin(size)
        t0 = time.perf_counter()
        try:
            seq = self.tp.send_json(Kind.CAPTURE, {"size": size}) if self.tp else None
            local = self.graphs.capture(size, bulk=bulk)
            results = [local.to_json()]
            if self.tp is not None:
                results += self.tp.collect(Kind.CAPTURED, seq)
            if any(r.get("size") != size for r in results):
                raise FatalEngineError(f"the ranks captured different sizes: {results}")
        except FatalEngineError as exc:
            self.policy.failed(size, str(exc))
            raise
        self._rank_captures[size] = results
        failed = [f"rank {r}: {res['error']}" for r, res in enumerate(results) if not res["ok"]]
        if failed:
            self.policy.failed(size, "; ".join(failed))
        else:
            # What the busy-time budget bounds: rank 0's whole stall, waiting for peers included.
            self.policy.succeeded(size, time.perf_counter() - t0, local.pool_bytes)

    # -- shutdown ---------------------------------------------------------------------------

    def close(self, kill: bool = False) -> None:
        """Stop the other ranks (engine thread, after the last step; idempotent).

        `kill`: the group is broken (or never formed): no SHUTDOWN, the workers are killed
        and rank 0 aborts its side of the group instead of the collective teardown.
        """
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
            from server.distributed.comm import destroy_group

            # Bounded: a teardown that waits on a peer must not hang the shutdown.
            leave = threading.Thread(target=destroy_group, args=(broken,),
                                     name="graphserve-tp-destroy", daemon=True)  # fmt: skip
            leave.start()
            leave.join(10.0)
            if leave.is_alive():
                log.warning("leaving the tensor-parallel group did not finish in 10 s")
        tp.join()

    # -- introspection ----------------------------------------------------------------------

    def _describe(self) -> str:
        cov = self.policy.snapshot().get("coverage", {})
        return (f"mode={self.policy.mode}, captured {cov.get('captured', 0)}/"
                f"{cov.get('total', 0)} sizes")  # fmt: skip

    def graph_report(self) -> dict:
        report = self.policy.snapshot()
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
        """Each rank's process, device and captures; each size's result on each rank.

        Called on the event loop while the engine thread may record a capture: it reads a
        copy (dict.copy is atomic under the GIL; each size's results list is never mutated).
        """
        captures = self._rank_captures.copy()
        for record in sizes:
            results = captures.get(record["size"])
            if results is not None:
                record["ranks"] = [
                    {"rank": r, "ok": res["ok"], "capture_ms": round(res["seconds"] * 1e3, 3),
                     "pool_bytes": res["pool_bytes"], "error": res["error"]}
                    for r, res in enumerate(results)
                ]  # fmt: skip
        procs = [{"rank": 0, "pid": os.getpid(), "alive": True, "returncode": None}]
        tp = self.tp or self._stopped_tp
        procs += tp.describe() if tp is not None else []
        devices = [self.graphs.device_info(), *self._rank_devices]
        ranks = []
        for r, proc in enumerate(procs):
            done = {s: res[r] for s, res in captures.items() if r < len(res)}
            ranks.append({
                **proc,
                "device": devices[r] if r < len(devices) else None,
                "captured": sorted(s for s, res in done.items() if res["ok"]),
                "failed": {str(s): res["error"] for s, res in sorted(done.items())
                           if not res["ok"]},
                "pool_bytes": max((res["pool_bytes"] for res in done.values()), default=0),
            })  # fmt: skip
        return {"world_size": self.world, "failure": tp.failure if tp else None, "ranks": ranks}
