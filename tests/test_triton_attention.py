"""The Triton decode attention of `server.triton_attention` (split-K, over the paged cache)
against the torch reference of `server.ops`, decode and prefill writing into one step's buffer,
and the ops' dispatch (the packed varlen prefill: tests/test_triton_prefill_attention.py).

Two ways to run (as tests/test_triton_ops.py):
* on CUDA (tests marked `gpu`): the compiled kernels, the 8B shapes, long contexts, CUDA-graph
  replay;
* on CPU under Triton's interpreter, opt-in:
  `TRITON_INTERPRET=1 pytest tests/test_triton_attention.py` (the variable must be set before
  triton is imported). The interpreter cases are small: the file runs in well under a minute.
Without triton the module is skipped.

Inputs, references and the error bound: `tests.helpers.paged_attention`.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from server import ops, triton_attention  # noqa: E402  (after the importorskip)
from tests.helpers import triton_testing  # noqa: E402
from tests.helpers.paged_attention import (  # noqa: E402, F401  (fixtures too)
    assert_within_bound,
    check_decode,
    decode_inputs,
    decode_reference,
    interpreter_loops,
    poison_outputs,
    prefill_inputs,
)
from tests.helpers.triton_testing import (  # noqa: E402
    CUDA_SKIP,
    DEVICES,
    DTYPES,
)

_gen = triton_testing.gen

# ---------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------


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
    inputs = decode_inputs(n, hq, hkv, d, max_len, page, dtype, device, _gen(sum(case)))
    check_decode(inputs, f"decode_attention {case} {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_DECODE_CASES, ids=_case_id)
@pytest.mark.gpu
@pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))
def test_decode_attention_8b_shapes(dtype, case):
    n, hq, hkv, d, max_len, page = case
    inputs = decode_inputs(n, hq, hkv, d, max_len, page, dtype, "cuda", _gen(sum(case)))
    check_decode(inputs, f"decode_attention {case} {dtype}")


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
    q, k_cache, v_cache, table, rows, seq_lens = decode_inputs(
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
    check_decode((q, k_cache, v_cache, table, rows, seq_lens), f"decode block_size {page}")


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3, 32])
def test_decode_attention_any_split_count(device, num_splits):
    """Any split count gives a result within the bound; int32 rows and lengths work too."""
    q, k_cache, v_cache, table, rows, seq_lens = decode_inputs(
        6, 8, 2, 64, 777, 16, torch.float16, device, _gen(3)
    )
    check_decode(
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
    inputs = decode_inputs(6, 8, 2, 64, 300, 16, torch.bfloat16, device, _gen(5))
    check_decode(inputs, f"config {config}", config=config)
    check_decode(inputs, f"config {config}, 7 splits", num_splits=7, config=config)


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("min_split", [64, 256, 512, 4096])
def test_decode_attention_minimum_split_length(device, min_split):
    """Rows whose context fits one split write their output directly and the merge skips
    them; longer rows in the same launch still merge several splits: every element is written
    (NaN-filled outputs) and within the bound, with 16-bit and fp32 caches."""
    lens = [1, 63, 64, 65, 300, 700, 777, 129]
    for dtype in (torch.bfloat16, torch.float32):
        inputs = decode_inputs(8, 8, 2, 64, 777, 16, dtype, device, _gen(min_split), lens=lens)
        check_decode(inputs, f"min_split={min_split} {dtype}", num_splits=4, min_split=min_split)


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
def test_decode_one_split_writes_what_the_merge_would(device):
    """A lone split's direct write is the merge of one partial bit for bit: a launch where every
    row has one split (long minimum) equals one where the policy gives each row one split."""
    lens = [5, 64, 200, 256]
    inputs = decode_inputs(4, 8, 2, 64, 256, 16, torch.bfloat16, device, _gen(9), lens=lens)
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
    q, k_cache, v_cache, table, rows, seq_lens = decode_inputs(
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
@pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))
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
        return decode_inputs(n, hq, hkv, d, max_len, page, dtype, "cuda", gen, lens=lens,
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
        ref, mean_abs_v = decode_reference(q, k_cache, v_cache, table, rows, seq_lens, scale)
        assert_within_bound(out, ref, mean_abs_v, dtype, f"replay {trial}")


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
def test_decode_and_prefill_write_into_one_step_buffer(device):
    """As a mixed step calls them: decode rows into `out[:nd]`, prompt chunks into `out[nd:]`
    of one buffer (here strided: padded head dim). Each writes exactly its rows, returns the
    view it was given, and gives what it gives into a fresh output."""
    dtype, hq, hkv, d, page, nd = torch.bfloat16, 8, 2, 64, 16, 3
    chunks = [(7, 50), (20, 20)]
    gen = _gen(31)
    inputs = prefill_inputs(chunks, hq, hkv, d, page, dtype, device, gen)
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
    ref, mean_abs_v = decode_reference(q_d, k_cache, v_cache, table, rows, seq_lens, scale)
    assert_within_bound(got_d, ref, mean_abs_v, dtype, "decode into the step buffer")


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))
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
    q, k_cache, v_cache, table, rows, seq_lens = decode_inputs(
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
