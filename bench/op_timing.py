"""Micro-benchmark: the Triton kernels of `server.triton_ops` against their torch references.

Shapes are Llama-3-8B's (hidden 4096, 32 query / 8 kv heads, head_dim 128, ffn 14336) at
decode batch sizes 1, 8 and 64; decode attention runs at context lengths 128, 1024 and 4096 in
a max_len 4096 cache (plus a mixed batch: one long row, the rest short). Each time is the
median of `triton.testing.do_bench` (L2 flushed between runs, so weights-streaming conditions).
GB/s counts the bytes an op must move; for decode attention, the K/V bytes actually read.

    python -m bench.op_timing --out results.json          # on a CUDA machine, well under 2 min
    python -m bench.op_timing --split-sweep               # also time other split-K factors
    TRITON_INTERPRET=1 python -m bench.op_timing --smoke  # CPU: checks the script, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from server import ops, triton_ops


@dataclass
class Shapes:
    hidden: int = 4096
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 14336
    eps: float = 1e-5


SMOKE_SHAPES = Shapes(hidden=256, num_heads=4, num_kv_heads=2, head_dim=64, ffn=512)


def _timer(device: torch.device):
    """Returns `time(fn) -> microseconds`."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, return_mode="median") * 1e3

    def wall(fn):  # --smoke on CPU: one timed run after one warm-up; not a measurement
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6

    return wall


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def _row(op, batch, triton_us, torch_us, nbytes, diff, ctx=None) -> dict:
    """One result; `torch_us` None where the reference was not timed."""
    return {
        "op": op,
        "batch": batch,
        "ctx": ctx,
        "triton_us": round(triton_us, 2),
        "torch_us": None if torch_us is None else round(torch_us, 2),
        "speedup": round(torch_us / triton_us, 2) if torch_us and triton_us > 0 else None,
        "bytes": nbytes,
        "triton_gbps": round(nbytes / (triton_us * 1e-6) / 1e9, 1) if triton_us > 0 else None,
        "max_abs_diff": diff,
    }


def bench_elementwise(s: Shapes, batch: int, dtype, device, timer, caches) -> list[dict]:
    elt = torch.tensor([], dtype=dtype).element_size()
    rows = []
    x = torch.randn(batch, s.hidden, dtype=dtype, device=device)
    res = torch.randn_like(x)
    w = torch.randn(s.hidden, dtype=dtype, device=device)

    got, ref = triton_ops.rms_norm(x, w, s.eps), ops.rms_norm(x, w, s.eps)
    rows.append(_row(
        "rms_norm", batch,
        timer(lambda: triton_ops.rms_norm(x, w, s.eps)), timer(lambda: ops.rms_norm(x, w, s.eps)),
        (2 * batch * s.hidden + s.hidden) * elt, _max_diff(got, ref),
    ))

    got, ref = triton_ops.add_rms_norm(x, res, w, s.eps), ops.add_rms_norm(x, res, w, s.eps)
    rows.append(_row(
        "add_rms_norm", batch,
        timer(lambda: triton_ops.add_rms_norm(x, res, w, s.eps)),
        timer(lambda: ops.add_rms_norm(x, res, w, s.eps)),
        (4 * batch * s.hidden + s.hidden) * elt,
        max(_max_diff(got[0], ref[0]), _max_diff(got[1], ref[1])),
    ))

    gate_up = torch.randn(batch, 2 * s.ffn, dtype=dtype, device=device)
    got, ref = triton_ops.silu_and_mul(gate_up), ops.silu_and_mul(gate_up)
    rows.append(_row(
        "silu_and_mul", batch,
        timer(lambda: triton_ops.silu_and_mul(gate_up)), timer(lambda: ops.silu_and_mul(gate_up)),
        3 * batch * s.ffn * elt, _max_diff(got, ref),
    ))

    hq, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    q = qkv[:, : hq * d].view(batch, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(batch, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(batch, hkv, d)
    cos = torch.randn(batch, d, dtype=dtype, device=device)
    sin = torch.randn(batch, d, dtype=dtype, device=device)
    k_cache, v_cache = caches
    slots = torch.arange(batch, device=device)
    positions = torch.full((batch,), 17, dtype=torch.int64, device=device)
    got = triton_ops.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, positions)
    ref = ops.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, positions)
    rows.append(_row(
        "rope_write_kv", batch,
        timer(lambda: triton_ops.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots,
                                               positions)),
        timer(lambda: ops.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, positions)),
        (batch * (2 * hq + 4 * hkv) * d + 2 * batch * d) * elt, _max_diff(got, ref),
    ))
    return rows


