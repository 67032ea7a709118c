"""`server.distributed.symm_allreduce`: the fused all-reduce + residual add + RMSNorm kernel.

A real group needs two GPUs (tests/test_gpu_tp.py runs the server on them with
`--tp-allreduce symm-mem`). Here one process plays rank 0 or rank 1 of a group of two: the
buffers and signal pads are ordinary tensors, and the test does what the peer's kernel would
have done before the call waits (its partial pushed into our buffer, its epoch into our pad),
so the kernel's data path, its epochs and its slot rotation are checked byte for byte. Runs on
CUDA (marked `gpu`: one GPU is enough; there the PTX waits and the deadline run), or on CPU
under Triton's interpreter, opt-in as tests/test_triton_ops.py
(`TRITON_INTERPRET=1 pytest tests/test_symm_allreduce.py`); skipped otherwise.

Tolerances: `s` (the residual stream) must equal the reference bit for bit, the sum being the
same two fp32 additions rounded at the same steps; the normalised output as in
tests/test_triton_ops.py (fp32 rtol 1e-5, 16-bit: 3 ulps), with the interpreter's truncating
bf16 conversion allowed for there. Both ranks' results must be identical to each other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from server import ops  # noqa: E402
from server.distributed.symm_allreduce import SLOTS, SymmAllReduce  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
WORLD = 2

if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
    pytestmark = pytest.mark.gpu
else:
    pytest.skip("needs CUDA, or TRITON_INTERPRET=1 on CPU", allow_module_level=True)


class Group:
    """Two ranks' buffers and signal pads in this process, and one `SymmAllReduce` per rank."""

    def __init__(self, rows: int, hidden: int, dtype: torch.dtype):
        self.rows, self.hidden = rows, hidden
        self.bufs = [torch.zeros(SLOTS * WORLD * rows * hidden, dtype=dtype, device=DEVICE)
                     for _ in range(WORLD)]  # fmt: skip
        self.pads = [torch.zeros(rows * WORLD, dtype=torch.int32, device=DEVICE)
                     for _ in range(WORLD)]  # fmt: skip
        self.epochs = [0] * rows  # calls so far, per row
        ptrs = [b.data_ptr() for b in self.bufs], [p.data_ptr() for p in self.pads]
        self.ranks = [SymmAllReduce(r, WORLD, rows, hidden, dtype, DEVICE, *ptrs, 60.0)
                      for r in range(WORLD)]  # fmt: skip

    def region(self, rank: int, slot: int, writer: int) -> torch.Tensor:
        """What `writer` pushed into `rank`'s buffer for a call on `slot`."""
        n = self.rows * self.hidden
        start = (slot * WORLD + writer) * n
        return self.bufs[rank][start : start + n].view(self.rows, self.hidden)

    def peer_arrives(self, rank: int, peer: int, slot: int, partial: torch.Tensor) -> None:
        """What `peer`'s kernel does before its wait: its partial into `rank`'s buffer (its
        region of the slot), its call count per row into `rank`'s pad."""
        n = partial.shape[0]
        self.region(rank, slot, writer=peer)[:n] = partial
        flags = self.pads[rank].view(self.rows, WORLD)
        for row in range(n):
            self.epochs[row] += 1
            flags[row, peer] = self.epochs[row]

    def run_as(self, rank: int, slot: int, partials, residual, weight):
        self.peer_arrives(rank, 1 - rank, slot, partials[1 - rank])
        return self.ranks[rank].reduce_rms_norm(partials[rank], residual, weight, 1e-5)

    def check_pushed(self, rank: int, slot: int, partial: torch.Tensor) -> None:
        """This rank's partial went into the peer's buffer, and both pads hold its call count
        per row: its own as the count, the peer's as the epoch it was sent."""
        n, peer = partial.shape[0], 1 - rank
        assert torch.equal(self.region(peer, slot, writer=rank)[:n], partial)
        assert self.pads[rank].view(self.rows, WORLD)[:, rank].tolist() == self.epochs
        assert self.pads[peer].view(self.rows, WORLD)[:, rank].tolist() == self.epochs


def _reference(partials, residual, weight):
    reduced = (partials[0].float() + partials[1].float()).to(partials[0].dtype)
    if residual is None:
        return ops._rms_norm_ref(reduced, weight, 1e-5), reduced
    return ops._rms_norm_ref(reduced + residual, weight, 1e-5), reduced + residual


def _assert_close(got, want):
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        return
    eps = torch.finfo(got.dtype).eps
    tol = 3 * eps * want.float().abs() + (4 * eps * want.float().abs().max() if INTERPRET else 0)
    assert bool(((got.float() - want.float()).abs() <= tol + 1e-30).all())


