"""Streamed completions as a benchmark client sees them: one request's chunk timings, the
workloads (a ShareGPT-like mix with Poisson arrivals), closed and open loops, and the latency
reports built from them. `bench.serve` drives servers with these; `bench.kv_serving`,
`bench.capture_stall`, `bench.load_clients` and `bench.sharegpt_sweep` reuse them.

Token visibility: ITL from chunk gaps is exact only if the server streams one chunk per token
(see `bench.serve`); `itl_pair` falls back to the server's own histogram below
`VISIBILITY_MIN`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from typing import Any

from bench.common import (
    BenchError,
    fmt,
    histogram_count,
    histogram_quantile,
    random_prompt,
    summarize,
)

VISIBILITY_MIN = 0.95


# ============================================================================ one request
class Request:
    """One streamed completion: what was asked, and when each SSE chunk arrived."""

    __slots__ = (
        "prompt",
        "max_tokens",
        "arrival",
        "sent",
        "chunks",
        "done",
        "completion_tokens",
        "finish_reason",
        "error",
        "logprobs",
        "chunk_tokens",
    )

    def __init__(self, prompt: list[int], max_tokens: int, arrival: float = 0.0,
                 logprobs: int | None = None):
        self.prompt = prompt
        self.max_tokens = max_tokens
        # Asking for the sampled tokens' logprobs makes every chunk carry its tokens, so a chunk
        # is sent for every token: a text-only stream sends none for a token whose text the
        # server holds back (one ending inside a UTF-8 character, or decoding to nothing), and
        # the client would see a gap of two steps that no step caused.
        self.logprobs = logprobs
        self.chunk_tokens: list[int] = []  # tokens per chunk, when logprobs is set
        self.arrival = arrival  # offset from the start of an open-loop run, seconds
        self.sent: float | None = None
        self.chunks: list[float] = []
        self.done: float | None = None
        self.completion_tokens: int | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks and self.sent is not None else None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first.

        Only when every token arrived in its own chunk: if the first chunk came late (tokens
        without text are not streamed), the span would miss tokens and flatter the mean.
        """
        n = self.completion_tokens
        if not n or n < 2 or len(self.chunks) != n:
            return None
        return (self.chunks[-1] - self.chunks[0]) / (n - 1)

    def gaps(self) -> list[tuple[float, float]]:
        """(arrival time of the later chunk, gap) for consecutive chunks."""
        c = self.chunks
        return [(c[i], c[i] - c[i - 1]) for i in range(1, len(c))]

    def brief(self, t0: float) -> list[Any]:
        """Compact per-request row for the JSON: sent, prompt, tokens, ttft ms, tpot ms, err."""
        return [
            None if self.sent is None else round(self.sent - t0, 4),
            len(self.prompt),
            self.completion_tokens,
            _ms(self.ttft),
            _ms(self.tpot),
            self.error,
        ]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 3)


