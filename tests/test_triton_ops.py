"""The Triton kernels of `server.triton_ops` against the torch references of `server.ops`.

Two ways to run:
* on CUDA (tests marked `gpu`): the compiled kernels, plus CUDA-graph replay and
  compile-variant checks;
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
* decode attention: against the reference run in float64 on the same (rounded) inputs. The
  kernel's own error is the final rounding (1 ulp) plus, for 16-bit caches, rounding the
  softmax weights to the cache dtype before the P @ V product (<= eps/2 relative per weight,
  so <= eps/2 * the weighted mean of |v|); the bound checked is 1 ulp + eps * that mean.
"""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from server import ops, triton_ops  # noqa: E402  (after the importorskip)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _interpreter_loops_work() -> bool:
    """Whether this triton + numpy pair can run a loop whose bound is a tensor in the interpreter.

    Triton < 3.7's interpreter turns a one-element array into an int with `int(array)`, which
    numpy >= 2.4 rejects; decode_attention's loop over the cached positions needs it.
    """
    import triton.language as tl

    @triton.jit
    def _probe(n_ptr, out_ptr):
        n = tl.load(n_ptr)
        acc = 0
        for _ in range(0, n):
            acc += 1
        tl.store(out_ptr, acc)

    n = torch.tensor([3], dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _probe[(1,)](n, out)
    except Exception:  # the interpreter's own error type differs between versions
        return False
    return int(out[0]) == 3


_CPU_SKIP = (
    None
    if INTERPRET
    else ("CPU runs need Triton's interpreter: set TRITON_INTERPRET=1 in the environment")
)
_CUDA_SKIP = (
    "TRITON_INTERPRET=1 runs kernels in the interpreter, not compiled on the GPU"
    if INTERPRET
    else None
)

DEVICES = [
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))],
        id="cuda",
    ),
    pytest.param(
        "cpu", marks=pytest.mark.skipif(_CPU_SKIP is not None, reason=str(_CPU_SKIP)), id="interp"
    ),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# A normalised value or silu(gate) whose fp32 value sits at a rounding midpoint may round to
# the other neighbour (1 ulp of it, up to 2 ulps of the product it scales) and the product's
# own rounding adds one more.
NORM_ULPS = 3
SILU_ULPS = 3


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels allocate starts as NaN, so an element left unwritten shows."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_ops, "_empty", nan_empty)


@contextlib.contextmanager
def torch_reference():
    """Make `server.ops` run its torch path on every device for the duration."""
    enabled = ops.triton_enabled()
    ops.use_triton(False)
    try:
        yield
    finally:
        ops.use_triton(enabled)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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

