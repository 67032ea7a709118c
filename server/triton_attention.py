"""Triton attention over the paged KV cache: decode (split-K) and packed prefill (flash).

The cache of one layer is a pair of `[num_blocks, block_size, Hkv, D]` tensors; a sequence's
tokens live in the blocks its block-table row lists, token `p` at block `table[p // block_size]`,
offset `p % block_size`. Both kernels read the cache through the table, token by token, so any
block size works and a sequence's blocks need not be contiguous.

* `decode_attention`: one query token per row (`seq_lens[row]` cached tokens, its own included).
  Flash-decoding: grid `(rows, Hkv, splits)`, each program takes the whole GQA group of one KV
  head over one slice of the context; a second kernel merges the slices by log-sum-exp (a
  row whose context fits one slice is written directly and skipped there). Slices are longer
  when the launch has many rows (`decode_min_split`). Grid and constants depend on shapes only,
  so the launch is capturable in a CUDA graph.
* `prefill_attention`: packed query chunks of several sequences (`cu_seqlens_q`), each chunk the
  last `q_len` tokens of a context of `k_len` tokens already written to the cache: query `i`
  sits at position `k_len - q_len + i` and sees every key at or before it (causal, aligned to
  the end). One launch for the whole batch over flat query blocks (each program finds its
  sequence by a binary search over `cu_seqlens_q`), so the grid depends on shapes only and
  a mixed step's CUDA graph can hold it; blocks of keys that no query of a block can see are
  never loaded. Steps of few query blocks split each block's keys into slices (split-KV,
  `prefill_splits`) merged by log-sum-exp in a second kernel.

Same semantics as the torch references in `server.ops` (which tests compare against).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from server import pdl
from server.pdl import wait_for_previous

__all__ = [
    "decode_attention", "decode_attention_splits", "decode_min_split", "prefill_attention",
    "prefill_splits",
]

# Under the interpreter, Triton 3.x computes `tl.dot` on bfloat16 operands wrongly (it treats the
# raw bits as integers); upcasting the operands to fp32 there keeps the CPU tests meaningful.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer comes from here (tests swap in a NaN-filled version to
    prove that each element a kernel should write is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[3] != q.shape[-1]:
        raise ValueError(
            f"caches must both be [blocks, block_size, Hkv, {q.shape[-1]}], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError(
            f"q {q.dtype}, k_cache {k_cache.dtype} and v_cache {v_cache.dtype} must share a dtype"
        )
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"attention needs a float32/float16/bfloat16 cache, got {q.dtype}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("caches must be contiguous (tokens are addressed by flat index)")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"Hq={q.shape[1]} must be a multiple of Hkv={k_cache.shape[2]}")


def _check_index(name: str, t: torch.Tensor, length: int | None = None) -> None:
    if t.dtype not in (torch.int64, torch.int32) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got {t.dtype} {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {t.shape[0]}")


# ---------------------------------------------------------------------------------------------
# Decode (split-K / flash-decoding)
# ---------------------------------------------------------------------------------------------

_BLOCK_N = 64  # cached positions per inner step (16-bit caches)
_BLOCK_N_FP32 = 32  # fp32 caches: exact fp32 dots hold more in registers
_MAX_SPLITS = 32  # also the reduce kernel's fixed (padded) split width: one compile per model
_TARGET_PROGRAMS = 2048  # split so that N * Hkv * splits reaches this (H100/H200: 132 SMs)
_MIN_SPLITS = 4  # keeps a long sequence from serialising a mixed-length batch
_FEW_PAIRS = 64  # (row, KV head) pairs up to which splits stay one block long


@triton.jit(do_not_specialize=["num_splits", "min_split"])
def _decode_split_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, rows_ptr, lens_ptr, part_o_ptr, part_lse_ptr, out_ptr,
    stride_qn, stride_qh,
    stride_bt,
    stride_tok,  # cache stride of one token (Hkv * D); a head's row is contiguous
    stride_on, stride_oh,
    num_q_heads,
    num_splits,
    min_split,  # fewest keys per split (a multiple of BLOCK_N): `decode_min_split`
    head_dim,
    max_len,
    scale_log2,  # softmax scale * log2(e): the kernel works in base 2
    PAGE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL, False)  # fills the GPU: its dependents launch as it retires
    row = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # Clamped to [1, max_len] so a bad length can never read outside the table row (the
    # contract says 1 <= seq_len <= max_len; this only makes a violation harmless).
    seq_len = tl.minimum(tl.maximum(tl.load(lens_ptr + row).to(tl.int32), 1), max_len)
    # The split length depends on this row's seq_len, so a short sequence is covered by a few
    # splits and the rest exit here without reading or writing anything.
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, min_split)
    start = split * split_len
    if start < seq_len:
        end = tl.minimum(start + split_len, seq_len)
        active = tl.cdiv(seq_len, split_len)
        table = bt_ptr + tl.load(rows_ptr + row).to(tl.int64) * stride_bt
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
        head_off = kvh * head_dim + offs_d[None, :]
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            page = tl.load(table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
            tok = (page * PAGE + offs_n % PAGE) * stride_tok
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(kc_ptr + tok[:, None] + head_off, mask=kv_mask, other=0.0)
            v = tl.load(vc_ptr + tok[:, None] + head_off, mask=kv_mask, other=0.0)
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
        out_mask = g_mask[:, None] & d_mask[None, :]
        if active == 1:
            # The row's only split: the merge of one partial is the identity (its weight is
            # exp2(0) = 1, the masked ones add +0), so its normalised output goes straight to
            # `out`, bit for bit what the merge would write; the merge skips this row.
            tl.store(out_ptr + row * stride_on + heads[:, None] * stride_oh + offs_d[None, :],
                     (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            # Partials: the split's normalised output and its log2-sum-exp, per query head.
            part_rows = (row * num_q_heads + heads) * num_splits + split
            tl.store(part_o_ptr + part_rows[:, None] * BLOCK_D + offs_d[None, :],
                     acc / l_i[:, None], mask=out_mask)
            tl.store(part_lse_ptr + part_rows, m_i + tl.log2(l_i), mask=g_mask)


@triton.jit(do_not_specialize=["num_splits", "min_split"])
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, lens_ptr, out_ptr,
    stride_on, stride_oh,
    num_q_heads,
    num_splits,
    min_split,
    head_dim,
    max_len,
    BLOCK_N: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_previous(PDL, True)  # small: release the next kernel now
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.minimum(tl.maximum(tl.load(lens_ptr + row).to(tl.int32), 1), max_len)
    # Same split arithmetic as the split kernel: only the splits that ran are read, and a row
    # of one split has its output written already.
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, min_split)
    active = tl.cdiv(seq_len, split_len)
    if active > 1:
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


def decode_min_split(batch: int, num_kv_heads: int) -> int:
    """The fewest cached positions one decode split covers, by how many (row, KV head) pairs
    the launch has (a pure function of shapes, like the split count).

    Few pairs (batch 1-8 of an 8B): 64, so a short context still spreads over many SMs. Many
    pairs: longer splits, since the GPU is full anyway and each extra split costs a partial
    round trip and merge work; a row whose context fits one split writes its output directly
    and the merge skips it. Measured on the H200 (8B, per layer, section 8g of
    docs/benchmarks.md): batch 64 at context 512 48 -> 39 us with 512-key splits, while batch 1
    needs 64-key ones (13 us with 512, 6 with 64). Long rows still get `num_splits` splits.
    """
    pairs = batch * num_kv_heads
    if pairs <= _FEW_PAIRS:
        return _BLOCK_N
    return 4 * _BLOCK_N if pairs <= 4 * _FEW_PAIRS else 8 * _BLOCK_N


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    config: tuple | None = None,
    out: torch.Tensor | None = None,
    min_split: int | None = None,
) -> torch.Tensor:
    """One query token per row over the first `seq_lens[i]` tokens of table row `rows[i]`.

    q `[N, Hq, D]`, caches `[blocks, block_size, Hkv, D]`, block_tables `[R, max_blocks]`
    int32, rows and seq_lens `[N]`. GQA: query head h reads KV head `h // (Hq // Hkv)`.
    `num_splits` in [1, 32] and `min_split` (a multiple of 64 positions) override the split-K
    policy (benchmarks and tests sweep them);
    `config` = (BLOCK_N, num_warps, num_stages) overrides the launch (16-bit caches). `out`
    (shaped like q, unit stride along D) receives the result instead of a new tensor.
    """
    _check_cache(q, k_cache, v_cache)
    if q.dim() != 3:
        raise ValueError(f"q must be [N, Hq, D], got {tuple(q.shape)}")
    n_rows, num_q_heads, head_dim = q.shape
    _check_index("rows", rows, n_rows)
    _check_index("seq_lens", seq_lens, n_rows)
    if q.stride(-1) != 1:
        q = q.contiguous()
    num_kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    max_len = block_tables.shape[1] * page
    out = _empty(q.shape, q.dtype, q.device) if out is None else out
    if n_rows == 0:
        return out
    group = num_q_heads // num_kv_heads
    if num_splits is None:
        num_splits = decode_attention_splits(n_rows, num_kv_heads, max_len)
    elif not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")
    if min_split is None:
        min_split = decode_min_split(n_rows, num_kv_heads)
    elif min_split < 1 or min_split % _BLOCK_N:
        raise ValueError(f"min_split must be a positive multiple of {_BLOCK_N}, got {min_split}")
    block_d = triton.next_power_of_2(head_dim)
    # Scratch for the per-split partials; written only by splits that hold positions.
    part_o = _empty((n_rows * num_q_heads * num_splits, block_d), torch.float32, q.device)
    part_lse = _empty((n_rows * num_q_heads * num_splits,), torch.float32, q.device)
    # fp32 caches: exact fp32 dots (tf32 would lose precision the reference keeps).
    dot_f32 = q.dtype == torch.float32 or (_INTERPRET and q.dtype == torch.bfloat16)
    if q.dtype == torch.float32:
        block_n, warps, stages = _BLOCK_N_FP32, 8, 2
    else:
        block_n, warps, stages = config or (_BLOCK_N, 4, 2)
    on = pdl.use(n_rows)  # server.pdl: small steps only
    _decode_split_kernel[(n_rows, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, rows, seq_lens, part_o, part_lse, out,
        q.stride(0), q.stride(1),
        block_tables.stride(0),
        k_cache.stride(1),
        out.stride(0), out.stride(1),
        num_q_heads, num_splits, min_split, head_dim, max_len, float(scale) * _LOG2E,
        PAGE=page,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),  # tl.dot needs >= 16 rows
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        DOT_F32=dot_f32,
        PDL=on,
        num_warps=warps,
        num_stages=stages,
        **pdl.launch_options(on),
    )
    _decode_reduce_kernel[(n_rows, num_q_heads)](
        part_o, part_lse, seq_lens, out,
        out.stride(0), out.stride(1),
        num_q_heads, num_splits, min_split, head_dim, max_len,
        BLOCK_N=block_n,
        SPLITS_PAD=_MAX_SPLITS,
        BLOCK_D=block_d,
        PDL=on,
        num_warps=4,
        **pdl.launch_options(on),
    )
    return out


# ---------------------------------------------------------------------------------------------
# Prefill (flash attention over packed chunks, keys read through the block table)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _prefill_tile(
    acc, m_i, l_i, q, kc_ptr, vc_ptr, table, head_off, n0, offs_m_pos, k_len,
    stride_tok, scale_log2, d_mask,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
):
    """One BLOCK_N tile of keys folded into the running softmax of a query block.

    CAUSAL=False is only called for tiles wholly below the block's first query (every key
    exists and every query sees it): no key mask and no -inf guard. That tile runs ~128 times
    per query block deep in a long context, so every elementwise pass over the 128 x 128 scores
    counts: without those two, with the scale folded into one FMA and the P.V product added
    inside the dot, 2048 queries after 14,336 keys took 0.89-0.90x the time (H200, 8B heads,
    docs/benchmarks.md 8i). The head-dim mask stays on the loads: dropping it when head_dim is
    a power of two measured no faster here and 5-6 % slower in the decode kernel.
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if CAUSAL:
        n_mask = offs_n < k_len
        page = tl.load(table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
    else:
        page = tl.load(table + offs_n // PAGE).to(tl.int64)
        kv_mask = d_mask[None, :]
    tok = (page * PAGE + offs_n % PAGE) * stride_tok
    k = tl.load(kc_ptr + tok[:, None] + head_off, mask=kv_mask, other=0.0)
    if DOT_F32:
        qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    if CAUSAL:
        qk = qk * scale_log2
        visible = (offs_n[None, :] <= offs_m_pos[:, None]) & n_mask[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        # A query row fully masked so far keeps m = -inf; shift by 0 then (exp2(-inf) = 0).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
    else:
        # Every score is finite here, so m_new is too; the scale folds into one FMA.
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale_log2)
        m_safe = m_new
        p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    v = tl.load(vc_ptr + tok[:, None] + head_off, mask=kv_mask, other=0.0)
    # Accumulating inside the dot lets the MMA add into acc (no separate 128 x 128 add).
    if DOT_F32:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _find_sequence(cu_q_ptr, n_seqs, target, BLOCK_T: tl.constexpr, BY_BLOCK: tl.constexpr):
    """The last sequence s that starts at or before `target` (a binary search over the packed
    offsets). BY_BLOCK: `target` is a flat query block and s starts at block
    `cu_q[s] // BLOCK_T + s`; else `target` is a token and s starts at token `cu_q[s]` (a
    sequence with an empty chunk has the next one's start, so it is passed over)."""
    lo = 0
    hi = n_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_q_ptr + mid).to(tl.int32)
        if BY_BLOCK:
            start = start // BLOCK_T + mid
        if start <= target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _split_len(hi, num_splits, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr):
    """Keys per split of a query block that sees `hi` keys: the block's keys in `num_splits`
    tile-aligned slices, but none shorter than MIN_SPLIT keys, so a block over a short
    context stays one split (its partials would cost more than the split saves). The block
    then has `cdiv(hi, split_len)` active splits; one split writes the output directly."""
    return tl.maximum(tl.cdiv(tl.cdiv(hi, num_splits), BLOCK_N) * BLOCK_N, MIN_SPLIT)


@triton.jit(do_not_specialize=["n_seqs", "num_splits"])
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_rows_ptr, cu_q_ptr, k_lens_ptr, out_ptr,
    part_o_ptr, part_lse_ptr,
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_bt,
    stride_tok,
    num_q_heads,
    head_dim,
    scale_log2,
    n_seqs,
    num_splits,
    PAGE: tl.constexpr,
    GROUP: tl.constexpr,
    HEADS: tl.constexpr,  # query heads per program: 1, or GROUP (GQA-packed)
    BLOCK_T: tl.constexpr,  # query tokens per program; rows = BLOCK_T * HEADS
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MIN_SPLIT: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    # Grid (flat query blocks, Hq // HEADS, splits). Sequence s owns the flat blocks from
    # `cu_q[s] // BLOCK_T + s` on, one per BLOCK_T of its tokens, so the grid needs at most
    # `T // BLOCK_T + n_seqs` of them whatever the chunk lengths: it depends on shapes only
    # (a CUDA graph can hold the launch) and a short chunk costs one block, not the longest's.
    # With HEADS = GROUP the rows are every (token, query head) pair of one KV head's group,
    # so each K/V tile is loaded once for the whole group. Split i of a block takes the i-th
    # slice of the keys the block can see (`_split_len`); a block with several active splits
    # writes partials that `_prefill_merge_kernel` combines (flash-decoding applied to
    # prefill: a short chunk over a long context would otherwise run a few programs on a
    # 132-SM GPU). num_splits is a runtime value: split and unsplit launches share one
    # compiled variant.
    block = tl.program_id(0)
    hg = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_sequence(cu_q_ptr, n_seqs, block, BLOCK_T, True)
    q_start = tl.load(cu_q_ptr + seq).to(tl.int32)
    q_len = tl.load(cu_q_ptr + seq + 1).to(tl.int32) - q_start
    tb = block - (q_start // BLOCK_T + seq)  # this program's block within the chunk
    if tb * BLOCK_T < q_len:
        k_len = tl.load(k_lens_ptr + seq).to(tl.int32)
        ctx = k_len - q_len  # position of the chunk's first query
        # Keys below the block's first query are visible to every query of the block: no
        # mask. From there up to its last query's position the causal mask applies; beyond,
        # nothing is visible and nothing is loaded. The unmasked tiles are whole and below
        # k_len (split starts are tile-aligned and a split that ends before full_end ends on
        # a tile boundary), which is what lets `_prefill_tile` skip the key mask there.
        first = ctx + tb * BLOCK_T
        full_end = (first // BLOCK_N) * BLOCK_N
        hi = tl.minimum(k_len, ctx + tl.minimum((tb + 1) * BLOCK_T, q_len))
        split_len = _split_len(hi, num_splits, BLOCK_N, MIN_SPLIT)
        lo = split * split_len
        if lo < hi:
            end = tl.minimum(lo + split_len, hi)
            table = bt_ptr + tl.load(seq_rows_ptr + seq).to(tl.int64) * stride_bt
            kvh = (hg * HEADS) // GROUP
            rows = tl.arange(0, BLOCK_T * HEADS)
            offs_m = tb * BLOCK_T + rows // HEADS  # token index within the chunk
            heads = hg * HEADS + rows % HEADS
            offs_d = tl.arange(0, BLOCK_D)
            m_mask = offs_m < q_len
            d_mask = offs_d < head_dim
            out_mask = m_mask[:, None] & d_mask[None, :]
            tokens = (q_start + offs_m).to(tl.int64)
            q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh
                        + offs_d[None, :], mask=out_mask, other=0.0)
            if DOT_F32:
                q = q.to(tl.float32)
            head_off = kvh * head_dim + offs_d[None, :]
            pos = ctx + offs_m  # absolute position of each query
            m_i = tl.full([BLOCK_T * HEADS], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_T * HEADS], tl.float32)
            acc = tl.zeros([BLOCK_T * HEADS, BLOCK_D], tl.float32)
            for n0 in range(lo, tl.minimum(end, full_end), BLOCK_N):
                acc, m_i, l_i = _prefill_tile(
                    acc, m_i, l_i, q, kc_ptr, vc_ptr, table, head_off, n0, pos, k_len,
                    stride_tok, scale_log2, d_mask, PAGE, BLOCK_N, False, DOT_F32,
                )
            for n0 in range(tl.maximum(lo, full_end), end, BLOCK_N):
                acc, m_i, l_i = _prefill_tile(
                    acc, m_i, l_i, q, kc_ptr, vc_ptr, table, head_off, n0, pos, k_len,
                    stride_tok, scale_log2, d_mask, PAGE, BLOCK_N, True, DOT_F32,
                )
            if split_len < hi:  # several active splits: partials for the merge
                # A row that sees none of this slice's keys (its position is below the
                # slice) has l = 0: weight 0 in the merge.
                seen = l_i > 0
                part = (tokens * num_q_heads + heads) * num_splits + split
                tl.store(part_o_ptr + part[:, None] * BLOCK_D + offs_d[None, :],
                         tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0),
                         mask=out_mask)
                tl.store(part_lse_ptr + part,
                         tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf")),
                         mask=m_mask)
            else:
                out = acc / l_i[:, None]
                tl.store(out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh
                         + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["n_seqs", "num_splits"])
