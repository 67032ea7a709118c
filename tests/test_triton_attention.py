"""The Triton attention kernels of `server.triton_attention` against the torch references of
`server.ops`: split-K decode attention and the packed varlen prefill (both of its kernels: one
program per query head, or GQA-packed, one per KV head), all over the paged cache.

Two ways to run (as tests/test_triton_ops.py):
* on CUDA (tests marked `gpu`): the compiled kernels, the 8B shapes, long contexts, CUDA-graph
  replay;
* on CPU under Triton's interpreter, opt-in:
  `TRITON_INTERPRET=1 pytest tests/test_triton_attention.py` (the variable must be set before
  triton is imported). The interpreter cases are small: the file runs in well under a minute.
Without triton the module is skipped.

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

triton = pytest.importorskip("triton", reason="triton is not installed")

from server import ops, triton_attention  # noqa: E402  (after the importorskip)
from tests.helpers import triton_testing  # noqa: E402

INTERPRET, _CUDA_SKIP, DEVICES, DTYPES = (
    triton_testing.INTERPRET, triton_testing.CUDA_SKIP, triton_testing.DEVICES,
    triton_testing.DTYPES,
)
gpu_only = triton_testing.GPU_ONLY
torch_reference, _gen = triton_testing.torch_reference, triton_testing.gen


@pytest.fixture
def interpreter_loops():
    triton_testing.skip_without_interpreter_loops()


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels allocate starts as NaN, so an element left unwritten shows."""
    triton_testing.poison(monkeypatch, triton_attention)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Paged inputs, reference and bound
# ---------------------------------------------------------------------------------------------


def _paged_cache(lens, page, hkv, d, dtype, gen, *, width, share=(), scratch_readable=False):
    """Paged K/V caches holding sequences of `lens` tokens in scattered blocks.

    Returns `(k_cache, v_cache, table, seq_rows)` (CPU): sequence i owns table row
    `seq_rows[i]` (rows shuffled); the table's last row is the scratch row, block 0 throughout.
    `share`: pairs (i, j), j < i: sequence i starts with the full blocks it has in common with
    sequence j (as a prefix-cache hit makes it). Every token no sequence reads is NaN, and so
    is a whole "poison" block that the table entries past each sequence's blocks point at.
    `scratch_readable`: block 0's first token is readable (padding rows read it).
    """
    n = len(lens)
    need = [_cdiv(length, page) for length in lens]
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


def _bound(ref: torch.Tensor, mean_abs_v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The module docstring's error bound, per element."""
    if dtype == torch.float32:
        return 1e-5 * (ref.abs() + mean_abs_v)
    finfo = torch.finfo(dtype)
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(finfo.tiny)))) * finfo.eps
    return ulp + finfo.eps * mean_abs_v


def _assert_within_bound(got, ref, mean_abs_v, dtype, what):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    assert not torch.isnan(ref).any(), f"{what}: NaN in the reference (a test setup bug)"
    assert not torch.isnan(got).any(), f"{what}: NaN (an unwritten output or a poisoned read)"
    got64 = got.double().cpu()
    ref, mean_abs_v = ref.cpu(), mean_abs_v.cpu()
    err = (got64 - ref).abs()
    bound = _bound(ref, mean_abs_v, dtype)
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements beyond the bound; first at "
            f"flat index {i}: got {got64.flatten()[i].item():.6g}, expected "
            f"{ref.flatten()[i].item():.6g} (bound {bound.flatten()[i].item():.3g}); worst "
            f"error {err.max().item():.3g}"
        )


# ---------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------


def _decode_inputs(n, hq, hkv, d, max_len, page, dtype, device, gen, lens=None, share=None):
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
    k_cache, v_cache, table, seq_rows = _paged_cache(
        lens, page, hkv, d, dtype, gen, width=_cdiv(max_len, page), share=share,
        scratch_readable=n_pad > 0,
    )
    rows = torch.cat([seq_rows, torch.full((n_pad,), n_seq, dtype=torch.int64)])
    seq_lens = torch.tensor(list(lens) + [1] * n_pad, dtype=torch.int64)
    q = (torch.randn(n, hq, d, generator=gen) * 2).to(dtype)
    return [t.to(device) for t in (q, k_cache, v_cache, table, rows, seq_lens)]


def _decode_reference(q, k_cache, v_cache, table, rows, seq_lens, scale):
    """(ref, mean|v|) in float64. The reference gathers every row up to the longest length (on
    CUDA, the whole table row) and masks afterwards: zero the NaNs it would multiply by 0."""
    k64, v64 = k_cache.nan_to_num().double(), v_cache.nan_to_num().double()
    args = (table, rows.long(), seq_lens.long(), scale)
    with torch_reference():
        ref = ops.decode_attention(q.double(), k64, v64, *args)
        mean_abs_v = ops.decode_attention(q.double(), k64, v64.abs(), *args)
    return ref, mean_abs_v


