"""Decode and prefill speed of one checkpoint: CUDA graph vs eager, next to the bandwidth floor.

Measured in one process, on one GPU, in this order:
1. HBM read bandwidth (sum over a 4 GiB bf16 tensor) -> decode floor = weight bytes / bandwidth.
2. The engine's load through `server.model_runner.ModelRunner` (`--graph-capture eager`): weights,
   the KV cache, Triton warm-up, and the capture of every size descending into one pool: time
   per graph, pool memory after the largest vs after all.
3. Per batch size: ms per decode step replaying the graph vs running the same step eagerly
   (CUDA events, median), at a given context length; plus one full engine step at batch 1
   (host input copy + replay + greedy sampling + device->host) to show host overhead.
4. Prefill throughput (tokens/s) for one long prompt and for a packed batch of prompts.

    python -m bench.decode --model /tmp/llama-8b --out bench/results/decode-8b.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path


def cuda_time_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` over `iters` runs, timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def hbm_read_bandwidth() -> float:
    """Bytes per second reading a 4 GiB bf16 tensor (random data, median of 20)."""
    import torch

    x = torch.randn(2**31, dtype=torch.bfloat16, device="cuda")
    ms = cuda_time_ms(x.sum, 20)
    nbytes = x.numel() * x.element_size()
    del x
    torch.cuda.empty_cache()
    return nbytes / (ms / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    ap.add_argument(
        "--graph-sizes", default=None, help="capture list (default: the server's default)"
    )
    ap.add_argument("--context", type=int, default=512, help="tokens each row attends to")
    ap.add_argument("--prefill", type=int, default=2048, help="tokens per prefill step")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    import transformers

    from server import ops
    from server.config import EngineConfig, default_capture_sizes
    from server.model import PrefillChunk
    from server.model_runner import ModelRunner
    from server.sampling import SamplingBatch, sample

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    max_n = max(batch_sizes)
    sizes = (
        sorted({int(s) for s in args.graph_sizes.split(",")})
        if args.graph_sizes
        else default_capture_sizes(max_n)
    )
    sizes = sorted(set(sizes) | set(batch_sizes))
    max_n = max(sizes)
    result: dict = {
        "model": args.model,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "context": args.context,
    }

    bw = hbm_read_bandwidth()
    result["hbm_read_gb_s"] = bw / 1e9

    # The engine's own load: weights, a KV cache of max_n + 1 slots (one scratch), Triton
    # warm-up, then the `eager` policy's startup captures (every size, descending, one pool).
    max_len = max(args.context + 64, 2 * args.prefill + 64)  # room for a continuation chunk
    config = EngineConfig(
        model=args.model,
        dtype="bfloat16",
        device="cuda",
        graph_capture="eager",
        cuda_graph_sizes=sizes,
        max_num_seqs=max_n,
        max_model_len=max_len,
        max_num_batched_tokens=args.prefill,  # the KV plan reserves room for this prefill
    )
    runner = ModelRunner(config, lambda phase, detail: print(f"[decode] {phase}", flush=True))
    runner.load()
    # The loader's whole call, as before the runner existed: weights plus any import inside it.
    result["load_s"] = runner.timings["weights_s"] + runner.checkpoint.import_s
    weight_bytes = runner.checkpoint.weight_bytes
    model, kv, graphs = runner.model, runner.kv_cache, runner.graphs
    for k, v in kv:  # attention reads real-looking values (the graphs read these tensors)
        k.normal_()
        v.normal_()
    result["weight_gb"] = weight_bytes / 1e9
    result["kernels"] = "triton" if ops.triton_enabled() else "torch"
    # Weights + the KV actually read at batch 1 (the cache is read only up to the context).
    kv_per_row = model.shape.kv_bytes_per_token * 2 * args.context
    result["floor_ms_batch1"] = (weight_bytes + kv_per_row) / bw * 1e3

    snap = runner.policy.snapshot()
    if sorted(graphs.graphs) != sizes:
        raise SystemExit(f"graph capture incomplete: {snap}")
    per_size = {s["size"]: s for s in snap["sizes"]}
    result["capture"] = {
        "sizes": sizes,
        # The runner's graph phase: warm-up + every capture (+ its input/logit buffers).
        "startup_total_s": runner.timings["graphs_s"],
        "largest_capture_s": per_size[max_n]["capture_ms"] / 1e3,
        "all_captures_s": sum(s["capture_ms"] for s in snap["sizes"]) / 1e3,
        "pool_bytes_largest": per_size[max_n]["pool_bytes_after"],
        "pool_bytes_all": snap["pool_bytes_total"],
        "per_size_ms": {s["size"]: s["capture_ms"] for s in snap["sizes"]},
    }
    result["capture"]["pool_ratio_all_vs_largest"] = result["capture"]["pool_bytes_all"] / max(
        1, result["capture"]["pool_bytes_largest"]
    )

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for b in batch_sizes:
        graphs.inputs[0, :b] = torch.randint(
            0, model.shape.vocab_size, (b,), device="cuda", generator=g
        )
        graphs.inputs[1, :b] = args.context - 1
        graphs.inputs[2, :b] = torch.arange(b, device="cuda")
        eager = cuda_time_ms(lambda b=b: graphs._decode_static(b), max(5, args.iters // 3))
        graph = cuda_time_ms(graphs.graphs[b].replay, args.iters)
        rows.append({"batch": b, "eager_ms": eager, "graph_ms": graph, "speedup": eager / graph})
    result["decode"] = rows

    # One whole engine step at batch 1: host->device inputs, replay, greedy sample, tokens back.
    greedy = SamplingBatch([0.0], [1.0], [0], [0], [0])

    def engine_step():
        logits = graphs.run([5], [args.context - 1], [0])
        sample(logits, greedy).tolist()

    for _ in range(5):
        engine_step()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        engine_step()
    result["engine_step_ms_batch1"] = (time.perf_counter() - t0) / args.iters * 1e3

    # Prefill throughput.
    prefill = {}
    for n_seqs in (1, 8):
        per = args.prefill // n_seqs
        ids = torch.randint(0, model.shape.vocab_size, (per * n_seqs,), device="cuda")
        pos = torch.arange(per, device="cuda").repeat(n_seqs)
        slots = torch.arange(n_seqs, device="cuda").repeat_interleave(per)
        chunks = [PrefillChunk(slot=i, start=0, length=per, offset=i * per) for i in range(n_seqs)]
        step = functools.partial(model.prefill, ids, pos, slots, kv, chunks)
        ms = cuda_time_ms(step, 5, warmup=2)
        prefill[f"{n_seqs}x{per}"] = {"ms": ms, "tokens_per_s": per * n_seqs / (ms / 1e3)}
    # A long prompt's second chunk: `prefill` new tokens attending to `prefill` cached ones
    # (chunked prefill's causal-with-offset attention path).
    n = args.prefill
    ids = torch.randint(0, model.shape.vocab_size, (n,), device="cuda")
    pos = torch.arange(n, 2 * n, device="cuda")
    slots = torch.zeros(n, dtype=torch.int64, device="cuda")
    chunks = [PrefillChunk(slot=0, start=n, length=n, offset=0)]
    step = functools.partial(model.prefill, ids, pos, slots, kv, chunks)
    ms = cuda_time_ms(step, 5, warmup=2)
    prefill[f"1x{n}_after_{n}"] = {"ms": ms, "tokens_per_s": n / (ms / 1e3)}
    result["prefill"] = prefill

    print(f"\n{result['device']}  torch {result['torch']}  kernels={result['kernels']}  "
          f"HBM read {result['hbm_read_gb_s']:.0f} GB/s  weights {result['weight_gb']:.2f} GB  "
          f"floor(b=1, ctx {args.context}) {result['floor_ms_batch1']:.2f} ms")  # fmt: skip
    cap = result["capture"]
    ratio = cap["pool_ratio_all_vs_largest"]
    print(f"capture: largest {cap['largest_capture_s'] * 1e3:.0f} ms, all {len(sizes)} sizes "
          f"{cap['all_captures_s']:.2f} s; pool all/largest = {ratio:.3f}")  # fmt: skip
    print(f"{'batch':>5} {'eager ms':>9} {'graph ms':>9} {'speedup':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['eager_ms']:>9.2f} {r['graph_ms']:>9.2f} {r['speedup']:>7.2f}")
    step_ms = result["engine_step_ms_batch1"]
    print(f"engine step batch 1 (with sampling and host sync): {step_ms:.2f} ms")
    for k, v in prefill.items():
        print(f"prefill {k}: {v['ms']:.1f} ms, {v['tokens_per_s']:.0f} tok/s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
