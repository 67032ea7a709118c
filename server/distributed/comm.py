"""The collectives of a tensor-parallel group, over `torch.distributed` (NCCL or gloo).

`TPComm` is all the sharded forward needs: an in-place all-reduce (after o_proj and down, and
after the vocabulary-parallel embedding lookup), the LM head's slices gathered into full logits,
and the broadcast of rank 0's sampled tokens to the workers, which need them as the next step's
carried inputs. Each call issues one collective on the calling thread's current stream and
returns without a host sync on CUDA (`Work.wait()` only orders the streams), so the same calls
run eagerly and inside a captured CUDA graph.

Every rank must issue the same collectives in the same order: the forward does, because every
rank runs the same step plan (`server.step_plan`); the token broadcast follows each step that
samples. Ordering across ranks is the caller's invariant, not checked here.

All-reduce: NCCL, unless `enable_symm_mem` (`--tp-allreduce symm-mem`, or the default `auto`
on GPUs with peer access: `choose_allreduce`) gives the decode-sized ones (up to `rows` rows)
to `server.distributed.symm_allreduce`: each all-reduce there is one kernel that also adds the
residual and RMS-normalises, as the forward does right after every all-reduce
(`reduce_rms_norm`). Larger tensors (prompt chunks) stay on NCCL.

Logits: all-gather (every rank gets every slice, one NCCL collective, capturable) rather than a
gather to rank 0 (only rank 0 samples). `bench/tp.py` measures both inside CUDA graphs
(`logits_all_gather_us` / `logits_gather_us` in its JSON), and on two H200s the gather is the
faster one: 8.7 vs 9.3 us at 1 row, 32.5 vs 53.7 us at 64 (`tp-collectives-fused-allreduce-
h200x2.json`), ~0.6 % of a batch-64 TP=2 step. Switching (the workers would then also skip
the transposing copy) is left for a session with the GPU pair to measure it end to end.
"""

from __future__ import annotations

import datetime
import logging
import threading

import torch
import torch.distributed as dist

from server.distributed.launcher import apply_env_defaults

log = logging.getLogger("graphserve.tp")

# Groups of this process that enabled symmetric memory (see `choose_allreduce`).
_symm_groups = 0