ROPE_CASES = [  # (T, Hq, Hkv, D)
    (1, 32, 8, 128),
    (7, 8, 8, 64),
    (37, 16, 2, 128),
    (300, 4, 1, 64),
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: "T{}-q{}-kv{}-d{}".format(*c))
def test_rope_write_kv(device, dtype, case):
    t, hq, hkv, d = case
    gen = _gen(t * 131 + hq * 17 + d)
    q, k, v = _fused_qkv(t, hq, hkv, d, dtype, device, gen, pad=8)  # an odd row stride too
    assert t == 1 or q.stride(0) > hq * d  # strided views into one buffer
    cos = _randn(t, d, dtype=dtype, device=device, gen=gen)
    sin = _randn(t, d, dtype=dtype, device=device, gen=gen)
    num_slots, max_len = 5, 97
    # Distinct (slot, position) pairs: duplicates would make the reference's order matter.
    flat = torch.randperm(num_slots * max_len, generator=gen)[:t]
    slots, positions = (flat // max_len).to(device), (flat % max_len).to(device)
    # Poisoned caches: written entries must be exact, every other entry must stay NaN.
    k_cache = torch.full((num_slots, hkv, max_len, d), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    with torch_reference():
        q_ref = ops.rope_write_kv(q, k, v, cos, sin, k_ref, v_ref, slots, positions)

    q_rot = triton_ops.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, positions)

    k_written = k_cache[slots, :, positions]
    if INTERPRET or dtype == torch.float32:
        assert_close(q_rot, q_ref, 0, "q_rot")
        assert_close(k_written, k_ref[slots, :, positions], 0, "k written")
    else:
        for name, got, want, x in (
            ("q_rot", q_rot, q_ref, q),
            ("k written", k_written, k_ref[slots, :, positions], k),
        ):
            err = (got.double() - want.double()).abs().cpu()
            bound = _rope_tolerance(x, cos, sin, dtype)
            assert not torch.isnan(got).any(), f"{name}: NaN (an element not written?)"
            assert bool((err <= bound).all()), f"{name}: {int((err > bound).sum())} elements off"
    assert torch.equal(v_cache[slots, :, positions], v_ref[slots, :, positions]), "v written"
    written = torch.zeros(num_slots, max_len, dtype=torch.bool, device=device)
    written[slots, positions] = True
    for name, cache in (("k", k_cache), ("v", v_cache)):
        untouched = cache.permute(0, 2, 1, 3)[~written]
        assert torch.isnan(untouched).all(), f"{name} cache changed outside the written positions"


# ---------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------

ATTN_CASES = [  # (N, Hq, Hkv, D, max_len)
    (1, 4, 4, 64, 37),  # G = 1
    (5, 8, 2, 128, 300),  # G = 4
    (3, 16, 2, 64, 1000),  # G = 8
    (64, 8, 2, 64, 129),  # wide batch, G = 4
    (2, 2, 1, 128, 4096),  # long context, few heads: many splits per row
]
GPU_ATTN_CASES = [  # the 8B shape (32 q / 8 kv heads, D 128)
    (1, 32, 8, 128, 4096),
    (8, 32, 8, 128, 4096),
    (64, 32, 8, 128, 513),
]


def _attention_inputs(n, hq, hkv, d, max_len, dtype, device, gen):
    """Caches where only the positions some row may read are finite; everything else is NaN.

    Rows get distinct slots except the last two, which share a "scratch" slot with seq_len 1
    (how the engine pads a batch). seq_lens cover 1, max_len and odd values in between.
    """
    num_slots = n + 3
    slot_perm = torch.randperm(num_slots, generator=gen)
    slots = slot_perm[:n].clone()
    lens = torch.randint(1, max_len + 1, (n,), generator=gen)
    lens[0] = max_len
    if n > 1:
        lens[1] = 1
    if n > 3:
        lens[2] = max(1, max_len // 2 + 1)
        slots[-2:] = slot_perm[n]  # padding rows: one scratch slot, seq_len 1
        lens[-2:] = 1
    k_cache = torch.randn(num_slots, hkv, max_len, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_slots, hkv, max_len, d, generator=gen).to(dtype)
    readable = torch.zeros(num_slots, max_len, dtype=torch.bool)
    for s, length in zip(slots.tolist(), lens.tolist(), strict=True):
        readable[s, :length] = True
    for cache in (k_cache, v_cache):
        cache.permute(0, 2, 1, 3)[~readable] = float("nan")
    q = (torch.randn(n, hq, d, generator=gen) * 2).to(dtype)
    return [t.to(device) for t in (q, k_cache, v_cache, slots, lens)]


def _attention_ref(q, k_cache, v_cache, slots, lens, scale):
    """`ops._decode_attention_ref` in float64 (NaN-poisoned positions zeroed: masked anyway)."""
    return ops._decode_attention_ref(
        q.double(),
        k_cache.nan_to_num().double(),
        v_cache.nan_to_num().double(),
        slots,
        lens,
        scale,
    )


def _assert_attention_close(got, inputs, what):
    """Error bound (module docstring): 1 ulp of the result + eps * the softmax-weighted mean of
    |v| (what rounding each weight to the cache dtype can move); fp32: rtol 1e-5 of the same."""
    q, k_cache, v_cache, slots, lens, scale = inputs
    assert got.shape == q.shape and got.dtype == q.dtype, what
    assert not torch.isnan(got).any(), f"{what}: NaN (unwritten output or a poisoned read)"
    ref = _attention_ref(q, k_cache, v_cache, slots, lens, scale).cpu()
    mean_abs_v = _attention_ref(q, k_cache, v_cache.abs(), slots, lens, scale).cpu()
    got64 = got.double().cpu()
    err = (got64 - ref).abs()
    if q.dtype == torch.float32:
        bound = 1e-5 * (ref.abs() + mean_abs_v)
    else:
        finfo = torch.finfo(q.dtype)
        ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(finfo.tiny)))) * finfo.eps
        bound = ulp + finfo.eps * mean_abs_v
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements beyond the bound; worst error {err.max().item():.3g}, "
        f"typical bound {bound.median().item():.3g}"
    )


