"""Paged-attention test inputs, torch references and error bounds, shared by
tests/test_triton_attention.py (decode) and tests/test_triton_prefill_attention.py.

Inputs: paged caches `[blocks, block_size, Hkv, D]` that hold NaN everywhere except the tokens
some sequence may read (its first seq_len / k_len tokens, found through its block-table row);
table entries past a sequence's last block point at a block that is NaN throughout; sequences
sit in scattered blocks, in shuffled table rows, some sharing their first full blocks (prefix
cache hits); decode padding rows share the scratch row (block 0) with seq_len 1. Outputs come
from a NaN-filled `_empty`. A read outside the contract, or an output element left unwritten,
shows up as NaN.

Reference and bound. The torch references (`ops.decode_attention`, `ops.prefill_attention`) run
in float64 on the same, already rounded, inputs. Per output element, with w_j the exact softmax
weights and mean|v| = sum_j w_j |v_j| (the reference run on |v|):
* fp32: 1e-5 * (|ref| + mean|v|). The kernels use IEEE fp32 dots; only the order of fp32 sums
  and the hardware exp2 differ from exact arithmetic.
* fp16/bf16: 1 ulp of ref + eps * mean|v|. Everything is accumulated in fp32; the kernels round
  to 16 bits at two places only. (1) P, the softmax weights, is rounded to the cache dtype
  before the P @ V product (tensor-core operands) while the normaliser sums the unrounded fp32
  weights: each weight is off by at most eps/2 of itself, which moves the output by at most
  eps/2 * mean|v|. (2) The output's own rounding: half an ulp; a whole ulp is allowed because
  the result may round across a power of two from the reference's binade. The factor 2 on (1)
  leaves room for what fp32 adds (the Q K^T and P V accumulations, exp2, decode's fp32 merge of
  the split-K partials) and for fp16 weights below 2^-14 that round as subnormals (at most
  2^-25 of the largest weight each). A causal off-by-one, a wrong block, or a missing split
  moves outputs by a whole key's share of the weight: far beyond the bound.
Under the interpreter, bfloat16 dots run in fp32 (an interpreter bug, worked around in the
module) and the fp32 -> bf16 output conversion truncates: under 1 ulp, inside the same bound.
"""

from __future__ import annotations

import pytest
import torch

from server import ops, triton_attention
from tests.helpers import triton_testing
from tests.helpers.triton_testing import torch_reference


@pytest.fixture
def interpreter_loops():
    """Skips a test whose kernels loop in ways this Triton's interpreter cannot run."""
    triton_testing.skip_without_interpreter_loops()


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels allocate starts as NaN, so an element left unwritten shows
    (autouse in each test module that imports it)."""
    triton_testing.poison(monkeypatch, triton_attention)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Paged inputs, reference and bound
# ---------------------------------------------------------------------------------------------


def paged_cache(lens, page, hkv, d, dtype, gen, *, width, share=(), scratch_readable=False):
    """Paged K/V caches holding sequences of `lens` tokens in scattered blocks.

    Returns `(k_cache, v_cache, table, seq_rows)` (CPU): sequence i owns table row
    `seq_rows[i]` (rows shuffled); the table's last row is the scratch row, block 0 throughout.
    `share`: pairs (i, j), j < i: sequence i starts with the full blocks it has in common with
    sequence j (as a prefix-cache hit makes it). Every token no sequence reads is NaN, and so
    is a whole "poison" block that the table entries past each sequence's blocks point at.
    `scratch_readable`: block 0's first token is readable (padding rows read it).
    """
    n = len(lens)
    need = [cdiv(length, page) for length in lens]
    assert max(need) <= width, "the table is too narrow for these lengths"
    shared = {i: (j, min(lens[i], lens[j]) // page) for i, j in share}
    assert all(j < i for i, (j, _) in shared.items())
    owned = sum(need) - sum(count for _, count in shared.values())
    num_blocks = 2 + owned + 2  # scratch, poison, the sequences', two never referenced
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    poison = free.pop()
    table = torch.full((n + 1, width), poison, dtype=torch.int32)
    table[n] = 0
    seq_rows = torch.randperm(n, generator=gen)
    readable = torch.zeros(num_blocks, page, dtype=torch.bool)
    blocks: list[list[int]] = []
    for i, length in enumerate(lens):
        mine = list(blocks[shared[i][0]][: shared[i][1]]) if i in shared else []
        mine += [free.pop() for _ in range(need[i] - len(mine))]
        blocks.append(mine)
        table[seq_rows[i], : len(mine)] = torch.tensor(mine, dtype=torch.int32)
        positions = torch.arange(length)
        readable[torch.tensor(mine)[positions // page], positions % page] = True
    if scratch_readable:
        readable[0, 0] = True
    k_cache = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype)
    for cache in (k_cache, v_cache):
        cache[~readable] = float("nan")
    assert not readable[poison].any()
    return k_cache, v_cache, table, seq_rows


def error_bound(ref: torch.Tensor, mean_abs_v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The module docstring's error bound, per element."""
    if dtype == torch.float32:
        return 1e-5 * (ref.abs() + mean_abs_v)
    finfo = torch.finfo(dtype)
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(finfo.tiny)))) * finfo.eps
    return ulp + finfo.eps * mean_abs_v