def _check_decode(inputs, what, num_splits=None, config=None, min_split=None):
    q, k_cache, v_cache, table, rows, seq_lens = inputs
    scale = q.shape[-1] ** -0.5
    got = triton_attention.decode_attention(
        q, k_cache, v_cache, table, rows, seq_lens, scale, num_splits, config=config,
        min_split=min_split,
    )
    ref, mean_abs_v = _decode_reference(q, k_cache, v_cache, table, rows, seq_lens, scale)
    _assert_within_bound(got, ref, mean_abs_v, q.dtype, what)
    return got


DECODE_CASES = [  # (N, Hq, Hkv, D, max_len, block_size)
    (1, 4, 4, 64, 37, 8),  # G = 1
    (5, 8, 2, 128, 300, 16),  # G = 4
    (3, 16, 2, 64, 1000, 64),  # G = 8
    (33, 8, 2, 64, 129, 16),  # wide batch, G = 4
    (2, 2, 1, 128, 4096, 64),  # long context, few heads: many splits per row
]
GPU_DECODE_CASES = [  # the 8B shape (32 q / 8 kv heads, D 128)
    (1, 32, 8, 128, 4096, 16),
    (8, 32, 8, 128, 4096, 16),
    (64, 32, 8, 128, 513, 16),
    (16, 32, 8, 128, 8192, 64),
    (4, 32, 8, 128, 2000, 8),
]


def _case_id(case) -> str:
    return "N{}-q{}-kv{}-d{}-L{}-bs{}".format(*case)


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=_case_id)
def test_decode_attention(device, dtype, case):
    n, hq, hkv, d, max_len, page = case
    inputs = _decode_inputs(n, hq, hkv, d, max_len, page, dtype, device, _gen(sum(case)))
    _check_decode(inputs, f"decode_attention {case} {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_DECODE_CASES, ids=_case_id)
@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
def test_decode_attention_8b_shapes(dtype, case):
    n, hq, hkv, d, max_len, page = case
    inputs = _decode_inputs(n, hq, hkv, d, max_len, page, dtype, "cuda", _gen(sum(case)))
    _check_decode(inputs, f"decode_attention {case} {dtype}")


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page", [8, 16, 64])
def test_decode_attention_block_sizes_edges_and_shared_blocks(device, dtype, page):
    """Lengths on both sides of block edges, sequences sharing their first full blocks in
    both directions of the table, padding rows on the scratch block, at each block size."""
    lens = [page - 1, page, page + 1, 3 * page, 5 * page + 3, 2 * page + 5, 1, 4 * page]
    share = [(3, 1), (4, 3), (7, 4)]  # 1 block, then 3, then 4 blocks in common
    gen = _gen(page)
    q, k_cache, v_cache, table, rows, seq_lens = _decode_inputs(
        len(lens), 8, 2, 64, 5 * page + 3, page, dtype, device, gen, lens=lens, share=share
    )
    assert torch.equal(table[rows[4], :3], table[rows[3], :3])  # shared blocks really shared
    # Two padding rows between the sequences, on the scratch row with seq_len 1.
    scratch = table.shape[0] - 1
    k_cache[0, 0] = torch.randn(k_cache.shape[2:], generator=gen).to(dtype).to(device)
    v_cache[0, 0] = torch.randn(v_cache.shape[2:], generator=gen).to(dtype).to(device)
    rows = torch.cat([rows[:3], torch.full((2,), scratch, device=device), rows[3:]])
    seq_lens = torch.cat([seq_lens[:3], torch.ones(2, dtype=torch.int64, device=device),
                          seq_lens[3:]])
    q = torch.cat([q[:3], (torch.randn(2, 8, 64, generator=gen) * 2).to(dtype).to(device), q[3:]])
    _check_decode((q, k_cache, v_cache, table, rows, seq_lens), f"decode block_size {page}")


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3, 32])
def test_decode_attention_any_split_count(device, num_splits):
    """Any split count gives a result within the bound; int32 rows and lengths work too."""
    q, k_cache, v_cache, table, rows, seq_lens = _decode_inputs(
        6, 8, 2, 64, 777, 16, torch.float16, device, _gen(3)
    )
    _check_decode(
        (q, k_cache, v_cache, table, rows.int(), seq_lens.int()),
        f"num_splits={num_splits}",
        num_splits=num_splits,
    )


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [(16, 2, 1), (32, 4, 2), (128, 8, 3)], ids=str)
def test_decode_attention_launch_configs(device, config):
    """(BLOCK_N, num_warps, num_stages) overrides (benchmarks sweep them): the split kernel and
    the merge agree on the split boundaries whatever the tile."""
    inputs = _decode_inputs(6, 8, 2, 64, 300, 16, torch.bfloat16, device, _gen(5))
    _check_decode(inputs, f"config {config}", config=config)
    _check_decode(inputs, f"config {config}, 7 splits", num_splits=7, config=config)


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("min_split", [64, 256, 512, 4096])
def test_decode_attention_minimum_split_length(device, min_split):
    """Rows whose context fits one split write their output directly and the merge skips
    them; longer rows in the same launch still merge several splits: every element is written
    (NaN-filled outputs) and within the bound, with 16-bit and fp32 caches."""
    lens = [1, 63, 64, 65, 300, 700, 777, 129]
    for dtype in (torch.bfloat16, torch.float32):
        inputs = _decode_inputs(8, 8, 2, 64, 777, 16, dtype, device, _gen(min_split), lens=lens)
        _check_decode(inputs, f"min_split={min_split} {dtype}", num_splits=4, min_split=min_split)


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
def test_decode_one_split_writes_what_the_merge_would(device):
    """A lone split's direct write is the merge of one partial bit for bit: a launch where every
    row has one split (long minimum) equals one where the policy gives each row one split."""
    lens = [5, 64, 200, 256]
    inputs = _decode_inputs(4, 8, 2, 64, 256, 16, torch.bfloat16, device, _gen(9), lens=lens)
    q, k_cache, v_cache, table, rows, seq_lens = inputs
    scale = 0.125
    one = triton_attention.decode_attention(q, k_cache, v_cache, table, rows, seq_lens, scale,
                                            num_splits=1)
    long_min = triton_attention.decode_attention(q, k_cache, v_cache, table, rows, seq_lens,
                                                 scale, num_splits=8, min_split=256)
    assert torch.equal(one, long_min)
    with pytest.raises(ValueError, match="multiple of 64"):
        triton_attention.decode_attention(q, k_cache, v_cache, table, rows, seq_lens, scale,
                                          min_split=100)


