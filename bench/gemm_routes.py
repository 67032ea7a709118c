"""The decode step's GEMMs by route: cuBLAS, cuBLASLt and `server.ops.linear` as routed.

Each projection of a model shape (q/k/v, o, gate/up, down, the LM head; optionally a
tensor-parallel rank's halves) at a range of row counts, timed per call inside a CUDA graph of
32 calls over 32 distinct weights (as 32 layers read 32 weights: no call finds its weight in
L2). Reports microseconds and the weight bytes read per second, and checks that the routed
result is within the fp32-reordering tolerance of cuBLAS's. `--sweep` also times the skinny
kernel's block configurations at up to 16 rows (what `triton_ops._skinny_config` was picked
from).

    python -m bench.gemm_routes --preset llama-3.1-8b --tp 1,2 --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from bench.common import environment
from bench.decode import graph_time_us
from server import ops

ROWS = (1, 2, 4, 8, 16, 17, 32, 48, 64, 65, 128, 512, 2048)
CALLS = 32


def projections(raw: dict, tp: int) -> dict[str, tuple[int, int]]:
    """(N, K) of each GEMM of a decode step on one rank of `tp`."""
    hidden, inter = raw["hidden_size"], raw["intermediate_size"]
    heads, kv = raw["num_attention_heads"], raw["num_key_value_heads"]
    head_dim = raw.get("head_dim", hidden // heads)
    return {
        "qkv": ((heads + 2 * kv) * head_dim // tp, hidden),
        "o": (hidden, heads * head_dim // tp),
        "gate_up": (2 * inter // tp, hidden),
        "down": (hidden, inter // tp),
        "lm_head": (-(-raw["vocab_size"] // tp), hidden),
    }


def per_call_us(fn, x, weights, out) -> float:
    """Microseconds per call of `fn(x, w, out)` inside one CUDA graph of one call per weight
    (`bench.decode.graph_time_us`, the weights taken in turn), median of 15 replays."""
    turn = itertools.cycle(weights)
    return graph_time_us(lambda: fn(x, next(turn), out), calls=len(weights), iters=15)


def with_blas(library: str):
    def mm(x, w, out):
        previous = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library(library)
        try:
            torch.mm(x, w.t(), out=out)
        finally:
            torch.backends.cuda.preferred_blas_library(previous)
    return mm


def sweep_skinny(x, weights, out) -> list[dict]:
    from server import triton_ops

    rows = []
    n, k = weights[0].shape
    for block_n in (32, 64, 128):
        for block_k in (64, 128, 256):
            for stages in (3, 4, 5):
                if n % block_n or k % block_k or block_n * block_k * stages > 128 * 256 * 3:
                    continue

                def launch(x, w, out, bn=block_n, bk=block_k, st=stages):
                    triton_ops._skinny_linear_kernel[(n // bn,)](
                        x, w, w, out, x.shape[0], k, x.stride(0), w.stride(0), out.stride(0),
                        HAS_BIAS=False, ROWS=triton_ops._SKINNY_ROWS, BLOCK_N=bn, BLOCK_K=bk,
                        DOT_F32=False, PDL=False, num_stages=st, num_warps=4)

                try:
                    us = per_call_us(launch, x, weights, out)
                except Exception as exc:  # a config past the shared memory: skipped
                    print(f"  config {block_n}x{block_k}x{stages}: {exc}"[:160], file=sys.stderr)
                    continue
                rows.append({"block_n": block_n, "block_k": block_k, "stages": stages, "us": us})
    return sorted(rows, key=lambda r: r["us"])


def main(argv: list[str] | None = None) -> int:
    from server.kernel_precompile import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--tp", default="1", help="comma-separated tensor-parallel sizes")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--sweep", action="store_true", help="time the skinny kernel's configs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    ops.use_triton(True)
    raw = PRESETS[args.preset]
    dtype = torch.bfloat16
    results = []
    for tp in (int(t) for t in args.tp.split(",")):
        for name, (n, k) in projections(raw, tp).items():
            calls = CALLS if n * k < 2**28 else 8  # the LM head: 8 distinct weights suffice
            weights = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(calls)]
            zero = torch.zeros(n, device="cuda", dtype=dtype)
            for m in (int(r) for r in args.rows.split(",")):
                if name == "lm_head" and m > 64:
                    continue  # prefill takes the LM head of its last tokens only
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                out = torch.empty(m, n, device="cuda", dtype=dtype)
                row = {"tp": tp, "gemm": name, "N": n, "K": k, "rows": m}
                row["cublas_us"] = per_call_us(with_blas("cublas"), x, weights, out)
                row["cublaslt_us"] = per_call_us(with_blas("cublaslt"), x, weights, out)
                row["routed_us"] = per_call_us(
                    lambda x, w, o, z=zero: ops.linear(x, w, None, z, out=o), x, weights, out)
                ref = torch.mm(x, weights[0].t()).double()
                got = ops.linear(x, weights[0], None, zero).double()
                row["routed_max_abs_diff"] = float((got - ref).abs().max())
                bytes_read = n * k * dtype.itemsize
                for key in ("cublas", "cublaslt", "routed"):
                    row[f"{key}_TBps"] = bytes_read / (row[f"{key}_us"] * 1e-6) / 1e12
                if args.sweep and m <= 16 and m in (1, 16):
                    row["skinny_configs"] = sweep_skinny(x, weights, out)[:5]
                results.append(row)
                print(f"tp{tp} {name:8s} rows {m:5d}: cuBLAS {row['cublas_us']:8.2f} us  "
                      f"Lt {row['cublaslt_us']:8.2f}  routed {row['routed_us']:8.2f} "
                      f"({row['routed_us'] / row['cublas_us']:.3f}x)", flush=True)
            del weights
            torch.cuda.empty_cache()
    summary = {}
    for tp in sorted({r["tp"] for r in results}):
        for m in sorted({r["rows"] for r in results}):
            sel = [r for r in results
                   if r["tp"] == tp and r["rows"] == m and r["gemm"] != "lm_head"]
            if sel:
                summary[f"tp{tp}_rows{m}_layer_us"] = {
                    "cublas": sum(r["cublas_us"] for r in sel),
                    "routed": sum(r["routed_us"] for r in sel)}
    import triton

    env = dict(environment(), torch=torch.__version__, triton=triton.__version__,
               device=torch.cuda.get_device_name())
    json.dump({"environment": env, "preset": args.preset, "calls_per_graph": CALLS,
               "rows": results, "per_layer": summary}, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
