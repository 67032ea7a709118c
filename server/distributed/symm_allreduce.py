"""A tensor-parallel decode step's all-reduce and the RMSNorm after it, as one Triton kernel.

Each half of a sharded decoder layer ends the same way: the ranks' partial o_proj (or down)
outputs are summed, the residual is added, and the sum is RMS-normalised for the next
projection. With NCCL that is an all-reduce launch (plus NCCL's proxy and protocol) and an
`add_rms_norm` launch; with torch's symmetric-memory one-shot op it is still two kernels, and
that op meets its peers at two device-side barriers and then pulls their data across the link.
A decode step issues 2L + 1 of these on rows of a few KiB, so their fixed costs, not their
bytes, are what a TP=2 step pays (H200 pair, 8B rows, per call: 8.4 µs for the one-shot op and
`add_rms_norm`, 4.6 µs here; `docs/benchmarks.md` 10b).

Here, one launch per call, one program per row, over a buffer every rank maps
(`torch.distributed._symmetric_memory`; peer stores over NVLink, multicast not used):

1. push: the program stores its row of `x` (this rank's partial) straight into every peer's
   buffer, in this rank's region of the call's slot: posted writes, no round trip;
2. it counts the call in its own signal pad (entry `[row, rank]`, which no peer writes) and,
   after a CTA barrier (so the release below orders every thread's pushes), stores that count,
   the epoch, into each peer's pad at `[row, rank]` (release, system scope);
3. every thread waits until its own pad's `[row, peer]` has reached the epoch (acquire, a
   wrap-safe compare), so each thread's later loads see what the peer pushed;
4. it sums the row over the ranks *in rank order* in fp32, its own partial from registers and
   the peers' from its own buffer (every rank computes the same bits, as NCCL's all-reduce
   gives every rank the same result), rounds the sum to the activation dtype as the
   all-reduce's output would be, then does exactly what `triton_ops.add_rms_norm` (or
   `rms_norm`, with no residual) does with it.

Epochs rather than flags the receiver resets: the sender never waits for its previous flag to
be taken, and no signal can be lost (a second 0 -> 1 on a flag still at 1 would be). The counts
live in device memory and advance in the kernel, so the same launch replays in a CUDA graph
with nothing counted on the host. Program i counts only calls of more than i rows, on every
rank alike (all ranks make the same calls).

Why one barrier is enough: calls rotate over three slots, and two consecutive calls never use
the same one (the first call of a forward uses slot 0, later calls alternate 1 and 2; see
`SymmAllReduce.start_forward`). A rank rewrites its region of a peer's slot s at call k + 2
only after call k + 1's wait, whose epoch the peer sends from its call-(k + 1) kernel, which
starts after its call-k kernel (the one reading slot s) has finished: kernels on one stream run
in order. torch's op needs its second barrier because it reuses one buffer for every call.

Never a hang: a wait longer than the group's timeout (`--tp-timeout`) executes `trap`, which
fails the step with a CUDA error (the engine then goes to `failed`, as it does when NCCL's
watchdog aborts a collective) instead of spinning forever on a dead peer.

Limits, checked by `fits`: the rows of one call (one program each, all resident at once, so no
program waits for a peer program that cannot be scheduled), a contiguous `[rows, hidden]`
tensor of the buffer's dtype. Anything else (prompt chunks) goes to NCCL.

Thread ownership: the engine thread (rank 0) or the worker's main thread, as `TPComm`.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from server import pdl
from server.pdl import wait_for_previous
from server.triton_ops import _TORCH_TO_TL, _empty

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SLOTS = 3


@triton.jit
def _send_epoch(addr, epoch, ASM: tl.constexpr):
    """Store `epoch` at `addr` (a peer's pad), ordered after this program's earlier writes."""
    if ASM:
        tl.inline_asm_elementwise(
            "st.release.sys.global.u32 [$1], $2; mov.u32 $0, 0;", "=r,l,r", [addr, epoch],
            dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
    else:
        tl.atomic_xchg(addr, epoch, sem="release", scope="sys")


@triton.jit
def _wait_epoch(addr, epoch, ASM: tl.constexpr, TIMEOUT_NS: tl.constexpr):
    """Spin until the flag at `addr` (this rank's pad) reaches `epoch` (wrap-safe compare);
    trap past the deadline. Every thread waits, so each one's later loads follow its acquire."""
    if ASM:
        tl.inline_asm_elementwise(
            f"""{{
            .reg .u32 %v;
            .reg .pred %p;
            .reg .u64 %t0, %t1;
            mov.u64 %t0, %globaltimer;
            Lwait:
            ld.acquire.sys.global.u32 %v, [$1];
            sub.u32 %v, %v, $2;
            setp.ge.s32 %p, %v, 0;
            @%p bra Ldone;
            mov.u64 %t1, %globaltimer;
            sub.u64 %t1, %t1, %t0;
            setp.gt.u64 %p, %t1, {TIMEOUT_NS};
            @%p trap;
            bra Lwait;
            Ldone:
            mov.u32 $0, 0;
            }}""",
            "=r,l,r", [addr, epoch], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
    else:
        while tl.atomic_add(addr, 0, sem="acquire", scope="sys") - epoch < 0:
            pass


@triton.jit(do_not_specialize=["rank", "slot_offset", "region"])
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
    region,  # elements of one rank's region in a slot: rows * hidden
    hidden,
    eps,
    WORLD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROUND_TY: tl.constexpr,
    BLOCK_H: tl.constexpr,
    TIMEOUT_NS: tl.constexpr,
    ASM: tl.constexpr,
    PDL: tl.constexpr,
):
    # Small (one program per row): the next kernel's blocks may launch and wait while this one
    # waits for its peers. Call order is kept (server.pdl), which the slots rely on.
    wait_for_previous(PDL, True)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    offs = row.to(tl.int64) * hidden + cols
    elem = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    # Push: this rank's partial goes straight into every peer's buffer (posted writes over
    # NVLink), in this rank's region of the slot; nothing is read across the link.
    for peer in tl.static_range(WORLD):
        if peer != rank:
            theirs = tl.load(bufs_ptr + peer).to(tl.pointer_type(elem))
            tl.store(theirs + slot_offset + rank * region + offs, x, mask=mask)
    mine_pad = tl.load(pads_ptr + rank).to(tl.pointer_type(tl.int32))
    count = mine_pad + row * WORLD + rank  # this program's call count (no peer writes there)
    epoch = tl.load(count) + 1
    tl.debug_barrier()  # every thread has read the count and issued its pushes
    tl.store(count, epoch)
    for peer in tl.static_range(WORLD):
        if peer != rank:
            theirs_pad = tl.load(pads_ptr + peer).to(tl.pointer_type(tl.int32))
            _send_epoch(theirs_pad + row * WORLD + rank, epoch, ASM)
    for peer in tl.static_range(WORLD):
        if peer != rank:
            _wait_epoch(mine_pad + row * WORLD + peer, epoch, ASM, TIMEOUT_NS)
    mine = tl.load(bufs_ptr + rank).to(tl.pointer_type(elem))
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for r in tl.static_range(WORLD):  # rank order on every rank: the same bits everywhere
        theirs_row = tl.load(mine + slot_offset + r * region + offs, mask=mask & (r != rank),
                             other=0.0)  # fmt: skip
        acc += tl.where(r == rank, x, theirs_row).to(tl.float32)
    reduced = acc.to(elem)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0)
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
    them (from torch's rendezvous; tests pass memory of their own). A buffer holds `SLOTS`
    slots of `world` regions of `[rows, hidden]` (region r: what rank r pushed); a signal pad
    `[rows, world]` int32 epochs.
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
        self._timeout_ns = max(1, int(timeout_s * 1e9))
        self._calls = 0
        self.keep_alive: object = None  # the rendezvous' buffer and handle, owned here

    @classmethod
    def create(cls, group_name: str, rank: int, world: int, rows: int, hidden: int, dtype,
               device, timeout_s: float) -> SymmAllReduce:  # fmt: skip
        """Allocate and rendezvous the buffer (collective: every rank, at the same point)."""
        import torch.distributed._symmetric_memory as symm

        with warnings.catch_warnings():  # needed by older torch, a deprecated no-op in 2.11
            warnings.simplefilter("ignore", FutureWarning)
            symm.enable_symm_mem_for_group(group_name)
        buffer = symm.empty(SLOTS * world * rows * hidden, dtype=dtype, device=device)
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
        region = self.rows * self.hidden
        on = pdl.use(n)
        _reduce_norm_kernel[(n,)](
            x, residual if residual is not None else x, weight.contiguous(), out, s,
            self._bufs, self._pads, self.rank, self.next_slot() * self.world * region, region,
            self.hidden, float(eps),
            WORLD=self.world,
            HAS_RESIDUAL=residual is not None,
            ROUND_TY=_TORCH_TO_TL[round_dtype],
            BLOCK_H=block_h,
            TIMEOUT_NS=self._timeout_ns,
            ASM=not _INTERPRET,  # the interpreter runs no PTX: Triton's atomics instead
            PDL=on,
            num_warps=8 if block_h >= 4096 else 4,
            **pdl.launch_options(on),
        )  # fmt: skip
        return out, s
