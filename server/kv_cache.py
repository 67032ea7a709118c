"""The paged KV cache: how many blocks fit the memory budget, and the cache tensors.

KV memory is one pool of fixed-size blocks (`--block-size` tokens each) shared by every
sequence; a sequence holds only the blocks its tokens fill (`server.block_manager` hands them
out), so the context length no longer multiplies by the number of sequences. Block 0 is the
scratch block: padding rows of a padded graph replay and warm-up runs write there.

`plan_kv_cache` decides the context length (the model's full context unless configured or the
whole pool is smaller) and the number of blocks (what the GPU memory budget holds after weights
and transient activations); `allocate_kv_cache` makes the tensors. Engine thread only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.config import DEVICE_DEFAULTS, EngineConfig, format_bytes
from server.errors import StartupError
from server.hf_config import head_dim, sliding_window
from server.model import ModelShape

_GPU_SAFETY_BYTES = 512 * 2**20


@dataclass
class KVPlan:
    max_model_len: int
    num_blocks: int  # including the scratch block 0
    block_size: int
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
    tp_world: int = 1,
    mixed_graph_tokens: int = 0,
    external_bytes: int = 0,
) -> KVPlan:
    """Choose max_model_len and the block count (for one rank of `tp_world`: its KV heads,
    its slice of the activations, its own GPU's memory). `mixed_graph_tokens`: the largest
    mixed-step graph bucket (0: none), whose graphs' private pool is reserved too.
    `external_bytes`: device memory in use outside torch's caching allocator (weights read by
    `server.early_weights`), counted against the budget as the allocator's own is.

    Context: `--max-model-len`, else the model's limit (its sliding window if it has one);
    on CPU capped at `DEVICE_DEFAULTS["cpu"].max_model_len`. Blocks: `--num-kv-blocks`, else
    on CUDA all the budget holds, on CPU enough for every sequence at full context. Raises
    StartupError when the configured context exceeds the model's limit, or when the pool cannot
    hold one sequence of the configured context.
    """
    bs = cfg.block_size
    dim = head_dim(hf_config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    kv_heads = hf_config.num_key_value_heads // tp_world
    per_token = 2 * hf_config.num_hidden_layers * kv_heads * dim * itemsize
    per_block = bs * per_token
    limit = hf_config.max_position_embeddings
    window = sliding_window(hf_config)
    if window:
        limit = min(limit, window)  # within the window, full attention is exact
    if cfg.max_model_len is not None and cfg.max_model_len > limit:
        raise StartupError(
            f"--max-model-len {cfg.max_model_len} exceeds the model's limit of {limit} tokens"
            + (" (its sliding window)" if window and window == limit else "")
        )
    gib = 2**30
    if device.type != "cuda":
        max_len = cfg.max_model_len or min(limit, DEVICE_DEFAULTS["cpu"].max_model_len)
        blocks = cfg.num_kv_blocks or full_pool_blocks(max_num_seqs, max_len, bs)
        return _fit(KVPlan(max_len, blocks, bs, blocks * per_block, None, "CPU"), cfg)

    free, total = torch.cuda.mem_get_info()
    budget = int(total * cfg.gpu_memory_utilization)
    in_use = torch.cuda.memory_reserved() + external_bytes
    h, inter = hf_config.hidden_size, hf_config.intermediate_size // tp_world
    qkv = (hf_config.num_attention_heads // tp_world + 2 * kv_heads) * dim
    vocab = hf_config.vocab_size
    # Peak transient memory outside the KV cache: a step's activations (x2 for the allocator's
    # slack), decode logits plus sampling temporaries (~40 B per logit), a margin.
    step_tokens = max_batched_tokens + max_num_seqs
    activations = 2 * step_tokens * (5 * h + qkv + 3 * inter) * itemsize
    sampling = 40 * max(max_num_seqs, 1) * vocab
    # The mixed-step graphs' private pool (activations of the largest bucket, which the
    # caching allocator cannot lend out) and their logits buffer. 3x the activations: the 8B
    # on an H200 grew the graph pool by 115 MiB for a 320-token bucket (estimate 127 MiB).
    # The decode graphs' pool (27 MiB there) fits in the safety margin.
    row = (5 * h + qkv + 3 * inter) * itemsize
    mixed_graphs = 3 * mixed_graph_tokens * row + (max_num_seqs * vocab * itemsize
                                                   if mixed_graph_tokens else 0)  # fmt: skip
    reserve = activations + sampling + mixed_graphs + _GPU_SAFETY_BYTES
    available = min(budget - in_use, free) - reserve
    fit = max(0, available // per_block)
    max_len = cfg.max_model_len or limit
    if cfg.num_kv_blocks is not None:
        if cfg.num_kv_blocks > fit:
            raise StartupError(
                f"--num-kv-blocks {cfg.num_kv_blocks} needs "
                f"{format_bytes(cfg.num_kv_blocks * per_block)} but only "
                f"{format_bytes(max(available, 0))} is available"
            )
        fit = cfg.num_kv_blocks
    if fit < 2:
        raise StartupError(
            f"no room for a KV cache: {max(available, 0) / gib:.2f} GiB left after weights "
            f"({weight_bytes / gib:.1f} GiB) and reserve ({reserve / gib:.1f} GiB); raise "
            "--gpu-memory-utilization or lower --max-num-batched-tokens"
        )
    plan = KVPlan(max_len, fit, bs, fit * per_block, budget,
                  f"{fit - 1} blocks of {bs} tokens fill the {budget / gib:.1f} GiB budget")
    return _fit(plan, cfg)


def full_pool_blocks(rows: int, max_model_len: int, block_size: int) -> int:
    """Blocks for `rows` sequences all at full length, plus the scratch block 0."""
    return 1 + rows * -(-max_model_len // block_size)


def agree(plan: KVPlan, num_blocks: int, cfg: EngineConfig) -> KVPlan:
    """Rank 0's plan cut down to `num_blocks` (the fewest any rank's memory holds), so every
    rank allocates the same pool and block tables mean the same on all of them."""
    if num_blocks >= plan.num_blocks:
        return plan
    if num_blocks < 2:
        raise StartupError(
            "no room for a KV cache on one of the tensor-parallel ranks; raise "
            "--gpu-memory-utilization or lower --max-num-batched-tokens"
        )
    per_block = plan.kv_bytes // plan.num_blocks
    note = f"{plan.note}; {num_blocks - 1} blocks, what the fullest rank holds"
    return _fit(KVPlan(plan.max_model_len, num_blocks, plan.block_size, num_blocks * per_block,
                       plan.budget_bytes, note), cfg)


def _fit(plan: KVPlan, cfg: EngineConfig) -> KVPlan:
    """A context longer than the whole pool can never be served: shrink a default one to the
    pool (with a note), refuse a configured one."""
    capacity = (plan.num_blocks - 1) * plan.block_size
    if plan.max_model_len <= capacity:
        return plan
    if cfg.max_model_len is not None:
        raise StartupError(
            f"--max-model-len {cfg.max_model_len} does not fit the KV cache: "
            f"{plan.num_blocks - 1} blocks of {plan.block_size} tokens hold {capacity} tokens; "
            "lower --max-model-len or free memory (--gpu-memory-utilization, --num-kv-blocks)"
        )
    plan.note += f"; context shrunk from {plan.max_model_len} to the pool's {capacity} tokens"
    plan.max_model_len = capacity
    return plan


def allocate_kv_cache(shape: ModelShape, num_blocks: int, block_size: int, dtype, device):
    """Per layer, `(k, v)` tensors of `[num_blocks, block_size, Hkv, D]`.

    Token-major inside a block (all heads of one token together): a token's K/V is one
    contiguous write, and a block table row turns into token addresses with one multiply.
    """
    dims = (num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
    return [
        (
            torch.zeros(*dims, dtype=dtype, device=device),
            torch.zeros(*dims, dtype=dtype, device=device),
        )
        for _ in range(shape.num_layers)
    ]
