"""A tensor-parallel decode step's all-reduce and the RMSNorm after it, as one Triton kernel.

Each half of a sharded decoder layer ends the same way: the ranks' partial o_proj (or down)
outputs are summed, the residual is added, and the sum is RMS-normalised for the next
projection. With NCCL that is an all-reduce launch (plus NCCL's proxy and protocol) and an
`add_rms_norm` launch; with torch's symmetric-memory one-shot op it is still two kernels, and
that op meets its peers at two device-side barriers. A decode step issues 2L + 1 of these on
rows of a few KiB, so their fixed costs, not their bytes, are what a TP=2 step pays for them
(about 0.45 ms of a 3.3 ms 8B step with the one-shot op, `docs/benchmarks.md` 8f).

Here, one launch per call, one program per row:

1. the program copies its row of `x` (this rank's partial) into this rank's slot of a buffer
   every rank maps (`torch.distributed._symmetric_memory`, peer loads over NVLink; multicast is
   not used);
2. it meets the same program on every other rank at a barrier made of per-(row, peer) flags in
   the buffer's signal pad: a flag is set 0 -> 1 by the sender (release, system scope) and
   taken 1 -> 0 by the receiver (acquire), so the pad is all zeros again after every call and
   nothing on the host has to count calls: the same launch replays in a CUDA graph;
3. it sums the row over the ranks' slots *in rank order* in fp32 (every rank computes the same
   bits, as NCCL's all-reduce gives every rank the same result), rounds the sum to the
   activation dtype as the all-reduce's output would be, then does exactly what
   `triton_ops.add_rms_norm` (or `rms_norm`, with no residual) does with it.

Why one barrier is enough: calls rotate over three slots, and two consecutive calls never use
the same one (the first call of a forward uses slot 0, later calls alternate 1 and 2; see
`SymmAllReduce.start_forward`). A rank can only rewrite slot s at call k + 2 after passing
call k + 1's barrier, which its peer reaches only after its call-k kernel (the one reading
slot s) has finished: kernels on one stream run in order. torch's op needs its second barrier
because it reuses one slot for every call.

Never a hang: a wait (for a peer's flag, or for a peer to take the previous flag) longer than
the group's timeout (`--tp-timeout`) executes `trap`, which fails the step with a CUDA error
(the engine then goes to `failed`, as it does when NCCL's watchdog aborts a collective) instead
of spinning forever on a dead peer.

Limits, checked by `fits`: the rows of one call (one program each, all resident at once, so no
program waits for a peer program that cannot be scheduled), a contiguous `[rows, hidden]`
tensor of the buffer's dtype. Anything else (prompt chunks) goes to NCCL.

Thread ownership: the engine thread (rank 0) or the worker's main thread, as `TPComm`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from server.triton_ops import _TORCH_TO_TL, _empty

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SLOTS = 3


@triton.jit
def _now_ns():
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def _trap():
    tl.inline_asm_elementwise("trap;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _flag_swap(addr, expect, new, SEM: tl.constexpr, TIMEOUT_NS: tl.constexpr):
    """Spin until the flag at `addr` goes `expect` -> `new` (one thread does the atomic; the
    program waits with it). TIMEOUT_NS == 0: no deadline (the interpreter has no timer)."""
    if TIMEOUT_NS > 0:
        start = _now_ns()
    while tl.atomic_cas(addr, expect, new, sem=SEM, scope="sys") != expect:
        if TIMEOUT_NS > 0:
            if _now_ns() - start > TIMEOUT_NS:
                _trap()


@triton.jit
def _barrier(pads_ptr, block, rank, WORLD: tl.constexpr, TIMEOUT_NS: tl.constexpr):
    """Meet program `block` of every other rank; this program's earlier global writes are
    visible to them, and theirs to this program's later reads."""
    tl.debug_barrier()  # every thread's slot stores are issued before the release below
    for peer in tl.static_range(WORLD):
        if peer != rank:
            theirs = tl.load(pads_ptr + peer).to(tl.pointer_type(tl.int32))
            _flag_swap(theirs + block * WORLD + rank, 0, 1, "release", TIMEOUT_NS)
    mine = tl.load(pads_ptr + rank).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != rank:
            _flag_swap(mine + block * WORLD + peer, 1, 0, "acquire", TIMEOUT_NS)
    tl.debug_barrier()  # no thread reads a peer's slot before the acquire above


@triton.jit(do_not_specialize=["rank", "slot_offset"])
def _reduce_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    sum_ptr,
    bufs_ptr,  # int64 [WORLD]: each rank's buffer, as this GPU addresses it
    pads_ptr,  # int64 [WORLD]: each rank's signal pad
    rank,
    slot_offset,  # elements from a buffer's start to this call's slot
    hidden,
    eps,
    WORLD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_TY: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TIMEOUT_NS: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    offs = row.to(tl.int64) * hidden + cols
    elem = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    mine = tl.load(bufs_ptr + rank).to(tl.pointer_type(elem))
    tl.store(mine + slot_offset + offs, x, mask=mask)
    _barrier(pads_ptr, row, rank, WORLD, TIMEOUT_NS)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for peer in tl.static_range(WORLD):  # rank order on every rank: the same bits everywhere
        base = tl.load(bufs_ptr + peer).to(tl.pointer_type(elem))
        acc += tl.load(base + slot_offset + offs, mask=mask, other=0.0).to(tl.float32)
    reduced = acc.to(elem)  # the all-reduce's output
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0)
        # From here on as triton_ops._rms_norm_kernel: `residual + x`, rounded, normalised.
        s = (r.to(tl.float32) + reduced.to(tl.float32)).to(sum_ptr.dtype.element_ty)
    else:
        s = reduced.to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + offs, s, mask=mask)
    h = s.to(tl.float32)
    var = tl.sum(h * h, axis=0) / hidden
    rstd = tl.rsqrt(var + eps)
    normed = (h * rstd).to(ROUND_TY).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


