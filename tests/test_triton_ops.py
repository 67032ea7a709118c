"""The Triton kernels of `server.triton_ops` against the torch references of `server.ops`.

Two ways to run:
* on CUDA (tests marked `gpu`): the compiled kernels, plus CUDA-graph replay and
  compile-variant checks (these include the attention kernels);
* on CPU under Triton's interpreter, opt-in: `TRITON_INTERPRET=1 pytest tests/test_triton_ops.py`
  (the variable must be set before triton is imported, hence an environment variable).
Without triton the module is skipped.

Tolerances, and why:
* fp32: rtol 1e-5 — the kernels only reorder fp32 reductions and use the hardware rsqrt/exp.
* fp16/bf16, elementwise ops: counted in ulps of the reference value. Each step the reference
  rounds is rounded at the same step here, so a result moves only where an fp32 intermediate
  (rsqrt, exp) differs in its last bits and tips a rounding of the normalised value or of
  silu(gate): that is 1 ulp of it, up to 2 ulps of the product it then scales, plus that
  product's rounding: 3 ulps (rms_norm, silu_and_mul). RoPE's products of 16-bit values are
  exact in fp32 and torch adds in fp32 too, so q_rot and the cached k must match bit for bit,
  as must the residual sum.
* Triton's interpreter converts fp32 -> bf16 by truncation, not round-to-nearest-even, so under
  the interpreter bf16 results get a loose extra allowance (4 eps * max|ref|); fp16 and fp32
  keep the compiled tolerances there, and they exercise the same rounding steps.
* rope_write_kv writes through the block table into a paged cache (`[blocks, block_size, Hkv,
  D]`); the caches start as NaN, so a write to the wrong block or offset shows twice: the
  entry that should hold k/v is NaN, and an entry that should have stayed NaN does not.
The attention kernels (`server.triton_attention`) have their own files,
tests/test_triton_attention.py (decode) and tests/test_triton_prefill_attention.py; the
compile-variant check here covers them too, since a decoder layer launches them beside these
kernels.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from server import ops, triton_ops  # noqa: E402  (after the importorskip)
from server.step_plan import WARMUP_PROMPT_CHUNKS  # noqa: E402
from tests.helpers import triton_testing  # noqa: E402

INTERPRET, _CUDA_SKIP, DEVICES, DTYPES = (
    triton_testing.INTERPRET, triton_testing.CUDA_SKIP, triton_testing.DEVICES,
    triton_testing.DTYPES,
)
torch_reference, _gen = triton_testing.torch_reference, triton_testing.gen
# A normalised value or silu(gate) whose fp32 value sits at a rounding midpoint may round to
# the other neighbour (1 ulp of it, up to 2 ulps of the product it scales) and the product's
# own rounding adds one more.
NORM_ULPS = 3
SILU_ULPS = 3


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels allocate starts as NaN, so an element left unwritten shows."""
    triton_testing.poison(monkeypatch, triton_ops)


def _randn(*shape, dtype, device, gen, scale=1.0) -> torch.Tensor:
    # Generated on CPU from a seeded generator, so a failure reproduces on any device.
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


