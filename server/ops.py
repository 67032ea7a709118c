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
_attention = None  # the server.triton_attention module once enabled


def use_triton(enabled: bool) -> bool:
    """Route the ops to Triton kernels (CUDA only). Returns whether they are now in use."""
    global _triton, _attention
    _triton = _attention = None
    if not enabled:
        return False
    try:  # imported on demand: Triton is optional, and the CPU path never needs it
        from server import triton_attention, triton_ops
    except ImportError:  # triton missing: keep the torch ops
        return False
    _triton, _attention = triton_ops, triton_attention
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


# Rows for which a bias-free projection goes to cuBLASLt's kernels (through addmm with a zero
# bias, the one per-call route torch gives to them; the preferred-BLAS switch is process-wide,
# so two threads flipping it would race). cuBLAS picks slow kernels for some of the 8B's
# shapes there: per call in a CUDA graph on the H200, at 64 rows down 35.4 -> 32.1 us and
# gate/up 60.7 -> 58.8, the LM head 272 -> 254; at 32-48 rows o_proj 13.7-14.3 -> 11.7-11.9
# and down 33.0-33.7 -> 30.9-31.2 (bench/results/gemm-routes-8b-h200.json). The bias costs
# 0.2-0.5 us where Lt's kernel is no faster (q/k/v; every GEMM of the 1B). Whole decode step,
# 8B, one process, interleaved replays: batch 32 5.43 -> 5.31 ms, 48 5.69 -> 5.54, 64 5.91 ->
# 5.72; from 17 or 24 rows it lost at batch 24 (5.26 -> 5.32), so the range starts at the
# 32-row graph (decode-routes-ab-8b-h200.json). Outside it cuBLAS is as fast or faster.
LT_ROWS = (32, 64)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           zero_bias: torch.Tensor | None = None, out: torch.Tensor | None = None
           ) -> torch.Tensor:
    """`x @ weight.T (+ bias)` for `x [T, K]`, `weight [N, K]`, into `out [T, N]` or a new
    tensor: the GEMM of every projection and the LM head, routed by row count on CUDA
    (`server.triton_ops.skinny_linear` at up to 16 rows for the weights it suits, cuBLASLt
    for `LT_ROWS` when the caller passes `zero_bias`, a zero vector of at least N elements,
    else cuBLAS; the CPU always takes F.linear). Each route rounds once from an fp32 sum;
    their summation orders differ, so a row's bits can depend on how many rows share the
    call, as they already do between cuBLAS's own kernels."""
    rows = x.shape[0]
    if x.is_cuda and rows:
        if _triton is not None and _triton.skinny_linear_fits(x, weight, bias, out):
            return _triton.skinny_linear(x, weight, bias, out, checked=True)
        if (bias is None and zero_bias is not None and LT_ROWS[0] <= rows <= LT_ROWS[1]
                and x.dtype in (torch.float16, torch.bfloat16)
                and zero_bias.shape[0] >= weight.shape[0]):
            bias = zero_bias[: weight.shape[0]]
    if out is None:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.matmul(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def flat_token_index(
    block_tables: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Index of each token in a cache viewed as `[blocks * block_size, Hkv, D]`: position `p`
    of table row `r` lives in block `block_tables[r, p // block_size]` at offset
    `p % block_size`."""
    blocks = block_tables[rows, positions // block_size].long()
    return blocks * block_size + positions % block_size


def rope_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Apply rotary embeddings (HF's rotate-half form) to q and k; store k, v in the cache.

    q `[T, Hq, D]`, k and v `[T, Hkv, D]`, cos and sin `[T, D]` (activation dtype), caches
    `[blocks, block_size, Hkv, D]`, block_tables `[R, max_blocks]` int32, rows and positions
    `[T]` int64: token t is position `positions[t]` of the sequence in table row `rows[t]`.
    Returns the rotated q `[T, Hq, D]`.
    """
    if _triton is not None and q.is_cuda:
        return _triton.rope_write_kv(
            q, k, v, cos, sin, k_cache, v_cache, block_tables, rows, positions
        )
    cos_ = cos.unsqueeze(1)
    sin_ = sin.unsqueeze(1)
    q_rot = (q * cos_) + (_rotate_half(q) * sin_)
    k_rot = (k * cos_) + (_rotate_half(k) * sin_)
    index = flat_token_index(block_tables, rows, positions, k_cache.shape[1])
    k_cache.view(-1, *k_cache.shape[2:])[index] = k_rot.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[index] = v.to(v_cache.dtype)
    return q_rot


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per row over the first `seq_lens[i]` tokens of its sequence.

    q `[N, Hq, D]` (already rotated; its own k/v already written), caches
    `[blocks, block_size, Hkv, D]`, block_tables `[R, max_blocks]`, rows and seq_lens `[N]`
    int64. Returns `[N, Hq, D]` (written into `out` when given). Capturable (the reference
    reads the whole table row when capturing on CUDA; on the CPU it stops at the longest
    sequence).
    """
    if _triton is not None and q.is_cuda:
        return _attention.decode_attention(
            q, k_cache, v_cache, block_tables, rows, seq_lens, scale, out=out
        )
    n, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    max_len = block_tables.shape[1] * block_size
    length = max_len if q.is_cuda else min(max_len, int(seq_lens.max()))
    positions = torch.arange(length, device=q.device)
    index = flat_token_index(block_tables, rows[:, None], positions[None, :], block_size)
    k = k_cache.view(-1, hkv, d)[index].transpose(1, 2)  # [N, Hkv, L, D]
    v = v_cache.view(-1, hkv, d)[index].transpose(1, 2)
    mask = positions[None, :] < seq_lens[:, None]
    # Fold the GQA group into the query rows rather than repeating K/V.
    qg = q.view(n, hkv, hq // hkv, d)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    if out is None:
        return o.reshape(n, hq, d)
    out.copy_(o.reshape(n, hq, d))
    return out


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_rows: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    k_lens: torch.Tensor,
    max_q_len: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed prompt chunks over their sequences' cached tokens.

    Sequence s owns query tokens `cu_seqlens_q[s]:cu_seqlens_q[s+1]`, the last `q_len` of its
    `k_lens[s]` tokens already in the cache (this chunk's keys included): query i sits at
    position `k_lens[s] - q_len + i` and sees every key at or before it. Returns `[T, Hq, D]`
    (written into `out` when given). Empty chunks compute nothing, and tokens past
    `cu_seqlens_q[-1]` (a graph's padding) are left as they were.
    """
    if _triton is not None and q.is_cuda:
        return _attention.prefill_attention(
            q, k_cache, v_cache, block_tables, seq_rows, cu_seqlens_q, k_lens, max_q_len, scale,
            out=out,
        )
    block_size = k_cache.shape[1]
    out = torch.empty_like(q) if out is None else out
    bounds = cu_seqlens_q.tolist()
    for s, (row, k_len) in enumerate(zip(seq_rows.tolist(), k_lens.tolist(), strict=True)):
        q0, q1 = bounds[s], bounds[s + 1]
        if q0 == q1:
            continue  # an empty chunk: a padding sequence of a mixed-step graph
        positions = torch.arange(k_len, device=q.device)
        index = flat_token_index(block_tables, torch.full_like(positions, row), positions,
                                 block_size)
        kc = k_cache.view(-1, *k_cache.shape[2:])[index].transpose(0, 1).unsqueeze(0)
        vc = v_cache.view(-1, *v_cache.shape[2:])[index].transpose(0, 1).unsqueeze(0)
        qc = q[q0:q1].transpose(0, 1).unsqueeze(0)
        start = k_len - (q1 - q0)
        if start == 0:
            o = F.scaled_dot_product_attention(
                qc, kc, vc, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            # Query j sits at position start + j and sees keys <= it. (SDPA's is_causal aligns
            # to the top-left corner; torch.nn.attention.bias.causal_lower_right would say
            # this without a mask but imports torch._dynamo: seconds of startup.)
            rows = torch.arange(start, k_len, device=q.device)[:, None]
            mask = positions[None, :] <= rows
            o = F.scaled_dot_product_attention(
                qc, kc, vc, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[q0:q1] = o[0].transpose(0, 1)
    return out