class TPComm:
    """One group's collectives; `group` is a `torch.distributed` process group object.

    Thread ownership: the engine thread (rank 0) or the worker's main thread; one caller.
    """

    def __init__(self, group, rank: int, world: int):
        self.group = group
        self.rank = rank
        self.world = world
        self._broadcast_opts = dist.BroadcastOptions()
        self._broadcast_opts.rootRank = 0
        self._fused = None  # symm_allreduce.SymmAllReduce, once enabled

    def enable_symm_mem(self, rows: int, hidden: int, dtype, device, timeout_s: float) -> None:
        """Route the `[<= rows, hidden]` all-reduces and the norms after them through a
        symmetric buffer (`server.distributed.symm_allreduce`).

        Collective (the buffer's rendezvous): every rank calls it at the same point.
        """
        from server.distributed.symm_allreduce import SymmAllReduce

        global _symm_groups
        _symm_groups += 1
        self._fused = SymmAllReduce.create(self.group.group_name, self.rank, self.world, rows,
                                           hidden, dtype, device, timeout_s)  # fmt: skip

    def start_forward(self) -> None:
        """Called at the start of every forward, before its first collective."""
        if self._fused is not None:
            self._fused.start_forward()

    def reduce_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight, eps: float):
        """`(rms_norm(s), s)` with `s = residual + all_reduce(x)` from one fused kernel, or
        None where that kernel does not take `x` (then: `all_reduce`, then the norm)."""
        if self._fused is None or not self._fused.fits(x):
            return None
        return self._fused.reduce_rms_norm(x, residual, weight, eps)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place; returns `x`."""
        self.group.allreduce([x]).wait()
        return x

    def gather_logits(self, local: torch.Tensor, out: torch.Tensor) -> None:
        """`local` `[n, rows]` (this rank's vocabulary slice) -> `out` `[n, world * rows]`,
        every rank's slice in rank order."""
        n, rows = local.shape
        gathered = torch.empty(self.world * n, rows, dtype=local.dtype, device=local.device)
        self.group._allgather_base(gathered, local).wait()
        # The gather is rank-major ([world, n, rows]); logits are row-major per token.
        out.view(n, self.world, rows).copy_(gathered.view(self.world, n, rows).transpose(0, 1))

    def broadcast_from_rank0(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` into every rank's `tensor` (same shape and dtype everywhere)."""
        self.group.broadcast([tensor], self._broadcast_opts).wait()
        return tensor


def share_cpu_threads(world: int) -> None:
    """CPU ranks split the cores: with each rank's torch using every core, ranks that wait in
    a collective while their peer computes oversubscribe them (20x slower steps measured on
    a 2-core box)."""
    torch.set_num_threads(max(1, torch.get_num_threads() // world))


def choose_allreduce(requested: str, device_type: str, world: int) -> str:
    """`nccl` or `symm-mem` for `--tp-allreduce`, logged with why (rank 0 decides; the workers
    are told).

    `auto` takes symm-mem only on CUDA where every pair of the group's GPUs (the first `world`
    this process sees, one per rank) can access each other's memory: the kernel stores into
    its peers' buffers. An explicit `symm-mem` is not second-guessed (a missing peer access
    then fails the start, at the buffer's rendezvous).

    Once per process: torch keeps each group name's symmetric-memory info (rank, size, store)
    from the first time it is set and refuses to set it again, and a new default group reuses
    the old one's name, so a second symmetric-memory group in one process (tests; an engine
    started again in-process, which the server never does: rank 0 is its process) would meet
    at the first group's store, which is gone; on the H200 pair it failed to form. `auto` then
    takes NCCL; an explicit `symm-mem` is refused with that reason.
    """
    choice, why = requested, "asked for"
    if _symm_groups and requested != "nccl":
        if requested == "symm-mem":
            raise RuntimeError("--tp-allreduce symm-mem: this process already formed a "
                               "symmetric-memory group, and a second one is not supported; use "
                               "nccl, or a new process")  # fmt: skip
        choice, why = "nccl", "this process already formed a symmetric-memory group"
    elif requested == "auto":
        choice, why = "symm-mem", "every pair of GPUs has peer access"
        if device_type != "cuda":
            choice, why = "nccl", "not on CUDA"
        else:
            blocked = [(i, j) for i in range(world) for j in range(world)
                       if i != j and not torch.cuda.can_device_access_peer(i, j)]  # fmt: skip
            if blocked:
                i, j = blocked[0]
                choice, why = "nccl", f"GPU {i} has no peer access to GPU {j}"
    log.info("tensor-parallel all-reduce: %s (%s)", choice, why)
    return choice


def create_store(world: int, timeout_s: float):
    """Rank 0's TCP rendezvous store on a free loopback port (read `.port` to hand it on).

    Created before the workers are told where it is, so no port is picked and then lost to
    another process in between.
    """
    return dist.TCPStore(
        "127.0.0.1", 0, world, True, timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )  # fmt: skip


def init_group(
    rank: int, world: int, device: torch.device, timeout_s: float, *, store=None, port: int = 0
) -> TPComm:
    """Join the group: rank 0 passes the store it created, workers the store's port.

    Blocks until every rank has joined (gloo connects all pairs; NCCL initialises its
    communicator eagerly through `device_id`), or raises after `timeout_s`. The same timeout
    then bounds every collective on gloo; on NCCL the watchdog aborts a collective that runs
    longer (and takes the process down), which a peer's death can cause.
    """
    apply_env_defaults()  # before the process's first NCCL call (see launcher.NCCL_ENV_DEFAULTS)
    _wait_for_previous_group(timeout_s)
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout=timeout)
    cuda = device.type == "cuda"
    if cuda and device.index is None:  # NCCL's eager init wants the exact device
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(
        "nccl" if cuda else "gloo", store=store, rank=rank, world_size=world, timeout=timeout,
        device_id=device if cuda else None,
    )  # fmt: skip
    return TPComm(dist.group.WORLD, rank, world)


# The teardown thread `leave_group` started last (rank 0), while it may still run.
_leaving: threading.Thread | None = None


def leave_group(abort: bool, wait_s: float = 10.0) -> bool:
    """`destroy_group` on a thread of its own, waited for at most `wait_s` (a teardown that
    waits on a peer must not hang a shutdown). False if it is still running then: a later
    `init_group` in this process waits for it before forming a new group."""
    global _leaving
    thread = threading.Thread(target=destroy_group, args=(abort,),
                              name="graphserve-tp-destroy", daemon=True)  # fmt: skip
    _leaving = thread
    thread.start()
    thread.join(wait_s)
    return not thread.is_alive()


def _wait_for_previous_group(timeout_s: float) -> None:
    """A second engine in one process (tests; an in-process restart) can only form its group
    once the first one's has gone: NCCL's orderly teardown took 10-20 s on the H200 pair."""
    if _leaving is not None:
        _leaving.join(timeout_s)
    if dist.is_initialized():
        raise RuntimeError(
            "this process's previous tensor-parallel group has not shut down yet "
            f"(waited {timeout_s:.0f} s)"
        )


def destroy_group(abort: bool = False) -> None:
    """Leave the group.

    Orderly (`abort=False`): every rank calls this after its last collective; NCCL's teardown
    is itself collective (it flushes, then frees), so a rank that never calls it can hang the
    others' call: callers bound it. `abort`: a peer is gone; the group is aborted locally,
    waiting for nothing (gloo's orderly teardown, too, waits for its threads blocked on the
    dead peer), where this torch offers it.
    """
    if not dist.is_initialized():
        return
    abort_group = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort and abort_group is not None:
        abort_group()
    elif not abort or dist.get_backend() != "nccl":
        dist.destroy_process_group()
    # else: a broken NCCL group without a local abort is left to the process's exit