async def stream_completion(client, url: str, model: str, req: Request) -> None:
    """POST /v1/completions with stream=true and time every SSE chunk carrying a choice."""
    import httpx

    body = {
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:  # omitted: the server's only model
        body["model"] = model
    if req.logprobs is not None:
        body["logprobs"] = req.logprobs
    req.sent = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                req.error = f"HTTP {r.status_code}: {text[:300]}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter()
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                # A plain token chunk (finish_reason null) needs no parsing: at 64 streams the
                # client sees thousands a second, and json.loads on each would skew the timing.
                # Anything else (last token, usage, error) is parsed, and so is every chunk of
                # a stream that counts its tokens per chunk (a few streams, not 64).
                if req.logprobs is not None or '"finish_reason":null' not in data:
                    obj = json.loads(data)
                    if "error" in obj:
                        err = obj["error"]
                        req.error = str(err.get("message", err) if isinstance(err, dict) else err)
                        continue
                    choices = obj.get("choices") or []
                    if choices:
                        req.chunks.append(now)
                        req.finish_reason = choices[0].get("finish_reason")
                        if req.logprobs is not None:
                            lp = choices[0].get("logprobs") or {}
                            req.chunk_tokens.append(len(lp.get("tokens") or []))
                    usage = obj.get("usage")
                    if usage:
                        req.completion_tokens = usage.get("completion_tokens")
                else:
                    req.chunks.append(now)
    except (httpx.HTTPError, ValueError) as exc:
        req.error = f"{type(exc).__name__}: {exc}"
    finally:
        req.done = time.perf_counter()
    if req.error is None and req.completion_tokens is None:
        req.error = "stream ended without a usage chunk"


# ============================================================================ workloads
def add_sharegpt_args(ap: argparse.ArgumentParser) -> None:
    """The ShareGPT-like mix's length distributions (`sharegpt_like` reads them)."""
    ap.add_argument("--sg-input-median", type=float, default=250.0)
    ap.add_argument("--sg-input-sigma", type=float, default=1.0,
                    help="log-normal sigma; 1.0 puts p99 near 10x the median")
    ap.add_argument("--sg-output-median", type=float, default=200.0)
    ap.add_argument("--sg-output-sigma", type=float, default=0.9)
    ap.add_argument("--sg-max-output", type=int, default=1024)


def parse_concurrency(ap: argparse.ArgumentParser, text: str) -> list[int]:
    """`--concurrency` ("1,2,4"): positive integers, or an argparse error."""
    try:
        levels = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--concurrency must be a comma list of integers, got {text!r}")
    if not levels or min(levels) < 1:
        ap.error("--concurrency needs positive integers")
    return levels


def sharegpt_like(rng: random.Random, n: int, max_model_len: int, args) -> list[tuple[int, int]]:
    """n (prompt_len, output_len) pairs from log-normals; prompt + output <= max_model_len."""
    pairs = []
    for _ in range(n):
        p = round(rng.lognormvariate(math.log(args.sg_input_median), args.sg_input_sigma))
        o = round(rng.lognormvariate(math.log(args.sg_output_median), args.sg_output_sigma))
        p = min(max(p, 4), max_model_len - 8)
        o = min(max(o, 2), args.sg_max_output, max_model_len - p)
        pairs.append((p, o))
    return pairs


def sharegpt_requests(
    seed: int, rate: float, duration: float, max_model_len: int, args
) -> list[Request]:
    """Poisson arrivals at `rate` over `duration` seconds; the same seed gives the same mix.

    The first request goes out at once (offset 0): a warm start is measured from its first step.
    """
    rng = random.Random(seed)
    arrivals = []
    t = 0.0
    while t < duration:
        arrivals.append(t)
        t += rng.expovariate(rate)
    if not arrivals:
        raise BenchError(f"no arrivals in {duration} s at {rate}/s: raise --rate or --duration")
    pairs = sharegpt_like(rng, len(arrivals), max_model_len, args)
    return [Request(random_prompt(rng, p), o, a) for a, (p, o) in zip(arrivals, pairs, strict=True)]


async def closed_loop(client, url: str, model: str, reqs: list[Request], concurrency: int):
    queue = list(reversed(reqs))

    async def worker():
        while queue:
            await stream_completion(client, url, model, queue.pop())

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def open_loop(client, url: str, model: str, reqs: list[Request]) -> float:
    """Send each request at its arrival offset; returns the start time (perf_counter)."""
    t0 = time.perf_counter()

    async def one(req: Request):
        delay = t0 + req.arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await stream_completion(client, url, model, req)

    await asyncio.gather(*(one(r) for r in reqs))
    return t0


# ============================================================================ analysis
def latency_report(
    reqs: list[Request],
    window: tuple[float, float] | None = None,
    hist: tuple[dict, dict, dict, dict] | None = None,
) -> dict[str, Any]:
    """TTFT / ITL / TPOT summaries (ms) and throughput of a set of finished requests.

    With `window` (t_start, t_end), only ITL gaps ending and requests sent inside it count.
    `hist` is (itl_before, itl_after, ttft_before, ttft_after) cumulative bucket scrapes.
    """
    ok = [r for r in reqs if r.error is None]
    if window is not None:
        lo, hi = window
        gaps = [g for r in ok for (t, g) in r.gaps() if lo <= t <= hi]
        in_window = [r for r in ok if r.sent is not None and lo <= r.sent <= hi]
    else:
        gaps = [g for r in ok for (_, g) in r.gaps()]
        in_window = ok
    tokens = sum(r.completion_tokens or 0 for r in ok)
    chunks = sum(len(r.chunks) for r in ok)
    sent = [r.sent for r in reqs if r.sent is not None]
    done = [r.done for r in reqs if r.done is not None]
    wall = (max(done) - min(sent)) if sent and done else None
    out: dict[str, Any] = {
        "requests": len(reqs),
        "errors": len(reqs) - len(ok),
        "first_errors": sorted({r.error for r in reqs if r.error})[:3],
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall if wall else None,
        "token_visibility": chunks / tokens if tokens else None,
        "ttft_ms": summarize([r.ttft for r in in_window if r.ttft is not None], 1e3),
        "itl_ms": summarize(gaps, 1e3),
        "tpot_ms": summarize([r.tpot for r in in_window if r.tpot is not None], 1e3),
    }
    if hist is not None:
        ib, ia, tb, ta = hist
        out["server_itl_ms"] = {
            "n": histogram_count(ib, ia),
            "p50": _ms(histogram_quantile(ib, ia, 0.50)),
            "p99": _ms(histogram_quantile(ib, ia, 0.99)),
        }
        out["server_ttft_ms"] = {
            "n": histogram_count(tb, ta),
            "p50": _ms(histogram_quantile(tb, ta, 0.50)),
            "p99": _ms(histogram_quantile(tb, ta, 0.99)),
        }
    return out


def itl_pair(a: dict[str, Any], b: dict[str, Any], q: str) -> tuple[Any, Any, str]:
    """ITL p50 or p99 (ms) of two reports for a comparison, both from the same source.

    Client chunk gaps when both streamed (nearly) every token; otherwise the server's own
    per-token histogram for both (it times every increment, streamed or not; bucketed and
    interpolated, so coarser).
    """
    vis = [r.get("token_visibility") for r in (a, b)]
    if all(v is not None and v >= VISIBILITY_MIN for v in vis):
        return a["itl_ms"][q], b["itl_ms"][q], "client SSE chunk gaps"
    va, vb = ((r.get("server_itl_ms") or {}).get(q) for r in (a, b))
    shown = "/".join(fmt(v, ".2f") for v in vis)
    return va, vb, f"server histogram (token visibility {shown})"
