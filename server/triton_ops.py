"""Fused Triton kernels for the decoder ops of `server.ops` (CUDA; CPU under TRITON_INTERPRET=1).

Each public function has the signature and the semantics of its namesake in `server.ops`, down
to the roundings: a value the torch reference rounds to the activation dtype is rounded here at
the same step, everything in between is fp32. Results differ from the reference only where the
fp32 intermediates do (reduction order, the hardware `exp`/`rsqrt`): where that tips a rounding,
a bf16/fp16 output moves by an ulp or two (tests/test_triton_ops.py states the bounds).

Graph capture: every launch grid and every compile-time constant depends only on shapes, dtypes
and strides, never on tensor values; nothing syncs with the host. Integer arguments that vary
with the batch (row counts, split counts) are marked `do_not_specialize`, so a new batch size
reuses the compiled kernel instead of compiling a variant (Triton otherwise specialises ints
equal to 1 or divisible by 16).

Kernels per decoder layer: rms_norm / add_rms_norm 1, silu_and_mul 1, rope_write_kv 1,
decode_attention 2 (split-K pass + log-sum-exp combine).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "add_rms_norm",
    "decode_attention",
    "decode_attention_split",
    "decode_attention_splits",
    "rms_norm",
    "rope_write_kv",
    "silu_and_mul",
]

# Under the interpreter, Triton 3.x computes `tl.dot` on bfloat16 operands wrongly (it treats the
# raw bits as integers); upcasting the operands to fp32 there keeps the CPU tests meaningful.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_FLOAT_DTYPES = tuple(_TORCH_TO_TL)


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer comes from here (tests swap in a NaN-filled version to
    prove that each element a kernel should write is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_index(name: str, t: torch.Tensor, length: int) -> None:
    if t.dtype not in (torch.int64, torch.int32) or t.dim() != 1 or t.shape[0] != length:
        raise ValueError(
            f"{name} must be a 1-D int64/int32 tensor of length {length}, "
            f"got {t.dtype} {tuple(t.shape)}"
        )


def _check_device(*named: tuple[str, torch.Tensor]) -> None:
    device = named[0][1].device
    for name, t in named[1:]:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} like {named[0][0]}")


# ---------------------------------------------------------------------------------------------
# RMSNorm (optionally fused with the residual add)
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_rows", "inner"])
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    sum_ptr,
    n_rows,
    inner,  # rows are indexed (r // inner, r % inner): x may be a strided [A, B, H] view
    stride_xa,
    stride_xb,
    stride_ra,
    stride_rb,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_TY: tl.constexpr,  # dtype the normalised value is rounded to (that of x, or of s)
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    row_mask = rows < n_rows
    col_mask = cols < hidden
    mask = row_mask[:, None] & col_mask[None, :]
    a = rows // inner
    b = rows % inner
    x_offs = (a * stride_xa + b * stride_xb)[:, None] + cols[None, :]
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
    # Outputs are contiguous [n_rows, hidden].
    out_offs = rows[:, None] * hidden + cols[None, :]
    if HAS_RESIDUAL:
        r_offs = (a * stride_ra + b * stride_rb)[:, None] + cols[None, :]
        r = tl.load(res_ptr + r_offs, mask=mask, other=0.0)
        # `residual + x`, rounded to the sum's dtype before it is normalised (as torch does).
        s = (r.to(tl.float32) + x.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + out_offs, s, mask=mask)
        h = s.to(tl.float32)
    else:
        h = x.to(tl.float32)
    var = tl.sum(h * h, axis=1) / hidden
    rstd = tl.rsqrt(var + eps)
    # HF: normalise in fp32, round to the activation dtype, *then* scale by the weight.
    normed = (h * rstd[:, None]).to(ROUND_TY).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, (normed * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(x: torch.Tensor, name: str) -> tuple[torch.Tensor, int, int, int]:
    """View `x [..., H]` as `[A, B, H]` with unit stride in H: returns (x3, B, stride_a, stride_b).

    A strided `[T, heads, D]` view (Qwen3's per-head norm on a fused QKV output) is read in
    place; anything that cannot be viewed that way is copied once.
    """
    if x.dim() == 0:
        raise ValueError(f"{name} must be [..., hidden], got a scalar")
    if x.dim() == 1:
        x3 = x.view(1, 1, -1)
    elif x.dim() == 2:
        x3 = x.unsqueeze(1)
    elif x.dim() == 3:
        x3 = x
    else:
        x3 = x.reshape(-1, x.shape[-2], x.shape[-1])
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    return x3, x3.shape[1], x3.stride(0), x3.stride(1)


def _norm_launch_params(hidden: int) -> tuple[int, int, int]:
    block_h = triton.next_power_of_2(hidden)
    # Several short rows per program (per-head norms over D=128), one program per long row.
    block_r = max(1, min(16, 2048 // block_h))
    num_warps = 8 if block_h >= 4096 else 4
    return block_h, block_r, num_warps


def _rms_norm_launch(x, residual, weight, eps):
    _check_float("x", x)
    _check_float("weight", weight)
    hidden = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != hidden:
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    weight = weight.contiguous()
    x3, inner, sxa, sxb = _as_rows(x, "x")
    n_rows = x3.shape[0] * inner
    if residual is not None:
        _check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(
                f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}"
            )
        _check_device(("x", x), ("residual", residual), ("weight", weight))
        r3, _, sra, srb = _as_rows(residual, "residual")
        sum_dtype = torch.promote_types(residual.dtype, x.dtype)
        round_dtype = sum_dtype
        s = _empty(x.shape, sum_dtype, x.device)
        out = _empty(x.shape, torch.promote_types(weight.dtype, sum_dtype), x.device)
    else:
        _check_device(("x", x), ("weight", weight))
        r3, sra, srb, s = x3, 0, 0, x3  # unused by the kernel (HAS_RESIDUAL=False)
        round_dtype = x.dtype
        out = _empty(x.shape, torch.promote_types(weight.dtype, x.dtype), x.device)
    if n_rows == 0:
        return out, s
    block_h, block_r, num_warps = _norm_launch_params(hidden)
    grid = (triton.cdiv(n_rows, block_r),)
    _rms_norm_kernel[grid](
        x3, r3, weight, out, s, n_rows, inner, sxa, sxb, sra, srb, hidden, float(eps),
        HAS_RESIDUAL=residual is not None,
        ROUND_TY=_TORCH_TO_TL[round_dtype],
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return out, s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of `x [..., H]` (see `server.ops.rms_norm`); one kernel.

    `x` may be a strided 3-D view such as `[T, heads, D]` out of a fused QKV output; the
    result is a new contiguous tensor of `x`'s shape.
    """
    out, _ = _rms_norm_launch(x, None, weight, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = residual + x`; returns `(rms_norm(s), s)` from one kernel (see `server.ops`).

    Neither input is modified: `s` goes to a new buffer. Writing it over `residual` would move
    the same number of bytes, so in-place would save no bandwidth, only a capture-pool buffer.
    """
    out, s = _rms_norm_launch(x, residual, weight, eps)
    return out, s


# ---------------------------------------------------------------------------------------------
# SiLU-and-mul
# ---------------------------------------------------------------------------------------------


@triton.jit
def _silu_and_mul_kernel(gu_ptr, out_ptr, stride_gu, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # torch rounds F.silu(gate) to the activation dtype before the product.
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * inter + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up [..., 2I]` -> `[..., I]` in one kernel (see `server.ops`)."""
    _check_float("gate_up", gate_up)
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (2 * I), got {tuple(gate_up.shape)}")
    inter = gate_up.shape[-1] // 2
    rows2d = gate_up.reshape(-1, 2 * inter)
    if rows2d.stride(-1) != 1:
        rows2d = rows2d.contiguous()
    out = _empty((*gate_up.shape[:-1], inter), gate_up.dtype, gate_up.device)
    n_rows = rows2d.shape[0]
    if n_rows == 0 or inter == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    grid = (n_rows, triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](rows2d, out, rows2d.stride(0), inter, BLOCK=block, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# RoPE + KV-cache write
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rope_halves(x1, x2, c1, c2, s1, s2, TY: tl.constexpr):
    """Rotate-half RoPE on fp32 halves, rounded like the reference: `(x * cos) + (rot(x) * sin)`
    with each product rounded to TY, then the sum rounded to TY."""
    o1 = (x1 * c1).to(TY).to(tl.float32) + (-x2 * s1).to(TY).to(tl.float32)
    o2 = (x2 * c2).to(TY).to(tl.float32) + (x1 * s2).to(TY).to(tl.float32)
    return o1.to(TY), o2.to(TY)


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slots_ptr, pos_ptr, qo_ptr,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ct, stride_st,
    stride_c0, stride_c1, stride_c2,
    stride_vc0, stride_vc1, stride_vc2,
    num_q_heads,
    head_dim,
    K_TY: tl.constexpr,  # dtype torch's `k * cos` has: k_rot is rounded in it
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program per (token, head): heads [0, Hq) rotate q, heads [Hq, Hq + Hkv) rotate k and
    # store k and v into the cache.
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < HALF
    # cos/sin are full-width [T, D] as the reference takes them; both halves are read.
    c1 = tl.load(cos_ptr + t * stride_ct + offs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_st + offs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_st + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    if head < num_q_heads:
        q_base = q_ptr + t * stride_qt + head * stride_qh
        q1 = tl.load(q_base + offs, mask=mask, other=0.0).to(tl.float32)
        q2 = tl.load(q_base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        qo1, qo2 = _rope_halves(q1, q2, c1, c2, s1, s2, qo_ptr.dtype.element_ty)
        qo_base = qo_ptr + (t * num_q_heads + head) * head_dim
        tl.store(qo_base + offs, qo1, mask=mask)
        tl.store(qo_base + HALF + offs, qo2, mask=mask)
    else:
        kh = head - num_q_heads
        slot = tl.load(slots_ptr + t).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        k_base = k_ptr + t * stride_kt + kh * stride_kh
        k1 = tl.load(k_base + offs, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        # Rounded as the reference rounds k_rot, then converted to the cache's dtype.
        ko1, ko2 = _rope_halves(k1, k2, c1, c2, s1, s2, K_TY)
        kc_base = kc_ptr + slot * stride_c0 + kh * stride_c1 + pos * stride_c2
        tl.store(kc_base + offs, ko1.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(kc_base + HALF + offs, ko2.to(kc_ptr.dtype.element_ty), mask=mask)
        v_base = v_ptr + t * stride_vt + kh * stride_vh
        vc_base = vc_ptr + slot * stride_vc0 + kh * stride_vc1 + pos * stride_vc2
        v1 = tl.load(v_base + offs, mask=mask, other=0.0)
        v2 = tl.load(v_base + HALF + offs, mask=mask, other=0.0)
        tl.store(vc_base + offs, v1.to(vc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_base + HALF + offs, v2.to(vc_ptr.dtype.element_ty), mask=mask)


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
    """Rotate q and k (rotate-half RoPE) and write k, v to the cache, in one kernel.

    Shapes as `server.ops.rope_write_kv`; q, k, v may be strided views into a fused QKV output
    (unit stride only along the head dim). Returns a new contiguous rotated q `[T, Hq, D]`.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin),
                    ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_float(name, t)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k and v must be [T, heads, head_dim]")
    n_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape != (n_tokens, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
            f"[{n_tokens}, Hkv, {head_dim}] to match q {tuple(q.shape)}"
        )
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {head_dim}")
    if cos.shape != (n_tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(
            f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be [{n_tokens}, {head_dim}]"
        )
    if (k_cache.dim() != 4 or k_cache.shape[1] != num_kv_heads or k_cache.shape[3] != head_dim
            or v_cache.shape != k_cache.shape):
        raise ValueError(
            f"caches must be [slots, {num_kv_heads}, max_len, {head_dim}], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    _check_index("slots", slots, n_tokens)
    _check_index("positions", positions, n_tokens)
    _check_device(("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin),
                  ("k_cache", k_cache), ("v_cache", v_cache), ("slots", slots),
                  ("positions", positions))
    q, k, v, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, cos, sin))
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches must have unit stride along head_dim (they are written in place)")
    q_rot = _empty(q.shape, torch.promote_types(q.dtype, cos.dtype), q.device)
    if n_tokens == 0:
        return q_rot
    half = head_dim // 2
    grid = (n_tokens, num_q_heads + num_kv_heads)
    _rope_write_kv_kernel[grid](
        q, k, v, cos, sin, k_cache, v_cache, slots, positions, q_rot,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_q_heads, head_dim,
        K_TY=_TORCH_TO_TL[torch.promote_types(k.dtype, cos.dtype)],
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=1 if half <= 64 else 2,
    )
    return q_rot


# ---------------------------------------------------------------------------------------------
# Decode attention (split-K / flash-decoding)
# ---------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634
_BLOCK_N = 64  # cached positions per inner step (16-bit caches)
_BLOCK_N_FP32 = 32  # fp32 caches: exact fp32 dots hold more in registers
_MAX_SPLITS = 32  # also the reduce kernel's fixed (padded) split width: one compile per model
_TARGET_PROGRAMS = 2048  # split so that N * Hkv * splits reaches this (H100: 132 SMs)
_MIN_SPLITS = 4  # keeps a long sequence from serialising a mixed-length batch


@triton.jit(do_not_specialize=["num_splits"])
def _decode_attn_split_kernel(
    q_ptr, kc_ptr, vc_ptr, slots_ptr, lens_ptr, part_o_ptr, part_lse_ptr,
    stride_qn, stride_qh,
    stride_kc0, stride_kc1, stride_kc2,
    stride_vc0, stride_vc1, stride_vc2,
    num_q_heads,
    num_splits,
    head_dim,
    max_len,
    scale_log2,  # softmax scale * log2(e): the kernel works in base 2
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # Clamped to [1, max_len] so a bad length can never read outside the slot (the contract
    # says 1 <= seq_len <= max_len; this only makes a violation harmless).
    seq_len = tl.minimum(tl.maximum(tl.load(lens_ptr + row).to(tl.int32), 1), max_len)
    # The split length depends on this row's seq_len, so a short sequence is covered by a few
    # splits and the rest exit here without reading or writing anything.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    if start < seq_len:
        end = tl.minimum(start + split_len, seq_len)
        slot = tl.load(slots_ptr + row).to(tl.int64)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, BLOCK_D)
        g_mask = offs_g < GROUP
        d_mask = offs_d < head_dim
        heads = kvh * GROUP + offs_g
        q = tl.load(
            q_ptr + row * stride_qn + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if DOT_F32:
            q = q.to(tl.float32)
        k_base = kc_ptr + slot * stride_kc0 + kvh * stride_kc1
        v_base = vc_ptr + slot * stride_vc0 + kvh * stride_vc1
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kc2 + offs_d[None, :], mask=kv_mask,
                        other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vc2 + offs_d[None, :], mask=kv_mask,
                        other=0.0)
            if DOT_F32:
                qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = tl.where(n_mask[None, :], qk * scale_log2, float("-inf"))
            # Every block holds at least one position < end, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DOT_F32:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        # Partials: the split's normalised output and its log2-sum-exp, per query head.
        part_rows = (row * num_q_heads + heads) * num_splits + split
        out_mask = g_mask[:, None] & d_mask[None, :]
        tl.store(part_o_ptr + part_rows[:, None] * BLOCK_D + offs_d[None, :],
                 acc / l_i[:, None], mask=out_mask)
        tl.store(part_lse_ptr + part_rows, m_i + tl.log2(l_i), mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_attn_reduce_kernel(
    part_o_ptr, part_lse_ptr, lens_ptr, out_ptr,
    stride_on, stride_oh,
    num_q_heads,
    num_splits,
    head_dim,
    max_len,
    BLOCK_N: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.minimum(tl.maximum(tl.load(lens_ptr + row).to(tl.int32), 1), max_len)
    # Same split arithmetic as the split kernel: only the splits that ran are read.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    active = tl.cdiv(seq_len, split_len)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < active
    base = (row * num_q_heads + head) * num_splits
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, axis=0))
    weights = tl.where(s_mask, weights, 0.0)
    o = tl.load(part_o_ptr + (base + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
                mask=s_mask[:, None], other=0.0)
    out = tl.sum(o * weights[:, None], axis=0) / tl.sum(weights, axis=0)
    tl.store(out_ptr + row * stride_on + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < head_dim)


def decode_attention_splits(batch: int, num_kv_heads: int, max_len: int) -> int:
    """The split-K factor decode_attention uses for these shapes (a pure function of shapes).

    Enough (row, kv head, split) programs to fill the GPU at small batch, at least a few splits
    so one long sequence does not serialise a mixed batch, and never more splits than blocks.
    """
    by_len = max(1, triton.cdiv(max_len, _BLOCK_N))
    by_occupancy = max(_MIN_SPLITS, triton.cdiv(_TARGET_PROGRAMS, max(1, batch * num_kv_heads)))
    return max(1, min(_MAX_SPLITS, by_len, by_occupancy))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per row over its slot's first `seq_lens[row]` cached positions.

    Same contract as `server.ops.decode_attention`: q `[N, Hq, D]`, caches
    `[slots, Hkv, max_len, D]`, GQA with query head h reading kv head `h // (Hq // Hkv)`.
    Flash-decoding: grid `(N, Hkv, splits)` with `splits = decode_attention_splits(...)` (shapes
    only); each program handles the whole query group of one kv head and reads only positions
    < seq_len; a second kernel merges the splits by log-sum-exp.
    """
    return decode_attention_split(q, k_cache, v_cache, slots, seq_lens, scale, None)


def decode_attention_split(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None,
) -> torch.Tensor:
    """`decode_attention` with an explicit split count in [1, 32] (None: the default policy).

    For benchmarks and tests that sweep the split-K factor.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_float(name, t)
    if q.dim() != 3:
        raise ValueError(f"q must be [N, Hq, D], got {tuple(q.shape)}")
    n_rows, num_q_heads, head_dim = q.shape
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"caches must both be [slots, Hkv, max_len, {head_dim}], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError(
            f"q {q.dtype}, k_cache {k_cache.dtype} and v_cache {v_cache.dtype} must share a dtype"
        )
    num_kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"Hq={num_q_heads} must be a multiple of Hkv={num_kv_heads}")
    _check_index("slots", slots, n_rows)
    _check_index("seq_lens", seq_lens, n_rows)
    _check_device(("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("slots", slots),
                  ("seq_lens", seq_lens))
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches must have unit stride along head_dim")
    out = _empty(q.shape, q.dtype, q.device)
    if n_rows == 0:
        return out
    group = num_q_heads // num_kv_heads
    if num_splits is None:
        num_splits = decode_attention_splits(n_rows, num_kv_heads, max_len)
    elif not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")
    block_d = triton.next_power_of_2(head_dim)
    # Scratch for the per-split partials; written only by splits that hold positions.
    part_o = _empty((n_rows * num_q_heads * num_splits, block_d), torch.float32, q.device)
    part_lse = _empty((n_rows * num_q_heads * num_splits,), torch.float32, q.device)
    # fp32 caches: exact fp32 dots (tf32 would lose precision the reference keeps).
    dot_f32 = q.dtype == torch.float32 or (_INTERPRET and q.dtype == torch.bfloat16)
    block_n = _BLOCK_N_FP32 if q.dtype == torch.float32 else _BLOCK_N
    _decode_attn_split_kernel[(n_rows, num_kv_heads, num_splits)](
        q, k_cache, v_cache, slots, seq_lens, part_o, part_lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_q_heads, num_splits, head_dim, max_len, float(scale) * _LOG2E,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),  # tl.dot needs >= 16 rows
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        DOT_F32=dot_f32,
        num_warps=8 if q.dtype == torch.float32 else 4,
        num_stages=2,
    )
    _decode_attn_reduce_kernel[(n_rows, num_q_heads)](
        part_o, part_lse, seq_lens, out,
        out.stride(0), out.stride(1),
        num_q_heads, num_splits, head_dim, max_len,
        BLOCK_N=block_n,
        SPLITS_PAD=_MAX_SPLITS,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out
