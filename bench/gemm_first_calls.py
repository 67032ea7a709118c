"""Probe: does spreading cuBLAS's first calls over threads shorten the startup GEMM warm-up?

`ModelRunner._warm_gemm_rows` makes every projection's first GEMM at every row count a graph
runs (decode sizes and mixed-step buckets) before ready, on the engine thread, one after the
other: 0.14-0.19 s of the 1B's graph phase on the H200 box. torch drops the GIL inside each
GEMM, so if that first-call cost were host work that threads can share, a pool would cut it.
This measures it: each trial is a fresh process (the cost is once per process) that times the
cuBLAS-routed rows (more than `SKINNY_MAX_ROWS`; the Triton ones stay on one thread in the
server) of the 1B's or 8B's layer shapes plus the LM head, through `server.ops.linear` as the
model routes them, with 1 or more threads; then the same calls again, warm, for scale.

    python -m bench.gemm_first_calls --out bench/results/gemm-first-calls-h200.json  # CUDA box
    python -m bench.gemm_first_calls --smoke       # CPU: checks the script (no cuBLAS there)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench.common import environment, median, write_json
from server.config import EngineConfig, default_capture_sizes
from server.mixed_graph_policy import mixed_graph_sizes

# (hidden, fused q/k/v rows, intermediate, vocab) of the bench checkpoints' architectures.
SHAPES = {"1b": (2048, 3072, 8192, 128256), "8b": (4096, 6144, 14336, 128256),
          "tiny": (64, 96, 128, 256)}
MAX_NUM_SEQS = 64  # the benchmarks' server setting; the LM head runs at min(rows, this)


def warmup_rows(max_num_seqs: int = MAX_NUM_SEQS) -> list[int]:
    """The row counts `ModelRunner._warm_gemm_rows` warms on CUDA with the default flags: every
    decode graph size and every mixed-step bucket."""
    cfg = EngineConfig(max_num_seqs=max_num_seqs)
    buckets = mixed_graph_sizes(max_num_seqs, cfg.decode_prefill_tokens_for("cuda"),
                                cfg.max_num_batched_tokens_for("cuda"))
    return sorted({*default_capture_sizes(max_num_seqs), *buckets})


def trial(shape: str, threads: int) -> dict:
    """One fresh process's measurement (run as `--trial SHAPE THREADS`)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from server import ops

    hidden, qkv, inter, vocab = SHAPES[shape]
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dt = torch.bfloat16 if cuda else torch.float32
    weights = [torch.zeros(n, k, dtype=dt, device=dev) for n, k in
               ((qkv, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter))]
    lm_head = torch.zeros(vocab, hidden, dtype=dt, device=dev)
    zero_bias = torch.zeros(2 * inter, dtype=dt, device=dev)
    if cuda:  # the rows cuBLAS takes; fewer go to `skinny_linear` (Triton)
        from server.triton_ops import SKINNY_MAX_ROWS

        rows = [n for n in warmup_rows() if n > SKINNY_MAX_ROWS]
    else:
        rows = warmup_rows()[:3]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def warm(n: int) -> None:
        """`DecoderModel.warm_gemms` at `n` rows, on zero weights of the layer's shapes (no
        model is built: the first calls depend only on the shapes)."""
        if cuda:
            torch.cuda.set_device(dev)  # the current device is per thread
        for w in weights:
            ops.linear(torch.zeros(n, w.shape[1], dtype=dt, device=dev), w, None, zero_bias)
        m = min(n, MAX_NUM_SEQS)
        out = torch.empty(m, vocab, dtype=dt, device=dev)
        ops.linear(torch.zeros(m, hidden, dtype=dt, device=dev), lm_head, None, zero_bias, out)
        sync()

    sync()
    t0 = time.perf_counter()
    if threads == 1:
        for n in rows:
            warm(n)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(warm, rows))
    t1 = time.perf_counter()
    for n in rows:
        warm(n)
    t2 = time.perf_counter()
    return {"shape": shape, "threads": threads, "cuda": cuda, "rows": rows,
            "first_s": t1 - t0, "again_s": t2 - t1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--threads", default="1,2,4,8", help="comma list of pool sizes")
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per (shape, threads)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 rep, 1 and 2 threads")
    ap.add_argument("--out", default=None)
    ap.add_argument("--trial", nargs=2, metavar=("SHAPE", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trial:
        print(json.dumps(trial(args.trial[0], int(args.trial[1]))))
        return
    if args.smoke:
        args.shapes, args.threads, args.reps = "tiny", "1,2", 1
    shapes = args.shapes.split(",")
    counts = [int(t) for t in args.threads.split(",")]
    trials = []
    for _ in range(args.reps):  # interleaved, so a drifting box affects every setting alike
        for shape in shapes:
            for t in counts:
                out = subprocess.run([sys.executable, "-m", "bench.gemm_first_calls", "--trial",
                                      shape, str(t)], capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"trial {shape} x{t} failed:\n{out.stderr[-3000:]}")
                trials.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(trials[-1]), flush=True)
    summary = {f"{s} x{t}": median(r["first_s"] for r in trials
                                   if r["shape"] == s and r["threads"] == t)
               for s in shapes for t in counts}
    for key, value in summary.items():
        print(f"{key:>8}: first calls, median {value:.4f} s")
    write_json(args.out, {"script": "gemm_first_calls", "smoke": args.smoke, "args": vars(args),
                          "environment": environment(), "trials": trials,
                          "median_first_s": summary})


if __name__ == "__main__":
    main()