def test_minimum_split_grows_with_the_launch():
    """64 keys while few (row, KV head) pairs must fill the GPU, longer once many do; a pure
    function of shapes (a captured graph's launch never depends on lengths)."""
    assert triton_attention.decode_min_split(1, 8) == 64
    assert triton_attention.decode_min_split(8, 8) == 64
    assert triton_attention.decode_min_split(16, 8) == 256
    assert triton_attention.decode_min_split(64, 8) == 512
    assert triton_attention.decode_min_split(64, 4) == 256  # 70B shapes under TP=2
    sizes = [triton_attention.decode_min_split(b, 8) for b in range(1, 257)]
    assert sizes == sorted(sizes) and all(m % 64 == 0 for m in sizes)


def test_split_policy_is_a_function_of_shapes():
    for batch in (1, 2, 8, 64, 256):
        for max_len in (1, 63, 64, 65, 4096, 131072):
            splits = triton_attention.decode_attention_splits(batch, 8, max_len)
            assert 1 <= splits <= 32
            assert splits <= max(1, -(-max_len // 64))  # never more splits than blocks
    assert triton_attention.decode_attention_splits(1, 8, 4096) == 32  # batch 1 fills the GPU
    assert triton_attention.decode_attention_splits(64, 8, 4096) == 4
    assert triton_attention.decode_attention_splits(1, 8, 16) == 1  # one block: no split


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_splits_by_table_width_not_lengths(device, monkeypatch):
    """decode_attention asks the policy about (rows, Hkv, table width * block_size): never the
    lengths, which a captured graph must not depend on."""
    calls = []
    policy = triton_attention.decode_attention_splits

    def recording(*args):
        calls.append(args)
        return policy(*args)

    monkeypatch.setattr(triton_attention, "decode_attention_splits", recording)
    q, k_cache, v_cache, table, rows, seq_lens = _decode_inputs(
        4, 4, 2, 64, 100, 8, torch.float32, device, _gen(8), lens=[3, 9, 1, 17], share=[]
    )
    scale = 0.125
    first = triton_attention.decode_attention(q, k_cache, v_cache, table, rows, seq_lens, scale)
    # Shorter lengths (prefixes of the same readable tokens): same policy question.
    triton_attention.decode_attention(q, k_cache, v_cache, table, rows, seq_lens // 2 + 1, scale)
    assert calls == [(4, 2, 13 * 8)] * 2
    explicit = triton_attention.decode_attention(
        q, k_cache, v_cache, table, rows, seq_lens, scale, policy(4, 2, 13 * 8)
    )
    assert torch.equal(first, explicit)


@pytest.mark.parametrize("device", [DEVICES[0], "cpu"])  # raised before any kernel runs
def test_input_validation(device):
    q = torch.zeros(2, 8, 64, device=device)
    cache = torch.zeros(3, 16, 2, 64, device=device)
    table = torch.zeros(2, 4, dtype=torch.int32, device=device)
    idx = torch.zeros(2, dtype=torch.int64, device=device)
    decode = triton_attention.decode_attention
    with pytest.raises(ValueError, match="multiple of Hkv"):
        decode(torch.zeros(2, 7, 64, device=device), cache, cache, table, idx, idx, 1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        decode(q, cache, cache, table, idx, idx[:1], 1.0)
    with pytest.raises(ValueError, match="rows"):
        decode(q, cache, cache, table, idx.float(), idx, 1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        decode(q.half(), cache, cache, table, idx, idx, 1.0)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        decode(q.double(), cache.double(), cache.double(), table, idx, idx, 1.0)
    with pytest.raises(ValueError, match="caches must both be"):
        decode(q, cache[:, :, :, :32], cache, table, idx, idx, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.zeros(3, 16, 2, 128, device=device)[..., :64]
        decode(q, strided, strided, table, idx, idx, 1.0)
    with pytest.raises(ValueError, match="q must be"):
        decode(q[0], cache, cache, table, idx, idx, 1.0)
    for bad in (0, 33):
        with pytest.raises(ValueError, match="num_splits"):
            decode(q, cache, cache, table, idx, idx, 1.0, bad)
    prefill = triton_attention.prefill_attention
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        prefill(q, cache, cache, table, idx, cu[:2], idx, 1, 1.0)
    with pytest.raises(ValueError, match="k_lens"):
        prefill(q, cache, cache, table, idx, cu, idx[:1], 1, 1.0)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        prefill(torch.zeros(2, 3, 64, device=device), cache, cache, table, idx, cu, idx, 1, 1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        prefill(q.bfloat16(), cache, cache, table, idx, cu, idx, 1, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_graph_replay_with_new_lengths_rows_and_tables(dtype, monkeypatch):
    """A graph captured once replays correctly with other queries, lengths, rows, block tables
    and cache contents (all written in place into the captured buffers)."""
    monkeypatch.setattr(
        triton_attention, "_empty", lambda shape, dt, dev: torch.empty(shape, dtype=dt, device=dev)
    )  # the graph pool hands out memory; no NaN fill inside
    n, hq, hkv, d, max_len, page = 8, 32, 8, 128, 1024, 16
    gen = _gen(123)

    def fresh(lens):
        # Same shapes every time: fixed lengths set the block count, the rest is random.
        return _decode_inputs(n, hq, hkv, d, max_len, page, dtype, "cuda", gen, lens=lens,
                              share=[])

    lens = [max_len, 1, 500, 17, 16, 300, 999, 64]
    buffers = fresh(lens)
    q, k_cache, v_cache, table, rows, seq_lens = buffers
    scale = d**-0.5
    triton_attention.decode_attention(q, k_cache, v_cache, table, rows, seq_lens, scale)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_attention.decode_attention(q, k_cache, v_cache, table, rows, seq_lens, scale)
    for trial in range(3):
        # A permutation of the lengths keeps every buffer's shape (the block count included).
        order = torch.randperm(n, generator=gen).tolist()
        new = fresh([lens[i] for i in order])
        for buf, value in zip(buffers, new, strict=True):
            buf.copy_(value)
        graph.replay()
        eager = triton_attention.decode_attention(q, k_cache, v_cache, table, rows, seq_lens, scale)
        torch.cuda.synchronize()
        assert not torch.isnan(out).any(), f"replay {trial}: NaN (a stale row or block read)"
        assert torch.equal(out, eager), f"replay {trial} differs from eager"
        ref, mean_abs_v = _decode_reference(q, k_cache, v_cache, table, rows, seq_lens, scale)
        _assert_within_bound(out, ref, mean_abs_v, dtype, f"replay {trial}")


# ---------------------------------------------------------------------------------------------
# prefill_attention
# ---------------------------------------------------------------------------------------------


def _prefill_inputs(chunks, hq, hkv, d, page, dtype, device, gen, share=(), q_offset=0):
    """Packed chunks `[(q_len, k_len)]`: chunk s is the last q_len of its sequence's k_len
    tokens. q is a view `q_offset` tokens into a larger buffer (as the model passes `q[nd:]`,
    after the decode rows). Returns the kernel's arguments (device) minus the scale."""
    lens = [k_len for _, k_len in chunks]
    assert all(1 <= q_len <= k_len for q_len, k_len in chunks)
    width = _cdiv(max(lens), page) + 1  # a column past the longest sequence
    k_cache, v_cache, table, seq_rows = _paged_cache(
        lens, page, hkv, d, dtype, gen, width=width, share=share
    )
    q_lens = [q_len for q_len, _ in chunks]
    total = sum(q_lens)
    q_all = (torch.randn(q_offset + total, hq, d, generator=gen) * 2).to(dtype).to(device)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    k_lens = torch.tensor(lens, dtype=torch.int32)
    tensors = [t.to(device) for t in (k_cache, v_cache, table, seq_rows, cu, k_lens)]
    return [q_all[q_offset:], *tensors, max(q_lens)]


def _prefill_reference(q, k_cache, v_cache, table, seq_rows, cu, k_lens, max_q_len, scale):
    """(ref, mean|v|) in float64. The reference reads exactly each sequence's first k_len
    tokens, so the NaN poison stays in (a NaN here would be a test setup bug)."""
    args = (table, seq_rows, cu, k_lens, max_q_len, scale)
    k64, v64 = k_cache.double(), v_cache.double()
    with torch_reference():
        ref = ops.prefill_attention(q.double(), k64, v64, *args)
        mean_abs_v = ops.prefill_attention(q.double(), k64, v64.abs(), *args)
    return ref, mean_abs_v


def _check_prefill(inputs, what, config=None):
    q = inputs[0]
    scale = q.shape[-1] ** -0.5
    got = triton_attention.prefill_attention(*inputs, scale, config=config)
    assert not torch.isnan(got).any(), f"{what}: NaN (an unwritten row or a poisoned read)"
    ref, mean_abs_v = _prefill_reference(*inputs, scale)
    _assert_within_bound(got, ref, mean_abs_v, q.dtype, what)
    return got


PREFILL_CASES = [  # (chunks [(q_len, k_len)], Hq, Hkv, D, block_size, share)
    # First chunks only (k_len == q_len), one of a single token; G = 1.
    ([(5, 5), (17, 17), (1, 1)], 4, 4, 64, 8, ()),
    # Continuation chunks (q_len 1 among them) beside a first chunk; G = 4; the second
    # sequence starts with the first one's two full blocks (a prefix-cache hit).
    ([(3, 40), (1, 77), (20, 20), (9, 33)], 8, 2, 128, 16, [(1, 0)]),
    # G = 8, block size 64.
    ([(33, 33), (12, 100)], 8, 1, 64, 64, ()),
    # Chunks longer than a query block (32 fp32, 128 fp16/bf16), a context that starts mid
    # key tile, so the unmasked and the causal key ranges split inside the chunk.
    ([(150, 150), (130, 260), (1, 230)], 2, 2, 64, 16, [(2, 1)]),
    # G = 3: no GQA packing (it needs a power-of-two group), the per-head kernel either way.
    ([(9, 30), (20, 20)], 6, 2, 64, 16, ()),
]
# "default": the launch prefill_attention picks (GQA-packed for 16-bit caches, per query head
# for fp32); "other": the other kernel, through `config`.
PREFILL_KERNELS = ["default", "other"]


def _prefill_config(kernel: str, dtype: torch.dtype, max_q_len: int):
    """None for the default launch; for "other", a config naming the kernel it does not pick."""
    if kernel == "default":
        return None
    if dtype == torch.float32 or max_q_len <= triton_attention.SHORT_CHUNK:
        return ("gqa", 32, 32, 4, 1) if dtype == torch.float32 else ("gqa", 128, 128, 8, 3)
    return ("per_head", 128, 64, 8, 3)


def _expected_prefill_kernel(kernel: str, dtype: torch.dtype, group: int, max_q_len: int) -> str:
    if group & (group - 1) or group == 1:
        return "per_head"  # the GQA packing needs a power-of-two group (of one: the same)
    # Short chunks (a few tokens over a long cached context) stay per query head by default:
    # one GQA program per KV head would leave most of the GPU idle.
    gqa_by_default = dtype != torch.float32 and max_q_len > triton_attention.SHORT_CHUNK
    return "gqa" if (kernel == "default") == gqa_by_default else "per_head"


class _RecordingKernel:
    """Stands in for the @triton.jit prefill kernel: logs ("per_head" | "gqa", grid, BLOCK_T)
    per launch (the kind from how many query heads one program stacks), then runs it."""

    def __init__(self, kernel, log: list):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            kind = "gqa" if kwargs["HEADS"] > 1 else "per_head"
            self.log.append((kind, tuple(grid), kwargs.get("BLOCK_T")))
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def prefill_launches(monkeypatch) -> list:
    """The prefill kernel's launches, in order: ("per_head" | "gqa", grid, BLOCK_T)."""
    log: list = []
    kernel = triton_attention._prefill_kernel
    monkeypatch.setattr(triton_attention, "_prefill_kernel", _RecordingKernel(kernel, log))
    return log


GPU_PREFILL_CASES = [  # 8B heads (32 q / 8 kv, D 128), long chunks and contexts
    ([(512, 512), (1, 4096), (2048, 4096), (77, 1000), (1, 1), (300, 301)], 32, 8, 128, 16,
     [(2, 1)]),
    ([(1000, 3000), (128, 128), (129, 129), (63, 64)], 32, 8, 128, 64, ()),
    ([(700, 2000), (2000, 2000), (5, 9)], 32, 8, 128, 8, [(1, 0)]),
    ([(256, 8192)], 32, 4, 128, 16, ()),  # G = 8
    ([(100, 1500), (1, 1), (900, 900)], 16, 16, 64, 16, ()),  # G = 1, D 64
]


def _prefill_id(case) -> str:
    chunks, hq, hkv, d, page, _ = case
    return f"{len(chunks)}seqs-q{hq}-kv{hkv}-d{d}-bs{page}-maxk{max(k for _, k in chunks)}"


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", PREFILL_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=_prefill_id)
def test_prefill_attention(device, kernel, dtype, case, prefill_launches):
    chunks, hq, hkv, d, page, share = case
    gen = _gen(len(chunks) * 1009 + hq * 31 + d + page)
    inputs = _prefill_inputs(chunks, hq, hkv, d, page, dtype, device, gen, share=share,
                             q_offset=3)
    what = f"prefill_attention {_prefill_id(case)} {dtype} {kernel}"
    _check_prefill(inputs, what, config=_prefill_config(kernel, dtype, inputs[-1]))
    assert [launch[0] for launch in prefill_launches] == [
        _expected_prefill_kernel(kernel, dtype, hq // hkv, max(q for q, _ in chunks))
    ], what


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_PREFILL_CASES, ids=_prefill_id)
@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
@pytest.mark.parametrize("kernel", PREFILL_KERNELS)
def test_prefill_attention_long_chunks(kernel, dtype, case):
    chunks, hq, hkv, d, page, share = case
    gen = _gen(len(chunks) * 7 + page)
    inputs = _prefill_inputs(chunks, hq, hkv, d, page, dtype, "cuda", gen, share=share,
                             q_offset=5)
    what = f"prefill_attention {_prefill_id(case)} {dtype} {kernel}"
    _check_prefill(inputs, what, config=_prefill_config(kernel, dtype, inputs[-1]))


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("min_split", [None, 32], ids=["whole", "split"])
def test_prefill_padding_as_a_graph_holds_it(device, dtype, min_split):
    """A mixed-step graph replays one launch sized for T tokens and S sequences: decode rows
    are one-token chunks, sequences past the step's are empty chunks and tokens past its last
    chunk are padding. The real tokens' outputs equal the unpadded launch's (bit for bit);
    nothing is written for the padding; the reference agrees."""
    hq, hkv, d, page = 8, 2, 64, 16
    chunks = [(1, 30), (1, 7), (25, 60), (1, 1)]  # two decode rows, a chunk, a first token
    inputs = _prefill_inputs(chunks, hq, hkv, d, page, dtype, device, _gen(5))
    q, k_cache, v_cache, table, seq_rows, cu, k_lens, max_q_len = inputs
    n, pad_tokens, pad_seqs = q.shape[0], 13, 5
    scale = d**-0.5
    config = PREFILL_CONFIG_FOR[dtype]
    exact = triton_attention.prefill_attention(*inputs, scale, config=config,
                                               min_split_keys=min_split)
    q_pad = torch.cat([q, torch.randn(pad_tokens, hq, d, device=device).to(dtype)])
    seq_pad = torch.cat([seq_rows, seq_rows[:1].repeat(pad_seqs)])
    cu_pad = torch.cat([cu, cu[-1:].repeat(pad_seqs)])
    k_pad = torch.cat([k_lens, torch.ones(pad_seqs, dtype=k_lens.dtype, device=device)])
    out = torch.full_like(q_pad, float("nan"))
    triton_attention.prefill_attention(
        q_pad, k_cache, v_cache, table, seq_pad, cu_pad, k_pad, n + pad_tokens, scale,
        config=config, out=out, min_split_keys=min_split,
    )
    if min_split is None:  # whole blocks: the same launch per block, bit for bit
        assert torch.equal(out[:n], exact)
    else:  # T sets the split count: other slices, the same values up to rounding
        torch.testing.assert_close(out[:n], exact, rtol=2e-3, atol=2e-3)
    assert torch.isnan(out[n:]).all(), "a padding token was written"
    ref_out = torch.full_like(q_pad, float("nan"))
    with torch_reference():
        ops.prefill_attention(q_pad, k_cache, v_cache, table, seq_pad, cu_pad, k_pad,
                              n + pad_tokens, scale, out=ref_out)  # fmt: skip
    assert torch.isnan(ref_out[n:]).all()
    ref, mean_abs_v = _prefill_reference(*inputs, scale)
    _assert_within_bound(out[:n], ref, mean_abs_v, dtype, "padded launch")


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_prefill_split_kv_equals_the_reference(device, num_splits):
    """Each query block's keys in 1..8 slices of at least 32 keys, merged by log-sum-exp:
    blocks whose keys fit fewer slices use fewer (a first chunk's first block: one, written
    directly), rows that see none of a slice's keys weigh nothing; the result is the
    reference's, and splitting changes little (fp32: close, not bit for bit)."""
    chunks = [(40, 200), (1, 90), (70, 70), (5, 133), (1, 20)]
    inputs = _prefill_inputs(chunks, 4, 2, 64, 16, torch.float32, device, _gen(9))
    scale = 64**-0.5
    got = triton_attention.prefill_attention(*inputs, scale, num_splits=num_splits,
                                             min_split_keys=32)  # fmt: skip
    assert not torch.isnan(got).any()
    ref, mean_abs_v = _prefill_reference(*inputs, scale)
    _assert_within_bound(got, ref, mean_abs_v, torch.float32, f"{num_splits} splits")
    one = triton_attention.prefill_attention(*inputs, scale, num_splits=1)
    torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_splits"):
        triton_attention.prefill_attention(*inputs, scale, num_splits=9)
    with pytest.raises(ValueError, match="min_split_keys"):
        triton_attention.prefill_attention(*inputs, scale, min_split_keys=48)


def test_prefill_split_policy():
    """Splits fill the GPU for a few blocks and leave a long first chunk alone."""
    split = triton_attention.prefill_splits
    assert split(2048, 32, 8) == 1  # 512 programs (8B: 2048 tokens, GQA tile of 32 tokens)
    assert split(1024, 32, 8) == 1
    assert split(512, 32, 8) == 2
    assert split(288, 32, 8) == 3  # a mixed step of 4 decode rows and 256 prompt tokens
    assert split(16, 64, 32) == 8  # a prefix hit's few tokens, per query head


# The tile a mixed-step graph uses (GQA-packed for 16-bit caches), and the fp32 one.
PREFILL_CONFIG_FOR = {torch.float16: ("gqa", 32, 32, 4, 1), torch.float32: ("gqa", 32, 32, 4, 1)}


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", PREFILL_KERNELS)
def test_prefill_packing_does_not_leak_between_sequences(device, kernel, prefill_launches):
    """A chunk's output is the same alone and packed with others (bit for bit: each query
    block belongs to one sequence), and a larger max_q_len than needed changes nothing."""
    dtype, hq, hkv, d, page = torch.float16, 4, 2, 64, 16
    chunks = [(7, 50), (40, 40), (1, 13)]
    inputs = _prefill_inputs(chunks, hq, hkv, d, page, dtype, device, _gen(21))
    q, k_cache, v_cache, table, seq_rows, cu, k_lens, max_q_len = inputs
    scale, config = d**-0.5, _prefill_config(kernel, dtype, max_q_len)
    packed = triton_attention.prefill_attention(*inputs, scale, config=config)
    # The default launch depends on max_q_len (short chunks stay per query head): pin the
    # one `packed` used, so only the grid's size differs.
    same = config or (triton_attention.SHORT_CHUNK_CONFIG
                      if max_q_len <= triton_attention.SHORT_CHUNK
                      else triton_attention.PREFILL_CONFIG)
    wider = triton_attention.prefill_attention(*inputs[:-1], max_q_len + 100, scale,
                                               config=same)
    assert torch.equal(packed, wider)
    bounds = cu.tolist()
    for s in range(len(chunks)):
        alone = triton_attention.prefill_attention(
            q[bounds[s] : bounds[s + 1]], k_cache, v_cache, table, seq_rows[s : s + 1],
            torch.tensor([0, chunks[s][0]], dtype=torch.int32, device=device),
            k_lens[s : s + 1], chunks[s][0], scale, config=config,
        )
        assert torch.equal(alone, packed[bounds[s] : bounds[s + 1]]), f"sequence {s}"
    name, grid, block_t = prefill_launches[0]
    assert name == _expected_prefill_kernel(kernel, dtype, hq // hkv, max_q_len)
    # Flat query blocks: ceil(T / BLOCK_T) + one per sequence (each may start mid-block).
    total = sum(q_len for q_len, _ in chunks)
    # The third axis: key slices per block (split-KV), from the shapes alone.
    if name == "gqa":  # one program per (token block, KV head); 128 rows = 64 x 2
        splits = triton_attention.prefill_splits(total, 64, hkv)
        assert block_t == 64 and grid == (_cdiv(total, 64) + len(chunks), hkv, splits)
    else:  # one per (query block, query head)
        splits = triton_attention.prefill_splits(total, block_t, hq)
        assert grid == (_cdiv(total, block_t) + len(chunks), hq, splits)
    assert splits == 8  # a few blocks: the most splits


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
def test_decode_and_prefill_write_into_one_step_buffer(device):
    """As a mixed step calls them: decode rows into `out[:nd]`, prompt chunks into `out[nd:]`
    of one buffer (here strided: padded head dim). Each writes exactly its rows, returns the
    view it was given, and gives what it gives into a fresh output."""
    dtype, hq, hkv, d, page, nd = torch.bfloat16, 8, 2, 64, 16, 3
    chunks = [(7, 50), (20, 20)]
    gen = _gen(31)
    inputs = _prefill_inputs(chunks, hq, hkv, d, page, dtype, device, gen)
    q_p, k_cache, v_cache, table, seq_rows, cu, k_lens, max_q_len = inputs
    n_tokens = q_p.shape[0]
    # Decode rows over the same sequences, at other lengths.
    rows = seq_rows[torch.tensor([0, 1, 0], device=device)]
    seq_lens = k_lens.long()[torch.tensor([0, 1, 0], device=device)] - torch.tensor(
        [0, 3, 11], device=device
    )
    q_d = (torch.randn(nd, hq, d, generator=gen) * 2).to(dtype).to(device)
    scale = d**-0.5
    buf = torch.full((nd + n_tokens + 2, hq, d + 8), float("nan"), dtype=dtype, device=device)
    out = buf[..., :d]
    got_d = triton_attention.decode_attention(
        q_d, k_cache, v_cache, table, rows, seq_lens, scale, out=out[:nd]
    )
    got_p = triton_attention.prefill_attention(
        q_p, k_cache, v_cache, table, seq_rows, cu, k_lens, max_q_len, scale,
        out=out[nd : nd + n_tokens],
    )
    assert got_d.data_ptr() == out.data_ptr() and got_d.shape == q_d.shape
    assert got_p.data_ptr() == out[nd].data_ptr() and got_p.shape == q_p.shape
    fresh_d = triton_attention.decode_attention(q_d, k_cache, v_cache, table, rows, seq_lens, scale)
    fresh_p = triton_attention.prefill_attention(*inputs, scale)
    assert torch.equal(out[:nd], fresh_d)
    assert torch.equal(out[nd : nd + n_tokens], fresh_p)
    assert torch.isnan(buf[nd + n_tokens :]).all(), "rows past the step's tokens were written"
    assert torch.isnan(buf[..., d:]).all(), "the padding past the head dim was written"
    ref, mean_abs_v = _decode_reference(q_d, k_cache, v_cache, table, rows, seq_lens, scale)
    _assert_within_bound(got_d, ref, mean_abs_v, dtype, "decode into the step buffer")


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
def test_ops_dispatch_attention_to_triton_on_cuda(monkeypatch):
    enabled = ops.triton_enabled()
    calls = []

    def fake(name):
        def kernel(*args, **kwargs):
            calls.append((name, kwargs.get("out")))
            return f"triton {name}"

        return kernel

    monkeypatch.setattr(triton_attention, "decode_attention", fake("decode"))
    monkeypatch.setattr(triton_attention, "prefill_attention", fake("prefill"))
    q, k_cache, v_cache, table, rows, seq_lens = _decode_inputs(
        2, 4, 2, 64, 32, 16, torch.bfloat16, "cuda", _gen(4)
    )
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device="cuda")
    decode_args = (q, k_cache, v_cache, table, rows, seq_lens, 0.125)
    prefill_args = (q, k_cache, v_cache, table, rows, cu, seq_lens, 1, 0.125)
    out = torch.empty_like(q)
    try:
        assert ops.use_triton(True)
        assert ops.decode_attention(*decode_args) == "triton decode"
        assert ops.prefill_attention(*prefill_args, out=out) == "triton prefill"
        assert calls == [("decode", None), ("prefill", out)]  # `out` is passed through
        ops.use_triton(False)
        assert isinstance(ops.decode_attention(*decode_args), torch.Tensor)
        assert ops.prefill_attention(*prefill_args, out=out) is out
        assert len(calls) == 2
    finally:
        ops.use_triton(enabled)
