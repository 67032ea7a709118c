"""The collectives behind tensor parallelism, timed inside CUDA graphs (`bench.tp`'s child).

Two processes, one GPU each, NCCL through `torch.distributed` as the server uses it. Each
measurement captures K collectives into one graph (after eager warm-ups on the capture stream)
and reports the median replay time divided by K, in microseconds per collective:

* `allreduce_us`: the hidden state of one decode step (`[rows, hidden]` bf16), rows 1 and 64,
  hidden 4096 (8B) and 8192 (70B): a TP decode step issues 2 per layer + 1 (the embedding);
* `logits_all_gather_us` / `logits_gather_us`: a rank's LM-head slice `[n, 128256 / 2]` bf16
  brought to rank 0, by all-gather (what `server.distributed.comm` does) or by gather;
* `broadcast_us`: rank 0's sampled tokens (`[n]` int64) to the other rank;
* with `symm_mem`: torch's symmetric-memory one-shot all-reduce at the same shapes (NVLink
  multicast stays off: `TORCH_SYMM_MEM_DISABLE_MULTICAST=1`), and a decode layer's all-reduce
  + residual add + RMSNorm three ways: that op then `add_rms_norm`, NCCL then `add_rms_norm`,
  and the server's fused kernel (`server.distributed.symm_allreduce`), checked against the first.

Rank 0 also measures HBM read bandwidth, and prints a `COLLECTIVES {json}` line after every
section (the last one holds everything). A failing measurement records its error instead of
ending the run.
"""

from __future__ import annotations

import json
import socket
import statistics

from server.distributed.launcher import apply_env_defaults

VOCAB_SLICE = 128256 // 2
ROWS = (1, 8, 32, 64)


def _graph_us(body, k: int, iters: int = 20) -> float:
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # eager warm-ups: NCCL connects, kernels load
            body()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        body()
    torch.cuda.synchronize()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times) * 1e3 / k, 2)


def _guarded(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded, the other measurements go on
        return f"error: {type(exc).__name__}: {exc}"[:300]


def _rank(rank: int, world: int, port: int, symm_mem: bool) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0,
                          timeout=datetime.timedelta(seconds=60))  # fmt: skip
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60),
                            device_id=torch.device("cuda", rank))  # fmt: skip
    res: dict = {"nccl": ".".join(map(str, torch.cuda.nccl.version())), "torch": torch.__version__}

    def report() -> None:  # after every section: a later hang still leaves the earlier numbers
        if rank == 0:
            print("COLLECTIVES " + json.dumps(res), flush=True)

    if rank == 0:  # before any collective: rank 1 waits in the first one meanwhile
        from bench.decode import hbm_read_bandwidth

        res["hbm_read_gb_s"] = round(hbm_read_bandwidth() / 1e9, 1)
        report()
    bf16 = torch.bfloat16
    res["allreduce_us"] = allreduce = {}
    for hidden in (4096, 8192):
        for rows in (1, 64):
            x = torch.zeros(rows, hidden, dtype=bf16, device="cuda")
            k = 64
            allreduce[f"h{hidden}_rows{rows}"] = _guarded(lambda x=x, k=k: _graph_us(
                lambda: [dist.all_reduce(x) for _ in range(k)], k))
    report()
    res["logits_all_gather_us"], res["broadcast_us"] = gathered, bcast = {}, {}
    for n in ROWS:
        local = torch.randn(n, VOCAB_SLICE, dtype=bf16, device="cuda")
        out = torch.empty(world * n, VOCAB_SLICE, dtype=bf16, device="cuda")
        k = 10
        gathered[n] = _guarded(lambda local=local, out=out, k=k: _graph_us(
            lambda: [dist.all_gather_into_tensor(out, local) for _ in range(k)], k))
        tokens = torch.zeros(n, dtype=torch.int64, device="cuda")
        bcast[n] = _guarded(lambda tokens=tokens, k=k: _graph_us(
            lambda: [dist.broadcast(tokens, src=0) for _ in range(k)], k))
    report()
    if symm_mem:
        res["symm_mem"] = _guarded(lambda: _symm_mem(rank, world))
        report()
    # Last: a gather is point-to-point sends and receives under the hood; if its capture fails
    # on one rank only, the other's replay waits for a partner that never comes.
    res["logits_gather_us"] = gather = {}
    for n in ROWS:
        local = torch.randn(n, VOCAB_SLICE, dtype=bf16, device="cuda")
        parts = [torch.empty_like(local) for _ in range(world)] if rank == 0 else None
        k = 10
        gather[n] = _guarded(lambda local=local, parts=parts, k=k: _graph_us(
            lambda: [dist.gather(local, parts, dst=0) for _ in range(k)], k))
    report()
    dist.barrier()
    dist.destroy_process_group()


