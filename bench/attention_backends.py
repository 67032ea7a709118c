"""Prefill attention: our paged Triton kernel against the attention libraries on this stack.

Issue 12 asks for the attention libraries to be weighed against our own kernels by
measurement, startup cost included. What the GPU box can run without a network:

* **FlashAttention-2** as torch bundles it (`aten._flash_attention_forward`, the flash-attn
  project's kernels; varlen, GQA and bottom-right causal alignment built in). It reads
  contiguous K/V, so from a paged cache the keys are gathered first: timed with and without
  that gather.
* **cuDNN's fused attention** (`aten._scaled_dot_product_cudnn_attention`). Through torch it
  has no bottom-right causal mask (a chunk continuing a cached prefix needs one) and its
  varlen form is not usable here (measured: wrong alignment, 50-70 ms a call), so the chunk
  runs as two calls merged by their log-sum-exps: the chunk against the cached prefix (no
  mask) and against itself (causal, square). The prefix rectangle alone is timed too: the
  best cuDNN could do here with no gather, merge or mask overheads.

The standalone packages are not measurable on the box: flashinfer-python's wheel (101 MB) is
over the device's transfer limit and it compiles its kernels at first use, and flash-attn has
no wheel for torch 2.11 + CUDA 13 (a source build needs nvcc and hours).

Startup costs are measured too: the first call into each library in the process, and for cuDNN
the first call at each new shape (it builds an execution plan per shape, and every chunk of a
long prompt continues a prefix of a new length).

Shapes: Llama-3-8B (32 query / 8 KV heads, head_dim 128), one 2048-token chunk continuing a
cached prefix of 0, 2048, 8192 and 14,336 tokens, bf16, 16-token KV blocks scattered at random.

    python -m bench.attention_backends --out bench/results/attention-backends-h200.json  # ~30 s
"""

from __future__ import annotations

import argparse
import sys
import time