def bench_attention(s: Shapes, batch, lens_list, label, dtype, device, timer, caches,
                    num_splits=None, with_reference=True) -> dict:
    k_cache, v_cache = caches
    elt = k_cache.element_size()
    q = torch.randn(batch, s.num_heads, s.head_dim, dtype=dtype, device=device)
    slots = torch.arange(batch, device=device)
    lens = torch.tensor(lens_list, dtype=torch.int64, device=device)
    scale = s.head_dim**-0.5

    def run():
        return triton_ops.decode_attention_split(q, k_cache, v_cache, slots, lens, scale,
                                                 num_splits)

    def reference():  # reads every slot's whole max_len, as the torch path does
        return ops.decode_attention(q, k_cache, v_cache, slots, lens, scale)

    kv_bytes = sum(lens_list) * s.num_kv_heads * s.head_dim * 2 * elt
    triton_us = timer(run)
    row = _row("decode_attention", batch, triton_us,
               timer(reference) if with_reference else None, kv_bytes,
               _max_diff(run(), reference()) if with_reference else None, ctx=label)
    row["num_splits"] = num_splits or triton_ops.decode_attention_splits(
        batch, s.num_kv_heads, k_cache.shape[2])
    return row


def _print_table(rows: list[dict]) -> None:
    head = (f"{'op':<18}{'batch':>6}{'ctx':>8}{'splits':>7}{'triton us':>11}{'torch us':>10}"
            f"{'x':>7}{'GB/s':>8}{'max|diff|':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ctx = "" if r["ctx"] is None else str(r["ctx"])
        splits = str(r.get("num_splits", ""))
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.2f}"
        diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
        ref = "" if r["torch_us"] is None else f"{r['torch_us']:.2f}"
        print(f"{r['op']:<18}{r['batch']:>6}{ctx:>8}{splits:>7}{r['triton_us']:>11.2f}"
              f"{ref:>10}{speedup:>7}{r['triton_gbps'] or 0:>8.0f}{diff:>11}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON to this path")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    parser.add_argument("--ctx", default="128,1024,4096", help="decode context lengths")
    parser.add_argument("--max-len", type=int, default=4096, help="KV cache positions per slot")
    parser.add_argument("--split-sweep", action="store_true",
                        help="also time decode_attention at split-K factors 1..32")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, runs anywhere Triton can (CPU: TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: run on a GPU, or pass --smoke with TRITON_INTERPRET=1",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    shapes = SMOKE_SHAPES if args.smoke else Shapes()
    batches = [1, 3] if args.smoke else [int(b) for b in args.batches.split(",")]
    max_len = 64 if args.smoke else args.max_len
    ctxs = [5, 40] if args.smoke else [int(c) for c in args.ctx.split(",")]
    if max(ctxs) > max_len:
        parser.error(f"--ctx values must be <= --max-len {max_len}")
    ops.use_triton(False)  # `ops.*` below is the torch reference; Triton is called directly
    torch.manual_seed(0)
    timer = _timer(device)

    # One cache pair for every case: max batch rows (slots 0..B-1) plus one spare slot.
    cache_shape = (max(batches) + 1, shapes.num_kv_heads, max_len, shapes.head_dim)
    caches = (torch.randn(cache_shape, dtype=dtype, device=device),
              torch.randn(cache_shape, dtype=dtype, device=device))
    started = time.perf_counter()
    rows: list[dict] = []
    for batch in batches:
        rows += bench_elementwise(shapes, batch, dtype, device, timer, caches)
        for ctx in ctxs:
            rows.append(bench_attention(shapes, batch, [ctx] * batch, ctx, dtype, device, timer,
                                        caches))
        if batch > 1:  # one long row among short ones: split-K must keep it from dominating
            mixed = [max(ctxs)] + [min(ctxs)] * (batch - 1)
            rows.append(bench_attention(shapes, batch, mixed, "mixed", dtype, device, timer,
                                        caches))
    sweep: list[dict] = []
    if args.split_sweep:
        for batch in batches:
            for ctx in (min(ctxs), max(ctxs)):
                for splits in (1, 2, 4, 8, 16, 32):
                    sweep.append(bench_attention(shapes, batch, [ctx] * batch, ctx, dtype,
                                                 device, timer, caches, num_splits=splits,
                                                 with_reference=False))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"device: {name}  dtype: {args.dtype}  torch {torch.__version__}  "
          f"triton {triton.__version__}  shapes: {asdict(shapes)}  max_len: {max_len}")
    _print_table(rows)
    layer_ctx = 1024 if 1024 in ctxs else ctxs[len(ctxs) // 2]
    for batch in batches:
        # The non-GEMM work of one decoder layer: rope + attention + 2 residual norms + SiLU.
        per = {r["op"]: r for r in rows if r["batch"] == batch and r["ctx"] in (None, layer_ctx)}
        parts = ("rope_write_kv", "decode_attention", "add_rms_norm", "add_rms_norm",
                 "silu_and_mul")
        tri = sum(per[p]["triton_us"] for p in parts)
        ref = sum(per[p]["torch_us"] for p in parts)
        print(f"non-GEMM ops per layer, batch {batch}, ctx {layer_ctx}: "
              f"triton {tri:.1f} us vs torch {ref:.1f} us")
    if sweep:
        print("\nsplit-K sweep (decode_attention, triton only):")
        _print_table(sweep)
    elapsed = time.perf_counter() - started
    print(f"\n{len(rows) + len(sweep)} cases in {elapsed:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "device": name,
            "dtype": args.dtype,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "shapes": asdict(shapes),
            "max_len": max_len,
            "timing": "triton.testing.do_bench median, microseconds",
            "results": rows,
            "split_sweep": sweep,
        }, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
