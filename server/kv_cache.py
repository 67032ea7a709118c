"""The KV cache: how many tokens of context fit the memory budget, and the cache tensors.

A slot cache: one slot of `max_model_len` tokens per sequence that can run at once, plus one
scratch slot that padding rows and graph warm-up runs write into. `plan_kv_cache` picks the
context length that fits the GPU memory budget after weights and transient activations;
`allocate_kv_cache` makes the tensors. Engine thread only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.config import DEVICE_DEFAULTS, EngineConfig
from server.errors import StartupError
from server.hf_config import head_dim, sliding_window
from server.model import ModelShape

_GPU_SAFETY_BYTES = 512 * 2**20


@dataclass
class KVPlan:
    max_model_len: int
    kv_bytes: int
    budget_bytes: int | None  # total GPU memory the server may hold (None on CPU)
    note: str


def plan_kv_cache(
    cfg: EngineConfig,
    hf_config,
    dtype: torch.dtype,
    device: torch.device,
    max_num_seqs: int,
    max_batched_tokens: int,
    weight_bytes: int,
) -> KVPlan:
    """Choose max_model_len and size the slot cache to fit the GPU memory budget.

    Raises StartupError when an explicit `--max-model-len` exceeds the model's limit or does
    not fit, or when not even 16 tokens per slot fit.
    """
    dim = head_dim(hf_config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * dim * itemsize
    slots = max_num_seqs + 1
    limit = hf_config.max_position_embeddings
    window = sliding_window(hf_config)
    if window:
        limit = min(limit, window)  # within the window, full attention is exact
    if cfg.max_model_len is not None and cfg.max_model_len > limit:
        raise StartupError(
            f"--max-model-len {cfg.max_model_len} exceeds the model's limit of {limit} tokens"
            + (" (its sliding window)" if window and window == limit else "")
        )
    if device.type != "cuda":
        max_len = cfg.max_model_len or min(limit, DEVICE_DEFAULTS["cpu"].max_model_len)
        return KVPlan(max_len, slots * max_len * per_token, None, "CPU")

    free, total = torch.cuda.mem_get_info()
    budget = int(total * cfg.gpu_memory_utilization)
    in_use = torch.cuda.memory_reserved()
    h, inter = hf_config.hidden_size, hf_config.intermediate_size
    qkv = (hf_config.num_attention_heads + 2 * hf_config.num_key_value_heads) * dim
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


def allocate_kv_cache(shape: ModelShape, num_slots: int, max_len: int, dtype, device):
    """Per layer, `(k, v)` tensors of `[num_slots, Hkv, max_len, D]`.

    Slot-major so one sequence's keys for one head are contiguous over positions: the decode
    kernel streams them without a gather, and a slot is reused as soon as its request ends.
    """
    dims = (num_slots, shape.num_kv_heads, max_len, shape.head_dim)
    return [
        (
            torch.zeros(*dims, dtype=dtype, device=device),
            torch.zeros(*dims, dtype=dtype, device=device),
        )
        for _ in range(shape.num_layers)
    ]
