"""Decode and prefill speed of one checkpoint: CUDA graph vs eager, next to the bandwidth floor.

Measured in one process, on one GPU, in this order:
1. HBM read bandwidth (sum over a 4 GiB bf16 tensor) -> decode floor = weight bytes / bandwidth.
2. The engine's load through `server.model_runner.ModelRunner` (`--graph-capture eager`): weights,
   the KV cache, Triton warm-up, and the capture of every size descending into one pool: time
   per graph, pool memory after the largest vs after all.
3. Per batch size: ms per decode step replaying the graph vs running the same step eagerly
   (CUDA events, median), at a given context length; plus one full engine step at batch 1
   (host input copy + replay + greedy sampling + device->host) to show host overhead.
4. Prefill throughput (tokens/s): a first chunk, continuation chunks after cached contexts of
   growing depth (2k, 8k, 14k), and a packed batch of short prompts — each against the first
   chunk's rate; plus decode attention alone per split-K factor at the largest batch.
5. Mixed steps (decode rows beside a prompt chunk): eager vs the mixed-step CUDA graph of its
   token bucket, wall time per step (host launches included) and GPU time.

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


def graph_time_us(fn, calls: int = 32, iters: int = 20) -> float:
    """Microseconds per call of `fn`, `calls` of them captured in one CUDA graph: what the
    call costs inside the decode graph, without the host launch that times an eager call."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    return cuda_time_ms(graph.replay, iters) * 1e3 / calls


def hbm_read_bandwidth() -> float:
    """Bytes per second reading a 4 GiB bf16 tensor (random data, median of 20)."""
    import torch

    x = torch.randn(2**31, dtype=torch.bfloat16, device="cuda")
    ms = cuda_time_ms(x.sum, 20)
    nbytes = x.numel() * x.element_size()
    del x
    torch.cuda.empty_cache()
    return nbytes / (ms / 1e3)


