"""Serving benchmark: an async HTTP load generator against a real server, streaming SSE.

Three parts, each runnable alone with `--part` (default: all three):

* `fixed`: closed-loop sweep, fixed 1024-token prompts (token-id lists) -> 128 tokens with
  `ignore_eos`, at concurrency 1, 2, 4, ... 64; each level runs max(2 x concurrency, 8) requests.
* `sharegpt`: open loop, Poisson arrivals at `--rate`, prompt and output lengths drawn from
  log-normals shaped like published ShareGPT summaries (input median ~250 tokens, output median
  ~200, heavy tails), clipped to the server's max_model_len; seeded.
* `warmstart`: a fresh `lazy` server; the ShareGPT mix starts the moment `/health/ready` turns
  200 and runs for `--warm-window` seconds; then, once graph coverage is complete, the identical
  mix runs again as the steady-state reference. ITL p99 in the first window after ready is
  compared with the steady-state p99, and /health/graphs is sampled throughout (timeline).

`fixed` and `sharegpt` run in steady state: after the server reports full graph coverage.
Reported per level / run: TTFT and ITL (p50/p99, from SSE chunk arrival times), TPOT per request,
output tokens/s, the server's own ITL/TTFT histograms (/metrics) as a cross-check, and the
decode-step counters of /health/graphs (exact / padded / eager) before and after.

Targets: ITL p99 in the first window after ready <= 1.25x steady-state p99; no decode step runs
eagerly once ready; output tokens/s at concurrency 8 >= 6x concurrency 1, with ITL p50 <= 1.2x.

Token visibility: ITL from chunk gaps is exact only if the server streams one chunk per token.
A chunk is skipped when a token adds no text (random weights, ids outside the tokenizer), so the
report gives chunks/tokens ("vis"); below 95 % the ITL targets use the server's own per-token
histogram (/metrics, bucket-interpolated) instead, and say so.

    python -m bench.serve --model /tmp/llama-8b --out bench/results/serve-8b.json
    python -m bench.serve --url http://127.0.0.1:8000 --part fixed
    python -m bench.serve --smoke --out /tmp/serve.json      # CPU, embedded model, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BenchError,
    ServerProcess,
    client_limits,
    coverage_complete,
    environment,
    fmt,
    percentile,
    print_table,
    random_prompt,
    run_and_report,
    scrape_histograms_async,
    target,
    traffic_delta,
    traffic_of,
    wait_ready,
    write_json,
)
from bench.traffic import (
    VISIBILITY_MIN,
    Request,
    add_sharegpt_args,
    closed_loop,
    itl_pair,
    latency_report,
    open_loop,
    parse_concurrency,
    sharegpt_requests,
)

PARTS = ("fixed", "sharegpt", "warmstart")
ITL_HIST = "graphserve_inter_token_latency_seconds"
TTFT_HIST = "graphserve_time_to_first_token_seconds"


# ============================================================================ the server
class Target:
    """The server under test: one we started, or one at --url."""

    def __init__(self, url: str, proc: ServerProcess | None):
        self.url = url
        self.proc = proc
        self.model = ""
        self.max_model_len = 0

    async def describe(self, client) -> None:
        r = await client.get(f"{self.url}/v1/models")
        r.raise_for_status()
        card = r.json()["data"][0]
        self.model = card["id"]
        self.max_model_len = int(card.get("max_model_len") or 0)
        if not self.max_model_len:
            raise BenchError("/v1/models did not report max_model_len")

    async def graphs(self, client) -> dict[str, Any]:
        try:
            r = await client.get(f"{self.url}/health/graphs", timeout=5.0)
            return r.json() if r.status_code == 200 else {}
        except Exception:  # noqa: BLE001 - diagnostics only
            return {}


def server_args(args, mode: str) -> list[str]:
    out = [
        "--graph-capture",
        mode,
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--disable-access-log",
        "--drain-timeout",
        "5",
        "--log-level",
        "warning",
        *args.server_arg,
    ]
    if args.model:
        out = ["--model", args.model, *out]
    return out


async def wait_steady(client, tgt: Target, timeout_s: float) -> dict[str, Any]:
    """Wait until every graph size is captured (or capture is off); report how long it took."""
    t0 = time.perf_counter()
    while True:
        graphs = await tgt.graphs(client)
        complete = coverage_complete(graphs)
        steady = complete or graphs.get("mode") == "off"
        if steady or time.perf_counter() - t0 >= timeout_s:
            return {
                "waited_s": time.perf_counter() - t0,
                "mode": graphs.get("mode"),
                "coverage": graphs.get("coverage"),
                "complete": complete,
                "steady": steady,
            }
        await asyncio.sleep(0.05)


async def measured(client, tgt: Target, coro_fn) -> tuple[Any, dict[str, Any]]:
    """Run `coro_fn()` between two scrapes of /health/graphs and /metrics."""
    g0 = await tgt.graphs(client)
    h0 = await scrape_histograms_async(client, tgt.url, (ITL_HIST, TTFT_HIST))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    value = await coro_fn()
    cpu = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    h1 = await scrape_histograms_async(client, tgt.url, (ITL_HIST, TTFT_HIST))
    g1 = await tgt.graphs(client)
    extra = {
        "hist": (h0[ITL_HIST], h1[ITL_HIST], h0[TTFT_HIST], h1[TTFT_HIST]),
        "traffic_before": traffic_of(g0),
        "traffic_after": traffic_of(g1),
        "traffic": traffic_delta(traffic_of(g0), traffic_of(g1)),
        "coverage_before": g0.get("coverage"),
        "coverage_after": g1.get("coverage"),
        "client_cpu_util": cpu,
    }
    return value, extra


# ============================================================================ parts
async def part_fixed(client, tgt: Target, args, deadline: float) -> dict[str, Any]:
    rng = random.Random(args.seed)
    # Warm the connection pool and the request path; not recorded.
    warm = [Request(random_prompt(rng, args.prompt_len), 4) for _ in range(2)]
    await closed_loop(client, tgt.url, tgt.model, warm, 2)
    levels = []
    for conc in args.concurrency:
        if time.perf_counter() > deadline:
            levels.append({"concurrency": conc, "skipped": "time budget"})
            continue
        n = max(args.requests_factor * conc, args.min_requests)
        reqs = [Request(random_prompt(rng, args.prompt_len), args.output_len) for _ in range(n)]
        _, extra = await measured(
            client, tgt, lambda reqs=reqs, c=conc: closed_loop(client, tgt.url, tgt.model, reqs, c)
        )
        rep = latency_report(reqs, hist=extra.pop("hist"))
        rep.update(extra, concurrency=conc)
        levels.append(rep)
        print(
            f"[fixed] c={conc:>3} n={n:>4}: {fmt(rep['output_tok_s'], '.1f')} tok/s, TTFT p50 "
            f"{fmt(rep['ttft_ms']['p50'], '.1f')} ms, ITL p50/p99 "
            f"{fmt(rep['itl_ms']['p50'], '.2f')}/{fmt(rep['itl_ms']['p99'], '.2f')} ms, "
            f"eager steps {fmt(rep['traffic']['eager_steps'])}, errors {rep['errors']}",
            flush=True,
        )
    return {"prompt_len": args.prompt_len, "output_len": args.output_len, "levels": levels}


def mix_summary(reqs: list[Request]) -> dict[str, Any]:
    p = [len(r.prompt) for r in reqs]
    o = [r.max_tokens for r in reqs]
    return {
        "requests": len(reqs),
        "prompt_len": {"p50": percentile(p, 50), "p99": percentile(p, 99), "max": max(p)},
        "output_len": {"p50": percentile(o, 50), "p99": percentile(o, 99), "max": max(o)},
    }


async def part_sharegpt(client, tgt: Target, args) -> dict[str, Any]:
    reqs = sharegpt_requests(args.seed + 1, args.rate, args.duration, tgt.max_model_len, args)
    t0, extra = await measured(client, tgt, lambda: open_loop(client, tgt.url, tgt.model, reqs))
    rep = latency_report(reqs, hist=extra.pop("hist"))
    rep.update(extra)
    rep["offered_rate"] = args.rate
    rep["mix"] = mix_summary(reqs)
    rep["per_request"] = {
        "columns": ["sent_s", "prompt", "tokens", "ttft_ms", "tpot_ms", "error"],
        "rows": [r.brief(t0) for r in reqs],
    }
    print(
        f"[sharegpt] {len(reqs)} requests at {args.rate}/s: {fmt(rep['output_tok_s'], '.1f')} "
        f"tok/s, TTFT p50/p99 {fmt(rep['ttft_ms']['p50'], '.1f')}/"
        f"{fmt(rep['ttft_ms']['p99'], '.1f')} ms, ITL p50/p99 {fmt(rep['itl_ms']['p50'], '.2f')}/"
        f"{fmt(rep['itl_ms']['p99'], '.2f')} ms, errors {rep['errors']}",
        flush=True,
    )
    return rep


async def sample_graphs(client, tgt: Target, t_ref: float, every_s: float, out: list, stop):
    while not stop.is_set():
        g = await tgt.graphs(client)
        if g:
            t = g.get("traffic") or {}
            cov = g.get("coverage") or {}
            out.append(
                [
                    round(time.perf_counter() - t_ref, 3),
                    cov.get("captured"),
                    cov.get("total"),
                    g.get("capturing"),
                    t.get("exact_steps"),
                    t.get("padded_steps"),
                    t.get("eager_steps"),
                ]
            )
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass


async def part_warmstart(client, args, log_dir: Path) -> dict[str, Any]:
    window = args.warm_window
    # Built before the server starts, so the load begins the moment it is ready. The model field
    # is omitted (the server's only model) and lengths are clipped to the --max-model-len we pass.
    reqs = sharegpt_requests(args.seed + 2, args.rate, window, args.max_model_len, args)
    server = ServerProcess(server_args(args, "lazy"), log_path=log_dir / "serve-warmstart.log")
    server.start()
    tgt = Target(server.url, server)
    try:
        t_ready = await wait_ready(client, server, args.ready_timeout)
        ready_s = t_ready - server.started_at
        timeline: list = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_graphs(client, tgt, t_ready, 0.5, timeline, stop))
        hist0 = {ITL_HIST: {}, TTFT_HIST: {}}  # nothing has been decoded before ready
        hist_at: dict[str, Any] = {}

        async def scrape_at_window_end():
            await asyncio.sleep(max(0.0, t_ready + window - time.perf_counter()))
            hist_at.update(await scrape_histograms_async(client, tgt.url, (ITL_HIST, TTFT_HIST)))

        scraper = asyncio.create_task(scrape_at_window_end())
        await open_loop(client, tgt.url, tgt.model, reqs)
        await scraper
        warm_done = time.perf_counter()
        await tgt.describe(client)
        steady_wait = await wait_steady(client, tgt, args.steady_timeout)
        stop.set()
        await sampler
        warm = latency_report(
            reqs,
            window=(t_ready, t_ready + window),
            hist=(
                hist0[ITL_HIST],
                hist_at.get(ITL_HIST, {}),
                hist0[TTFT_HIST],
                hist_at.get(TTFT_HIST, {}),
            ),
        )
        warm["all_requests"] = latency_report(reqs)
        g_after_warm = await tgt.graphs(client)
        # When capture ended relative to ready: the server's own clock if it says, else ours.
        complete_after = None
        if steady_wait["complete"]:
            complete_after = (g_after_warm.get("timings") or {}).get(
                "complete_after_ready_s"
            ) or steady_wait["waited_s"] + warm_done - t_ready
        print(
            f"[warmstart] ready {ready_s:.2f} s after exec; first {window:.0f} s: ITL p50/p99 "
            f"{fmt(warm['itl_ms']['p50'], '.2f')}/{fmt(warm['itl_ms']['p99'], '.2f')} ms; "
            f"coverage complete {fmt(complete_after, '.1f')} s after ready "
            f"(mode {steady_wait['mode']})",
            flush=True,
        )

        # Steady state: the identical mix again, all graphs captured.
        steady_reqs = sharegpt_requests(args.seed + 2, args.rate, window, args.max_model_len, args)
        h0 = await scrape_histograms_async(client, tgt.url, (ITL_HIST, TTFT_HIST))
        g0 = await tgt.graphs(client)
        h_end: dict[str, Any] = {}

        async def steady_scrape(t0: float):
            await asyncio.sleep(max(0.0, t0 + window - time.perf_counter()))
            h_end.update(await scrape_histograms_async(client, tgt.url, (ITL_HIST, TTFT_HIST)))

        t_steady = time.perf_counter()
        scraper = asyncio.create_task(steady_scrape(t_steady))
        await open_loop(client, tgt.url, tgt.model, steady_reqs)
        await scraper
        g1 = await tgt.graphs(client)
        steady = latency_report(
            steady_reqs,
            window=(t_steady, t_steady + window),
            hist=(h0[ITL_HIST], h_end.get(ITL_HIST, {}), h0[TTFT_HIST], h_end.get(TTFT_HIST, {})),
        )
        steady["traffic"] = traffic_delta(traffic_of(g0), traffic_of(g1))
        print(
            f"[warmstart] steady state: ITL p50/p99 {fmt(steady['itl_ms']['p50'], '.2f')}/"
            f"{fmt(steady['itl_ms']['p99'], '.2f')} ms",
            flush=True,
        )
        return {
            "ready_after_exec_s": ready_s,
            "window_s": window,
            "mix": mix_summary(reqs),
            "warm": warm,
            "steady": steady,
            "steady_wait": steady_wait,
            "coverage_complete_after_ready_s": complete_after,
            "traffic_after_warm": traffic_of(g_after_warm),
            "traffic_final": traffic_of(g1),
            "graphs_final": {k: g1.get(k) for k in ("mode", "coverage", "timings", "complete")},
            "startup_timings_s": g1.get("startup_timings_s"),
            "timeline": {
                "columns": [
                    "t_after_ready_s",
                    "captured",
                    "total",
                    "capturing",
                    "exact_steps",
                    "padded_steps",
                    "eager_steps",
                ],
                "rows": timeline,
            },
        }
    finally:
        server.stop()


# ============================================================================ main
def evaluate(result: dict[str, Any], modes: set[str]) -> list[dict[str, Any]]:
    checks = []
    parts = result["parts"]
    ws = parts.get("warmstart")
    if ws and "warm" in ws:
        warm_p99, steady_p99, src_w = itl_pair(ws["warm"], ws["steady"], "p99")
        checks.append(
            target(
                f"ITL p99 first {ws['window_s']:.0f} s after ready (lazy) vs 1.25x steady p99, ms",
                warm_p99,
                None if steady_p99 is None else 1.25 * steady_p99,
                detail=f"steady p99 {fmt(steady_p99, '.2f')} ms; {src_w}",
            )
        )
    # Eager decode steps after ready, wherever we saw the counters.
    eager_counts = []
    if ws and "traffic_final" in ws:
        eager_counts.append(ws["traffic_final"].get("eager_steps"))
    fixed = parts.get("fixed") or {}
    for lvl in fixed.get("levels", []):
        if "traffic" in lvl:
            eager_counts.append(lvl["traffic"].get("eager_steps"))
    sg = parts.get("sharegpt")
    if sg and "traffic" in sg:
        eager_counts.append(sg["traffic"].get("eager_steps"))
    known = [c for c in eager_counts if c is not None]
    detail = "decode steps run without a graph, summed over measured periods"
    if "off" in modes:
        detail += "; graph capture is off on this server (n/a)"
        known = []
    checks.append(
        target("eager decode steps once ready", sum(known) if known else None, 0, detail=detail)
    )
    levels = {lvl["concurrency"]: lvl for lvl in fixed.get("levels", []) if "output_tok_s" in lvl}
    c1, c8 = levels.get(1), levels.get(8)
    if c1 and c8:
        checks.append(
            target(
                "output tok/s at concurrency 8 vs 6x concurrency 1",
                c8["output_tok_s"],
                None if c1["output_tok_s"] is None else 6 * c1["output_tok_s"],
                lower_is_better=False,
                detail=f"c1 {fmt(c1['output_tok_s'], '.1f')} tok/s",
            )
        )
        i8, i1, src = itl_pair(c8, c1, "p50")
        checks.append(
            target(
                "ITL p50 at concurrency 8 vs 1.2x concurrency 1, ms",
                i8,
                None if i1 is None else 1.2 * i1,
                detail=f"c1 {fmt(i1, '.2f')} ms; {src}",
            )
        )
    return checks


def print_summary(result: dict[str, Any]) -> None:
    parts = result["parts"]
    print()
    fixed = parts.get("fixed")
    if fixed and fixed.get("levels"):
        print(
            f"fixed {fixed['prompt_len']} -> {fixed['output_len']} tokens, closed loop (ms; "
            "srv50/99: server ITL histogram; traffic: decode steps exact/padded/eager)"
        )
        rows = []
        for lvl in fixed["levels"]:
            if "skipped" in lvl:
                rows.append([lvl["concurrency"], "skipped"] + ["-"] * 10)
                continue
            t = lvl["traffic"]
            rows.append(
                [
                    lvl["concurrency"],
                    lvl["requests"],
                    fmt(lvl["output_tok_s"], ".1f"),
                    fmt(lvl["ttft_ms"]["p50"], ".1f"),
                    fmt(lvl["ttft_ms"]["p99"], ".1f"),
                    fmt(lvl["itl_ms"]["p50"], ".2f"),
                    fmt(lvl["itl_ms"]["p99"], ".2f"),
                    fmt(lvl["tpot_ms"]["p50"], ".2f"),
                    fmt(lvl["server_itl_ms"]["p50"], ".2f"),
                    fmt(lvl["server_itl_ms"]["p99"], ".2f"),
                    fmt(lvl["token_visibility"], ".2f"),
                    f"{fmt(t['exact_steps'])}/{fmt(t['padded_steps'])}/{fmt(t['eager_steps'])}",
                ]
            )
        print_table(
            (
                "conc",
                "reqs",
                "tok/s",
                "ttft50",
                "ttft99",
                "itl50",
                "itl99",
                "tpot50",
                "srv50",
                "srv99",
                "vis",
                "traffic",
            ),
            rows,
        )
    rows = []
    sg = parts.get("sharegpt")
    if sg and "itl_ms" in sg:
        rows.append(
            [
                "sharegpt steady",
                sg["requests"],
                fmt(sg["output_tok_s"], ".1f"),
                fmt(sg["ttft_ms"]["p50"], ".1f"),
                fmt(sg["ttft_ms"]["p99"], ".1f"),
                fmt(sg["itl_ms"]["p50"], ".2f"),
                fmt(sg["itl_ms"]["p99"], ".2f"),
                fmt((sg.get("server_itl_ms") or {}).get("p99"), ".2f"),
                fmt(sg["token_visibility"], ".2f"),
            ]
        )
    ws = parts.get("warmstart")
    if ws and "warm" in ws:
        for label, rep in (
            (f"warm first {ws['window_s']:.0f}s", ws["warm"]),
            ("warm steady", ws["steady"]),
        ):
            rows.append(
                [
                    label,
                    rep["requests"],
                    fmt(rep["output_tok_s"], ".1f"),
                    fmt(rep["ttft_ms"]["p50"], ".1f"),
                    fmt(rep["ttft_ms"]["p99"], ".1f"),
                    fmt(rep["itl_ms"]["p50"], ".2f"),
                    fmt(rep["itl_ms"]["p99"], ".2f"),
                    fmt((rep.get("server_itl_ms") or {}).get("p99"), ".2f"),
                    fmt(rep["token_visibility"], ".2f"),
                ]
            )
    if rows:
        print("open loop (ms; srv itl99: the server's histogram, bucket-interpolated)")
        print_table(
            ("run", "reqs", "tok/s", "ttft50", "ttft99", "itl50", "itl99", "srv itl99", "vis"), rows
        )
    if ws and "ready_after_exec_s" in ws:
        print(
            f"warmstart: ready {ws['ready_after_exec_s']:.2f} s after exec; full coverage "
            f"{fmt(ws['coverage_complete_after_ready_s'], '.2f')} s after ready; traffic after "
            f"warm window {ws['traffic_after_warm']}"
        )
    for name, part in parts.items():
        if "error" in part:
            print(f"{name}: ERROR {part['error'].splitlines()[0]}")
    vis = [p.get("token_visibility") for p in _reports(parts)]
    if any(v is not None and v < VISIBILITY_MIN for v in vis):
        print(
            f"NOTE: fewer SSE chunks than tokens (visibility < {VISIBILITY_MIN}): the server "
            "skips chunks for tokens without text, so chunk gaps over-state ITL and TTFT; "
            "ITL targets use the server's histogram instead (TPOT only counts fully "
            "streamed requests)"
        )
    cpu = [p.get("client_cpu_util") for p in _reports(parts) if p.get("client_cpu_util")]
    if cpu and max(cpu) > 0.8:
        print(
            f"NOTE: load generator CPU at {max(cpu):.0%} of one core: client-side latencies "
            "may include client queueing"
        )


def _reports(parts: dict[str, Any]) -> list[dict[str, Any]]:
    out = list((parts.get("fixed") or {}).get("levels", []))
    if parts.get("sharegpt"):
        out.append(parts["sharegpt"])
    return out


async def main_async(args) -> dict[str, Any]:
    import httpx

    t_start = time.perf_counter()
    deadline = t_start + args.time_budget_s
    log_dir = Path(
        args.log_dir
        or (Path(args.out).parent / "logs" if args.out else Path("/tmp/graphserve-bench-logs"))
    )
    result: dict[str, Any] = {
        "script": "serve",
        "smoke": args.smoke,
        "args": vars(args),
        "environment": environment(),
        "parts": {},
        "targets": [],
    }
    modes: set[str] = set()
    limits = client_limits(max(args.concurrency) * 2 + 64)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        steady_parts = [p for p in args.part if p in ("fixed", "sharegpt")]
        if steady_parts:
            proc = None
            try:
                if args.url:
                    tgt = Target(args.url.rstrip("/"), None)
                else:
                    proc = ServerProcess(
                        server_args(args, args.graph_capture), log_path=log_dir / "serve-steady.log"
                    )
                    proc.start()
                    tgt = Target(proc.url, proc)
                    ready_at = await wait_ready(client, proc, args.ready_timeout)
                    result["server_ready_after_exec_s"] = ready_at - proc.started_at
                await tgt.describe(client)
                result["server"] = {
                    "url": tgt.url,
                    "model": tgt.model,
                    "max_model_len": tgt.max_model_len,
                    "args": proc.args if proc else None,
                }
                result["steady_wait"] = await wait_steady(client, tgt, args.steady_timeout)
                g = await tgt.graphs(client)
                modes.add(g.get("mode"))
                result["server"]["graphs"] = {
                    k: g.get(k)
                    for k in ("mode", "reason", "coverage", "device", "startup_timings_s")
                }
                for part in steady_parts:
                    try:
                        if part == "fixed":
                            result["parts"]["fixed"] = await part_fixed(client, tgt, args, deadline)
                        else:
                            result["parts"]["sharegpt"] = await part_sharegpt(client, tgt, args)
                    except (BenchError, httpx.HTTPError) as exc:
                        result["parts"][part] = {"error": str(exc)}
                    write_json(args.out, result)
            except (BenchError, httpx.HTTPError) as exc:
                for part in steady_parts:
                    result["parts"].setdefault(part, {"error": str(exc)})
            finally:
                if proc is not None:
                    proc.stop()
        if "warmstart" in args.part:
            if args.url:
                result["parts"]["warmstart"] = {
                    "error": "warmstart starts its own server; it cannot run against --url"
                }
            elif time.perf_counter() + 2 * args.warm_window + 60 > deadline and not args.smoke:
                result["parts"]["warmstart"] = {"error": "skipped: time budget"}
            else:
                try:
                    result["parts"]["warmstart"] = await part_warmstart(client, args, log_dir)
                    modes.add(result["parts"]["warmstart"]["graphs_final"].get("mode"))
                except (BenchError, httpx.HTTPError) as exc:
                    result["parts"]["warmstart"] = {"error": str(exc)}
    result["targets"] = evaluate(result, modes)
    result["graph_modes"] = sorted(m for m in modes if m)
    result["wall_s"] = time.perf_counter() - t_start
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default=None, help="checkpoint directory (default: the embedded default model)"
    )
    ap.add_argument(
        "--url",
        default=None,
        help="benchmark a running server instead of starting one (not warmstart)",
    )
    ap.add_argument(
        "--part", default="fixed,sharegpt,warmstart", help="comma list of: " + ", ".join(PARTS)
    )
    ap.add_argument(
        "--graph-capture",
        default="lazy",
        choices=("lazy", "eager", "off"),
        help="policy of the server started for fixed/sharegpt",
    )
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra server flag (repeat; use --server-arg=--flag=value)",
    )
    ap.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument(
        "--requests-factor",
        type=int,
        default=2,
        help="requests per level = max(factor x concurrency, --min-requests)",
    )
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--rate", type=float, default=4.0, help="ShareGPT mix: requests/s (Poisson)")
    ap.add_argument(
        "--duration", type=float, default=60.0, help="ShareGPT part: seconds of arrivals"
    )
    ap.add_argument(
        "--warm-window",
        type=float,
        default=60.0,
        help="warmstart: seconds of arrivals from ready (and of the steady rerun)",
    )
    add_sharegpt_args(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument(
        "--steady-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for full graph coverage before steady-state parts",
    )
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument(
        "--time-budget-s",
        type=float,
        default=480.0,
        help="fixed levels are skipped once this has passed, and warmstart when it could not "
        "finish inside it (about 2 x --warm-window + 60 s)",
    )
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CPU check of the script: embedded model, tiny sizes, seconds",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.concurrency = "1,2,8"
        args.prompt_len, args.output_len = 32, 8
        args.min_requests, args.requests_factor = 4, 1
        args.rate, args.duration, args.warm_window = 8.0, 2.0, 2.0
        args.sg_input_median, args.sg_output_median, args.sg_max_output = 24.0, 6.0, 16
        args.max_model_len, args.max_num_seqs = 256, 8
        args.ready_timeout = min(args.ready_timeout, 180.0)
        args.steady_timeout = min(args.steady_timeout, 30.0)
    args.concurrency = parse_concurrency(ap, args.concurrency)
    args.part = [p.strip() for p in args.part.split(",") if p.strip()]
    for p in args.part:
        if p not in PARTS:
            ap.error(f"unknown part {p!r}; choose from {', '.join(PARTS)}")
    if args.rate <= 0:
        ap.error("--rate must be > 0")
    if args.max_num_seqs < max(args.concurrency):
        print(f"note: concurrency above --max-num-seqs {args.max_num_seqs} queues on the server")
    return args


def main() -> None:
    run_and_report(main_async, parse_args(), print_summary)


if __name__ == "__main__":
    main()