HQ, HKV, D, PAGE, CHUNK = 32, 8, 128, 16, 2048
PREFIXES = (0, 2048, 8192, 14336)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefixes", default=",".join(map(str, PREFIXES)),
                    help="cached tokens before the chunk, comma-separated")
    ap.add_argument("--chunk", type=int, default=CHUNK)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench.attention_backends needs a CUDA GPU")
    from bench.common import environment, write_json
    from bench.decode import cuda_time_ms
    from server import triton_attention as ta

    dev, dt, scale = "cuda", torch.bfloat16, D ** -0.5
    chunk = args.chunk

    def first_ms(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, (time.perf_counter() - t) * 1e3

    def median_ms(fn):
        return cuda_time_ms(fn, args.iters, warmup=2)

    def fa2(q, k, v, cu_q, cu_k, max_q, max_k, causal=True):
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)[0]

    def cudnn(q4, k4, v4, causal):
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q4, k4, v4, None, True, 0.0, causal, False, scale=scale)
        return out[0], out[1].reshape(out[0].shape[:3])  # lse [1, H, Q, 1] -> [1, H, Q]

    def merge(o1, l1, o2, l2):
        m = torch.maximum(l1, l2)
        w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
        s = w1 + w2
        o = o1.float() * (w1 / s)[..., None] + o2.float() * (w2 / s)[..., None]
        return o.to(o1.dtype)[0].transpose(0, 1)  # [1, H, Q, D] -> [Q, H, D]

    result = {"environment": environment(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "chunk": chunk, "cases": {}}
    startup = {}
    # First call into each library in this process (a tiny shape: the library's load and
    # set-up, not the kernel).
    tiny = torch.randn(1, HQ, 128, D, device=dev, dtype=dt)
    tq = torch.randn(128, HQ, D, device=dev, dtype=dt)
    tk = torch.randn(128, HKV, D, device=dev, dtype=dt)
    cu = torch.tensor([0, 128], device=dev, dtype=torch.int32)
    _, startup["fa2_first_call_ms"] = first_ms(lambda: fa2(tq, tk, tk, cu, cu, 128, 128))
    _, startup["cudnn_first_call_ms"] = first_ms(lambda: cudnn(tiny, tiny, tiny, True))
    result["startup"] = startup
    print(f"first call in the process: FA2 {startup['fa2_first_call_ms']:.1f} ms, "
          f"cuDNN {startup['cudnn_first_call_ms']:.1f} ms", flush=True)

    def run_case(prefix: int) -> dict:
        total = prefix + chunk
        n_blocks = -(-total // PAGE)
        k_cache = torch.randn(n_blocks + 1, PAGE, HKV, D, device=dev, dtype=dt)
        v_cache = torch.randn_like(k_cache)
        table = (torch.randperm(n_blocks, device=dev) + 1).to(torch.int32)[None]
        pos = torch.arange(total, device=dev)
        slots = table[0, pos // PAGE].long() * PAGE + pos % PAGE

        def gather():
            return (k_cache.view(-1, HKV, D).index_select(0, slots),
                    v_cache.view(-1, HKV, D).index_select(0, slots))

        k, v = gather()
        q = torch.randn(chunk, HQ, D, device=dev, dtype=dt)
        cu_q = torch.tensor([0, chunk], device=dev, dtype=torch.int32)
        cu_k = torch.tensor([0, total], device=dev, dtype=torch.int32)
        rows = torch.zeros(1, device=dev, dtype=torch.long)
        k_lens = torch.tensor([total], device=dev, dtype=torch.int32)
        ref = fa2(q, k, v, cu_q, cu_k, chunk, total).float()
        visible = chunk * prefix + chunk * (chunk + 1) / 2
        flops = 4 * D * HQ * visible
        q4 = q.transpose(0, 1)[None]  # [1, H, Q, D] views: cuDNN takes the strides as they are

        def cudnn_split(kk, vv):
            k4, v4 = kk.transpose(0, 1)[None], vv.transpose(0, 1)[None]
            o2, l2 = cudnn(q4, k4[:, :, prefix:], v4[:, :, prefix:], True)
            if prefix == 0:
                return o2[0].transpose(0, 1)
            o1, l1 = cudnn(q4, k4[:, :, :prefix], v4[:, :, :prefix], False)
            return merge(o1, l1, o2, l2)

        impls = {
            "ours_paged_triton": lambda: ta.prefill_attention(q, k_cache, v_cache, table, rows,
                                                              cu_q, k_lens, chunk, scale),
            "fa2_contiguous_kv": lambda: fa2(q, k, v, cu_q, cu_k, chunk, total),
            "fa2_with_gather": lambda: fa2(q, *gather(), cu_q, cu_k, chunk, total),
            "cudnn_split_contiguous_kv": lambda: cudnn_split(k, v),
            "cudnn_split_with_gather": lambda: cudnn_split(*gather()),
        }
        case = {"prefix": prefix, "tflops_basis": flops}
        for name, fn in impls.items():
            try:
                out, first = first_ms(fn)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = median_ms(fn)
                case[name] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1),
                              "rel_err_vs_fa2": round(err, 5), "first_call_ms": round(first, 1)}
            except Exception as exc:  # a backend refusing a shape is a result, not a crash
                case[name] = {"error": repr(exc)[:300]}
        if prefix:
            k4, v4 = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
            ms = median_ms(lambda: cudnn(q4, k4[:, :, :prefix], v4[:, :, :prefix], False))
            rf = 4 * D * HQ * chunk * prefix
            case["cudnn_prefix_rectangle_only"] = {"ms": round(ms, 3),
                                                   "tflops": round(rf / ms / 1e9, 1)}
            # A prefix one block longer: a new shape, a new execution plan.
            k5 = torch.randn(1, HKV, prefix + PAGE, D, device=dev, dtype=dt)
            _, plan = first_ms(lambda: cudnn(q4, k5, k5, False))
            case["cudnn_new_shape_first_call_ms"] = round(plan, 1)
        case["gather_kv_ms"] = round(median_ms(gather), 3)
        ours = case["ours_paged_triton"].get("ms")
        print(f"2048 after {prefix:>5}: " + ", ".join(
            f"{n} {c['ms']:.3f} ms ({ours / c['ms']:.2f}x ours)" if isinstance(c, dict)
            and "ms" in c and ours else f"{n} {c}" for n, c in case.items()
            if isinstance(c, dict)), flush=True)
        return case

    for prefix in [int(p) for p in args.prefixes.split(",")]:
        result["cases"][str(prefix)] = run_case(prefix)
        torch.cuda.empty_cache()  # the case's caches are gone with its frame
    write_json(args.out, result)


if __name__ == "__main__":
    main()