def _run_attention_case(device, dtype, case, seed, num_splits=None):
    n, hq, hkv, d, max_len = case
    gen = _gen(seed)
    q, k_cache, v_cache, slots, lens = _attention_inputs(n, hq, hkv, d, max_len, dtype, device, gen)
    scale = d**-0.5
    got = triton_ops.decode_attention_split(q, k_cache, v_cache, slots, lens, scale, num_splits)
    _assert_attention_close(
        got, (q, k_cache, v_cache, slots, lens, scale), f"decode_attention {case} {dtype}"
    )


@pytest.fixture
def interpreter_loops(request):
    if INTERPRET and not _interpreter_loops_work():
        pytest.skip(
            "this triton's interpreter cannot run loops with tensor bounds under this numpy "
            "(fixed in triton 3.7); compiled GPU runs are unaffected"
        )


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "N{}-q{}-kv{}-d{}-L{}".format(*c))
def test_decode_attention(device, dtype, case):
    _run_attention_case(device, dtype, case, seed=sum(case))


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_ATTN_CASES, ids=lambda c: "N{}-q{}-kv{}-d{}-L{}".format(*c))
def test_decode_attention_8b_shapes(dtype, case):
    _run_attention_case("cuda", dtype, case, seed=sum(case))


@pytest.mark.usefixtures("interpreter_loops")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3, 32])
def test_decode_attention_any_split_count(device, num_splits):
    _run_attention_case(device, torch.float16, (6, 8, 2, 64, 777), seed=3, num_splits=num_splits)


