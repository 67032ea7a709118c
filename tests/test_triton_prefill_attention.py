"""The Triton packed varlen prefill attention of `server.triton_attention` (both of its kernels:
one program per query head, or GQA-packed, one per KV head; split-KV for deep chunks), over the
paged cache, against the torch reference of `server.ops`.

How to run (CUDA, or Triton's interpreter on CPU, opt-in): as tests/test_triton_attention.py.
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
    cdiv,
    check_prefill,
    interpreter_loops,
    poison_outputs,
    prefill_inputs,
    prefill_reference,
)
from tests.helpers.triton_testing import (  # noqa: E402
    CUDA_SKIP,
    DEVICES,
    DTYPES,
    torch_reference,
)

_gen = triton_testing.gen

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
    inputs = prefill_inputs(chunks, hq, hkv, d, page, dtype, device, gen, share=share,
                             q_offset=3)
    what = f"prefill_attention {_prefill_id(case)} {dtype} {kernel}"
    check_prefill(inputs, what, config=_prefill_config(kernel, dtype, inputs[-1]))
    assert [launch[0] for launch in prefill_launches] == [
        _expected_prefill_kernel(kernel, dtype, hq // hkv, max(q for q, _ in chunks))
    ], what


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_PREFILL_CASES, ids=_prefill_id)
@pytest.mark.gpu
@pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))
@pytest.mark.parametrize("kernel", PREFILL_KERNELS)
def test_prefill_attention_long_chunks(kernel, dtype, case):
    chunks, hq, hkv, d, page, share = case
    gen = _gen(len(chunks) * 7 + page)
    inputs = prefill_inputs(chunks, hq, hkv, d, page, dtype, "cuda", gen, share=share,
                             q_offset=5)
    what = f"prefill_attention {_prefill_id(case)} {dtype} {kernel}"
    check_prefill(inputs, what, config=_prefill_config(kernel, dtype, inputs[-1]))


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
    inputs = prefill_inputs(chunks, hq, hkv, d, page, dtype, device, _gen(5))
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
    ref, mean_abs_v = prefill_reference(*inputs, scale)
    assert_within_bound(out[:n], ref, mean_abs_v, dtype, "padded launch")


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_prefill_split_kv_equals_the_reference(device, num_splits):
    """Each query block's keys in 1..8 slices of at least 32 keys, merged by log-sum-exp:
    blocks whose keys fit fewer slices use fewer (a first chunk's first block: one, written
    directly), rows that see none of a slice's keys weigh nothing; the result is the
    reference's, and splitting changes little (fp32: close, not bit for bit)."""
    chunks = [(40, 200), (1, 90), (70, 70), (5, 133), (1, 20)]
    inputs = prefill_inputs(chunks, 4, 2, 64, 16, torch.float32, device, _gen(9))
    scale = 64**-0.5
    got = triton_attention.prefill_attention(*inputs, scale, num_splits=num_splits,
                                             min_split_keys=32)  # fmt: skip
    assert not torch.isnan(got).any()
    ref, mean_abs_v = prefill_reference(*inputs, scale)
    assert_within_bound(got, ref, mean_abs_v, torch.float32, f"{num_splits} splits")
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
    inputs = prefill_inputs(chunks, hq, hkv, d, page, dtype, device, _gen(21))
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
        assert block_t == 64 and grid == (cdiv(total, 64) + len(chunks), hkv, splits)
    else:  # one per (query block, query head)
        splits = triton_attention.prefill_splits(total, block_t, hq)
        assert grid == (cdiv(total, block_t) + len(chunks), hq, splits)
    assert splits == 8  # a few blocks: the most splits
