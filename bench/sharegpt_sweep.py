"""A ShareGPT-like mix at concurrency 1 ... 64: this server against the previous design (issue 12).

Workload (identical for every server of the run): prompt and output lengths from log-normals
shaped like published ShareGPT summaries (`bench.traffic.sharegpt_like`: input median ~250
tokens, output ~200, heavy tails, clipped to `--max-model-len`), distinct random prompts,
`ignore_eos`. Per concurrency level c: `max(--requests-factor x c, --min-requests)` requests
(4c by default) with **Poisson arrivals** at `--load x c / S` per second, S being the mean
request time of a few sequential requests measured first on the first server (so the offered
load is about c requests in flight), and **at most c in flight**: a request that arrives while
c are running waits in the client; its TTFT counts from when it is sent and the wait is
reported apart.
From 8 up the requests are dealt over client processes (`bench.load_clients`), so one client
loop parsing every stream's chunks does not put its own lateness into the tail.

Reported per level and server: TTFT and ITL p50 / p99 (ITL from the gaps between SSE chunks:
text chunks, which the previous design also serves; a token whose text is held back merges two
gaps, ~0.2 % of random-weight tokens), TPOT p50, output tokens/s and requests/s over the
level's whole span, chunks/s and the mean number in flight in its steady part (first to last
send: afterwards the level drains through the long outputs' tail with few in flight), the
client-side wait, errors, each request's row, and how the client loops kept up.

Servers: this checkout, and with `--baseline-dir` another checkout (the landed slot-cache
design: `.probe/landed` on the GPU box) with the same flags, one after the other in the same
run. Both run `--graph-capture eager` so every level is in steady state.

    python -m bench.sharegpt_sweep --model /tmp/llama-8b --baseline-dir .probe/landed \\
        --out bench/results/sharegpt-sweep-8b-h200.json
    python -m bench.sharegpt_sweep --smoke            # CPU, the embedded model, a minute
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from bench.common import (
    BenchError,
    ServerProcess,
    client_limits,
    environment,
    fmt,
    percentile,
    print_table,
    random_prompt,
    run_and_report,
    target,
    wait_ready,
)
from bench.load_clients import run_open_loop
from bench.traffic import (
    Request,
    add_sharegpt_args,
    parse_concurrency,
    sharegpt_like,
    stream_completion,
)

CALIBRATION_REQUESTS = 4


def level_requests(seed: int, concurrency: int, n: int, rate: float, max_model_len: int,
                   args) -> list[Request]:
    """n requests of the ShareGPT-like mix, Poisson arrivals at `rate`/s from offset 0; the
    same (seed, concurrency) gives the same list, so every server sees the same level."""
    rng = random.Random(f"{seed}/{concurrency}")
    arrivals, t = [], 0.0
    for _ in range(n):
        arrivals.append(t)
        t += rng.expovariate(rate)
    pairs = sharegpt_like(rng, n, max_model_len, args)
    return [Request(random_prompt(rng, p), o, a) for a, (p, o) in zip(arrivals, pairs, strict=True)]


def level_metrics(reqs: list[Request], start: float) -> dict[str, Any]:
    """What one level measured: latencies in ms, rates over the span from the first send to
    the last completion, the mean number in flight (busy request-seconds over that span)."""
    ok = [r for r in reqs if r.error is None and r.sent is not None and r.done is not None]
    out: dict[str, Any] = {"requests": len(reqs), "errors": len(reqs) - len(ok)}
    if len(reqs) - len(ok):
        out["first_error"] = next(r.error for r in reqs if r.error is not None)
    if not ok:
        return out
    span = max(r.done for r in ok) - min(r.sent for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for _, g in r.gaps()]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    waits = [max(0.0, r.sent - (start + r.arrival)) for r in ok]
    tokens = sum(r.completion_tokens or 0 for r in ok)

    def ms(values, q):
        v = percentile(values, q)
        return None if v is None else round(v * 1e3, 3)

    # While requests are still being sent the cap is what limits the level; after the last
    # send it drains through the heavy tail of long outputs with few in flight. The window
    # from the first to the last send is the level's steady part.
    w0, w1 = min(r.sent for r in ok), max(r.sent for r in ok)
    window = w1 - w0
    busy = sum(max(0.0, min(r.done, w1) - max(r.sent, w0)) for r in ok)
    out.update({
        "window_s": round(window, 3),
        "window_chunks_per_s": (round(sum(w0 <= t <= w1 for r in ok for t in r.chunks) / window, 1)
                                if window > 0 else None),
        "window_mean_in_flight": round(busy / window, 2) if window > 0 else None,
        "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
        "itl_p50_ms": ms(gaps, 50), "itl_p99_ms": ms(gaps, 99),
        "itl_max_ms": round(max(gaps) * 1e3, 3) if gaps else None,
        "tpot_p50_ms": ms(tpot, 50),
        "output_tokens": tokens, "span_s": round(span, 3),
        "output_tok_s": round(tokens / span, 1) if span > 0 else None,
        "requests_per_s": round(len(ok) / span, 3) if span > 0 else None,
        "mean_in_flight": round(sum(r.done - r.sent for r in ok) / span, 2) if span > 0 else None,
        "client_wait_p50_ms": ms(waits, 50), "client_wait_p99_ms": ms(waits, 99),
        "prompt_tokens_mean": round(sum(len(r.prompt) for r in ok) / len(ok), 1),
        # [sent - start s, prompt tokens, output tokens, TTFT ms, TPOT ms, error]
        "per_request": [r.brief(start) for r in reqs],
    })
    return out


async def calibrate(client, url: str, args) -> float:
    """Mean seconds per request of the mix, sent one at a time (the arrival rates' unit)."""
    rng = random.Random(f"{args.seed}/calibration")
    pairs = sharegpt_like(rng, CALIBRATION_REQUESTS, args.max_model_len, args)
    times = []
    for p, o in pairs:
        req = Request(random_prompt(rng, p), o)
        await stream_completion(client, url, "", req)
        if req.error is not None:
            raise BenchError(f"calibration request failed: {req.error}")
        times.append(req.done - req.sent)
    return sum(times) / len(times)


def client_processes(concurrency: int, wanted: int) -> int:
    """Client processes for a level: one below 8 streams, else the most up to `wanted` that
    split the cap evenly."""
    if concurrency < 8:
        return 1
    return max(p for p in range(1, wanted + 1) if concurrency % p == 0)


async def run_server(label: str, args, cwd, shared: dict) -> dict[str, Any]:
    import httpx

    server_args = ["--graph-capture", "eager", "--served-model-name", "m",
                   "--max-model-len", str(args.max_model_len),
                   "--max-num-seqs", str(args.max_num_seqs)]
    if args.model:
        server_args += ["--model", args.model]
    server = ServerProcess(server_args, cwd=cwd,
                           log_path=f"{args.log_dir}/{label}.log" if args.log_dir else None)
    result: dict[str, Any] = {"args": server_args, "checkout": str(cwd or "."), "levels": []}
    print(f"[{label}] starting: {' '.join(server_args)}", flush=True)
    with server:
        async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout),
                                     limits=client_limits(8)) as client:
            await wait_ready(client, server, timeout_s=args.ready_timeout)
            result["ready_after_s"] = round(server.since_start(), 2)
            if "request_s" not in shared:
                shared["request_s"] = await calibrate(client, server.url, args)
                print(f"[{label}] calibration: {shared['request_s'] * 1e3:.0f} ms per request "
                      "one at a time", flush=True)
            else:  # the same warm-up the first server had
                await calibrate(client, server.url, args)
        for c in args.concurrency:
            n = max(args.requests_factor * c, args.min_requests)
            rate = args.load * c / shared["request_s"]
            reqs = level_requests(args.seed, c, n, rate, args.max_model_len, args)
            procs = client_processes(c, args.client_processes)
            start, clients = await run_open_loop(server.url, reqs, procs, cap=c)
            level = {"concurrency": c, "arrival_rate_per_s": round(rate, 3),
                     **level_metrics(reqs, start), **clients}
            result["levels"].append(level)
            print(f"[{label}] c={c}: {level.get('output_tok_s')} tok/s, TTFT p50 "
                  f"{level.get('ttft_p50_ms')} ms, ITL p50/p99 {level.get('itl_p50_ms')}/"
                  f"{level.get('itl_p99_ms')} ms, in flight {level.get('mean_in_flight')}, "
                  f"errors {level['errors']}", flush=True)
    if server.exited() not in (0, None):
        raise BenchError(f"[{label}] server exited {server.exited()}:\n{server.log_tail()}")
    return result