# RoPE: the reference rounds each product to the activation dtype before the sum. Under the
# interpreter the kernel reproduces that bit for bit. Compiled for the H100 (triton 3.6,
# 2026-11-26) the compiler may drop the fp32 -> fp16/bf16 -> fp32 round trip of either product
# (e.g. fusing one into an FMA), so each product is rounded or not. The difference to the
# reference is then bounded by half an ulp of each product plus one ulp of the result, which is
# what the compiled kernel is held to (a wrong sign, half or position is off by whole values).
def _rope_tolerance(x, cos, sin, dtype):
    x, c, s = x.double(), cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    finfo = torch.finfo(dtype)

    def ulp(v):
        return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(finfo.tiny)))) * finfo.eps

    return (0.5 * ulp(x * c) + 0.5 * ulp(rot * s) + ulp(x * c + rot * s)).cpu()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, ulps: int, what: str) -> None:
    """fp32: rtol 1e-5. fp16/bf16: within `ulps` units in the last place of `expected`."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in the output (an element not written?)"
    assert not torch.isnan(expected).any(), f"{what}: NaN in the reference"
    a, e = actual.double().cpu(), expected.double().cpu()
    if expected.dtype == torch.float32:
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=what)
        return
    finfo = torch.finfo(expected.dtype)
    ulp = torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(finfo.tiny)))) * finfo.eps
    err = (a - e).abs()
    allowed = ulps * ulp
    if INTERPRET and expected.dtype == torch.bfloat16:
        # The interpreter truncates fp32 -> bf16 (see the module docstring): only a loose check.
        allowed = allowed + 4 * finfo.eps * e.abs().max()
    bad = err > allowed
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements beyond {ulps} ulp(s); first at "
            f"flat index {i}: got {a.flatten()[i].item()}, expected {e.flatten()[i].item()}"
        )


# ---------------------------------------------------------------------------------------------
# rms_norm / add_rms_norm
# ---------------------------------------------------------------------------------------------

NORM_SHAPES = [(1, 4096), (7, 4096), (33, 1000), (300, 128), (5, 64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm(device, dtype, shape):
    gen = _gen(shape[0] * 7919 + shape[1])
    # Rows of very different magnitudes exercise the normalisation, not just the weight.
    row_scale = torch.exp(torch.randn(shape[0], 1, generator=gen) * 2)
    x = (torch.randn(*shape, generator=gen) * row_scale).to(dtype).to(device)
    w = _randn(shape[1], dtype=dtype, device=device, gen=gen)
    got = triton_ops.rms_norm(x, w, 1e-6)
    assert_close(got, ops._rms_norm_ref(x, w, 1e-6), NORM_ULPS, "rms_norm")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_on_strided_qkv_view(device, dtype):
    """Qwen3's q/k norm: `[T, heads, D]` views into a fused QKV row (row stride != heads * D)."""
    gen = _gen(11)
    t, hq, hkv, d = 9, 8, 2, 128
    qkv = _randn(t, (hq + 2 * hkv) * d, dtype=dtype, device=device, gen=gen, scale=3.0)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    w = _randn(d, dtype=dtype, device=device, gen=gen)
    for view in (q, k, q.reshape(-1, d)):
        got = triton_ops.rms_norm(view, w, 1e-6)
        assert got.is_contiguous()
        assert_close(got, ops._rms_norm_ref(view, w, 1e-6), NORM_ULPS, "per-head norm")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(96,), (2, 3, 5, 96)], ids=["1d", "4d"])
def test_rms_norm_any_leading_dims(device, shape):
    gen = _gen(len(shape))
    x = _randn(*shape, dtype=torch.bfloat16, device=device, gen=gen)
    w = _randn(shape[-1], dtype=torch.bfloat16, device=device, gen=gen)
    assert_close(
        triton_ops.rms_norm(x, w, 1e-6),
        ops._rms_norm_ref(x, w, 1e-6),
        NORM_ULPS,
        "rms_norm [..., H]",
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_rms_norm(device, dtype, shape):
    gen = _gen(shape[0] * 104729 + shape[1])
    x = _randn(*shape, dtype=dtype, device=device, gen=gen)
    residual = _randn(*shape, dtype=dtype, device=device, gen=gen, scale=4.0)
    w = _randn(shape[1], dtype=dtype, device=device, gen=gen)
    x_before, residual_before = x.clone(), residual.clone()
    with torch_reference():
        ref_out, ref_sum = ops.add_rms_norm(x, residual, w, 1e-5)
    out, s = triton_ops.add_rms_norm(x, residual, w, 1e-5)
    assert_close(s, ref_sum, 0, "add_rms_norm sum")  # exact
    assert_close(out, ref_out, NORM_ULPS, "add_rms_norm normed")
    # The inputs are left alone (the reference does not modify them either).
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


# ---------------------------------------------------------------------------------------------
# silu_and_mul
# ---------------------------------------------------------------------------------------------


def _silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    with torch_reference():
        return ops.silu_and_mul(gate_up)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 14336), (3, 1000), (300, 128), (64, 2048)])
def test_silu_and_mul(device, dtype, rows, inter):
    gen = _gen(rows * 31 + inter)
    gate_up = _randn(rows, 2 * inter, dtype=dtype, device=device, gen=gen, scale=3.0)
    got = triton_ops.silu_and_mul(gate_up)
    assert_close(got, _silu_and_mul_ref(gate_up), SILU_ULPS, "silu_and_mul")


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul_strided_rows_and_3d(device):
    gen = _gen(5)
    wide = _randn(6, 2 * 96 + 10, dtype=torch.float16, device=device, gen=gen)
    gate_up = wide[:, : 2 * 96]  # rows are 202 elements apart
    assert_close(triton_ops.silu_and_mul(gate_up), _silu_and_mul_ref(gate_up), SILU_ULPS, "strided")
    batched = _randn(2, 3, 2 * 40, dtype=torch.float16, device=device, gen=gen)
    assert_close(triton_ops.silu_and_mul(batched), _silu_and_mul_ref(batched), SILU_ULPS, "3-D")


