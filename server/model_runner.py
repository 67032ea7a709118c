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

A step is queued in two parts, `launch` (the forward: graph replay or mixed step) and `sample`
(logits processing and the draw, `server.logits_processors`). `run_step` does both at once;
the engine splits them when the step has constrained rows: their grammar masks need step N's
tokens, which the host reads while step N+1's forward is already queued, so the device stays
busy while the host advances the matchers and fills the masks.

Logprobs and prompt logprobs are computed on the device with the draw and copied back with the
tokens; a mixed step keeps the logits of every prompt position of the sequences that want
prompt logprobs (`StepBatch.logit_rows` lists them after the sampled rows).

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
from server.logits_processors import PenaltyState, process_and_sample, prompt_logprobs
from server.model import StepBatch
from server.model_loader import load_checkpoint
from server.request import TokenLogprob
from server.sampling import to_device
from server.scheduler import ScheduledStep, Sequence, StepResult

log = logging.getLogger("graphserve.engine")

# A mixed step at startup compiles the prefill kernels before the server reports ready.
_WARMUP_PROMPT_TOKENS = 32


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
        self.penalties = PenaltyState(self.max_num_seqs, self.vocab_size, self.device)
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

    def run_step(self, step: ScheduledStep, prev: PendingStep | None,
                 masks=None) -> PendingStep | None:
        """Queue `step` on the device (forward and draw); nothing here waits for it. None if
        it computes nothing the host reads (prompt chunks that complete no prompt)."""
        return self.sample(self.launch(step, prev), masks)

    def launch(self, step: ScheduledStep, prev: PendingStep | None) -> Launched:
        """Queue the step's forward; nothing here waits for it.

        A decode row whose input token is still in flight takes it from `prev.tokens` on the
        device; every other token comes from the host.
        """
        self._sync_block_tables(step)
        if prev is not None and not prev.seqs:
            prev = None  # a step that sampled nothing (prompt logprobs only) carries no tokens
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
        prompt_rows: list[tuple[Sequence, int]] = []
        targets: list[int] = []
        if not step.prefill:
            logits = self.graphs.run(ids, positions, rows, prev_tokens, src)
        else:
            logits = self._forward_mixed(step, ids, src, positions, rows, prev_tokens,
                                         prompt_rows, targets)
        return Launched(sampled, logits, prompt_rows, targets)

    def sample(self, launched: Launched, masks=None) -> PendingStep | None:
        """Queue the draw (and logprobs) of a launched step and the copies back to the host.
        `masks`: grammar bitmasks of the sampled rows (numpy int32), or None."""
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

    def _forward_mixed(self, step, ids, src, positions, rows, prev_tokens,
                       prompt_rows, targets) -> torch.Tensor:
        nd = len(step.decode)
        seq_rows, cu, k_lens, logit_rows = [], [0], [], list(range(nd))
        extra: list[int] = []  # prompt positions whose logits are kept, after the sampled rows
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
            if seq.prompt_lps is not None and not seq.prompt_lps_sent:
                # Position p's logits give the logprob of prompt token p + 1.
                last = min(item.start + item.length, len(seq.prompt_ids) - 1)
                for p in range(item.start, last):
                    extra.append(nd + cu[-2] + p - item.start)
                    prompt_rows.append((seq, p + 1))
                    targets.append(seq.prompt_ids[p + 1])
        logit_rows += extra
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
                if seq.params.penalized:  # nothing is in flight for it: the host's view is whole
                    self.penalties.init_row(row, seq.prompt_ids, seq.output_ids)
            done, n = self._row_synced[row], len(seq.blocks)
            if n > done:
                r_idx.extend([row] * (n - done))
                c_idx.extend(range(done, n))
                values.extend(seq.blocks[done:n])
                self._row_synced[row] = n
        if values:
            idx = to_device([r_idx, c_idx, values], torch.int64, self.device)
            self.block_tables[idx[0], idx[1]] = idx[2].to(torch.int32)

    def read(self, step: PendingStep) -> StepResult:
        """What the step computed for the host (blocks until the device has produced it)."""
        if step.ready is not None:
            step.ready.synchronize()  # releases the GIL while the device finishes
        host = step.host
        tokens = host["tokens"].tolist() if "tokens" in host else []
        result = StepResult(tokens)
        if "lp" in host:
            result.logprobs = _entries(
                [s.params.logprobs for s in step.seqs], tokens, host["lp"].tolist(),
                host["top_ids"].tolist() if "top_ids" in host else None,
                host["top_lp"].tolist() if "top_lp" in host else None,
            )
        if step.prompt_rows:
            entries = _entries(
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

    def capture(self, size: int) -> None:
        self.graphs.capture(size)

    @property
    def mask_words(self) -> int:
        """Width of a grammar bitmask row (int32 words) for this vocabulary."""
        return (self.vocab_size + 31) // 32

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


def _entries(ks, tokens, lps, top_ids, top_lps) -> list[TokenLogprob | None]:
    """Host lists -> one TokenLogprob per row (None where the row asked for no logprobs)."""
    out: list[TokenLogprob | None] = []
    for i, k in enumerate(ks):
        if k is None:
            out.append(None)
            continue
        top = list(zip(top_ids[i][:k], top_lps[i][:k], strict=True)) if k and top_ids else []
        out.append(TokenLogprob(tokens[i], lps[i], top))
    return out