def _prefill_merge_kernel(
    part_o_ptr, part_lse_ptr, cu_q_ptr, k_lens_ptr, out_ptr,
    stride_ot, stride_oh,
    num_q_heads,
    head_dim,
    n_seqs,
    num_splits,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_SPLIT: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid (T, Hq): one (token, query head) per program. Only tokens whose query block had
    # several active splits are merged (the same arithmetic as `_prefill_kernel`); the others
    # were written directly, and tokens past the last chunk (a graph's padding) not at all.
    # Every merged row has a split that saw a key (its own position): the weights never all
    # vanish.
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token < tl.load(cu_q_ptr + n_seqs):
        seq = _find_sequence(cu_q_ptr, n_seqs, token, BLOCK_T, False)
        q_start = tl.load(cu_q_ptr + seq).to(tl.int32)
        q_len = tl.load(cu_q_ptr + seq + 1).to(tl.int32) - q_start
        tb = (token - q_start) // BLOCK_T
        k_len = tl.load(k_lens_ptr + seq).to(tl.int32)
        ctx = k_len - q_len
        hi = tl.minimum(k_len, ctx + tl.minimum((tb + 1) * BLOCK_T, q_len))
        split_len = _split_len(hi, num_splits, BLOCK_N, MIN_SPLIT)
        if split_len < hi:
            active = tl.cdiv(hi, split_len)
            offs_s = tl.arange(0, SPLITS_PAD)
            offs_d = tl.arange(0, BLOCK_D)
            s_mask = offs_s < active
            base = (token.to(tl.int64) * num_q_heads + head) * num_splits
            lse = tl.load(part_lse_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
            weights = tl.exp2(lse - tl.max(lse, axis=0))
            o = tl.load(part_o_ptr + (base + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
                        mask=s_mask[:, None], other=0.0)
            out = tl.sum(o * weights[:, None], axis=0) / tl.sum(weights, axis=0)
            tl.store(out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
                     out.to(out_ptr.dtype.element_ty), mask=offs_d < head_dim)


# (kind, BLOCK_M or tokens x group rows, BLOCK_N, num_warps, num_stages) for 16-bit caches;
# `prefill_attention(config=...)` overrides it (benchmarks sweep it).
# Measured on an H200 (8B shapes, bf16, 2026-11-30, .probe tune run): the GQA-packed 128 x 128
# tile led or tied every case (first 2048-token chunk, after 2k and 14k of context, 8 x 256,
# 256 after 8k); per-head 128 x 64 was 5-19 % slower.
PREFILL_CONFIG = ("gqa", 128, 128, 8, 3)
# A short chunk over a long context (a prefix-cache hit leaves a few tokens to compute) gets one
# GQA program per KV head: 8 programs for 132 SMs. One per query head and 64 queries keeps 4x
# the programs busy (the 8B prefix-hit TTFT went 17 -> 25 ms with the GQA tile, H200).
SHORT_CHUNK = 64
SHORT_CHUNK_CONFIG = ("per_head", 64, 64, 4, 3)


# Split-KV for prefill: a step of few query blocks (a short chunk over a long context, the
# chunks beside decode rows) runs few programs; splitting each block's keys fills the GPU.
# The grid's split count comes from the shapes only (T and the tile), so a graph's launch is
# fixed: enough (block, head group) programs x splits to reach _PREFILL_TARGET_PROGRAMS with
# the chunk's own blocks (a chunk of 1024+ tokens on the 8B is not split: 256+ programs).
# How many of them a block uses depends on its context (`_split_len`): at least
# _MIN_SPLIT_KEYS keys per split, so shallow blocks stay whole and cost no merge.
_MAX_PREFILL_SPLITS = 8
_PREFILL_TARGET_PROGRAMS = 256
# No split shorter than this many keys (`_split_len`): the fp32 partials and the merge cost
# more than a shorter split saves (H200, 8B heads, bench/results/prefill-split-probe-h200.json,
# docs/benchmarks.md 8c: 512 and 1024-token first chunks ran 1.7x slower split in 2-8; 16
# tokens after 4000 fastest in 2 splits, 256 after 8192 in 2-4).
_MIN_SPLIT_KEYS = 2048


def prefill_splits(n_tokens: int, block_t: int, head_groups: int) -> int:
    """The split-KV factor `prefill_attention` uses for these shapes."""
    programs = max(1, triton.cdiv(n_tokens, block_t) * head_groups)
    return max(1, min(_MAX_PREFILL_SPLITS, _PREFILL_TARGET_PROGRAMS // programs))


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
    config: tuple | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    min_split_keys: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed query chunks over their sequences' cached tokens.

    q `[T, Hq, D]` (sequence s owns tokens `cu_seqlens_q[s]:cu_seqlens_q[s+1]`), caches
    `[blocks, block_size, Hkv, D]` already holding every key up to `k_lens[s]` (the chunk's own
    included), block_tables `[R, max_blocks]` int32 with sequence s at row `seq_rows[s]`.
    `max_q_len` (a host int, >= every chunk length) only picks the tile: chunks of at most
    `SHORT_CHUNK` tokens run per query head. The grid depends on shapes alone (T and the
    number of sequences), so the launch is capturable: a CUDA graph replays it for any
    chunk lengths that fit; sequences with an empty chunk (`cu_seqlens_q[s] ==
    cu_seqlens_q[s+1]`, padding) compute nothing, and tokens past `cu_seqlens_q[-1]` are
    left unwritten. Returns `[T, Hq, D]`. `config` overrides `PREFILL_CONFIG` (kind
    "per_head": one program per query head; "gqa": one per KV head, its group's query heads
    stacked as rows so K/V tiles load once). `out` (shaped like q, unit stride along D)
    receives the result instead of a new tensor. `num_splits` overrides `prefill_splits`
    (each query block's keys in up to that many slices, merged by a second kernel) and
    `min_split_keys` the shortest slice (`_MIN_SPLIT_KEYS`; tests make it short).
    """
    _check_cache(q, k_cache, v_cache)
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got {tuple(q.shape)}")
    n_seqs = seq_rows.shape[0]
    _check_index("seq_rows", seq_rows, n_seqs)
    _check_index("cu_seqlens_q", cu_seqlens_q, n_seqs + 1)
    _check_index("k_lens", k_lens, n_seqs)
    if q.stride(-1) != 1:
        q = q.contiguous()
    n_tokens, num_q_heads, head_dim = q.shape
    out = _empty(q.shape, q.dtype, q.device) if out is None else out
    if n_tokens == 0 or n_seqs == 0:
        return out
    fp32 = q.dtype == torch.float32
    dot_f32 = fp32 or (_INTERPRET and q.dtype == torch.bfloat16)
    group = num_q_heads // k_cache.shape[2]
    # Hopper: 128 x 64 tiles with 8 warps keep the tensor cores busy at head_dim 128; fp32
    # (CPU interpreter, tests) needs smaller tiles to fit registers.
    if config is None:
        if fp32:
            config = ("per_head", 32, 32, 4, 1)
        elif max_q_len <= SHORT_CHUNK:
            config = SHORT_CHUNK_CONFIG
        else:
            config = PREFILL_CONFIG
    kind, block_m, block_n, warps, stages = config
    if kind == "gqa" and group & (group - 1) == 0 and block_m >= group:
        heads, block_t = group, block_m // group  # rows = tokens x the group's query heads
    else:
        heads, block_t = 1, block_m
    # Flat query blocks: every sequence's blocks fit in T // BLOCK_T + n_seqs (the kernel's
    # comment), so the grid is a function of the shapes alone; so is the split count.
    if num_splits is None:
        num_splits = prefill_splits(n_tokens, block_t, num_q_heads // heads)
    elif not 1 <= num_splits <= _MAX_PREFILL_SPLITS:
        raise ValueError(f"num_splits must be in [1, {_MAX_PREFILL_SPLITS}], got {num_splits}")
    block_d = triton.next_power_of_2(head_dim)
    min_split = _MIN_SPLIT_KEYS if min_split_keys is None else min_split_keys
    if min_split < block_n or min_split % block_n:
        raise ValueError(f"min_split_keys must be a multiple of BLOCK_N={block_n}")
    # Partials (fp32 even when unused: a pointer's dtype is part of the compiled variant).
    rows = n_tokens * num_q_heads * num_splits if num_splits > 1 else 1
    part_o = _empty((rows, block_d), torch.float32, q.device)
    part_lse = _empty((rows,), torch.float32, q.device)
    grid = (triton.cdiv(n_tokens, block_t) + n_seqs, num_q_heads // heads, num_splits)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_rows, cu_seqlens_q, k_lens, out, part_o, part_lse,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(1), num_q_heads, head_dim, float(scale) * _LOG2E, n_seqs, num_splits,
        PAGE=k_cache.shape[1], GROUP=group, HEADS=heads, BLOCK_T=block_t, BLOCK_N=block_n,
        BLOCK_D=block_d, MIN_SPLIT=min_split, DOT_F32=dot_f32, num_warps=warps,
        num_stages=stages,
    )
    if num_splits > 1:
        _prefill_merge_kernel[(n_tokens, num_q_heads)](
            part_o, part_lse, cu_seqlens_q, k_lens, out, out.stride(0), out.stride(1),
            num_q_heads, head_dim, n_seqs, num_splits, BLOCK_T=block_t, BLOCK_N=block_n,
            MIN_SPLIT=min_split, SPLITS_PAD=_MAX_PREFILL_SPLITS, BLOCK_D=block_d, num_warps=4,
        )
    return out
