"""The model runner: loads the checkpoint, owns the KV cache, runs prefill and decode steps.

Everything that touches a tensor happens here or below (`server.model`, `server.ops`,
`server.graph_runner`, `server.sampling`); the scheduler above sees sequences and token ids.
A step goes in as a list of sequences and comes out as sampled token ids.

Decode keeps the device one step ahead of the host: `launch_decode` queues step N+1 (its input
tokens gathered on the device from step N's samples, host inputs staged through pinned memory,
no synchronising copy) and returns a `PendingStep`; `read_decode` waits for that step's tokens
later, after the host has done step N's bookkeeping.

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
from server.kv_cache import allocate_kv_cache, plan_kv_cache
from server.model import PrefillChunk
from server.model_loader import load_checkpoint
from server.sampling import SamplingBatch, sample, to_device
from server.scheduler import PrefillItem, Sequence

log = logging.getLogger("graphserve.engine")


@dataclass
class PendingStep:
    """A decode step launched on the device whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]
    tokens: torch.Tensor  # int64 [n] on the device: the next step reads its inputs from here
    host: torch.Tensor  # int64 [n] host copy, valid once `ready` has fired
    ready: torch.cuda.Event | None  # recorded after the copy (None on CPU: already valid)


class ModelRunner:
    """Model, KV cache, prefill/decode forward, sampling and the decode-graph runner.

    After `load()`: `max_model_len`, `max_num_seqs`, `max_batched_tokens`, `vocab_size`,
    `eos_ids`, `checkpoint` (tokenizers, name), `policy` and `graphs` are set.
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
        self.max_model_len = plan.max_model_len
        model.init_rope(self.max_model_len)
        self.model = model
        self.checkpoint.model = None  # the runner owns the model from here on
        self.vocab_size = model.shape.vocab_size
        scratch_slot = self.max_num_seqs  # padding rows and warm-up runs write here
        self.kv_cache = allocate_kv_cache(
            model.shape, self.max_num_seqs + 1, self.max_model_len, model.dtype, self.device
        )
        triton = ops.use_triton(cuda)
        self.timings["kv_cache_s"] = time.perf_counter() - t0
        log.info(
            "KV cache: %d slots x %d tokens = %.2f GB (%s); decode kernels: %s",
            self.max_num_seqs + 1,
            self.max_model_len,
            plan.kv_bytes / 1e9,
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
        self.graphs = DecodeGraphRunner(
            model, self.kv_cache, self.policy, self.max_num_seqs, scratch_slot
        )
        self.graphs.startup()
        self.policy.mark_ready()
        self.timings["graphs_s"] = time.perf_counter() - t0
        self.timings["load_total_s"] = time.perf_counter() - t_start
        log.info(
            "startup graphs done in %.2f s (%s)", self.timings["graphs_s"], self.graphs.describe()
        )

    # -- steps ------------------------------------------------------------------------------

    def prefill(self, items: list[PrefillItem]) -> list[int]:
        """Run one packed prefill chunk; returns the first sampled token of each item that
        completes its prompt, in item order (waits for the device)."""
        chunks, ids, positions, slots = [], [], [], []
        for item in items:
            seq = item.seq
            chunks.append(PrefillChunk(seq.slot, item.start, item.length, offset=len(ids)))
            ids.extend(seq.prompt_ids[item.start : item.start + item.length])
            positions.extend(range(item.start, item.start + item.length))
            slots.extend([seq.slot] * item.length)
        inputs = to_device([ids, positions, slots], torch.int64, self.device)
        logits = self.model.prefill(inputs[0], inputs[1], inputs[2], self.kv_cache, chunks)
        done = [row for row, item in enumerate(items) if item.completes_prompt]
        if not done:
            return []
        rows = to_device(done, torch.int64, self.device)
        return self._sample(logits[rows], [items[r].seq for r in done]).tolist()

    def launch_decode(self, seqs: list[Sequence], prev: PendingStep | None) -> PendingStep:
        """Queue one decode step for `seqs`; nothing here waits for the device.

        A sequence that was in `prev` with a token in flight takes its input token from
        `prev.tokens` on the device; the others from their last token the host has read.
        """
        prev_row = {id(s): i for i, s in enumerate(prev.seqs)} if prev is not None else {}
        ids, src = [], []
        for s in seqs:
            row = prev_row.get(id(s), -1) if s.in_flight else -1
            ids.append(s.output_ids[-1] if row < 0 else 0)
            src.append(row)
        positions = [s.num_cached for s in seqs]
        slots = [s.slot for s in seqs]
        logits = self.graphs.run(
            ids, positions, slots, prev.tokens if prev is not None else None, src
        )
        tokens = self._sample(logits, seqs)
        if self.device.type != "cuda":
            return PendingStep(seqs, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return PendingStep(seqs, tokens, host, ready)

    def read_decode(self, step: PendingStep) -> list[int]:
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
        return report