def fit_depth_unit(points: list[dict]) -> float | None:
    """Least squares of `wall_ms = c + a * length + b * length * (start + length / 2)` over
    the grid; returns a / b, the depth at which a token's attention costs its linear layers
    (`scheduler.ChunkCost.depth_unit`). None when the grid cannot determine it."""
    import numpy as np

    if len(points) < 4:
        return None
    x = np.array([[1.0, p["length"], p["length"] * (p["start"] + p["length"] / 2)]
                  for p in points])
    y = np.array([p["wall_ms"] for p in points])
    (_, a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(a / b) if b > 0 and a > 0 else None


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
    ap.add_argument("--deep", type=int, default=14336, help="deepest cached context before a "
                    "continuation chunk")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    import transformers

    from server import ops, triton_attention
    from server.config import EngineConfig, default_capture_sizes
    from server.model import StepBatch
    from server.model_runner import ModelRunner
    from server.sampling import SamplingBatch, sample
    from server.step_plan import StepPlan

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
        "kv_layout": f"paged, block_size {args.block_size}",
    }

    bw = hbm_read_bandwidth()
    result["hbm_read_gb_s"] = bw / 1e9

    # The engine's own load: weights, the paged KV pool, the mixed-step warm-up, then the
    # `eager` policy's startup captures (every size, descending, one pool).
    bs = args.block_size
    max_len = -(-max(args.context + 64, args.deep + args.prefill) // bs) * bs
    config = EngineConfig(
        model=args.model,
        dtype="bfloat16",
        device="cuda",
        graph_capture="eager",
        cuda_graph_sizes=sizes,
        max_num_seqs=max_n,
        max_model_len=max_len,
        max_num_batched_tokens=args.prefill,
        block_size=bs,
        # Enough blocks for every row at the decode context and one row at max_len.
        num_kv_blocks=1 + max_n * -(-(args.context + 64) // bs) + max_len // bs,
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
    # Row r of the block table: the blocks a sequence admitted r-th would get (consecutive
    # runs, as a fresh pool hands them out); the last real row gets the deep context.
    per_row = -(-(args.context + 64) // bs)
    table = runner.block_tables
    for r in range(max_n):
        table[r, :per_row] = torch.arange(1 + r * per_row, 1 + (r + 1) * per_row,
                                          dtype=torch.int32, device="cuda")
    deep_row = max_n - 1
    deep_first = 1 + max_n * per_row
    table[deep_row, : max_len // bs] = torch.arange(deep_first, deep_first + max_len // bs,
                                                    dtype=torch.int32, device="cuda")
    result["weight_gb"] = weight_bytes / 1e9
    result["kernels"] = "triton" if ops.triton_enabled() else "torch"
    kv_token = model.shape.kv_bytes_per_token * 2  # bf16
    result["floor_ms"] = {
        b: (weight_bytes + b * kv_token * args.context) / bw * 1e3 for b in batch_sizes
    }
    result["floor_ms_batch1"] = result["floor_ms"][1]

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
        floor = result["floor_ms"][b]
        rows.append({"batch": b, "eager_ms": eager, "graph_ms": graph, "speedup": eager / graph,
                     "floor_ms": floor, "of_floor": floor / graph})
    result["decode"] = rows

    # Attention alone at the largest batch, per split-K factor with one-block splits allowed
    # (min_split 64), and the policy's own launch (one layer's call, 32 of them in one CUDA
    # graph: an eager call's time is its host launch, ~150 us whatever the split).
    q = torch.randn(max_n, model.shape.num_heads, model.shape.head_dim, device="cuda",
                    dtype=torch.bfloat16)
    arows = torch.arange(max_n, device="cuda")
    lens = torch.full((max_n,), args.context, device="cuda")
    splits = {}
    for n_splits in (1, 2, 4, 8, 16, "policy"):
        def attn(n_splits=n_splits):
            explicit = {} if n_splits == "policy" else dict(num_splits=n_splits, min_split=64)
            triton_attention.decode_attention(q, kv[0][0], kv[0][1], table, arows, lens,
                                              model.scale, **explicit)
        try:
            splits[n_splits] = graph_time_us(attn)
        except RuntimeError as exc:  # a diagnostic: never the reason the benchmark stops
            splits[n_splits] = f"{type(exc).__name__}: {exc}"[:200]
    result["attention_us_by_splits"] = {
        "batch": max_n, "context": args.context, "default_splits":
        triton_attention.decode_attention_splits(max_n, model.shape.num_kv_heads,
                                                 table.shape[1] * bs),
        "default_min_split": triton_attention.decode_min_split(max_n, model.shape.num_kv_heads),
        "us": splits,
    }

    # One whole engine step at batch 1: host->device inputs, replay, greedy sample, tokens back.
    greedy = SamplingBatch([0.0], [1.0], [0], [0], [0])

    def engine_step():
        # size=1: replay the batch-1 graph, as the policy dispatches a step of one row.
        logits = graphs.run([5], [args.context - 1], [0], size=1)
        sample(logits, greedy).tolist()

    for _ in range(5):
        engine_step()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        engine_step()
    result["engine_step_ms_batch1"] = (time.perf_counter() - t0) / args.iters * 1e3

    # Prefill: chunks of `--prefill` tokens, first and continuing cached contexts of growing
    # depth (the deep row's table spans max_len), plus packed short prompts.
    def chunk_step(chunks):
        ids, pos, trows, cu, k_lens, seq_rows = [], [], [], [0], [], []
        for row, start, length in chunks:
            ids += [7] * length
            pos += range(start, start + length)
            trows += [row] * length
            cu.append(cu[-1] + length)
            k_lens.append(start + length)
            seq_rows.append(row)
        dev = "cuda"
        batch = StepBatch(
            input_ids=torch.tensor(ids, device=dev), positions=torch.tensor(pos, device=dev),
            rows=torch.tensor(trows, device=dev),
            logit_rows=torch.tensor([c - 1 for c in cu[1:]], device=dev), num_decode=0,
            seq_rows=torch.tensor(seq_rows, device=dev),
            cu_seqlens_q=torch.tensor(cu, device=dev),  # int64, as the engine's steps
            k_lens=torch.tensor(k_lens, device=dev),
            max_q_len=max(length for _, _, length in chunks),
        )
        return functools.partial(model.forward, batch, kv, table)

    n = args.prefill
    prefill = {}
    cases = {f"1x{n}": [(deep_row, 0, n)]}
    for depth in sorted({n, 8192, args.deep}):
        if depth + n <= max_len:
            cases[f"1x{n}_after_{depth}"] = [(deep_row, depth, n)]
    packed = n // 8
    if per_row * bs >= packed:
        cases[f"8x{packed}"] = [(r, 0, packed) for r in range(min(8, max_n))]
    for name, chunks in cases.items():
        ms = cuda_time_ms(chunk_step(chunks), 5, warmup=2)
        tokens = sum(length for _, _, length in chunks)
        prefill[name] = {"ms": ms, "tokens_per_s": tokens / (ms / 1e3)}
    first = prefill[f"1x{n}"]["tokens_per_s"]
    for entry in prefill.values():
        entry["vs_first_chunk"] = entry["tokens_per_s"] / first
    result["prefill"] = prefill

    # Mixed steps (decode rows beside a prompt chunk): eager vs the mixed-step graph of the
    # bucket the policy picks. Wall time per step with a sync, as a running stream sees it
    # (an eager mixed step is bound by its host launches), and CUDA-event time.
    def mixed_plan(nd, length, start, graph):
        return StepPlan(
            ids=[5] * nd + [7] * length, src=[-1] * (nd + length),
            positions=[args.context - 1] * nd + list(range(start, start + length)),
            rows=list(range(nd)) + [deep_row] * length, num_decode=nd, num_sampled=nd + 1,
            graph=graph, logit_rows=[*range(nd), nd + length - 1], seq_rows=[deep_row],
            cu_seqlens=[0, length], k_lens=[start + length], max_q_len=length,
        )  # fmt: skip

    def wall_ms(fn, iters):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    mixed = {}
    executor = runner.executor
    for nd, length, start in ((4, 256, 0), (4, 512, 0), (min(60, max_n - 1), 256, 4096),
                              (1, 16, 4000), (0, 40, 4000)):
        if start + length > max_len:
            continue
        bucket = runner.mixed_policy.select(nd + length, nd + 1, False, args.context)
        entry = {"decode_rows": nd, "prompt_tokens": length, "context": start, "bucket": bucket}
        for label, graph in (("eager", 0), ("graph", bucket)):
            if label == "graph" and graph <= 0:  # not captured (or unpacked): no graph
                continue
            plan = mixed_plan(nd, length, start, graph)
            step = functools.partial(executor.execute, plan, None)
            entry[f"{label}_wall_ms"] = wall_ms(step, args.iters)
            entry[f"{label}_gpu_ms"] = cuda_time_ms(step, args.iters)
        if "graph_wall_ms" in entry:
            entry["wall_speedup"] = entry["eager_wall_ms"] / entry["graph_wall_ms"]
        mixed[f"{nd}+{length}@{start}"] = entry
    result["mixed_steps"] = mixed
    result["mixed_graphs"] = runner.mixed_policy.snapshot()

    # Mixed-step graphs by chunk length and depth: 4 decode rows beside one prompt chunk of
    # `length` tokens starting at `start` (what the scheduler's ChunkCost models), graph wall
    # ms per step; the fitted depth unit is where a token's attention costs its linear layers.
    depth_grid = {}
    for length in (64, 128, 256):
        for start in (0, 2048, 4096, 8192, 14336):
            bucket = runner.mixed_policy.select(4 + length, 5, False, args.context)
            if start + length > max_len or bucket <= 0:
                continue
            step = functools.partial(executor.execute, mixed_plan(4, length, start, bucket), None)
            depth_grid[f"{length}@{start}"] = {"length": length, "start": start,
                                               "bucket": bucket, "wall_ms": wall_ms(step, 20)}
    result["mixed_depth_grid"] = depth_grid
    result["mixed_depth_unit_fit"] = fit_depth_unit(list(depth_grid.values()))
    result["mixed_depth_unit_model"] = runner.chunk_cost.depth_unit

    print(f"\n{result['device']}  torch {result['torch']}  kernels={result['kernels']}  "
          f"HBM read {result['hbm_read_gb_s']:.0f} GB/s  weights {result['weight_gb']:.2f} GB  "
          f"floor(b=1, ctx {args.context}) {result['floor_ms_batch1']:.2f} ms")  # fmt: skip
    cap = result["capture"]
    ratio = cap["pool_ratio_all_vs_largest"]
    print(f"capture: largest {cap['largest_capture_s'] * 1e3:.0f} ms, all {len(sizes)} sizes "
          f"{cap['all_captures_s']:.2f} s; pool all/largest = {ratio:.3f}")  # fmt: skip
    print(f"{'batch':>5} {'eager ms':>9} {'graph ms':>9} {'speedup':>7} {'floor':>6} {'%floor':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {r['eager_ms']:>9.2f} {r['graph_ms']:>9.2f} {r['speedup']:>7.2f} "
              f"{r['floor_ms']:>6.2f} {100 * r['of_floor']:>5.1f}%")
    print(f"attention b{max_n} ctx {args.context} us by splits: {splits}")
    step_ms = result["engine_step_ms_batch1"]
    print(f"engine step batch 1 (with sampling and host sync): {step_ms:.2f} ms")
    for k, v in prefill.items():
        print(f"prefill {k}: {v['ms']:.1f} ms, {v['tokens_per_s']:.0f} tok/s, "
              f"{v['vs_first_chunk']:.2f}x the first chunk's rate")
    for k, v in mixed.items():
        print(f"mixed step {k} (bucket {v['bucket']}): eager {v['eager_wall_ms']:.2f} ms wall "
              f"/ {v['eager_gpu_ms']:.2f} GPU; graph {v.get('graph_wall_ms', float('nan')):.2f}"
              f" wall / {v.get('graph_gpu_ms', float('nan')):.2f} GPU")  # fmt: skip
    print("mixed graph ms by chunk@start: " + ", ".join(
        f"{k} {v['wall_ms']:.2f}" for k, v in depth_grid.items()))
    print(f"depth unit: fitted {result['mixed_depth_unit_fit']}, "
          f"the server's {result['mixed_depth_unit_model']:.0f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
