"""Tensor parallelism on the GPUs of one host (issue 15): speed, agreement, lazy capture.

Parts (each writes its section of the JSON as soon as it ends, so a cut-off run keeps them):

* `collectives`: two processes, one GPU each, NCCL: HBM read bandwidth; inside CUDA graphs,
  the all-reduce of one decode step's hidden state, and the LM head's logits slices gathered to
  rank 0 by all-gather vs gather, at batch 1..64 x 128256/2 columns (which one the server uses
  is `server.distributed.comm`'s choice; this keeps it honest); the token broadcast.
  `--symm-mem` adds the symmetric-memory all-reduces (P2P, no multicast): torch's one-shot op,
  and a decode layer's all-reduce + residual add + RMSNorm as the previous route (that op, then
  `add_rms_norm`), NCCL then `add_rms_norm`, and the server's fused kernel.
* `8b`: Llama-3.1-8B shapes at TP=1, TP=2 with the server's default all-reduce (`auto`) and
  TP=2 with `--tp-allreduce nccl` (`--graph-capture eager`): greedy agreement over
  `--agree-tokens` tokens per prompt (first divergence per prompt), decode ms/step at batch 1
  and tokens/s at batch 64, each from the difference of two request lengths (prefill, admission
  and HTTP cancel out).
* `70b`: 70B shapes from a config-only directory with `--load-format dummy`, TP=2, lazy:
  exec -> /health and exec -> ready, graphs at ready on every rank, batch-1 decode against its
  floor (weights per GPU / the HBM bandwidth measured in this run).
* `lazy`: 8B at TP=2, `--restarts` fresh servers under `--graph-capture lazy` with traffic from
  the moment they are ready (waves of 1, 2, 3, 5, ... 64 concurrent requests), against one
  `--graph-capture eager` server: no hang, no decode step without a graph, the same text.

    python -m bench.tp --out bench/results/tp-h200x2.json                 # ~5 min, 2 GPUs
    python -m bench.tp --parts 8b,70b --out ...                           # a subset
    python -m bench.tp --smoke --out /tmp/tp.json                         # CPU, embedded model

The servers are `graphserve serve` processes (HTTP, as deployed); NVLink multicast stays off in
every process (`server.distributed.launcher.NCCL_ENV_DEFAULTS`). Torch is imported only in the
collectives child, never in the process that times the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
    BenchError,
    ServerProcess,
    environment,
    fmt,
    print_targets,
    random_prompt,
    ratio,
    target,
    traffic_of,
    wait_ready,
    write_json,
)
from server.distributed.launcher import NCCL_ENV_DEFAULTS

PARTS = ("collectives", "8b", "70b", "lazy")
WAVES = (1, 2, 3, 5, 8, 13, 24, 40, 64)
TARGET_B1_RATIO = 0.65  # TP=2 ms/step <= 0.65 x TP=1 at batch 1
TARGET_B64_RATIO = 1.6  # TP=2 tokens/s >= 1.6 x TP=1 at batch 64
TARGET_FLOOR_RATIO = 1.3  # 70B TP=2 batch-1 step <= 1.3 x (weights per GPU / HBM bandwidth)


# ============================================================================ requests
async def complete(client, url: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    r = await client.post(f"{url}/v1/completions", json=body)
    if r.status_code != 200:
        raise BenchError(f"HTTP {r.status_code}: {r.text[:300]}")
    out = r.json()
    return {"text": out["choices"][0]["text"], "tokens": out["usage"]["completion_tokens"]}


async def stream_pieces(client, url: str, prompt: list[int], max_tokens: int) -> list[str]:
    """The text of each streamed chunk: one per token (every id of the bench tokenizer has a
    text), so the index of the first differing piece is the first differing token."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    pieces = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise BenchError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                obj = json.loads(line[5:])
                for choice in obj.get("choices") or []:
                    pieces.append(choice.get("text", ""))
    return pieces


async def timed_batch(client, url: str, prompts: list[list[int]], max_tokens: int) -> float:
    """Seconds from sending `prompts` at once until the last answer."""
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(complete(client, url, p, max_tokens) for p in prompts))
    if any(o["tokens"] != max_tokens for o in outs):
        raise BenchError(f"expected {max_tokens} tokens per request, got "
                         f"{sorted({o['tokens'] for o in outs})}")  # fmt: skip
    return time.perf_counter() - t0


