"""What the OpenAI surface costs on the GPU: constrained decoding and logprobs beside plain
decoding, batch 8, one server, one run (~3 minutes with an 8B checkpoint).

Scenarios, each `--rounds` times (medians reported), every request streaming `--output-len`
tokens (greedy, plain ones with ignore_eos, constrained ones held open by a schema that needs
more tokens than that, so every row decodes the whole time):

* `plain`: 8 plain requests (the baseline: today's path, full one-step-ahead overlap);
* `mixed`: 7 plain + 1 constrained (`response_format` json_schema) in the same batch;
* `constrained`: 8 constrained requests;
* `logprobs`: 8 plain requests with `logprobs: 5`.

A request's decode time per token (TPOT) is (last chunk - first chunk) / (tokens - 1), the
tokens from its usage chunk. Targets (issue 13, 8B on an H200, batch 8): plain rows in `mixed`
<= 1.03x `plain`; the constrained row in `mixed` <= 1.2x the plain rows beside it; `logprobs`
<= 1.05x `plain`.

    python -m bench.make_checkpoint --shape 8b --out /tmp/llama-8b
    python -m bench.openai_overheads --model /tmp/llama-8b \
        --out bench/results/openai-overheads-8b-h200.json
    python -m bench.openai_overheads --smoke --out /tmp/oo.json     # CPU, embedded model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any

from bench.common import (
    PROMPT_ID_HIGH,
    PROMPT_ID_LOW,
    ServerProcess,
    client_limits,
    coverage_complete,
    environment,
    fmt,
    print_table,
    ratio,
    run_and_report,
    target,
    wait_ready,
)

SCENARIOS = ("plain", "mixed", "constrained", "logprobs")


def long_schema(min_items: int) -> dict[str, Any]:
    """A document that needs more than `min_items` tokens: a long array of short strings."""
    return {
        "type": "object",
        "properties": {"notes": {"type": "array", "minItems": min_items,
                                 "items": {"type": "string", "minLength": 1, "maxLength": 6}}},
        "required": ["notes"],
        "additionalProperties": False,
    }


class Stream:
    """One streamed request: chunk arrival times and the usage it reported."""

    def __init__(self, kind: str):
        self.kind = kind
        self.chunks: list[float] = []
        self.tokens: int | None = None
        self.finish: str | None = None
        self.error: str | None = None

    @property
    def tpot_ms(self) -> float | None:
        if self.error or not self.tokens or self.tokens < 2 or len(self.chunks) < 2:
            return None
        return (self.chunks[-1] - self.chunks[0]) / (self.tokens - 1) * 1e3


async def run_stream(client, url: str, req: Stream, body: dict[str, Any], path: str) -> None:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                req.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj:
                    req.error = str(obj["error"].get("message"))
                    continue
                if obj.get("choices"):
                    req.chunks.append(now)
                    req.finish = obj["choices"][0].get("finish_reason") or req.finish
                if obj.get("usage"):
                    req.tokens = obj["usage"]["completion_tokens"]
    except Exception as exc:  # reported per request, the run goes on
        req.error = f"{type(exc).__name__}: {exc}"


def plain_body(rng: random.Random, args, logprobs: int | None = None) -> dict[str, Any]:
    body = {"prompt": [rng.randint(PROMPT_ID_LOW, PROMPT_ID_HIGH) for _ in range(args.prompt_len)],
            "max_tokens": args.output_len, "temperature": 0.0, "ignore_eos": True}
    if logprobs is not None:
        body["logprobs"] = logprobs
    return body


def constrained_body(rng: random.Random, args) -> dict[str, Any]:
    words = " ".join(f"w{rng.randint(0, 999)}" for _ in range(args.prompt_len // 2))
    return {"messages": [{"role": "user", "content": f"List notes about: {words}"}],
            "max_tokens": args.output_len, "temperature": 0.0,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "notes", "schema": long_schema(args.output_len), "strict": True}}}


async def scenario(client, url: str, name: str, args, rng: random.Random) -> list[Stream]:
    batch = args.batch
    jobs = []
    for i in range(batch):
        constrained = name == "constrained" or (name == "mixed" and i == batch - 1)
        if constrained:
            req = Stream("constrained")
            jobs.append(run_stream(client, url, req, constrained_body(rng, args),
                                   "/v1/chat/completions"))
        else:
            req = Stream("plain")
            lp = 5 if name == "logprobs" else None
            jobs.append(run_stream(client, url, req, plain_body(rng, args, lp), "/v1/completions"))
        jobs[-1] = (req, jobs[-1])
    await asyncio.gather(*(job for _, job in jobs))
    return [req for req, _ in jobs]


def tpots(streams: list[Stream], kind: str) -> list[float]:
    return [s.tpot_ms for s in streams if s.kind == kind and s.tpot_ms is not None]


async def main_async(args) -> dict[str, Any]:
    import httpx

    rng = random.Random(args.seed)
    server_args = ["--max-model-len", str(args.max_model_len), "--max-num-seqs",
                   str(args.max_num_seqs), "--disable-access-log", "--log-level", "warning",
                   "--drain-timeout", "5"]
    if args.model:
        server_args = ["--model", args.model, *server_args]
    server_args += args.server_arg
    result: dict[str, Any] = {"script": "openai_overheads", "smoke": args.smoke,
                              "environment": environment(), "args": vars(args)}
    limits = client_limits(64)
    async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
        with ServerProcess(server_args, log_path=args.log) as srv:
            await wait_ready(client, srv, args.ready_timeout)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < args.steady_timeout:
                graphs = (await client.get(srv.url + "/health/graphs")).json()
                if coverage_complete(graphs) or graphs.get("mode") == "off":
                    break
                await asyncio.sleep(0.1)
            # Warm-up (not recorded): the grammar tokenizer, a first schema, every path once.
            for name in SCENARIOS:
                await scenario(client, srv.url, name, args, rng)
            rounds: dict[str, list[list[Stream]]] = {name: [] for name in SCENARIOS}
            for r in range(args.rounds):
                for name in SCENARIOS:  # interleaved, so drift hits every scenario alike
                    streams = await scenario(client, srv.url, name, args, rng)
                    rounds[name].append(streams)
                print(f"round {r + 1}/{args.rounds} done", flush=True)
            graphs = (await client.get(srv.url + "/health/graphs")).json()
    result["traffic"] = graphs.get("traffic")
    per: dict[str, Any] = {}
    errors = 0
    for name, runs in rounds.items():
        streams = [s for run in runs for s in run]
        errors += sum(1 for s in streams if s.error)
        row = {"errors": [s.error for s in streams if s.error][:3]}
        for kind in ("plain", "constrained"):
            # Median over rounds of each round's median: one slow round cannot dominate.
            meds = [statistics.median(v) for v in (tpots(run, kind) for run in runs) if v]
            row[f"{kind}_tpot_ms"] = statistics.median(meds) if meds else None
            row[f"{kind}_tpot_rounds"] = meds
        row["finish_reasons"] = sorted({s.finish for s in streams if s.finish})
        per[name] = row
    result["scenarios"] = per
    result["errors"] = errors
    base = per["plain"]["plain_tpot_ms"]
    mixed_plain = per["mixed"]["plain_tpot_ms"]
    result["targets"] = [
        target("plain rows beside a constrained one / plain alone (TPOT)",
               ratio(mixed_plain, base), 1.03),
        target("constrained row / plain rows in the same batch (TPOT)",
               ratio(per["mixed"]["constrained_tpot_ms"], mixed_plain), 1.2),
        target("logprobs (top 5) / plain (TPOT)", ratio(per["logprobs"]["plain_tpot_ms"], base),
               1.05),
        target("requests that failed", errors, 0),
    ]
    return result


def print_summary(result: dict[str, Any]) -> None:
    rows = []
    base = result["scenarios"]["plain"]["plain_tpot_ms"]
    for name, row in result["scenarios"].items():
        rows.append([name, fmt(row["plain_tpot_ms"], ".3f"), fmt(row["constrained_tpot_ms"], ".3f"),
                     fmt(ratio(row["plain_tpot_ms"], base), ".3f"),
                     fmt(ratio(row["constrained_tpot_ms"], base), ".3f"),
                     ",".join(row["finish_reasons"]), len(row["errors"])])
    print_table(["scenario", "plain TPOT ms", "constrained TPOT ms", "plain x base",
                 "constrained x base", "finish", "errors"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--steady-timeout", type=float, default=60.0)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--log", default=None, help="server log file")
    ap.add_argument("--server-arg", action="append", default=[], metavar="FLAG",
                    help="one more server flag, e.g. --server-arg=--no-engine-process (repeat)")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--smoke", action="store_true", help="CPU check: embedded model, tiny sizes")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.rounds, args.prompt_len, args.output_len = 4, 1, 16, 12
        args.max_model_len, args.max_num_seqs = 512, 8
        args.ready_timeout, args.steady_timeout = 180.0, 0.0
    if args.batch < 2:
        ap.error("--batch must be >= 2 (the mixed scenario needs a plain and a constrained row)")
    return args


def main() -> None:
    run_and_report(main_async, parse_args(), print_summary)


if __name__ == "__main__":
    main()