# ---------------------------------------------------------------------------------------------
# rope_write_kv
# ---------------------------------------------------------------------------------------------

ROPE_CASES = [  # (T, Hq, Hkv, D, block_size)
    (1, 32, 8, 128, 16),
    (7, 8, 8, 64, 8),
    (37, 16, 2, 128, 64),
    (300, 4, 1, 64, 16),
]


def _fused_qkv(t, hq, hkv, d, dtype, device, gen, pad=0):
    """q, k, v as the model makes them: views into one `[T, (Hq + 2 Hkv) * D]` GEMM output.

    `pad` extra columns per row check that the kernel uses the real row stride.
    """
    qkv = _randn(t, (hq + 2 * hkv) * d + pad, dtype=dtype, device=device, gen=gen)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d : (hq + 2 * hkv) * d].view(t, hkv, d)
    return q, k, v


def _block_table(n_rows: int, width: int, gen, spare: int = 3) -> tuple[torch.Tensor, int]:
    """`[n_rows + 1, width]` int32: each row lists its own scattered blocks (no block in two
    rows), the last row is the scratch row (block 0). Returns (table, number of blocks)."""
    num_blocks = 1 + n_rows * width + spare
    table = torch.zeros(n_rows + 1, width, dtype=torch.int32)
    perm = torch.randperm(num_blocks - 1, generator=gen)[: n_rows * width] + 1
    table[:n_rows] = perm.view(n_rows, width).to(torch.int32)
    return table, num_blocks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: "T{}-q{}-kv{}-d{}-bs{}".format(*c))