async def step_seconds(client, url, rng, batch: int, short: int, long: int, prompt_len: int,
                       repeats: int = 2) -> float:
    """Seconds per decode step at `batch` rows: (T(long) - T(short)) / (long - short), the best
    of `repeats`, fresh prompts every time (no prefix-cache hit changes a prefill)."""
    best = []
    for n in (short, long):
        times = []
        for _ in range(repeats):
            prompts = [random_prompt(rng, prompt_len) for _ in range(batch)]
            times.append(await timed_batch(client, url, prompts, n))
        best.append(min(times))
    return (best[1] - best[0]) / (long - short)


def first_difference(a: list[str], b: list[str]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ============================================================================ servers
class Bench:
    """Flags, output and server start-up shared by the parts."""

    def __init__(self, args):
        self.args = args
        self.result: dict[str, Any] = {
            "script": "tp", "smoke": args.smoke, "env": environment(), "args": vars(args),
            "parts": {},
        }  # fmt: skip
        self.lazy_reference: list[str] | None = None
        self.log_dir = Path(args.log_dir)
        # Added to this process's environment for the servers and children it starts.
        self.env = {k: os.environ.get(k, v) for k, v in NCCL_ENV_DEFAULTS.items()}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
        )
        if args.smoke:
            # CPU has no CUDA graphs; emulated ones still run the capture protocol on every rank.
            self.env["GRAPHSERVE_EMULATE_GRAPHS"] = "1"
            # A CI box has two cores: one torch thread per process keeps the ranks off each other.
            self.env["OMP_NUM_THREADS"] = "1"

    def child_env(self) -> dict[str, str]:
        return dict(os.environ, **self.env)

    def server(self, name: str, model: str | None, tp: int, capture: str,
               extra: list[str] = ()) -> ServerProcess:
        a = self.args
        args = ["--tensor-parallel-size", str(tp), "--graph-capture", capture,
                "--max-num-seqs", str(a.max_num_seqs), "--max-model-len", str(a.max_model_len),
                "--disable-access-log", "--startup-failure-grace", "1", *extra]  # fmt: skip
        if model:
            args = ["--model", model, *args]
        if a.smoke:
            args += ["--device", "cpu", "--max-num-batched-tokens", "512"]
        return ServerProcess(args, log_path=self.log_dir / f"{name}.log", env=self.env).start()

    async def ready(self, client, server: ServerProcess) -> float:
        seconds = await wait_ready(client, server, self.args.ready_timeout) - server.started_at
        tp = (await graphs(client, server)).get("tensor_parallel") or {}
        server.worker_pids = [r["pid"] for r in tp.get("ranks", [])[1:]]
        return seconds

    @staticmethod
    def stop(server: ServerProcess) -> int | None:
        """Stop the server, then wait until its workers are gone too (they exit after rank 0
        or with it), so the next server finds every GPU's memory free."""
        code = server.stop()
        deadline = time.monotonic() + 30
        for pid in getattr(server, "worker_pids", []):
            while time.monotonic() < deadline:
                try:
                    state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
                except (OSError, IndexError):
                    break  # gone
                if state == "Z":
                    break  # a zombie holds no GPU memory
                time.sleep(0.05)
        return code

    def save(self, part: str, data: dict[str, Any]) -> None:
        self.result["parts"][part] = data
        write_json(self.args.out, self.result)


async def graphs(client, server: ServerProcess) -> dict[str, Any]:
    return (await client.get(f"{server.url}/health/graphs")).json()


def rank_summary(report: dict[str, Any]) -> list[dict[str, Any]]:
    tp = report.get("tensor_parallel") or {}
    return [{k: r.get(k) for k in ("rank", "captured", "failed", "pool_bytes")}
            for r in tp.get("ranks", [])]  # fmt: skip


# ============================================================================ parts
def part_collectives(b: Bench) -> dict[str, Any]:
    """Run the two-GPU probe in a child process (torch stays out of this one)."""
    cmd = [sys.executable, "-m", "bench.tp", "--collectives-child"]
    if b.args.symm_mem:
        cmd.append("--symm-mem")
    line, problem = _child(b, cmd, "COLLECTIVES ", 300)
    if line is None:
        raise BenchError(problem)
    data = json.loads(line)
    if problem:  # the sections reported before it went wrong
        data["error"] = problem
    return data


