"""The decode step's CUDA graphs under each GEMM routing of `server.ops.linear`, in one process.

Separate `bench.decode` runs of two trees differ by 1-2 % from the GPU's clocks and heat alone
(the HBM read rate they measure moved 4,094 vs 4,177 GB/s between two such runs), which is the
size of what a GEMM route changes. Here every variant's graphs are captured in one process over
one loaded model, and their replays are interleaved (each round replays every batch size under
every variant), so drift hits all variants alike. Variants: `cublas` (every GEMM on cuBLAS, the
design before the routes), `skinny` (the skinny Triton GEMM up to 16 rows, cuBLAS beyond), and
`skinny+lt<N>` (plus cuBLASLt from N to 64 rows; `--lt-starts`). `--pdl-ab` compares instead
the routing as it ships with programmatic dependent launch off (`routed`) and on
(`routed+pdl`, `server.pdl`).

    python -m bench.decode_routes_ab --model /tmp/llama-8b --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

SIZES = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--context", type=int, default=512, help="cached tokens per row")
    ap.add_argument("--lt-starts", default="17,24,32")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--pdl-ab", action="store_true",
                    help="the shipped routing with PDL off and on (instead of the GEMM routes)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from bench.common import environment
    from server import ops, pdl
    from server.config import EngineConfig
    from server.model_runner import ModelRunner

    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    block, max_n = 16, max(SIZES)
    per_row = -(-(args.context + 64) // block)
    cfg = EngineConfig(model=args.model, dtype="bfloat16", device="cuda", graph_capture="eager",
                       cuda_graph_sizes=[1], max_num_seqs=max_n,
                       max_model_len=per_row * block, max_num_batched_tokens=2048,
                       block_size=block, num_kv_blocks=1 + max_n * per_row)  # fmt: skip
    runner = ModelRunner(cfg, lambda *a: None)
    runner.load()
    for k, v in runner.kv_cache:
        k.normal_()
        v.normal_()
    for r in range(max_n):  # each row its own blocks, `context` tokens cached
        runner.block_tables[r, :per_row] = torch.arange(
            1 + r * per_row, 1 + (r + 1) * per_row, dtype=torch.int32, device="cuda")
    graphs = runner.graphs
    graphs.inputs[0] = torch.randint(0, 1000, (max_n,), device="cuda")
    graphs.inputs[1] = args.context - 1
    graphs.inputs[2] = torch.arange(max_n, device="cuda")
    routed, routed_rows = ops.linear, ops.LT_ROWS

    def cublas_linear(x, w, b=None, zero_bias=None, out=None):
        if out is None:
            return F.linear(x, w, b)
        return torch.matmul(x, w.t(), out=out) if b is None else torch.addmm(b, x, w.t(), out=out)

    # name -> (linear, Lt rows, PDL: None keeps the process's default)
    if args.pdl_ab:
        variants = {"routed": (routed, routed_rows, False),
                    "routed+pdl": (routed, routed_rows, True)}
    else:
        variants = {"cublas": (cublas_linear, routed_rows, None),
                    "skinny": (routed, (10**9, 10**9), None)}
        for start in (int(s) for s in args.lt_starts.split(",")):
            variants[f"skinny+lt{start}"] = (routed, (start, 64), None)
    captured = {}
    stream = torch.cuda.Stream()
    try:
        for name, (fn, lt_rows, pdl_on) in variants.items():
            ops.linear, ops.LT_ROWS = fn, lt_rows
            pdl.set_enabled(pdl_on)
            pool = torch.cuda.graph_pool_handle()
            for n in SIZES:
                with torch.cuda.stream(stream):  # warm-up: workspaces, compiles
                    graphs._decode_static(n)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    graphs._decode_static(n)
                captured[name, n] = graph
    finally:
        ops.linear, ops.LT_ROWS = routed, routed_rows
        pdl.set_enabled(None)
    torch.cuda.synchronize()
    times: dict = {key: [] for key in captured}
    for round_ in range(args.rounds + 2):  # the first two rounds are warm-up
        for n in SIZES:
            for name in variants:
                graph = captured[name, n]
                graph.replay()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(5):
                    graph.replay()
                end.record()
                end.synchronize()
                if round_ >= 2:
                    times[name, n].append(start.elapsed_time(end) / 5)
    result = {}
    print("batch " + " ".join(f"{v:>12s}" for v in variants))
    for n in SIZES:
        result[n] = {v: statistics.median(times[v, n]) for v in variants}
        print(f"{n:5d} " + " ".join(f"{result[n][v]:12.3f}" for v in variants), flush=True)
    import triton

    env = dict(environment(), torch=torch.__version__, triton=triton.__version__,
               device=torch.cuda.get_device_name())
    with open(args.out, "w") as f:
        json.dump({"environment": env, "context": args.context, "rounds": args.rounds,
                   "replays_per_round": 5, "routed_lt_rows": list(routed_rows),
                   "ms_per_step_median": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