def test_rope_write_kv(device, dtype, case):
    t, hq, hkv, d, page = case
    gen = _gen(t * 131 + hq * 17 + d + page)
    q, k, v = _fused_qkv(t, hq, hkv, d, dtype, device, gen, pad=8)  # an odd row stride too
    assert t == 1 or q.stride(0) > hq * d  # strided views into one buffer
    cos = _randn(t, d, dtype=dtype, device=device, gen=gen)
    sin = _randn(t, d, dtype=dtype, device=device, gen=gen)
    n_rows, max_len = 5, 97
    table, num_blocks = _block_table(n_rows, -(-max_len // page), gen)
    table = table.to(device)
    # Distinct (row, position) pairs, so distinct cache entries: duplicates would make the
    # reference's write order matter.
    flat = torch.randperm(n_rows * max_len, generator=gen)[:t]
    rows, positions = (flat // max_len).to(device), (flat % max_len).to(device)
    # Poisoned caches: written entries must be exact, every other entry must stay NaN.
    k_cache = torch.full((num_blocks, page, hkv, d), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    with torch_reference():
        q_ref = ops.rope_write_kv(q, k, v, cos, sin, k_ref, v_ref, table, rows, positions)

    q_rot = triton_ops.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, table, rows, positions)

    index = ops.flat_token_index(table, rows, positions, page)
    assert index.unique().numel() == t

    def tokens(cache):  # the cache as `[blocks * block_size, Hkv, D]`
        return cache.view(-1, hkv, d)

    k_written, k_want = tokens(k_cache)[index], tokens(k_ref)[index]
    if INTERPRET or dtype == torch.float32:
        assert_close(q_rot, q_ref, 0, "q_rot")
        assert_close(k_written, k_want, 0, "k written")
    else:
        for name, got, want, x in (("q_rot", q_rot, q_ref, q), ("k written", k_written, k_want, k)):
            err = (got.double() - want.double()).abs().cpu()
            bound = _rope_tolerance(x, cos, sin, dtype)
            assert not torch.isnan(got).any(), f"{name}: NaN (an element not written?)"
            assert bool((err <= bound).all()), f"{name}: {int((err > bound).sum())} elements off"
    assert torch.equal(tokens(v_cache)[index], tokens(v_ref)[index]), "v written"
    written = torch.zeros(num_blocks * page, dtype=torch.bool, device=device)
    written[index] = True
    for name, cache in (("k", k_cache), ("v", v_cache)):
        untouched = tokens(cache)[~written]
        assert torch.isnan(untouched).all(), f"{name} cache changed outside the written tokens"


@pytest.mark.parametrize("device", [DEVICES[0], "cpu"])  # raised before any kernel runs
def test_input_validation(device):
    with pytest.raises(ValueError, match="weight must be"):
        triton_ops.rms_norm(torch.zeros(2, 64, device=device), torch.zeros(32, device=device), 1e-6)
    with pytest.raises(ValueError, match="even"):
        triton_ops.silu_and_mul(torch.zeros(2, 5, device=device))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        triton_ops.rms_norm(
            torch.zeros(2, 4, dtype=torch.int32, device=device), torch.zeros(4, device=device), 1e-6
        )
    q = torch.zeros(2, 8, 64, device=device)
    k = torch.zeros(2, 2, 64, device=device)
    cs = torch.zeros(2, 64, device=device)
    cache = torch.zeros(3, 16, 2, 64, device=device)
    table = torch.zeros(2, 4, dtype=torch.int32, device=device)
    idx = torch.zeros(2, dtype=torch.int64, device=device)

    def rope(**changes):
        args = dict(q=q, k=k, v=k, cos=cs, sin=cs, k_cache=cache, v_cache=cache,
                    block_tables=table, rows=idx, positions=idx)
        args.update(changes)
        return triton_ops.rope_write_kv(**args)

    with pytest.raises(ValueError, match="caches must be"):
        rope(k_cache=torch.zeros(3, 16, 4, 64, device=device))
    with pytest.raises(ValueError, match="caches must be"):
        rope(v_cache=torch.zeros(3, 8, 2, 64, device=device))
    with pytest.raises(ValueError, match="caches must be contiguous"):
        strided = torch.zeros(3, 16, 2, 128, device=device)[..., :64]
        rope(k_cache=strided, v_cache=strided)
    with pytest.raises(ValueError, match="positions"):
        rope(positions=idx[:1])
    with pytest.raises(ValueError, match="rows"):
        rope(rows=idx.float())
    with pytest.raises(ValueError, match="even"):
        odd = torch.zeros(2, 2, 63, device=device)
        rope(q=torch.zeros(2, 8, 63, device=device), k=odd, v=odd,
             cos=torch.zeros(2, 63, device=device), sin=torch.zeros(2, 63, device=device))
    if device == "cuda":
        with pytest.raises(ValueError, match="block_tables is on cpu"):
            rope(block_tables=table.cpu())


# ---------------------------------------------------------------------------------------------
# Skinny GEMM (the projections of a decode step of up to 16 rows)
# ---------------------------------------------------------------------------------------------

# The kernel sums in fp32 in another order than the fp32 reference and rounds once: 1 ulp of
# the output, plus the fp32 reordering (K products of magnitude <= max|x| max|w|, eps32 each).
def _linear_tolerance(x, w, out_dtype):
    k = x.shape[1]
    reorder = k * torch.finfo(torch.float32).eps * x.float().abs().max() * w.float().abs().max()
    return torch.finfo(out_dtype).eps, float(reorder) + 1e-6


def small_weights_fit(monkeypatch):
    """Let weights small enough for the interpreter take the kernel (by default it leaves
    them to cuBLAS, which is faster there)."""
    monkeypatch.setattr(triton_ops, "_SKINNY_MIN_PROGRAMS", 1)
    monkeypatch.setattr(triton_ops, "_SKINNY_MIN_WEIGHT_BYTES", 0)


SKINNY_CASES = [  # (rows, N, K): both block configs, rows 1 to SKINNY_MAX_ROWS
    (1, 128, 512), (5, 192, 256), (16, 64, 768), (3, 16384, 128),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", SKINNY_CASES, ids=lambda c: "M{}-N{}-K{}".format(*c))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_skinny_linear(device, dtype, case, bias, monkeypatch):
    small_weights_fit(monkeypatch)
    m, n, k = case
    gen = _gen(21)
    x = _randn(m, k, dtype=dtype, device=device, gen=gen)
    w = _randn(n, k, dtype=dtype, device=device, gen=gen, scale=0.05)
    b = _randn(n, dtype=dtype, device=device, gen=gen) if bias else None
    assert triton_ops.skinny_linear_fits(x, w, b, None)
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    rtol, atol = _linear_tolerance(x, w, dtype)
    if INTERPRET and dtype == torch.bfloat16:  # the interpreter truncates (see the docstring)
        atol += 4 * torch.finfo(dtype).eps * float(ref.abs().max())
    out = triton_ops.skinny_linear(x, w, b)
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=rtol, atol=atol)
    # Into a wider caller-owned buffer (the logits rows of a graph): only [M, N] is written.
    wide = torch.full((m, n + 64), 7.0, dtype=dtype, device=device)
    assert triton_ops.skinny_linear(x, w, b, out=wide[:, :n]).data_ptr() == wide.data_ptr()
    assert torch.equal(wide[:, :n], out)
    assert bool((wide[:, n:] == 7.0).all())


@pytest.mark.parametrize("device", [DEVICES[0], "cpu"])  # decided before any kernel runs
def test_skinny_linear_fits(device, monkeypatch):
    if device == "cuda" and _CUDA_SKIP is not None:
        pytest.skip(str(_CUDA_SKIP))
    dt = torch.bfloat16

    def t(*shape, dtype=dt):
        return torch.zeros(*shape, dtype=dtype, device=device)

    fits = triton_ops.skinny_linear_fits
    # Too few programs or too few bytes: cuBLAS is faster (an 8B's o_proj, a 1B's down).
    assert fits(t(1, 4096), t(4096, 4096), None, None)
    assert not fits(t(1, 8192), t(2048, 8192), None, None)  # 32 programs
    assert not fits(t(1, 2048), t(3072, 2048), None, None)  # 12 MiB
    assert fits(t(1, 2048), t(16384, 2048), None, None)  # the wide class: 128 programs
    small_weights_fit(monkeypatch)
    assert fits(t(16, 256), t(128, 256), None, None)
    assert fits(t(1, 256), t(128, 256), t(128), t(1, 128))
    assert not fits(t(0, 256), t(128, 256), None, None)  # nothing to compute
    assert not fits(t(17, 256), t(128, 256), None, None)  # past SKINNY_MAX_ROWS: cuBLAS's
    assert not fits(t(2, 256), t(100, 256), None, None)  # N not a whole number of blocks
    assert not fits(t(2, 200), t(128, 200), None, None)  # K not a whole number of steps
    assert not fits(t(2, 256), t(128, 512), None, None)  # K mismatch
    assert not fits(t(2, 256, dtype=torch.float32), t(128, 256, dtype=torch.float32), None,
                    None)  # fp32 keeps cuBLAS (its TF32 settings apply)
    assert not fits(t(2, 256), t(128, 256, dtype=torch.float16), None, None)
    assert not fits(t(2, 512)[:, ::2], t(128, 256), None, None)  # strided columns
    assert not fits(t(2, 256), t(256, 128).t(), None, None)  # column-major weight
    assert not fits(t(2, 256), t(128, 256), t(64), None)  # bias of the wrong length
    assert not fits(t(2, 256), t(128, 256), None, t(2, 64))  # out of the wrong shape
    with pytest.raises(ValueError, match="does not take"):
        triton_ops.skinny_linear(t(17, 256), t(128, 256))


def test_ops_linear_on_cpu_is_torch():
    """The CPU path (CI, the fp32 references) stays F.linear whatever the routes' inputs."""
    gen = _gen(22)
    x = torch.randn(32, 64, generator=gen)
    w = torch.randn(48, 64, generator=gen)
    b = torch.randn(48, generator=gen)
    zero = torch.zeros(64)
    assert torch.equal(ops.linear(x, w, None, zero), torch.nn.functional.linear(x, w))
    assert torch.equal(ops.linear(x, w, b, zero), torch.nn.functional.linear(x, w, b))
    out = torch.empty(32, 48)
    assert ops.linear(x, w, None, zero, out=out) is out
    assert torch.equal(out, x @ w.t())


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
def test_ops_linear_routes_by_rows(monkeypatch):
    """On CUDA `ops.linear` takes the skinny kernel up to 16 rows, cuBLASLt (the zero-bias
    addmm) for 17-64 and cuBLAS beyond; every route agrees with the fp64 product, the Lt
    route is the addmm bit for bit, and each replays unchanged inside a CUDA graph."""
    monkeypatch.setattr(ops, "_triton", triton_ops)
    gen = _gen(23)
    dtype, n, k = torch.bfloat16, 6144, 4096
    w = _randn(n, k, dtype=dtype, device="cuda", gen=gen, scale=0.02)
    zero = torch.zeros(n, dtype=dtype, device="cuda")
    for m in (1, 8, 16, 17, 32, 64, 65, 300):
        x = _randn(m, k, dtype=dtype, device="cuda", gen=gen)
        got = ops.linear(x, w, None, zero)
        ref = x.double() @ w.double().t()
        rtol, atol = _linear_tolerance(x, w, dtype)
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol)
        if ops.LT_ROWS[0] <= m <= ops.LT_ROWS[1]:
            assert torch.equal(got, torch.addmm(zero, x, w.t()))
        elif m > ops.LT_ROWS[1]:
            assert torch.equal(got, x @ w.t())
        out = torch.empty(m, n, dtype=dtype, device="cuda")
        ops.linear(x, w, None, zero, out=out)  # warm-up outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ops.linear(x, w, None, zero, out=out)
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, got), f"{m} rows replayed differently"


# ---------------------------------------------------------------------------------------------
# CUDA graphs and compile variants (GPU only)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
def test_layer_ops_graph_replay(monkeypatch):
    """rope_write_kv + norms + silu captured together follow new positions, rows and block
    tables on replay (the table is read in place, as the engine's device table is)."""
    monkeypatch.setattr(
        triton_ops, "_empty", lambda shape, dt, dev: torch.empty(shape, dtype=dt, device=dev)
    )
    dtype, n, hq, hkv, d, hidden, page, width = torch.bfloat16, 4, 8, 2, 64, 512, 8, 4
    gen = _gen(9)
    q, k, v = _fused_qkv(n, hq, hkv, d, dtype, "cuda", gen)
    cos = _randn(n, d, dtype=dtype, device="cuda", gen=gen)
    sin = _randn(n, d, dtype=dtype, device="cuda", gen=gen)
    x = _randn(n, hidden, dtype=dtype, device="cuda", gen=gen)
    res = _randn(n, hidden, dtype=dtype, device="cuda", gen=gen)
    w = _randn(hidden, dtype=dtype, device="cuda", gen=gen)
    table, num_blocks = _block_table(n, width, gen, spare=8)
    table = table.cuda()
    k_cache = torch.zeros(num_blocks, page, hkv, d, dtype=dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    rows = torch.arange(n, device="cuda")
    positions = torch.zeros(n, dtype=torch.int64, device="cuda")

    def step():
        q_rot = triton_ops.rope_write_kv(
            q, k, v, cos, sin, k_cache, v_cache, table, rows, positions
        )
        normed, s = triton_ops.add_rms_norm(x, res, w, 1e-5)
        return q_rot, normed, s, triton_ops.silu_and_mul(torch.cat([normed, s], dim=-1))

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    rows.copy_(torch.tensor([3, 1, 0, 2]))
    positions.copy_(torch.tensor([31, 7, 0, 12]))
    new_table, _ = _block_table(n, width, _gen(10), spare=8)  # other blocks for every row
    assert not torch.equal(new_table, table.cpu())
    table.copy_(new_table)
    x.mul_(-0.5)
    k_cache.zero_()
    v_cache.zero_()
    graph.replay()
    torch.cuda.synchronize()
    k_graph, v_graph = k_cache.clone(), v_cache.clone()
    k_cache.zero_()
    v_cache.zero_()
    eager = step()
    torch.cuda.synchronize()
    for a, b in zip(outs, eager, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(k_graph, k_cache) and torch.equal(v_graph, v_cache)
    # The replay wrote exactly the tokens the new table, rows and positions name.
    index = ops.flat_token_index(table, rows, positions, page)
    written = torch.zeros(num_blocks * page, dtype=torch.bool, device="cuda")
    written[index] = True
    for cache in (k_graph, v_graph):
        tokens = cache.view(-1, hkv, d)
        assert bool((tokens[index] != 0).any(dim=-1).all()), "a token was not written"
        assert not tokens[~written].any(), "a token outside the new table's entries was written"


def _variant_keys(kernel) -> set | None:
    """The compiled variants' cache keys of a @triton.jit function, over every device (empty:
    never launched; None: a triton whose kernel cache has an unknown layout)."""
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        return None
    keys: set = set()
    for entry in caches.values():  # (kernel_cache, ...) per device
        kernel_cache = entry[0] if isinstance(entry, (tuple, list)) and entry else None
        if not isinstance(kernel_cache, dict):
            return None
        keys |= set(kernel_cache)
    return keys


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
def test_batch_size_does_not_recompile():
    """After one decode step and one mixed step, no batch size, split count, chunk length or
    number of chunks compiles another variant of any kernel a decoder layer launches.

    Triton specialises integer arguments equal to 1 (or divisible by 16) and pointers by their
    16-byte alignment, so the arguments are made the way the engine makes them: decode inputs
    are rows of one static `[4, max_num_seqs]` buffer (DecodeGraphRunner.inputs), a mixed
    step passes `q_rot[:nd]` to decode and `q_rot[nd:]` to prefill attention, writing into
    `attn_out[:nd]` and `attn_out[nd:]` of one buffer. Any new variant is reported with its
    specialisation key, which names the argument responsible.
    """
    from server import triton_attention

    dtype, hq, hkv, d, hidden, inter = torch.bfloat16, 12, 3, 64, 384, 320
    page, width, max_n = 16, 64, 64  # 1024 positions per row: 16 or 11 splits by batch size
    max_len = page * width
    gen = _gen(77)
    kernels = {
        "skinny_linear": triton_ops._skinny_linear_kernel,
        "rms_norm": triton_ops._rms_norm_kernel,
        "silu_and_mul": triton_ops._silu_and_mul_kernel,
        "rope_write_kv": triton_ops._rope_write_kv_kernel,
        "decode_split": triton_attention._decode_split_kernel,
        "decode_reduce": triton_attention._decode_reduce_kernel,
        "prefill": triton_attention._prefill_kernel,
        "prefill merge": triton_attention._prefill_merge_kernel,
    }
    table, num_blocks = _block_table(max_n, width, gen)
    table = table.cuda()
    k_cache = torch.zeros(num_blocks, page, hkv, d, dtype=dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    static = torch.zeros(4, max_n, dtype=torch.int64, device="cuda")  # ids, positions, rows, src
    skinny_w = _randn(3072, 4096, dtype=dtype, device="cuda", gen=gen)  # big enough to fit

    def layer_ops(t):
        x = _randn(t, hidden, dtype=dtype, device="cuda", gen=gen)
        w = _randn(hidden, dtype=dtype, device="cuda", gen=gen)
        if t <= triton_ops.SKINNY_MAX_ROWS:  # the decode projections of a few rows
            triton_ops.skinny_linear(_randn(t, 4096, dtype=dtype, device="cuda", gen=gen),
                                     skinny_w)
        triton_ops.rms_norm(x, w, 1e-6)
        triton_ops.add_rms_norm(x, x, w, 1e-6)
        triton_ops.silu_and_mul(_randn(t, 2 * inter, dtype=dtype, device="cuda", gen=gen))
        q, k, v = _fused_qkv(t, hq, hkv, d, dtype, "cuda", gen)
        return q, k, v, _randn(t, d, dtype=dtype, device="cuda", gen=gen)

    def decode_step(n, num_splits=None):
        q, k, v, cs = layer_ops(n)
        positions, rows = static[1, :n], static[2, :n]
        positions.copy_(torch.randint(0, max_len, (n,), generator=gen))
        rows.copy_(torch.randperm(max_n, generator=gen)[:n])
        q_rot = triton_ops.rope_write_kv(q, k, v, cs, cs, k_cache, v_cache, table, rows, positions)
        triton_attention.decode_attention(
            q_rot, k_cache, v_cache, table, rows, positions + 1, 0.125, num_splits
        )

    def mixed_step(nd, chunks):
        """nd decode rows, then prompt chunks [(q_len, k_len)], on distinct table rows."""
        seq_rows = torch.randperm(max_n, generator=gen)[: nd + len(chunks)].tolist()
        pos = torch.randint(0, max_len, (nd,), generator=gen).tolist()
        rows = seq_rows[:nd]
        for r, (q_len, k_len) in zip(seq_rows[nd:], chunks, strict=True):
            pos += range(k_len - q_len, k_len)
            rows += [r] * q_len
        q_lens = [q_len for q_len, _ in chunks]
        q, k, v, cs = layer_ops(len(pos))
        positions = torch.tensor(pos, device="cuda")
        rows = torch.tensor(rows, device="cuda")
        q_rot = triton_ops.rope_write_kv(q, k, v, cs, cs, k_cache, v_cache, table, rows, positions)
        attn_out = torch.empty_like(q_rot)  # one buffer per step, as DecoderModel.forward
        if nd:
            triton_attention.decode_attention(
                q_rot[:nd], k_cache, v_cache, table, rows[:nd], positions[:nd] + 1, 0.125,
                out=attn_out[:nd],
            )
        triton_attention.prefill_attention(
            q_rot[nd:], k_cache, v_cache, table,
            torch.tensor(seq_rows[nd:], device="cuda"),
            torch.tensor([0] + q_lens, device="cuda").cumsum(0, dtype=torch.int32),
            torch.tensor([k_len for _, k_len in chunks], dtype=torch.int32, device="cuda"),
            max(q_lens), 0.125, out=attn_out[nd:],
        )

    def packed_step(nd, chunks):
        """The same step in the packed form of `server.mixed_graph_runner`: decode rows as
        one-token chunks, one launch over every token padded to a bucket, int64 metadata in
        rows of a padded [4, W] buffer."""
        seq_rows = torch.randperm(max_n, generator=gen)[: nd + len(chunks)].tolist()
        lens = [(1, int(p) + 1) for p in torch.randint(0, max_len, (nd,), generator=gen)]
        lens += chunks
        total = sum(q_len for q_len, _ in lens)
        bucket = next(b for b in (16, 32, 64, 128, 256, 384, 512, 640, 768) if b >= total)
        n_seqs = min(bucket, max_n)
        meta = torch.zeros(4, 72, dtype=torch.int64, device="cuda")
        meta[0].fill_(max_n)
        meta[0, : len(seq_rows)] = torch.tensor(seq_rows)
        cu = [0]
        for q_len, _ in lens:
            cu.append(cu[-1] + q_len)
        cu += [total] * (n_seqs + 1 - len(cu))
        meta[1, : n_seqs + 1] = torch.tensor(cu)
        meta[2].fill_(1)
        meta[2, : len(lens)] = torch.tensor([k for _, k in lens])
        q, k, v, cs = layer_ops(bucket)
        positions = torch.zeros(bucket, dtype=torch.int64, device="cuda")
        rows = torch.full((bucket,), max_n, dtype=torch.int64, device="cuda")
        q_rot = triton_ops.rope_write_kv(q, k, v, cs, cs, k_cache, v_cache, table, rows, positions)
        triton_attention.prefill_attention(
            q_rot, k_cache, v_cache, table, meta[0, :n_seqs], meta[1, : n_seqs + 1],
            meta[2, :n_seqs], bucket, 0.125, out=torch.empty_like(q_rot),
        )

    # As the engine starts: mixed warm-up steps (one decode row and a chunk of each warm-up
    # size: both prefill kernels), then decode at the largest and the smallest batch size.
    for n in WARMUP_PROMPT_CHUNKS:
        mixed_step(1, [(n, n)])
        packed_step(1, [(n, n)])
    decode_step(max_n)
    decode_step(1)
    torch.cuda.synchronize()
    before = {name: _variant_keys(kern) for name, kern in kernels.items()}
    if None in before.values():
        pytest.skip("this triton keeps its kernel cache in an unknown layout")
    # Every kernel the steps launch has a variant by now, so the cache is being read right.
    assert all(before.values()), before

    def check(what):
        torch.cuda.synchronize()
        for name, kern in kernels.items():
            new = _variant_keys(kern) - before[name]
            assert not new, f"{what} compiled a new variant of {name}: {sorted(map(str, new))}"

    for n in (2, 3, 16, 17, 63, 64):
        decode_step(n)
        check(f"decode batch {n}")
    for splits in (1, 2, 3, 16, 32):
        decode_step(5, splits)
        check(f"decode with {splits} splits")
    for nd, chunks in [
        (0, [(1, 1)]),
        (0, [(5, 5), (17, 40)]),
        (3, [(128, 128)]),
        (1, [(200, 300), (1, 90), (64, 64)]),
        (0, [(1, 1000)]),
        (2, [(600, 1024), (16, 16)]),
        (16, [(1, 2)] * 7),
        (5, [(513, 600)]),
    ]:
        mixed_step(nd, chunks)
        check(f"a mixed step of {nd} decode rows and chunks {chunks}")
        packed_step(nd, chunks)
        check(f"the packed form of a mixed step of {nd} decode rows and chunks {chunks}")


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
def test_ops_dispatch_to_triton_on_cuda(monkeypatch):
    enabled = ops.triton_enabled()
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(triton_ops, "rms_norm", lambda *args: "triton")
    try:
        assert ops.use_triton(True)
        assert ops.rms_norm(x, w, 1e-6) == "triton"
        assert ops.rms_norm(x.cpu(), w.cpu(), 1e-6).device.type == "cpu"  # CPU stays on torch
        ops.use_triton(False)
        assert isinstance(ops.rms_norm(x, w, 1e-6), torch.Tensor)
    finally:
        ops.use_triton(enabled)
