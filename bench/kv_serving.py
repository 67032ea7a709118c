"""KV cache and prefill under real traffic (issue 12), over HTTP, against real servers.

Parts (each against the server under test and, where `--baseline-dir` names another checkout,
the same part against that checkout's server in the same run):

* `ttft`: time to first token for prompts of 512 ... 16,000 tokens, alone (median of 3) and 8 at
  once (p50); every prompt distinct, so no prefix is shared.
* `prefix`: a 4,000-token system prompt shared by requests with different 40-token questions:
  the first request's TTFT against the next ones', with prefix caching on (this server) and off
  (a second server started with `--no-prefix-caching`).
* `interference`: four streams decode (per-token chunks: `logprobs: 0`); an 8,000-token prompt
  arrives, sent from a client process of its own; the streams' inter-token gaps while it is
  prefilled: max and p99 against their p50, with the engine's step intervals, the server's
  and the client's event-loop lateness over the same window.
* `sweep`: open loop, Poisson arrivals whose rate rises in stages so concurrency sweeps ~1 to
  ~60 (prompts 64-512 tokens, outputs 64-256), sent from `--sweep-clients` processes
  (`bench.load_clients`), ITL p50 / p99 / max over the whole run beside the engine's and the
  clients' own share.

`--mixed-baseline` runs the same parts on the same server with `--no-mixed-graphs` (every
step that carries prompt tokens eager, the design before mixed-step graphs), in the same run.

    python -m bench.kv_serving --model /tmp/llama-8b --baseline-dir .probe/landed \\
        --out bench/results/kv-serving-8b-h200.json
    python -m bench.kv_serving --smoke           # CPU, the embedded model, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from bench.common import (
    BenchError,
    ServerProcess,
    client_limits,
    environment,
    histogram_count_above,
    histogram_quantile,
    percentile,
    random_prompt,
    scrape_histograms_async,
    wait_ready,
    write_json,
)
from bench.load_clients import ClientProcesses, lag_summary, run_open_loop, watch_lag
from bench.traffic import Request, stream_completion

TTFT_LENGTHS = (512, 2048, 4096, 8000, 16000)
SWEEP_STAGES = ((1.0, 4), (4.0, 4), (10.0, 4), (25.0, 4), (50.0, 4), (75.0, 6))  # (rate/s, s)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def ttft_ms(req: Request) -> float | None:
    if req.error or not req.chunks or req.sent is None:
        return None
    return (req.chunks[0] - req.sent) * 1e3


def gaps_ms(req: Request) -> list[float]:
    return [(b - a) * 1e3 for a, b in zip(req.chunks, req.chunks[1:], strict=False)]


def _errors(reqs: list[Request]) -> list[str]:
    return [r.error for r in reqs if r.error][:3]


async def part_ttft(client, url: str, rng: random.Random, lengths, batch8: bool) -> dict:
    out: dict[str, Any] = {}
    for n in lengths:
        single = []
        for _ in range(3):
            req = Request(random_prompt(rng, n), 16)
            await stream_completion(client, url, "", req)
            single.append(ttft_ms(req))
        entry: dict[str, Any] = {"batch1_ms": percentile([t for t in single if t], 50)}
        if batch8:
            reqs = [Request(random_prompt(rng, n), 16) for _ in range(8)]
            await asyncio.gather(*(stream_completion(client, url, "", r) for r in reqs))
            ttfts = [t for t in map(ttft_ms, reqs) if t is not None]
            entry["batch8_p50_ms"] = percentile(ttfts, 50)
            entry["batch8_max_ms"] = max(ttfts) if ttfts else None
            entry["errors"] = _errors(reqs)
        out[str(n)] = entry
        print(f"  ttft {n:>6} tokens: {entry}", flush=True)
    return out


async def part_prefix(client, url: str, rng: random.Random, system_len: int) -> dict:
    # One request of another prompt of the same length first: the first long prompt after a
    # server starts pays a one-time cost (0.5-0.7 s on the H200, section 8c) that is not what
    # the cache-miss TTFT should measure.
    await stream_completion(client, url, "", Request(random_prompt(rng, system_len + 40), 1))
    system = random_prompt(rng, system_len)
    ttfts = []
    for _ in range(4):
        req = Request(system + random_prompt(rng, 40), 8)
        await stream_completion(client, url, "", req)
        ttfts.append(ttft_ms(req))
    warm = percentile([t for t in ttfts[1:] if t], 50)
    out = {"first_ms": ttfts[0], "next_p50_ms": warm,
           "next_vs_first": warm / ttfts[0] if warm and ttfts[0] else None}
    print(f"  prefix ({system_len}-token system prompt): {out}", flush=True)
    return out


STEP_INTERVALS = "graphserve_step_interval_seconds"
LOOP_LAG = "graphserve_event_loop_lag_seconds"


async def part_interference(client, url: str, rng: random.Random, long_len: int) -> dict:
    before = await scrape_histograms_async(client, url, [STEP_INTERVALS, LOOP_LAG])
    # Per-token chunks (logprobs 0): a gap is then a real wait, not a token whose text the
    # server held back (0.2 % of the random-weight model's tokens end inside a UTF-8 character
    # or decode to nothing: the text-only stream skips their chunk and shows a two-step gap).
    streams = [Request(random_prompt(rng, 256), 400, logprobs=0) for _ in range(4)]
    # The long prompt leaves from a client process of its own, made ready before the streams
    # start: drawing 8,000 ids, encoding them and opening a connection on the streams' loop
    # stamped their chunks late (runs showed all four streams' 23-26 ms gaps beginning just
    # before the prompt was sent, while neither the engine nor the server's loop was late).
    long_req = Request(random_prompt(rng, long_len), 8)
    sender = ClientProcesses(url, [[long_req]])
    await sender.ready()
    lags: list[tuple[float, float]] = []
    watcher = asyncio.ensure_future(watch_lag(lags))
    tasks = [asyncio.ensure_future(stream_completion(client, url, "", r)) for r in streams]
    while sum(len(r.chunks) for r in streams) < 4 * 40:  # all streaming at a steady pace
        await asyncio.sleep(0.005)
    t_arrive = time.perf_counter()
    sender.go(t_arrive)
    await sender.collect()
    t_first = long_req.chunks[0] if long_req.chunks else time.perf_counter()
    await asyncio.gather(*tasks)
    watcher.cancel()
    steady, during, when = [], [], []
    for r in streams:
        for a, b in zip(r.chunks, r.chunks[1:], strict=False):
            gap = (b - a) * 1e3
            if b >= t_arrive and a <= t_first:
                during.append(gap)
                when.append(((a - t_arrive) * 1e3, gap))
            else:
                steady.append(gap)
    p50 = percentile(steady, 50)
    after = await scrape_histograms_async(client, url, [STEP_INTERVALS, LOOP_LAG])
    # Both sides of the same gaps (over the whole part): engine step intervals past 15 ms, and
    # the HTTP event loop running a timer more than 5 ms late. A long client gap with neither
    # came from the client itself.
    steps_before, steps_after = before[STEP_INTERVALS], after[STEP_INTERVALS]
    lag_before, lag_after = before[LOOP_LAG], after[LOOP_LAG]
    # Where the long gaps fall: (ms from the long prompt's send to the gap's start, gap ms).
    slow = [(round(t, 1), round(g, 2)) for t, g in sorted(when) if p50 and g > 2.5 * p50]
    out = {"long_prompt_tokens": long_len, "long_ttft_ms": ttft_ms(long_req),
           "stream_itl_p50_ms": p50, "during_prefill_max_ms": max(during) if during else None,
           "during_prefill_p99_ms": percentile(during, 99),
           "max_vs_p50": (max(during) / p50) if during and p50 else None,
           "gaps_over_2_5x_p50": slow,
           "chunks_with_several_tokens": sum(n > 1 for r in streams for n in r.chunk_tokens),
           "engine_step_intervals_over_15ms": histogram_count_above(steps_before, steps_after,
                                                                    0.015),
           "engine_step_interval_p99_ms": _ms(histogram_quantile(steps_before, steps_after, 0.99)),
           "event_loop_lags_over_5ms": histogram_count_above(lag_before, lag_after, 0.005),
           # The streams' own client loop while the prompt was prefilled (its lateness shows
           # up in their gaps as if the server had made it).
           **lag_summary([lag for t, lag in lags if t_arrive <= t <= t_first + 0.05]),
           "errors": _errors(streams + [long_req])}
    print(f"  interference: {out}", flush=True)
    return out


async def part_sweep(client, url: str, rng: random.Random, scale: float,
                     rate_scale: float, processes: int) -> dict:
    reqs, t = [], 0.0
    for rate, seconds in SWEEP_STAGES:
        end = t + seconds * scale
        while t < end:
            reqs.append(Request(random_prompt(rng, rng.randint(64, 512)), rng.randint(64, 256), t))
            t += rng.expovariate(rate * rate_scale)
    before = await scrape_histograms_async(client, url, [STEP_INTERVALS, LOOP_LAG])
    # Several client processes: one loop parsing ~60 streams fell behind and reported its own
    # lateness as ITL (bench.load_clients).
    t0, clients = await run_open_loop(url, reqs, processes)
    elapsed = time.perf_counter() - t0
    after = await scrape_histograms_async(client, url, [STEP_INTERVALS, LOOP_LAG])
    steps_before, steps_after = before[STEP_INTERVALS], after[STEP_INTERVALS]
    lag_before, lag_after = before[LOOP_LAG], after[LOOP_LAG]
    itl = [g for r in reqs for g in gaps_ms(r)]
    ttfts = [t for t in map(ttft_ms, reqs) if t is not None]
    p50 = percentile(itl, 50)
    out = {"requests": len(reqs), "duration_s": elapsed,
           "itl_p50_ms": p50, "itl_p99_ms": percentile(itl, 99), "itl_max_ms": max(itl),
           "p99_vs_p50": percentile(itl, 99) / p50 if p50 else None,
           "ttft_p50_ms": percentile(ttfts, 50), "ttft_p99_ms": percentile(ttfts, 99),
           "output_tok_s": sum(len(r.chunks) for r in reqs) / elapsed,
           # The engine's and the HTTP side's share of the ITL tail (see part_interference).
           "engine_step_interval_p50_ms": _ms(histogram_quantile(steps_before, steps_after, 0.5)),
           "engine_step_interval_p99_ms": _ms(histogram_quantile(steps_before, steps_after,
                                                                 0.99)),
           "event_loop_lags_over_5ms": histogram_count_above(lag_before, lag_after, 0.005),
           "event_loop_lags_over_20ms": histogram_count_above(lag_before, lag_after, 0.02),
           **clients,  # the client's own share: its loops' lateness
           "errors": _errors(reqs)}
    print(f"  sweep: {out}", flush=True)
    return out


async def run_server(label: str, args, server_args: list[str], parts: list[str],
                     cwd=None) -> dict:
    import httpx

    server = ServerProcess(server_args, cwd=cwd)
    result: dict[str, Any] = {"args": server_args}
    print(f"[{label}] starting: {' '.join(server_args)}", flush=True)
    with server:
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0),
                                     limits=client_limits(256)) as client:
            await wait_ready(client, server, timeout_s=600)
            result["ready_after_s"] = server.since_start()
            rng = random.Random(args.seed)
            url = server.url
            if "ttft" in parts:
                lengths = [n for n in TTFT_LENGTHS if n <= args.max_prompt]
                result["ttft"] = await part_ttft(client, url, rng, lengths, args.batch8)
            if "prefix" in parts:
                result["prefix"] = await part_prefix(client, url, rng, args.system_len)
            if "interference" in parts:
                runs = [await part_interference(client, url, rng, args.long_len)
                        for _ in range(args.interference_repeats)]
                result["interference"] = runs[0] if len(runs) == 1 else {
                    "runs": runs,
                    "max_vs_p50_median": percentile([r["max_vs_p50"] for r in runs
                                                     if r["max_vs_p50"] is not None], 50),
                }
            if "sweep" in parts:
                result["sweep"] = await part_sweep(client, url, rng, args.sweep_scale,
                                                   args.sweep_rate_scale, args.sweep_clients)
            graphs = (await client.get(f"{url}/health/graphs")).json()
            result["traffic"] = graphs.get("traffic")
            if isinstance(graphs.get("mixed"), dict):
                result["mixed_traffic"] = graphs["mixed"].get("traffic")
            result["kv_cache"] = graphs.get("kv_cache")
    if server.exited() not in (0, None):
        raise BenchError(f"[{label}] server exited {server.exited()}:\n{server.log_tail()}")
    return result


async def main_async(args) -> dict:
    common = ["--graph-capture", "eager", "--served-model-name", "m"]
    if args.model:
        common += ["--model", args.model]
    if args.smoke:
        common = ["--served-model-name", "m"]
    out: dict[str, Any] = {"environment": environment(), "date": time.strftime("%Y-%m-%d")}
    parts = args.parts.split(",")
    extra = args.server_args.split() if args.server_args else []
    out["graphserve"] = await run_server(
        "graphserve", args, common + ["--max-num-seqs", "64"] + extra, parts)
    if args.mixed_baseline:
        # The same server with every mixed step eager (the design before mixed-step graphs).
        out["graphserve_eager_mixed"] = await run_server(
            "eager mixed steps", args,
            common + ["--max-num-seqs", "64", "--no-mixed-graphs"] + extra,
            [p for p in parts if p in ("ttft", "interference", "sweep")])
    if "prefix" in parts:
        out["graphserve_no_prefix_cache"] = await run_server(
            "no prefix cache", args, common + ["--no-prefix-caching"] + extra, ["prefix"])
    if args.baseline_dir:
        # The previous design keeps one slot of max_model_len per sequence: a long context
        # needs few slots, the sweep needs many, so two servers.
        long_ctx = str(max(args.max_prompt, args.long_len, args.system_len) + 512)
        out["baseline_long"] = await run_server(
            "baseline long", args, common + ["--max-model-len", long_ctx, "--max-num-seqs", "16"],
            ["ttft", "prefix", "interference"], cwd=args.baseline_dir)
        out["baseline_sweep"] = await run_server(
            "baseline sweep", args, common + ["--max-model-len", "2048", "--max-num-seqs", "64"],
            ["sweep"], cwd=args.baseline_dir)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--baseline-dir", default=None,
                    help="another checkout whose server is measured the same way (same run)")
    ap.add_argument("--max-prompt", type=int, default=16000)
    ap.add_argument("--system-len", type=int, default=4000)
    ap.add_argument("--long-len", type=int, default=8000)
    ap.add_argument("--sweep-scale", type=float, default=1.0, help="stretch the sweep's stages")
    ap.add_argument("--sweep-rate-scale", type=float, default=1.0, help="scale its rates")
    ap.add_argument("--sweep-clients", type=int, default=4,
                    help="client processes sending the sweep (1: the old single loop)")
    ap.add_argument("--no-batch8", dest="batch8", action="store_false")
    ap.add_argument("--interference-repeats", type=int, default=1,
                    help="run the interference part this many times (median of max/p50)")
    ap.add_argument("--parts", default="ttft,prefix,interference,sweep",
                    help="comma-separated parts for the server under test")
    ap.add_argument("--mixed-baseline", action="store_true",
                    help="also run the server with --no-mixed-graphs (eager mixed steps)")
    ap.add_argument("--server-args", default="", help="extra flags for every graphserve server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="CPU: the embedded model, tiny sizes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.max_prompt, args.system_len, args.long_len = 512, 300, 400
        args.sweep_scale, args.sweep_rate_scale, args.batch8 = 0.5, 0.05, False
    result = asyncio.run(main_async(args))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
