"""The model runner: loads the checkpoint, owns the paged KV cache, runs each scheduled step.

Everything that touches a tensor happens here or below (`server.model`, `server.ops`,
`server.graph_runner`, `server.sampling`); the scheduler above sees sequences, blocks and token
ids. A step goes in as a `ScheduledStep` and comes out as sampled token ids.

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

Thread ownership: engine thread only. `load` reports its phases through `set_phase`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from server import ops
from server.config import EngineConfig
from server.engine_protocol import PhaseCallback
from server.errors import StartupError
from server.graph_runner import DecodeGraphRunner
from server.graph_warmup import CapturePolicy
from server.kv_cache import KVPlan, allocate_kv_cache, plan_kv_cache
from server.model import StepBatch
from server.model_loader import load_checkpoint
from server.sampling import SamplingBatch, sample, to_device
from server.scheduler import ScheduledStep, Sequence

log = logging.getLogger("graphserve.engine")

# A mixed step at startup compiles the prefill kernels before the server reports ready.
_WARMUP_PROMPT_TOKENS = 32


@dataclass
class PendingStep:
    """A step launched on the device whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]  # the sequences it samples for, in row order
    tokens: torch.Tensor  # int64 [n] on the device: the next step reads its inputs from here
    host: torch.Tensor  # int64 [n] host copy, valid once `ready` has fired
    ready: torch.cuda.Event | None  # recorded after the copy (None on CPU: already valid)