def _inputs(rows: int, hidden: int, dtype):
    g = torch.Generator().manual_seed(rows * 1000 + hidden)
    partials = [torch.randn(rows, hidden, generator=g).to(dtype).to(DEVICE) for _ in range(WORLD)]
    residual = torch.randn(rows, hidden, generator=g).to(dtype).to(DEVICE)
    weight = (torch.rand(hidden, generator=g) + 0.5).to(dtype).to(DEVICE)
    return partials, residual, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "embedding"])
def test_both_ranks_get_the_reference_sum_and_norm_bit_identical(dtype, with_residual):
    rows, hidden = 5, 96  # hidden not a power of two: the masked tail
    partials, residual, weight = _inputs(rows, hidden, dtype)
    residual = residual if with_residual else None
    want_out, want_s = _reference(partials, residual, weight)
    results = []
    for rank in range(WORLD):
        group = Group(8, hidden, dtype)  # more rows than the call: only its rows are touched
        group.ranks[rank].start_forward()
        out, s = group.run_as(rank, 0, partials, residual, weight)
        results.append((out, s))
        if not INTERPRET or dtype == torch.float32:
            assert torch.equal(s, want_s)
        _assert_close(out, want_out)
        group.check_pushed(rank, 0, partials[rank])
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_calls_rotate_over_three_slots_and_never_reuse_the_last_one():
    group = Group(2, 32, torch.float32)
    ar = group.ranks[0]
    seen = []
    for calls in (5, 2, 0, 4, 3):  # forwards of different lengths, back to back
        ar.start_forward()
        seen += [ar.next_slot() for _ in range(calls)]
    assert seen[:5] == [0, 1, 2, 1, 2]
    assert all(a != b for a, b in zip(seen, seen[1:], strict=False))
    assert set(seen) == {0, 1, 2}
    # A forward of one call would end on slot 0, where the next one starts: refused.
    ar.start_forward()
    ar.next_slot()
    with pytest.raises(RuntimeError, match="single symmetric all-reduce"):
        ar.start_forward()


def test_a_forward_writes_each_call_into_its_slot():
    rows, hidden = 2, 64
    group = Group(rows, hidden, torch.float32)
    partials, residual, weight = _inputs(rows, hidden, torch.float32)
    group.ranks[0].start_forward()
    for call, slot in enumerate((0, 1, 2, 1)):
        scaled = [p * (call + 1) for p in partials]
        n = rows - call % 2  # calls of 2 and 1 rows: the counts move per row
        scaled = [p[:n].contiguous() for p in scaled]
        out, s = group.run_as(0, slot, scaled, residual[:n].contiguous(), weight)
        assert torch.equal(s, _reference(scaled, residual[:n], weight)[1])
        group.check_pushed(0, slot, scaled[0])


def test_fits_only_contiguous_decode_sized_rows_of_its_dtype():
    ar = Group(4, 32, torch.float32).ranks[0]
    x = torch.zeros(4, 32, device=DEVICE)
    assert ar.fits(x) and ar.fits(x[:1])
    assert not ar.fits(torch.zeros(5, 32, device=DEVICE))  # more rows than its programs
    assert not ar.fits(torch.zeros(0, 32, device=DEVICE))
    assert not ar.fits(torch.zeros(4, 16, device=DEVICE))
    assert not ar.fits(x.to(torch.bfloat16))
    assert not ar.fits(torch.zeros(32, 4, device=DEVICE).t())
    if DEVICE == "cuda":
        assert not ar.fits(torch.zeros(4, 32))  # host memory


@pytest.mark.skipif(DEVICE != "cuda", reason="the deadline is the GPU's clock")
def test_a_peer_that_never_arrives_fails_the_call_instead_of_hanging():
    """No flag from the peer: the kernel traps at the deadline, which surfaces as a CUDA error
    at the next sync. In a child process: a trap leaves the CUDA context unusable."""
    code = textwrap.dedent("""
        import time, torch
        from server.distributed.symm_allreduce import SLOTS, SymmAllReduce
        bufs = [torch.zeros(SLOTS * 2 * 64, device="cuda") for _ in range(2)]
        pads = [torch.zeros(2, dtype=torch.int32, device="cuda") for _ in range(2)]
        ar = SymmAllReduce(0, 2, 1, 64, torch.float32, "cuda", [b.data_ptr() for b in bufs],
                           [p.data_ptr() for p in pads], 0.5)
        x = torch.ones(1, 64, device="cuda")
        t0 = time.monotonic()
        try:
            ar.reduce_rms_norm(x, x, torch.ones(64, device="cuda"), 1e-5)
            torch.cuda.synchronize()
        except Exception as exc:
            print("FAILED after %.1f s: %s" % (time.monotonic() - t0, exc))
        else:
            print("RETURNED")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))  # fmt: skip
    assert "FAILED after" in proc.stdout, proc.stdout + proc.stderr[-2000:]