class SymmAllReduce:
    """The symmetric buffer of one group and the fused launches over it.

    `buffer_ptrs` / `signal_pad_ptrs`: every rank's buffer and signal pad as this GPU addresses
    them (from torch's rendezvous; tests pass host memory under the interpreter). The buffer
    holds `SLOTS` slots of `[rows, hidden]`; the signal pad `rows * world` int32 flags.
    """

    def __init__(self, rank: int, world: int, rows: int, hidden: int, dtype: torch.dtype,
                 device, buffer_ptrs, signal_pad_ptrs, timeout_s: float):  # fmt: skip
        if dtype not in _TORCH_TO_TL:
            raise TypeError(f"the symmetric all-reduce needs a float dtype, got {dtype}")
        self.rank, self.world, self.rows, self.hidden, self.dtype = rank, world, rows, hidden, dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._bufs = torch.tensor(list(buffer_ptrs), dtype=torch.int64, device=self.device)
        self._pads = torch.tensor(list(signal_pad_ptrs), dtype=torch.int64, device=self.device)
        self._timeout_ns = 0 if _INTERPRET else max(1, int(timeout_s * 1e9))
        self._calls = 0
        self.keep_alive: object = None  # the rendezvous' buffer and handle, owned here

    @classmethod
    def create(cls, group_name: str, rank: int, world: int, rows: int, hidden: int, dtype,
               device, timeout_s: float) -> SymmAllReduce:  # fmt: skip
        """Allocate and rendezvous the buffer (collective: every rank, at the same point)."""
        import torch.distributed._symmetric_memory as symm

        symm.enable_symm_mem_for_group(group_name)
        buffer = symm.empty(SLOTS * rows * hidden, dtype=dtype, device=device)
        handle = symm.rendezvous(buffer, group_name)
        need = rows * world * 4
        if handle.signal_pad_size < need:
            raise RuntimeError(
                f"the symmetric all-reduce needs a {need}-byte signal pad for {rows} rows, "
                f"torch gave {handle.signal_pad_size}"
            )
        self = cls(rank, world, rows, hidden, dtype, device, handle.buffer_ptrs,
                   handle.signal_pad_ptrs, timeout_s)  # fmt: skip
        self.keep_alive = (buffer, handle)
        return self

    def start_forward(self) -> None:
        """The next call is a forward's first: it takes slot 0 (see the module docstring).

        A forward must make no call or at least two: a forward of one call would end on slot
        0 and the next one start there (a decoder forward makes 2L + 1)."""
        if self._calls == 1:
            raise RuntimeError("a forward made a single symmetric all-reduce; the next one "
                               "would reuse its slot")  # fmt: skip
        self._calls = 0

    def fits(self, x: torch.Tensor) -> bool:
        return (
            x.dim() == 2 and 0 < x.shape[0] <= self.rows and x.shape[1] == self.hidden
            and x.dtype == self.dtype and x.is_contiguous() and x.device == self.device
        )  # fmt: skip

    def next_slot(self) -> int:
        slot = 0 if self._calls == 0 else 1 + (self._calls - 1) % 2
        self._calls += 1
        return slot

    def reduce_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`s = residual + sum over ranks of x` (no residual: the sum alone); returns
        `(rms_norm(s), s)`, as `ops.add_rms_norm` / `ops.rms_norm` would after an all-reduce.
        `x` must `fit`; it is not modified."""
        n = x.shape[0]
        if residual is not None:
            if residual.shape != x.shape or not residual.is_contiguous():
                raise ValueError(f"residual must be a contiguous {tuple(x.shape)} tensor")
            sum_dtype = torch.promote_types(residual.dtype, x.dtype)
            round_dtype = sum_dtype
        else:
            sum_dtype = round_dtype = x.dtype
        s = _empty(x.shape, sum_dtype, x.device)
        out = _empty(x.shape, torch.promote_types(weight.dtype, sum_dtype), x.device)
        block_h = triton.next_power_of_2(self.hidden)
        _reduce_norm_kernel[(n,)](
            x, residual if residual is not None else x, weight.contiguous(), out, s,
            self._bufs, self._pads, self.rank, self.next_slot() * self.rows * self.hidden,
            self.hidden, float(eps),
            WORLD=self.world,
            HAS_RESIDUAL=residual is not None,
            ROUND_TY=_TORCH_TO_TL[round_dtype],
            BLOCK_H=block_h,
            TIMEOUT_NS=self._timeout_ns,
            num_warps=8 if block_h >= 4096 else 4,
        )  # fmt: skip
        return out, s