class ModelRunner:
    """Model, paged KV cache, decode graphs, the mixed-step forward and sampling.

    After `load()`: `max_model_len`, `max_num_seqs`, `max_batched_tokens`, `vocab_size`,
    `eos_ids`, `kv_plan` (blocks), `checkpoint` (tokenizers, name), `policy` and `graphs` are set.
    """

    def __init__(self, config: EngineConfig, set_phase: PhaseCallback):
        self.config = config
        self._set_phase = set_phase
        self.timings: dict[str, float] = {}

    # -- startup ----------------------------------------------------------------------------

    def load(self, t_start: float | None = None) -> None:
        """Weights, KV cache, startup graphs; raises StartupError (or ModelLoadError).

        The caller has reported "loading_weights" already: importing this module (torch) is
        part of loading. `t_start`: when that import began, so `timings["import_s"]` holds it.
        """
        t_start = time.perf_counter() if t_start is None else t_start
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
        t0 = time.perf_counter()
        self.checkpoint = load_checkpoint(
            cfg.model, device, cfg.dtype, cfg.served_model_name, loader=cfg.loader,
            load_format=cfg.load_format,
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
        )
        self.kv_plan: KVPlan = plan
        self.max_model_len = plan.max_model_len
        model.init_rope(self.max_model_len)
        self.model = model
        self.checkpoint.model = None  # the runner owns the model from here on
        self.vocab_size = model.shape.vocab_size
        self.kv_cache = allocate_kv_cache(
            model.shape, plan.num_blocks, plan.block_size, model.dtype, self.device
        )
        # One row per sequence that can be admitted, plus the scratch row (all block 0) that
        # padding rows and warm-up runs use.
        self.scratch_row = self.max_num_seqs
        self.block_tables = torch.zeros(
            self.max_num_seqs + 1, plan.max_blocks_per_seq, dtype=torch.int32, device=self.device
        )
        self._row_owner = [-1] * self.max_num_seqs  # admission number of the row's sequence
        self._row_synced = [0] * self.max_num_seqs  # table entries already on the device
        triton = ops.use_triton(cuda)
        self.timings["kv_cache_s"] = time.perf_counter() - t0
        log.info(
            "KV cache: %d blocks x %d tokens = %.2f GB, context %d tokens (%s); kernels: %s",
            plan.num_blocks,
            plan.block_size,
            plan.kv_bytes / 1e9,
            plan.max_model_len,
            plan.note,
            "triton" if triton else "torch",
        )

        self._set_phase("capturing_graphs", None)
        t0 = time.perf_counter()
        disabled = None
        if not cuda and cfg.graph_capture != "off":
            disabled = "CUDA graphs need a CUDA device; running eagerly on CPU"
        self.policy = CapturePolicy.from_config(cfg, self.max_num_seqs, disabled_reason=disabled)
        if plan.budget_bytes is not None:
            self.policy.set_memory(plan.budget_bytes, plan.kv_bytes, self.checkpoint.weight_bytes)
        self._warm_mixed_step()
        self.graphs = DecodeGraphRunner(
            model, self.kv_cache, self.block_tables, self.policy, self.max_num_seqs,
            self.scratch_row,
        )
        self.graphs.startup()
        self.policy.mark_ready()
        self.timings["graphs_s"] = time.perf_counter() - t0
        self.timings["load_total_s"] = time.perf_counter() - t_start
        log.info(
            "startup graphs done in %.2f s (%s)", self.timings["graphs_s"], self.graphs.describe()
        )

    def _warm_mixed_step(self) -> None:
        """Run one mixed step on the scratch row so its kernels (the varlen prefill attention
        among them) compile now, not in the first request's time to first token."""
        n = _WARMUP_PROMPT_TOKENS
        dev = self.device
        batch = StepBatch(
            input_ids=torch.zeros(n + 1, dtype=torch.int64, device=dev),
            positions=torch.cat([torch.tensor([n], device=dev), torch.arange(n, device=dev)]),
            rows=torch.full((n + 1,), self.scratch_row, dtype=torch.int64, device=dev),
            logit_rows=torch.tensor([0, n], device=dev),
            num_decode=1,
            seq_rows=torch.tensor([self.scratch_row], device=dev),
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=dev),
            k_lens=torch.tensor([n], dtype=torch.int32, device=dev),
            max_q_len=n,
        )
        self.model.forward(batch, self.kv_cache, self.block_tables)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # -- steps ------------------------------------------------------------------------------

    def run_step(self, step: ScheduledStep, prev: PendingStep | None) -> PendingStep | None:
        """Queue `step` on the device; nothing here waits for it. None if it samples nothing
        (prompt chunks that complete no prompt).

        A decode row whose input token is still in flight takes it from `prev.tokens` on the
        device; every other token comes from the host.
        """
        self._sync_block_tables(step)
        prev_row = {id(s): i for i, s in enumerate(prev.seqs)} if prev is not None else {}
        ids, src, positions, rows = [], [], [], []
        for s in step.decode:
            pos = s.num_computed
            known = pos < len(s.tokens)
            ids.append(s.tokens[pos] if known else 0)
            src.append(-1 if known else prev_row[id(s)])
            positions.append(pos)
            rows.append(s.row)
        prev_tokens = prev.tokens if prev is not None else None
        sampled = step.sampled
        if not step.prefill:
            logits = self.graphs.run(ids, positions, rows, prev_tokens, src)
        else:
            logits = self._forward_mixed(step, ids, src, positions, rows, prev_tokens)
        if not sampled:
            return None
        tokens = self._sample(logits, sampled)
        if self.device.type != "cuda":
            return PendingStep(sampled, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return PendingStep(sampled, tokens, host, ready)

    def _forward_mixed(self, step, ids, src, positions, rows, prev_tokens) -> torch.Tensor:
        nd = len(step.decode)
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
        dev = self.device
        tok = to_device([ids, src, positions, rows], torch.int64, dev)
        meta = to_device([seq_rows, k_lens], torch.int64, dev)
        input_ids = tok[0]
        if prev_tokens is not None and nd:
            carried = prev_tokens.index_select(0, tok[1, :nd].clamp(min=0))
            input_ids = input_ids.clone()
            input_ids[:nd] = torch.where(tok[1, :nd] >= 0, carried, tok[0, :nd])
        batch = StepBatch(
            input_ids=input_ids,
            positions=tok[2],
            rows=tok[3],
            logit_rows=to_device(logit_rows, torch.int64, dev),
            num_decode=nd,
            seq_rows=meta[0],
            cu_seqlens_q=to_device(cu, torch.int32, dev),
            k_lens=meta[1].to(torch.int32),
            max_q_len=max(item.length for item in step.prefill),
        )
        return self.model.forward(batch, self.kv_cache, self.block_tables)

    def _sync_block_tables(self, step: ScheduledStep) -> None:
        """Write the table entries the step's sequences gained since they were last synced."""
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
        if values:
            idx = to_device([r_idx, c_idx, values], torch.int64, self.device)
            self.block_tables[idx[0], idx[1]] = idx[2].to(torch.int32)

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

    def capture(self, size: int) -> None:
        self.graphs.capture(size)

    # -- introspection ----------------------------------------------------------------------

    def graph_report(self) -> dict:
        report = self.policy.snapshot()
        report["device"] = self.graphs.device_info()
        report["startup_timings_s"] = dict(self.timings)
        report["kv_cache"] = {
            "num_blocks": self.kv_plan.num_blocks - 1,
            "block_size": self.kv_plan.block_size,
            "bytes": self.kv_plan.kv_bytes,
            "max_model_len": self.kv_plan.max_model_len,
            "note": self.kv_plan.note,
        }
        return report