def _child(b: Bench, cmd: list[str], prefix: str, timeout_s: float):
    """(the last `prefix` line the child printed, without the prefix, or None; what went
    wrong, or None). The child runs in its own session: on a timeout the whole group goes
    (its rank processes included), so no GPU stays held by a wedged probe."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=b.child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    problem = None
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        problem = f"{cmd[3:]} timed out after {timeout_s:.0f} s: {err[-2000:]}"
    lines = [ln for ln in out.splitlines() if ln.startswith(prefix)]
    if problem is None and proc.returncode != 0:
        problem = f"{cmd[3:]} exited {proc.returncode}: {err[-3000:]}"
    return (lines[-1][len(prefix):] if lines else None), problem


async def part_8b(b: Bench, client) -> dict[str, Any]:
    a = b.args
    data: dict[str, Any] = {"model": a.model_8b, "runs": {}}
    rng = random.Random(0)
    agree_prompts = [random_prompt(rng, 24) for _ in range(a.agree_prompts)]
    # tp2 runs the server's default all-reduce (auto: symm-mem where the GPUs have peer
    # access); tp2_nccl is NCCL everywhere, the all-reduce it replaced, in the same run.
    configs = [("tp1", 1, []), ("tp2", 2, []), ("tp2_nccl", 2, ["--tp-allreduce", "nccl"])]
    pieces = {}
    for name, tp, extra in configs:
        run: dict[str, Any] = {"args": extra}
        data["runs"][name] = run
        server = b.server(f"8b-{name}", a.model_8b, tp, "eager", extra)
        try:
            run["ready_s"] = await b.ready(client, server)
            run["agreement_pieces"] = [
                await stream_pieces(client, server.url, p, a.agree_tokens) for p in agree_prompts
            ]
            rng_t = random.Random(1)
            run["b1_ms_per_step"] = 1e3 * await step_seconds(
                client, server.url, rng_t, 1, a.short, a.long_b1, 32)
            step64 = await step_seconds(client, server.url, rng_t, a.batch, a.short,
                                        a.long_b64, 32)  # fmt: skip
            run["b64_ms_per_step"] = step64 * 1e3
            run["b64_tokens_per_s"] = a.batch / step64
            report = await graphs(client, server)
            if name == "tp2" and "lazy" in a.parts:
                # The lazy part's reference: this server captured every size before ready.
                b.lazy_reference = await asyncio.wait_for(
                    run_waves(client, server.url, lazy_plan(a)), a.hang_timeout)
            run["traffic"] = traffic_of(report)
            run["coverage"] = report.get("coverage")
            run["ranks"] = rank_summary(report)
            run["weights_bytes_per_gpu"] = report.get("weights_bytes")
            run["allreduce"] = (report.get("tensor_parallel") or {}).get("allreduce")
        except Exception as exc:  # a failing variant keeps the others' numbers
            if name == "tp1":
                raise
            run["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            run["returncode"] = b.stop(server)
        pieces[name] = run.pop("agreement_pieces", None)
    one = data["runs"]["tp1"]
    for name in data["runs"]:
        two = data["runs"][name]
        if name == "tp1" or pieces.get(name) is None:
            continue
        key = "" if name == "tp2" else f"_{name.removeprefix('tp2_')}"
        data[f"agreement{key}"] = agreement(pieces["tp1"], pieces[name])
        data[f"b1_ratio{key}"] = ratio(two.get("b1_ms_per_step"), one["b1_ms_per_step"])
        data[f"b64_throughput_ratio{key}"] = ratio(two.get("b64_tokens_per_s"),
                                                   one["b64_tokens_per_s"])  # fmt: skip
    return data


def agreement(reference: list[list[str]], other: list[list[str]]) -> list[dict[str, Any]]:
    """Per prompt: equal, or the first token where the pieces differ and a few around it."""
    out = []
    for i, (p1, p2) in enumerate(zip(reference, other, strict=True)):
        diff = first_difference(p1, p2)
        out.append({
            "prompt": i, "tokens": len(p1), "equal": diff is None, "first_divergence": diff,
            "context": None if diff is None else {"tp1": p1[max(0, diff - 3): diff + 3],
                                                  "tp2": p2[max(0, diff - 3): diff + 3]},
        })  # fmt: skip
    return out


async def part_70b(b: Bench, client) -> dict[str, Any]:
    a = b.args
    data: dict[str, Any] = {"model": a.model_70b}
    bw = b.result["parts"].get("collectives", {}).get("hbm_read_gb_s")
    if bw is None and not a.smoke:
        bw = part_collectives_hbm(b)
    data["hbm_read_gb_s"] = bw
    server = b.server("70b-tp2", a.model_70b, 2, "lazy", ["--load-format", "dummy"])
    try:
        data["exec_to_ready_s"] = await b.ready(client, server)
        at_ready = await graphs(client, server)
        data["at_ready"] = {"coverage": at_ready.get("coverage"), "ranks": rank_summary(at_ready),
                            "timings": at_ready.get("startup_timings_s")}  # fmt: skip
        largest = max(s["size"] for s in at_ready["sizes"])
        data["largest_captured_on_every_rank"] = all(
            largest in r["captured"] for r in data["at_ready"]["ranks"]
        )
        # Idle time captures the rest (batch 1 among them) before the timing.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (await graphs(client, server)).get("complete"):
            await asyncio.sleep(0.2)
        rng = random.Random(2)
        step = await step_seconds(client, server.url, rng, 1, a.short, a.long_b1, 32)
        data["b1_ms_per_step"] = step * 1e3
        report = await graphs(client, server)
        data["weights_bytes_per_gpu"] = report.get("weights_bytes")
        data["traffic"] = traffic_of(report)
        data["ranks"] = rank_summary(report)
        if bw and data["weights_bytes_per_gpu"]:
            data["floor_ms"] = data["weights_bytes_per_gpu"] / (bw * 1e9) * 1e3
            data["floor_ratio"] = data["b1_ms_per_step"] / data["floor_ms"]
    finally:
        data["returncode"] = b.stop(server)
    return data


def part_collectives_hbm(b: Bench) -> float | None:
    line, problem = _child(b, [sys.executable, "-m", "bench.tp", "--hbm-child"], "HBM ", 120)
    if line is None:
        print(f"[tp] HBM bandwidth not measured: {problem}", flush=True)
        return None
    return float(line)


def waves(seed: int, max_batch: int, max_tokens: int) -> list[list[tuple[list[int], int]]]:
    """Fixed waves of concurrent requests: each wave's batch composition is the same in every
    run (sent together, same length), so eager and lazy runs decode the same batches."""
    rng = random.Random(seed)
    return [[(random_prompt(rng, rng.randrange(8, 48)), max_tokens) for _ in range(n)]
            for n in WAVES if n <= max_batch]  # fmt: skip


async def run_waves(client, url: str, plan) -> list[str]:
    texts: list[str] = []
    for wave in plan:
        outs = await asyncio.gather(*(complete(client, url, p, n) for p, n in wave))
        texts += [o["text"] for o in outs]
    return texts


def lazy_plan(args):
    return waves(3, args.max_num_seqs, args.wave_tokens)


async def part_lazy(b: Bench, client) -> dict[str, Any]:
    a = b.args
    plan = lazy_plan(a)
    data: dict[str, Any] = {"model": a.model_8b, "waves": [len(w) for w in plan], "runs": [],
                            "dtype": a.lazy_dtype or "the checkpoint's"}
    extra = ["--dtype", a.lazy_dtype] if a.lazy_dtype else []
    # The 8b part's TP=2 server (--graph-capture eager), if it ran in the same dtype.
    reference = None if a.lazy_dtype else b.lazy_reference
    data["reference"] = "8b part, TP=2 eager server" if reference else "own eager server"
    if reference is None:
        server = b.server("lazy-reference-eager", a.model_8b, 2, "eager", extra)
        try:
            await b.ready(client, server)
            reference = await asyncio.wait_for(run_waves(client, server.url, plan),
                                               a.hang_timeout)  # fmt: skip
        finally:
            b.stop(server)
    for i in range(a.restarts):
        run: dict[str, Any] = {"restart": i}
        data["runs"].append(run)
        server = b.server(f"lazy-{i}", a.model_8b, 2, "lazy", extra)
        try:
            run["ready_s"] = await b.ready(client, server)
            t0 = time.perf_counter()
            try:
                texts = await asyncio.wait_for(run_waves(client, server.url, plan),
                                               a.hang_timeout)  # fmt: skip
                run["hang"] = False
            except asyncio.TimeoutError:
                run["hang"], texts = True, []
            run["workload_s"] = time.perf_counter() - t0
            report = await graphs(client, server)
            run["traffic"] = traffic_of(report)
            run["captured_in"] = {s["size"]: s["captured_in"] for s in report["sizes"]}
            run["failed_sizes"] = {s["size"]: s["error"] for s in report["sizes"]
                                   if s["state"] == "failed"}  # fmt: skip
            run["ranks"] = rank_summary(report)
            mismatched = [j for j, (x, y) in enumerate(zip(texts, reference, strict=False))
                          if x != y]  # fmt: skip
            run["equal_to_eager"] = not run["hang"] and not mismatched
            run["mismatched_requests"] = mismatched
        finally:
            run["returncode"] = b.stop(server)
            run["log"] = str(server.log_path)
    return data


# ============================================================================ verdicts
def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
    parts = result["parts"]
    out = []
    if "8b" in parts and "error" not in parts["8b"] and "agreement" in parts["8b"]:
        d = parts["8b"]
        agreed = sum(x["equal"] for x in d["agreement"])
        firsts = [x["first_divergence"] for x in d["agreement"] if not x["equal"]]
        out.append(target("8B TP=2 greedy equals TP=1 (prompts)", agreed, len(d["agreement"]),
                          lower_is_better=False,
                          detail=f"first divergences at tokens {firsts}" if firsts else ""))
        out.append(target("8B batch-1 ms/step TP=2 / TP=1", d["b1_ratio"], TARGET_B1_RATIO,
                          detail=f"{fmt(d['runs']['tp2']['b1_ms_per_step'])} vs "
                          f"{fmt(d['runs']['tp1']['b1_ms_per_step'])} ms"))
        out.append(target("8B batch-64 tokens/s TP=2 / TP=1", d["b64_throughput_ratio"],
                          TARGET_B64_RATIO, lower_is_better=False,
                          detail=f"{fmt(d['runs']['tp2']['b64_tokens_per_s'], '.0f')} vs "
                          f"{fmt(d['runs']['tp1']['b64_tokens_per_s'], '.0f')} tok/s"))
        nccl = d["runs"].get("tp2_nccl")
        if nccl is not None:  # NCCL everywhere, against the same target
            agree = d.get("agreement_nccl", [])
            out.append(target("8B batch-1 ms/step TP=2 nccl / TP=1",
                              d.get("b1_ratio_nccl"), TARGET_B1_RATIO,
                              detail=nccl.get("error") or
                              f"agreement {sum(x['equal'] for x in agree)}/{len(agree)} prompts; "
                              f"b64 ratio {fmt(d.get('b64_throughput_ratio_nccl'))}"))
    if "70b" in parts and "error" not in parts["70b"]:
        d = parts["70b"]
        out.append(target("70B TP=2 batch-1 step / bandwidth floor", d.get("floor_ratio"),
                          TARGET_FLOOR_RATIO,
                          detail=f"{fmt(d.get('b1_ms_per_step'))} ms vs floor "
                          f"{fmt(d.get('floor_ms'))} ms; exec->ready "
                          f"{fmt(d.get('exec_to_ready_s'), '.1f')} s; largest graph on every "
                          f"rank at ready: {fmt(d.get('largest_captured_on_every_rank'))}"))
    if "lazy" in parts and "error" not in parts["lazy"]:
        runs = parts["lazy"]["runs"]
        eager = sum((r.get("traffic") or {}).get("eager_steps") or 0 for r in runs)
        out.append(target("lazy TP=2 restarts without a hang", sum(not r.get("hang", True)
                          for r in runs), len(runs), lower_is_better=False))
        out.append(target("lazy TP=2 eager decode steps (all restarts)", eager, 0))
        out.append(target("lazy TP=2 output equal to --graph-capture eager (restarts)",
                          sum(bool(r.get("equal_to_eager")) for r in runs), len(runs),
                          lower_is_better=False))
    return out


# ============================================================================ main
async def main_async(b: Bench) -> None:
    import httpx

    a = b.args
    async with httpx.AsyncClient(timeout=a.hang_timeout) as client:
        for part in a.parts:
            t0 = time.perf_counter()
            print(f"[tp] part {part} ...", flush=True)
            try:
                if part == "collectives":
                    data = part_collectives(b)
                elif part == "8b":
                    data = await part_8b(b, client)
                elif part == "70b":
                    data = await part_70b(b, client)
                else:
                    data = await part_lazy(b, client)
            except Exception as exc:  # keep the other parts' numbers
                data = {"error": f"{type(exc).__name__}: {exc}", "traceback":
                        traceback.format_exc()[-4000:]}  # fmt: skip
                print(f"[tp] part {part} failed: {data['error']}", flush=True)
            data["seconds"] = time.perf_counter() - t0
            b.save(part, data)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of "
                    + ", ".join(PARTS))  # fmt: skip
    ap.add_argument("--model-8b", default="/tmp/llama-8b",
                    help="made with bench.make_checkpoint --shape 8b if missing")
    ap.add_argument("--model-70b", default="/tmp/llama-70b",
                    help="made with bench.make_checkpoint --shape 70b --config-only if missing")
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--lazy-dtype", default=None, choices=("float32",),
                    help="the lazy part's servers and their eager reference in this dtype "
                         "(float32: random bf16 weights' near-ties no longer decide whether lazy "
                         "output equals eager)")
    ap.add_argument("--agree-prompts", type=int, default=4)
    ap.add_argument("--agree-tokens", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--short", type=int, default=32, help="tokens of the short request")
    ap.add_argument("--long-b1", type=int, default=288, help="tokens of the long batch-1 request")
    ap.add_argument("--long-b64", type=int, default=160, help="tokens of the long batch requests")
    ap.add_argument("--wave-tokens", type=int, default=24)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--ready-timeout", type=float, default=300)
    ap.add_argument("--hang-timeout", type=float, default=180,
                    help="a workload (or request) taking longer counts as a hang")
    ap.add_argument("--symm-mem", action="store_true",
                    help="collectives: also time the symmetric-memory all-reduces")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, the embedded model, tiny workloads (checks the script, not speed)")
    ap.add_argument("--log-dir", default="/tmp/graphserve-tp-logs")
    ap.add_argument("--out", default=None)
    ap.add_argument("--collectives-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hbm-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}")
    if args.smoke:
        from server.default_model import ensure_default_model

        default = str(ensure_default_model())
        args.parts = [p for p in args.parts if p != "collectives"]  # needs two GPUs
        args.model_8b = args.model_70b = default  # 70b: its config with dummy weights
        args.restarts, args.agree_prompts, args.agree_tokens = 1, 2, 8
        args.batch, args.short, args.long_b1, args.long_b64 = 4, 2, 6, 6
        args.max_num_seqs, args.max_model_len, args.wave_tokens = 8, 256, 6
    return args


def ensure_models(args) -> None:
    if args.smoke:
        return
    make = [sys.executable, "-m", "bench.make_checkpoint"]
    if {"8b", "lazy"} & set(args.parts) and not Path(args.model_8b, "config.json").exists():
        subprocess.run([*make, "--shape", "8b", "--out", args.model_8b], cwd=REPO_ROOT,
                       check=True)  # fmt: skip
    if "70b" in args.parts and not Path(args.model_70b, "config.json").exists():
        subprocess.run([*make, "--shape", "70b", "--config-only", "--out", args.model_70b],
                       cwd=REPO_ROOT, check=True)  # fmt: skip


def print_summary(result: dict[str, Any]) -> None:
    parts = result["parts"]
    c = parts.get("collectives") or {}
    if "error" not in c and c:
        print(f"HBM read {fmt(c.get('hbm_read_gb_s'), '.0f')} GB/s; all-reduce in graph "
              f"(us/op): {c.get('allreduce_us')}")
        print(f"logits to rank 0 in graph (us/op): all_gather {c.get('logits_all_gather_us')}, "
              f"gather {c.get('logits_gather_us')}; token broadcast {c.get('broadcast_us')}")
        if c.get("symm_mem"):
            print(f"symm-mem all-reduces (us/op): {c['symm_mem']}")
    d = parts.get("8b") or {}
    for name, run in (d.get("runs") or {}).items():
        print(f"8B {name}: ready {fmt(run.get('ready_s'), '.1f')} s, b1 "
              f"{fmt(run.get('b1_ms_per_step'))} ms/step, b64 "
              f"{fmt(run.get('b64_tokens_per_s'), '.0f')} tok/s, traffic {run.get('traffic')}")
    for part, data in parts.items():
        if "error" in data:
            print(f"part {part} failed: {data['error']}")
    lazy = parts.get("lazy") or {}
    for run in lazy.get("runs", []):
        print(f"lazy restart {run['restart']}: ready {fmt(run.get('ready_s'), '.1f')} s, hang "
              f"{fmt(run.get('hang'))}, equal {fmt(run.get('equal_to_eager'))}, traffic "
              f"{run.get('traffic')}, captured_in {run.get('captured_in')}")


def main() -> None:
    args = parse_args()
    if args.collectives_child or args.hbm_child:
        from bench.tp_collectives import main as child

        child(hbm_only=args.hbm_child, symm_mem=args.symm_mem)
        return
    ensure_models(args)
    b = Bench(args)
    b.log_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(main_async(b))
    b.result["targets"] = evaluate(b.result)
    write_json(args.out, b.result)
    print_summary(b.result)
    print_targets(b.result["targets"], "(smoke: CPU numbers, not meaningful)" if args.smoke
                  else "")  # fmt: skip


if __name__ == "__main__":
    main()