def _symm_mem(rank: int, world: int) -> dict:
    """Per call, in µs, inside graphs of 64 calls: torch's one-shot all-reduce alone; the
    decode layer's previous route, that op then `add_rms_norm`; NCCL then `add_rms_norm`; and
    the server's fused kernel (`server.distributed.symm_allreduce`), whose output is checked
    against the previous route's."""
    import torch
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm

    from server import ops
    from server.distributed.symm_allreduce import SymmAllReduce

    ops.use_triton(True)
    group = dist.group.WORLD.group_name
    symm.enable_symm_mem_for_group(group)
    one_shot = torch.ops.symm_mem.one_shot_all_reduce_copy_out
    out = {}
    k = 64
    for hidden in (4096, 8192):
        rows_max = 64
        fused = SymmAllReduce.create(group, rank, world, rows_max, hidden, torch.bfloat16,
                                     torch.device("cuda", rank), 60.0)  # fmt: skip
        for rows in (1, 64):
            buf = symm.empty(rows, hidden, dtype=torch.bfloat16, device=f"cuda:{rank}")
            symm.rendezvous(buf, group)
            gen = torch.Generator(device="cuda").manual_seed(rank)
            local = torch.randn(rows, hidden, dtype=torch.bfloat16, device="cuda", generator=gen)
            residual = torch.randn(rows, hidden, dtype=torch.bfloat16, device="cuda",
                                   generator=torch.Generator(device="cuda").manual_seed(7))
            weight = torch.rand(hidden, dtype=torch.bfloat16, device="cuda") + 0.5
            summed = torch.empty_like(local)

            def torch_op(buf=buf, local=local, summed=summed):
                for _ in range(k):
                    one_shot(buf, local, "sum", group, summed)

            def torch_op_norm(buf=buf, local=local, summed=summed, residual=residual,
                              weight=weight):  # fmt: skip
                for _ in range(k):
                    one_shot(buf, local, "sum", group, summed)
                    ops.add_rms_norm(summed, residual, weight, 1e-5)

            def nccl_norm(local=local, residual=residual, weight=weight):
                x = local.clone()
                for _ in range(k):
                    dist.all_reduce(x)
                    ops.add_rms_norm(x, residual, weight, 1e-5)

            def fused_norm(local=local, residual=residual, weight=weight, fused=fused):
                fused.start_forward()
                for _ in range(k):
                    fused.reduce_rms_norm(local, residual, weight, 1e-5)

            key = f"h{hidden}_rows{rows}"
            out[key] = _guarded(lambda: _graph_us(torch_op, k))
            out[key + "_one_shot_then_norm"] = _guarded(lambda: _graph_us(torch_op_norm, k))
            out[key + "_nccl_then_norm"] = _guarded(lambda: _graph_us(nccl_norm, k))
            out[key + "_fused"] = _guarded(lambda: _graph_us(fused_norm, k))
            torch.cuda.synchronize()
            one_shot(buf, local, "sum", group, summed)
            want = ops.add_rms_norm(summed, residual, weight, 1e-5)
            for _ in range(3):  # several calls: slots rotate, flags must come back to zero
                got = fused.reduce_rms_norm(local, residual, weight, 1e-5)
            torch.cuda.synchronize()
            pairs = list(zip(got, want, strict=True))
            out[key + "_fused_equal"] = [bool(torch.equal(g, w)) for g, w in pairs]
            out[key + "_fused_max_diff"] = max(float((g.float() - w.float()).abs().max())
                                               for g, w in pairs)  # fmt: skip
    return out


def main(hbm_only: bool = False, symm_mem: bool = False) -> None:
    apply_env_defaults()  # NVLink multicast off, before any CUDA or NCCL call
    if hbm_only:
        from bench.decode import hbm_read_bandwidth

        print(f"HBM {hbm_read_bandwidth() / 1e9:.1f}", flush=True)
        return
    import torch
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, symm_mem), nprocs=2)