async def main_async(args) -> dict[str, Any]:
    out: dict[str, Any] = {"script": "sharegpt_sweep", "smoke": args.smoke,
                           "args": {k: v for k, v in vars(args).items()},
                           "environment": environment(), "date": time.strftime("%Y-%m-%d")}
    shared: dict[str, Any] = {}
    out["graphserve"] = await run_server("graphserve", args, None, shared)
    if args.baseline_dir:
        out["baseline"] = await run_server("baseline", args, args.baseline_dir, shared)
    out["request_s_at_concurrency_1"] = round(shared["request_s"], 4)
    failed = sum(lvl["errors"] for lvl in out["graphserve"]["levels"])
    out["targets"] = [target("requests that failed (graphserve, all levels)", failed, 0,
                             detail="bad input is not part of this mix: every request must "
                                    "complete")]
    return out


def print_summary(data: dict[str, Any]) -> None:
    base = {lvl["concurrency"]: lvl for lvl in (data.get("baseline") or {}).get("levels", [])}
    rows = []
    for lvl in data["graphserve"]["levels"]:
        b = base.get(lvl["concurrency"], {})
        ratio = (round(lvl["window_chunks_per_s"] / b["window_chunks_per_s"], 2)
                 if lvl.get("window_chunks_per_s") and b.get("window_chunks_per_s") else "-")
        keys = ("window_chunks_per_s", "window_mean_in_flight", "ttft_p50_ms", "ttft_p99_ms",
                "itl_p50_ms", "itl_p99_ms")
        rows.append([lvl["concurrency"], *(fmt(lvl.get(k)) for k in keys),
                     *(fmt(b.get(k)) for k in keys), ratio])
    print("chunks/s and in flight: between the level's first and last send (its steady part)")
    print_table(["c", "chunks/s", "in flight", "TTFT p50", "p99", "ITL p50", "p99",
                 "base chunks/s", "in flight", "TTFT p50", "p99", "ITL p50", "p99",
                 "chunks/s ratio"], rows)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: embedded)")
    ap.add_argument("--baseline-dir", default=None,
                    help="another checkout whose server runs the same levels after this one")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    ap.add_argument("--requests-factor", type=int, default=4,
                    help="requests per level = max(factor x concurrency, --min-requests)")
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--load", type=float, default=1.5,
                    help="arrival rate = load x concurrency / (seconds per request alone)")
    ap.add_argument("--client-processes", type=int, default=4)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    add_sharegpt_args(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check: the embedded model, tiny sizes, this checkout as baseline")
    args = ap.parse_args(argv)
    if args.smoke:
        args.concurrency = "1,8"
        args.min_requests, args.requests_factor = 4, 1
        args.sg_input_median, args.sg_output_median, args.sg_max_output = 24.0, 6.0, 12
        args.max_model_len, args.max_num_seqs = 256, 8
        args.baseline_dir = args.baseline_dir or "."
        args.ready_timeout = min(args.ready_timeout, 180.0)
    args.concurrency = parse_concurrency(ap, args.concurrency)
    if args.load <= 0 or args.client_processes < 1:
        ap.error("--load must be > 0 and --client-processes >= 1")
    return args


def main() -> None:
    run_and_report(main_async, parse_args(), print_summary)


if __name__ == "__main__":
    main()
