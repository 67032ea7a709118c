"""The tensor operations of the decoder forward, with a torch reference for each.

Every op here has a plain-torch implementation that matches the HF modules' arithmetic (the
same roundings in the same order), which runs on CPU and is the reference in tests. On CUDA,
`use_triton(True)` switches the ops to the fused Triton kernels of `server.triton_ops`, which
cut the kernel count per decoder layer (it bounds a captured graph's replay time).

All ops are capturable in a CUDA graph: fixed shapes in, no host synchronisation, no branching
on tensor values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_triton = None  # the server.triton_ops module once enabled


def use_triton(enabled: bool) -> bool:
    """Route the ops to Triton kernels (CUDA only). Returns whether they are now in use."""
    global _triton
    if not enabled:
        _triton = None
        return False
    try:
        from server import triton_ops
    except ImportError:  # triton missing: keep the torch ops
        _triton = None
        return False
    _triton = triton_ops
    return True


def triton_enabled() -> bool:
    return _triton is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, as HF Llama: normalise in fp32, round, then scale by weight."""
    if _triton is not None and x.is_cuda:
        return _triton.rms_norm(x, weight, eps)
    return _rms_norm_ref(x, weight, eps)


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = residual + x` (rounded to the activation dtype), returns `(rms_norm(s), s)`."""
    if _triton is not None and x.is_cuda:
        return _triton.add_rms_norm(x, residual, weight, eps)
    s = residual + x
    return _rms_norm_ref(s, weight, eps), s


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for a fused `[T, 2I]` gate/up projection output."""
    if _triton is not None and gate_up.is_cuda:
        return _triton.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Apply rotary embeddings (HF's rotate-half form) to q and k; store k, v in the cache.

    q `[T, Hq, D]`, k and v `[T, Hkv, D]`, cos and sin `[T, D]` (activation dtype), caches
    `[slots, Hkv, max_len, D]`, slots and positions `[T]` int64. Token t is written at
    `cache[slots[t], :, positions[t]]`. Returns the rotated q `[T, Hq, D]`.
    """
    if _triton is not None and q.is_cuda:
        return _triton.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, positions)
    cos_ = cos.unsqueeze(1)
    sin_ = sin.unsqueeze(1)
    q_rot = (q * cos_) + (_rotate_half(q) * sin_)
    k_rot = (k * cos_) + (_rotate_half(k) * sin_)
    k_cache[slots, :, positions] = k_rot
    v_cache[slots, :, positions] = v
    return q_rot


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one new token per row over its slot's first `seq_lens[row]` cached tokens.

    q `[N, Hq, D]` (already rotated; its own k/v already written to the cache), caches
    `[slots, Hkv, max_len, D]`, slots and seq_lens `[N]` int64. Returns `[N, Hq, D]`.
    """
    if _triton is not None and q.is_cuda:
        return _triton.decode_attention(q, k_cache, v_cache, slots, seq_lens, scale)
    return _decode_attention_ref(q, k_cache, v_cache, slots, seq_lens, scale)


def _decode_attention_ref(q, k_cache, v_cache, slots, seq_lens, scale):
    n, hq, d = q.shape
    hkv, max_len = k_cache.shape[1], k_cache.shape[2]
    # Fold the GQA group into the query rows rather than repeating K/V.
    qg = q.view(n, hkv, hq // hkv, d)
    k = k_cache[slots]
    v = v_cache[slots]
    mask = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out.reshape(n, hq, d)
