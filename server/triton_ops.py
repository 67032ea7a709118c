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

Kernels per decoder layer: rms_norm / add_rms_norm 1, silu_and_mul 1, rope_write_kv 1; the
attention kernels are in `server.triton_attention`; at up to `SKINNY_MAX_ROWS` rows the four
projections (and the LM head) are `skinny_linear` launches instead of cuBLAS GEMMs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from server import pdl
from server.pdl import wait_for_previous

__all__ = ["add_rms_norm", "rms_norm", "rope_write_kv", "silu_and_mul", "skinny_linear",
           "skinny_linear_fits"]

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
    PDL: tl.constexpr,
):
    wait_for_previous(PDL, True)  # small: release the next kernel now
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
    on = pdl.use(x.shape[0] if x.dim() > 1 else 1)  # tokens (a q/k norm's rows are heads too)
    _rms_norm_kernel[grid](
        x3, r3, weight, out, s, n_rows, inner, sxa, sxb, sra, srb, hidden, float(eps),
        HAS_RESIDUAL=residual is not None,
        ROUND_TY=_TORCH_TO_TL[round_dtype],
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        PDL=on,
        num_warps=num_warps,
        **pdl.launch_options(on),
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
def _silu_and_mul_kernel(gu_ptr, out_ptr, stride_gu, inter, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    wait_for_previous(PDL, True)  # small: release the next kernel now
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
    on = pdl.use(n_rows)
    _silu_and_mul_kernel[grid](rows2d, out, rows2d.stride(0), inter, BLOCK=block, PDL=on,
                               num_warps=4, **pdl.launch_options(on))
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
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, bt_ptr, rows_ptr, pos_ptr, qo_ptr,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ct, stride_st,
    stride_bt,
    stride_tok,  # cache stride of one token (Hkv * D)
    num_q_heads,
    head_dim,
    K_TY: tl.constexpr,  # dtype torch's `k * cos` has: k_rot is rounded in it
    PAGE: tl.constexpr,  # tokens per KV block
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL, True)  # small: release the next kernel now
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
        row = tl.load(rows_ptr + t).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        block = tl.load(bt_ptr + row * stride_bt + pos // PAGE).to(tl.int64)
        tok = block * PAGE + pos % PAGE
        k_base = k_ptr + t * stride_kt + kh * stride_kh
        k1 = tl.load(k_base + offs, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        # Rounded as the reference rounds k_rot, then converted to the cache's dtype.
        ko1, ko2 = _rope_halves(k1, k2, c1, c2, s1, s2, K_TY)
        kc_base = kc_ptr + tok * stride_tok + kh * head_dim
        tl.store(kc_base + offs, ko1.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(kc_base + HALF + offs, ko2.to(kc_ptr.dtype.element_ty), mask=mask)
        v_base = v_ptr + t * stride_vt + kh * stride_vh
        vc_base = vc_ptr + tok * stride_tok + kh * head_dim
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
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Rotate q and k (rotate-half RoPE) and write k, v to the paged cache, in one kernel.

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
    if (k_cache.dim() != 4 or k_cache.shape[2] != num_kv_heads or k_cache.shape[3] != head_dim
            or v_cache.shape != k_cache.shape):
        raise ValueError(
            f"caches must be [blocks, block_size, {num_kv_heads}, {head_dim}], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    _check_index("rows", rows, n_tokens)
    _check_index("positions", positions, n_tokens)
    _check_device(("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin),
                  ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                  ("rows", rows), ("positions", positions))
    q, k, v, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, cos, sin))
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("caches must be contiguous (they are written in place by flat index)")
    q_rot = _empty(q.shape, torch.promote_types(q.dtype, cos.dtype), q.device)
    if n_tokens == 0:
        return q_rot
    half = head_dim // 2
    grid = (n_tokens, num_q_heads + num_kv_heads)
    on = pdl.use(n_tokens)
    _rope_write_kv_kernel[grid](
        q, k, v, cos, sin, k_cache, v_cache, block_tables, rows, positions, q_rot,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0),
        block_tables.stride(0),
        k_cache.stride(1),
        num_q_heads, head_dim,
        K_TY=_TORCH_TO_TL[torch.promote_types(k.dtype, cos.dtype)],
        PAGE=k_cache.shape[1],
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), PDL=on,
        num_warps=1 if half <= 64 else 2, **pdl.launch_options(on),
    )
    return q_rot


# ---------------------------------------------------------------------------------------------
# Skinny GEMM: the projections of a decode step of a few rows
# ---------------------------------------------------------------------------------------------

# A decode step of 1-16 rows reads every weight once and does almost no arithmetic: it is a
# bandwidth problem. cuBLAS's kernels for these shapes leave bandwidth unused where the weight
# has few output rows (8B on the H200, per call in a CUDA graph, 1 / 16 rows: o_proj 14.0 /
# 13.3 -> 11.4 / 11.2 us, q/k/v 15.6 / 15.4 -> 14.7 / 15.0, down 31.0 / 31.3 -> 30.7 / 31.0,
# LM head 243 / 245 -> 231 / 239; gate/up 55.3 -> 56.0; a TP=2 rank's down 21.8 -> 17.8 and
# q/k/v 12.2 -> 10.0; bench/results/gemm-routes-8b-h200.json). Whole decode step of the 8B,
# interleaved in one process: batch 1 4.53 -> 4.36 ms, 8 4.82 -> 4.59, 16 5.10 -> 4.85
# (decode-routes-ab-8b-h200.json).
# This kernel computes C^T = W @ X^T ("swap AB"): the weight's output rows fill the MMA's
# 64-row side, the few activation rows its narrow side (16), and each program streams one
# BLOCK_N-row slice of the weight through shared memory in BLOCK_K steps.
SKINNY_MAX_ROWS = 16
_SKINNY_ROWS = 16  # the MMA's narrow side: rows past M are masked, never read or written
# Below these the kernel has too few programs, or too little to stream per program, to beat
# cuBLAS (H200: the 1B's down, 32 programs of 1 MiB, 14.9 -> 17.1 us; its q/k/v, 12 MiB, 6.2
# -> 6.4; a TP rank's q/k/v, 48 programs over 24 MiB, gains 12.2 -> 10.0).
_SKINNY_MIN_PROGRAMS = 48
_SKINNY_MIN_WEIGHT_BYTES = 16 * 2**20


def _skinny_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, stages): the fastest of a sweep on the H200 (`bench.gemm_routes
    --sweep`) for each weight class: up to 16K output rows 64-row slices in 256-wide K steps
    (64-96 programs on the 8B's projections), wider weights 128 x 128."""
    return (128, 128, 3) if n >= 16384 else (64, 256, 4)


def skinny_linear_fits(x: torch.Tensor, weight: torch.Tensor, bias, out) -> bool:
    """Whether `skinny_linear` takes these operands (else the caller uses cuBLAS): 1 to
    `SKINNY_MAX_ROWS` rows of a 2-D activation, a row-major weight whose shape the blocks
    tile exactly and that is large enough to gain, one float dtype throughout."""
    if x.dim() != 2 or weight.dim() != 2 or not 0 < x.shape[0] <= SKINNY_MAX_ROWS:
        return False
    n, k = weight.shape
    block_n, block_k, _ = _skinny_config(n)
    if x.shape[1] != k or n % block_n or k % block_k:
        return False
    if n // block_n < _SKINNY_MIN_PROGRAMS or n * k * weight.element_size() < (
            _SKINNY_MIN_WEIGHT_BYTES):
        return False
    if x.stride(1) != 1 or weight.stride(1) != 1 or x.dtype != weight.dtype:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if bias is not None and (bias.shape != (n,) or bias.stride(0) != 1 or bias.dtype != x.dtype):
        return False
    return out is None or (out.shape == (x.shape[0], n) and out.stride(1) == 1
                           and out.dtype == x.dtype)


@triton.jit(do_not_specialize=["m"])
def _skinny_linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, m, k, stride_x, stride_w, stride_out,
    HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, PDL: tl.constexpr,
):
    # Releases the next kernel at once: in a decode layer no GEMM follows a GEMM, so what
    # waits on the SMs meanwhile is a small kernel's blocks (server.pdl says what it gains).
    wait_for_previous(PDL, True)
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, ROWS)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * stride_x + offs_k[:, None]
    x_mask = offs_m[None, :] < m
    acc = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
    for _ in range(0, k, BLOCK_K):
        w = tl.load(w_ptrs)
        xt = tl.load(x_ptrs, mask=x_mask, other=0.0)
        if DOT_F32:  # only under the interpreter (see _INTERPRET)
            w, xt = w.to(tl.float32), xt.to(tl.float32)
        acc = tl.dot(w, xt, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if HAS_BIAS:  # cuBLAS's epilogue: the bias joins the fp32 sum before the one rounding
        acc += tl.load(b_ptr + offs_n).to(tl.float32)[:, None]
    out_ptrs = out_ptr + offs_m[None, :] * stride_out + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=x_mask)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, checked: bool = False) -> torch.Tensor:
    """`x @ weight.T (+ bias)` for `x [M, K]` with M <= SKINNY_MAX_ROWS, `weight [N, K]`,
    into `out [M, N]` (may have a row stride) or a new tensor; fp32 accumulation, one rounding
    to the output dtype (as cuBLAS; the sums' order differs). Operands must pass
    `skinny_linear_fits`; `checked`: the caller has just asked it (the routers do, on every
    eager projection), so it is not asked again."""
    if not checked and not skinny_linear_fits(x, weight, bias, out):
        raise ValueError(
            f"skinny_linear does not take x {tuple(x.shape)} {x.dtype}, weight "
            f"{tuple(weight.shape)} {weight.dtype}"
        )
    n, k = weight.shape
    if out is None:
        out = _empty((x.shape[0], n), x.dtype, x.device)
    block_n, block_k, stages = _skinny_config(n)
    on = pdl.use(x.shape[0])
    _skinny_linear_kernel[(n // block_n,)](
        x, weight, bias if bias is not None else weight, out, x.shape[0], k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, ROWS=_SKINNY_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_F32=_INTERPRET and x.dtype == torch.bfloat16, PDL=on,
        num_stages=stages, num_warps=4, **pdl.launch_options(on),
    )
    return out