def test_split_policy_depends_on_shapes_only():
    for batch in (1, 2, 8, 64, 256):
        for max_len in (1, 63, 64, 65, 4096, 131072):
            splits = triton_ops.decode_attention_splits(batch, 8, max_len)
            assert 1 <= splits <= 32
            assert splits <= max(1, -(-max_len // 64))  # never more splits than blocks
    assert triton_ops.decode_attention_splits(1, 8, 4096) == 32  # batch 1 fills the GPU
    assert triton_ops.decode_attention_splits(64, 8, 4096) == 4


@pytest.mark.parametrize("device", [DEVICES[0], "cpu"])  # raised before any kernel runs
def test_input_validation(device):
    q = torch.zeros(2, 8, 64, device=device)
    cache = torch.zeros(3, 2, 16, 64, device=device)
    idx = torch.zeros(2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        triton_ops.decode_attention(
            torch.zeros(2, 7, 64, device=device), cache, cache, idx, idx, 1.0
        )
    with pytest.raises(ValueError, match="seq_lens"):
        triton_ops.decode_attention(q, cache, cache, idx, idx[:1], 1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        triton_ops.decode_attention(q.half(), cache, cache, idx, idx, 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        triton_ops.decode_attention_split(q, cache, cache, idx, idx, 1.0, 33)
    with pytest.raises(ValueError, match="weight must be"):
        triton_ops.rms_norm(torch.zeros(2, 64, device=device), torch.zeros(32, device=device), 1e-6)
    with pytest.raises(ValueError, match="even"):
        triton_ops.silu_and_mul(torch.zeros(2, 5, device=device))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        triton_ops.rms_norm(
            torch.zeros(2, 4, dtype=torch.int32, device=device), torch.zeros(4, device=device), 1e-6
        )


# ---------------------------------------------------------------------------------------------
# CUDA graphs and compile variants (GPU only)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_graph_replay_with_new_lengths(dtype, monkeypatch):
    """A graph captured once replays correctly with other seq_lens, slots and queries."""
    monkeypatch.setattr(
        triton_ops, "_empty", lambda shape, dt, dev: torch.empty(shape, dtype=dt, device=dev)
    )  # the graph pool hands out memory; no NaN fill inside
    n, hq, hkv, d, max_len = 8, 32, 8, 128, 1024
    gen = _gen(123)
    q, k_cache, v_cache, slots, lens = _attention_inputs(n, hq, hkv, d, max_len, dtype, "cuda", gen)
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()
    scale = d**-0.5
    triton_ops.decode_attention(q, k_cache, v_cache, slots, lens, scale)  # compile outside
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_ops.decode_attention(q, k_cache, v_cache, slots, lens, scale)
    for trial in range(3):
        new_q = (torch.randn(n, hq, d, generator=gen) * 2).to(dtype)
        new_slots = torch.randperm(k_cache.shape[0], generator=gen)[:n]
        new_lens = torch.randint(1, max_len + 1, (n,), generator=gen)
        new_lens[trial] = max_len if trial else 1
        q.copy_(new_q)
        slots.copy_(new_slots)
        lens.copy_(new_lens)
        graph.replay()
        eager = triton_ops.decode_attention(q, k_cache, v_cache, slots, lens, scale)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), f"replay {trial} differs from eager"
        _assert_attention_close(out, (q, k_cache, v_cache, slots, lens, scale), f"replay {trial}")


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
def test_layer_ops_graph_replay(monkeypatch):
    """rope_write_kv + norms + silu captured together follow new positions/slots on replay."""
    monkeypatch.setattr(
        triton_ops, "_empty", lambda shape, dt, dev: torch.empty(shape, dtype=dt, device=dev)
    )
    dtype, n, hq, hkv, d, hidden = torch.bfloat16, 4, 8, 2, 64, 512
    gen = _gen(9)
    q, k, v = _fused_qkv(n, hq, hkv, d, dtype, "cuda", gen)
    cos = _randn(n, d, dtype=dtype, device="cuda", gen=gen)
    sin = _randn(n, d, dtype=dtype, device="cuda", gen=gen)
    x = _randn(n, hidden, dtype=dtype, device="cuda", gen=gen)
    res = _randn(n, hidden, dtype=dtype, device="cuda", gen=gen)
    w = _randn(hidden, dtype=dtype, device="cuda", gen=gen)
    k_cache = torch.zeros(6, hkv, 32, d, dtype=dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    slots = torch.arange(n, device="cuda")
    positions = torch.zeros(n, dtype=torch.int64, device="cuda")

    def step():
        q_rot = triton_ops.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, positions)
        normed, s = triton_ops.add_rms_norm(x, res, w, 1e-5)
        return q_rot, normed, s, triton_ops.silu_and_mul(torch.cat([normed, s], dim=-1))

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    slots.copy_(torch.tensor([5, 3, 1, 0]))
    positions.copy_(torch.tensor([31, 7, 0, 12]))
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
    assert k_cache[5, :, 31].abs().sum() > 0  # the new slot/position was written


def _compiled_variants(kernel) -> int | None:
    """How many compiled variants a @triton.jit function holds (None: unknown triton layout)."""
    caches = getattr(kernel, "device_caches", None)
    if not caches:
        return None
    kernel_cache = next(iter(caches.values()))[0]
    return len(kernel_cache) if isinstance(kernel_cache, dict) else None


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))
def test_batch_size_does_not_recompile():
    """Every batch size and sequence length reuses the kernels compiled for the first one."""
    dtype, hq, hkv, d, hidden, inter, max_len = torch.bfloat16, 12, 3, 64, 384, 320, 200
    gen = _gen(77)
    kernels = [
        triton_ops._rms_norm_kernel,
        triton_ops._silu_and_mul_kernel,
        triton_ops._rope_write_kv_kernel,
        triton_ops._decode_attn_split_kernel,
        triton_ops._decode_attn_reduce_kernel,
    ]
    k_cache = torch.zeros(70, hkv, max_len, d, dtype=dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    counts = None
    for n in (1, 2, 3, 16, 17, 64):
        x = _randn(n, hidden, dtype=dtype, device="cuda", gen=gen)
        w = _randn(hidden, dtype=dtype, device="cuda", gen=gen)
        triton_ops.rms_norm(x, w, 1e-6)
        triton_ops.add_rms_norm(x, x, w, 1e-6)
        triton_ops.silu_and_mul(_randn(n, 2 * inter, dtype=dtype, device="cuda", gen=gen))
        q, k, v = _fused_qkv(n, hq, hkv, d, dtype, "cuda", gen)
        cs = _randn(n, d, dtype=dtype, device="cuda", gen=gen)
        slots = torch.arange(n, device="cuda")
        positions = torch.randint(0, max_len, (n,), generator=gen).cuda()
        q_rot = triton_ops.rope_write_kv(q, k, v, cs, cs, k_cache, v_cache, slots, positions)
        triton_ops.decode_attention(q_rot, k_cache, v_cache, slots, positions + 1, 0.125)
        now = [_compiled_variants(kern) for kern in kernels]
        if None in now:
            pytest.skip("this triton keeps its kernel cache in an unknown layout")
        if counts is None:
            counts = now
        assert now == counts, f"batch {n} compiled new variants: {counts} -> {now}"


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