def assert_within_bound(got, ref, mean_abs_v, dtype, what):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    assert not torch.isnan(ref).any(), f"{what}: NaN in the reference (a test setup bug)"
    assert not torch.isnan(got).any(), f"{what}: NaN (an unwritten output or a poisoned read)"
    got64 = got.double().cpu()
    ref, mean_abs_v = ref.cpu(), mean_abs_v.cpu()
    err = (got64 - ref).abs()
    bound = error_bound(ref, mean_abs_v, dtype)
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements beyond the bound; first at "
            f"flat index {i}: got {got64.flatten()[i].item():.6g}, expected "
            f"{ref.flatten()[i].item():.6g} (bound {bound.flatten()[i].item():.3g}); worst "
            f"error {err.max().item():.3g}"
        )


def decode_inputs(n, hq, hkv, d, max_len, page, dtype, device, gen, lens=None, share=None):
    """A decode batch of n rows over a table of width cdiv(max_len, page).

    Without `lens`: seq_lens cover max_len, 1, both sides of a block edge, and random values;
    when n > 3 the last two rows are padding (the scratch row, seq_len 1, as the engine pads a
    batch) and every third sequence shares its first full blocks with the first one.
    Returns (q, k_cache, v_cache, table, rows, seq_lens) on `device`.
    """
    n_pad = 2 if lens is None and n > 3 else 0
    n_seq = n - n_pad
    if lens is None:
        lens = torch.randint(1, max_len + 1, (n_seq,), generator=gen).tolist()
        specials = [max_len, 1, page + 1, page, page - 1, 2 * page, max_len // 2 + 1]
        for i, length in enumerate(specials[:n_seq]):
            lens[i] = min(max(length, 1), max_len)
    if share is None:
        share = [(i, 0) for i in range(3, n_seq, 3)]
    k_cache, v_cache, table, seq_rows = paged_cache(
        lens, page, hkv, d, dtype, gen, width=cdiv(max_len, page), share=share,
        scratch_readable=n_pad > 0,
    )
    rows = torch.cat([seq_rows, torch.full((n_pad,), n_seq, dtype=torch.int64)])
    seq_lens = torch.tensor(list(lens) + [1] * n_pad, dtype=torch.int64)
    q = (torch.randn(n, hq, d, generator=gen) * 2).to(dtype)
    return [t.to(device) for t in (q, k_cache, v_cache, table, rows, seq_lens)]


def decode_reference(q, k_cache, v_cache, table, rows, seq_lens, scale):
    """(ref, mean|v|) in float64. The reference gathers every row up to the longest length (on
    CUDA, the whole table row) and masks afterwards: zero the NaNs it would multiply by 0."""
    k64, v64 = k_cache.nan_to_num().double(), v_cache.nan_to_num().double()
    args = (table, rows.long(), seq_lens.long(), scale)
    with torch_reference():
        ref = ops.decode_attention(q.double(), k64, v64, *args)
        mean_abs_v = ops.decode_attention(q.double(), k64, v64.abs(), *args)
    return ref, mean_abs_v


def check_decode(inputs, what, num_splits=None, config=None, min_split=None):
    q, k_cache, v_cache, table, rows, seq_lens = inputs
    scale = q.shape[-1] ** -0.5
    got = triton_attention.decode_attention(
        q, k_cache, v_cache, table, rows, seq_lens, scale, num_splits, config=config,
        min_split=min_split,
    )
    ref, mean_abs_v = decode_reference(q, k_cache, v_cache, table, rows, seq_lens, scale)
    assert_within_bound(got, ref, mean_abs_v, q.dtype, what)
    return got


def prefill_inputs(chunks, hq, hkv, d, page, dtype, device, gen, share=(), q_offset=0):
    """Packed chunks `[(q_len, k_len)]`: chunk s is the last q_len of its sequence's k_len
    tokens. q is a view `q_offset` tokens into a larger buffer (as the model passes `q[nd:]`,
    after the decode rows). Returns the kernel's arguments (device) minus the scale."""
    lens = [k_len for _, k_len in chunks]
    assert all(1 <= q_len <= k_len for q_len, k_len in chunks)
    width = cdiv(max(lens), page) + 1  # a column past the longest sequence
    k_cache, v_cache, table, seq_rows = paged_cache(
        lens, page, hkv, d, dtype, gen, width=width, share=share
    )
    q_lens = [q_len for q_len, _ in chunks]
    total = sum(q_lens)
    q_all = (torch.randn(q_offset + total, hq, d, generator=gen) * 2).to(dtype).to(device)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    k_lens = torch.tensor(lens, dtype=torch.int32)
    tensors = [t.to(device) for t in (k_cache, v_cache, table, seq_rows, cu, k_lens)]
    return [q_all[q_offset:], *tensors, max(q_lens)]


def prefill_reference(q, k_cache, v_cache, table, seq_rows, cu, k_lens, max_q_len, scale):
    """(ref, mean|v|) in float64. The reference reads exactly each sequence's first k_len
    tokens, so the NaN poison stays in (a NaN here would be a test setup bug)."""
    args = (table, seq_rows, cu, k_lens, max_q_len, scale)
    k64, v64 = k_cache.double(), v_cache.double()
    with torch_reference():
        ref = ops.prefill_attention(q.double(), k64, v64, *args)
        mean_abs_v = ops.prefill_attention(q.double(), k64, v64.abs(), *args)
    return ref, mean_abs_v


def check_prefill(inputs, what, config=None):
    q = inputs[0]
    scale = q.shape[-1] ** -0.5
    got = triton_attention.prefill_attention(*inputs, scale, config=config)
    assert not torch.isnan(got).any(), f"{what}: NaN (an unwritten row or a poisoned read)"
    ref, mean_abs_v = prefill_reference(*inputs, scale)
    assert_within_bound(got, ref, mean_abs_v, q.dtype, what)
    return got
