"""Our engine next to Hugging Face transformers on the same checkpoint, GPU and process.

Two workloads, the same token ids for everyone (random ids, fixed seed):

* batch 1: one `--prompt-len` prompt -> `--new-tokens` tokens; decode ms/token;
* batch `--batch`: that many prompts of `--prompt-len` -> `--new-tokens` each; output tokens/s
  over the whole job (prefill included).

Steps, in this order, each guarded (an exception is recorded in the JSON and the next step
runs), with the GPU freed in between:

1. `ours`: `server.engine.AsyncEngine` in-process, `graph_capture="eager"` (every decode graph
   captured before timing), both workloads; ms/token from the arrival times of token increments.
2. `hf_eager`: `model.generate`, dynamic cache, batch 1.
3. `hf_continuous_batching`: `model.generate_batch` on the batch workload. The paged attention
   implementation is chosen by transformers (sdpa, switched to flash attention if installed);
   older names (`sdpa_paged`, `paged|sdpa`) are tried if the first is refused. The first call
   (persistent manager, CUDA graph warm-up) is not timed; the second, reusing it, is.
4. `hf_static_compile`: `model.generate(cache_implementation="static")`, batch 1. On CUDA,
   transformers compiles the decoding forward itself (torch.compile, its CompileConfig default
   mode "reduce-overhead"); the first call compiles and is timed separately, the second is the
   measurement. Whether compilation happened is recorded (`model._compiled_call`, dynamo's
   graph count). The forward is never compiled by hand: that breaks generate.

HF decode ms/token = (generate time - prefill forward time) / (new tokens - 1); the prefill
forward is timed separately on the same prompt. Ratios: peer ms/token / ours (speed-up at batch
1) and ours tok/s / peer tok/s (batch). Stops starting steps past `--time-budget-s`.

    python -m bench.peers --model /tmp/llama-8b --out bench/results/peers-8b.json
    python -m bench.peers --smoke --out /tmp/peers.json     # CPU, embedded model, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import inspect
import itertools
import random
import statistics
import time
import traceback
from typing import Any

from bench.common import (
    PROMPT_ID_HIGH,
    PROMPT_ID_LOW,
    BenchError,
    environment,
    fmt,
    print_table,
    ratio,
    write_json,
)

STEPS = ("ours", "hf_eager", "hf_continuous_batching", "hf_static_compile")
# Seconds a step is expected to need at most on an H100 with an 8B model: a step is not started
# when less than this is left of the time budget (compilation is the long one).
RESERVE_S = {"ours": 90, "hf_eager": 60, "hf_continuous_batching": 120, "hf_static_compile": 240}
CB_ATTN_FALLBACKS = ("sdpa_paged", "paged|sdpa", "paged_attention")
_ids = itertools.count()


class Ctx:
    """What every step needs: the resolved checkpoint, device, dtype and the prompts."""

    def __init__(self, args):
        import torch

        self.args = args
        self.torch = torch
        self.cuda = torch.cuda.is_available() and args.device != "cpu"
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        if args.model:
            self.model_path = args.model
        else:
            from server.default_model import ensure_default_model

            self.model_path = str(ensure_default_model())
        rng = random.Random(args.seed)
        self.b1_prompt = [
            rng.randrange(PROMPT_ID_LOW, PROMPT_ID_HIGH) for _ in range(args.prompt_len)
        ]
        self.batch_prompts = [
            [rng.randrange(PROMPT_ID_LOW, PROMPT_ID_HIGH) for _ in range(args.prompt_len)]
            for _ in range(args.batch)
        ]

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def free(self) -> dict[str, Any]:
        """Collect garbage and return cached blocks; report what is still held."""
        gc.collect()
        if not self.cuda:
            return {}
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()
        return {
            "allocated_gb": self.torch.cuda.memory_allocated() / 1e9,
            "reserved_gb": self.torch.cuda.memory_reserved() / 1e9,
        }


# ============================================================================ ours
def step_ours(ctx: Ctx) -> dict[str, Any]:
    from server.config import EngineConfig
    from server.engine import AsyncEngine
    from server.request import SamplingParams

    a = ctx.args
    max_len = -(-(a.prompt_len + a.new_tokens + 16) // 16) * 16
    cfg = EngineConfig(
        model=a.model,
        device=ctx.device,
        max_num_seqs=a.batch,
        max_model_len=max_len,
        graph_capture="eager",
    )
    t0 = time.perf_counter()
    engine = AsyncEngine(cfg)
    engine.start()
    try:
        while not engine.ready.wait(0.2):
            if engine.phase == "failed":
                raise BenchError(f"engine failed to start: {engine.error}")
            if time.perf_counter() - t0 > a.load_timeout:
                raise BenchError(f"engine not ready after {a.load_timeout:.0f} s ({engine.phase})")
        out: dict[str, Any] = {"startup_s": time.perf_counter() - t0}

        async def one(prompt: list[int], n: int) -> dict[str, Any]:
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            stamps: list[float] = []
            tokens = 0
            sent = time.perf_counter()
            async for o in engine.generate(f"peer-{next(_ids)}", prompt, params):
                if o.token_ids:
                    stamps.append(time.perf_counter())
                    tokens += len(o.token_ids)
                if o.finished and o.finish_reason not in ("stop", "length"):
                    raise BenchError(f"request ended with {o.finish_reason}: {o.error}")
            return {"sent": sent, "stamps": stamps, "tokens": tokens}

        async def batch(prompts: list[list[int]], n: int) -> tuple[float, list[dict]]:
            t = time.perf_counter()
            res = await asyncio.gather(*(one(p, n) for p in prompts))
            return time.perf_counter() - t, res

        asyncio.run(one(ctx.b1_prompt, min(8, a.new_tokens)))  # warm-up
        b1 = []
        for _ in range(a.repeats):
            r = asyncio.run(one(ctx.b1_prompt, a.new_tokens))
            s = r["stamps"]
            b1.append(
                {
                    "tokens": r["tokens"],
                    "ttft_ms": (s[0] - r["sent"]) * 1e3,
                    "ms_per_token": (s[-1] - s[0]) / max(r["tokens"] - 1, 1) * 1e3,
                    "total_ms_per_token": (s[-1] - r["sent"]) / r["tokens"] * 1e3,
                }
            )
        out["b1_runs"] = b1
        out["b1_ms_per_token"] = statistics.median(x["ms_per_token"] for x in b1)
        rounds = []
        for _ in range(2):  # the first round warms the batched prefill path
            wall, res = asyncio.run(batch(ctx.batch_prompts, a.new_tokens))
            tokens = sum(r["tokens"] for r in res)
            rounds.append({"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall})
        out["batch_rounds"] = rounds
        out["batch_tok_s"] = rounds[-1]["tok_s"]
        report = engine.graph_report()
        out["graphs"] = {
            k: report.get(k) for k in ("mode", "reason", "coverage", "traffic", "startup_timings_s")
        }
        return out
    finally:
        engine.shutdown()
        # An exception's traceback keeps this frame alive: drop the weights, KV cache and graphs
        # here so the caller's ctx.free() can release them either way.
        engine = None


# ============================================================================ transformers
def load_hf(ctx: Ctx, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": ctx.dtype,
        "local_files_only": True,
        "attn_implementation": attn,
    }
    # As the server's loader: straight into device memory when accelerate is there.
    direct = ctx.cuda and importlib.util.find_spec("accelerate") is not None
    if direct:
        kwargs["device_map"] = ctx.device
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ctx.model_path, **kwargs)
    if ctx.cuda and not direct:
        model.to(ctx.device)
    model.eval()
    ctx.sync()
    return model, time.perf_counter() - t0


def gen_kwargs(model, n: int) -> dict[str, Any]:
    """Greedy, exactly n new tokens (min_new_tokens masks EOS, like ignore_eos)."""
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else (eos if eos is not None else 0)
    return {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": pad}


def timed_prefill(ctx: Ctx, model, ids) -> float:
    """Median seconds of one forward over the prompt (what generate does before decoding)."""
    torch = ctx.torch
    times = []
    with torch.inference_mode():
        for _ in range(3):
            ctx.sync()
            t = time.perf_counter()
            try:
                model(input_ids=ids, logits_to_keep=1)
            except TypeError:  # versions without logits_to_keep
                model(input_ids=ids)
            ctx.sync()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def timed_generate(ctx: Ctx, model, ids, **kw) -> tuple[float, int]:
    torch = ctx.torch
    with torch.inference_mode():
        ctx.sync()
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        ctx.sync()
    return time.perf_counter() - t, int(out.shape[1] - ids.shape[1])


def decode_rate(total_s: float, prefill_s: float, new: int) -> dict[str, Any]:
    return {
        "generate_s": total_s,
        "new_tokens": new,
        "ms_per_token": (total_s - prefill_s) / max(new - 1, 1) * 1e3,
        "total_ms_per_token": total_s / max(new, 1) * 1e3,
    }


def step_hf_eager(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    model, load_s = load_hf(ctx)
    try:
        ids = ctx.torch.tensor([ctx.b1_prompt], device=ctx.device)
        out: dict[str, Any] = {"load_s": load_s, "attn": model.config._attn_implementation}
        out["prefill_s"] = timed_prefill(ctx, model, ids)
        timed_generate(ctx, model, ids, **gen_kwargs(model, min(8, a.new_tokens)))  # warm-up
        runs = []
        for _ in range(a.repeats):
            s, new = timed_generate(ctx, model, ids, **gen_kwargs(model, a.new_tokens))
            runs.append(decode_rate(s, out["prefill_s"], new))
        out["b1_runs"] = runs
        out["b1_ms_per_token"] = statistics.median(r["ms_per_token"] for r in runs)
        return out
    finally:
        model = None  # see step_ours: a traceback must not pin the weights


def step_hf_static_compile(ctx: Ctx) -> dict[str, Any]:
    torch = ctx.torch
    a = ctx.args
    model, load_s = load_hf(ctx)
    try:
        ids = torch.tensor([ctx.b1_prompt], device=ctx.device)
        kw = dict(gen_kwargs(model, a.new_tokens), cache_implementation="static")
        out: dict[str, Any] = {"load_s": load_s, "attn": model.config._attn_implementation}
        out["prefill_s"] = timed_prefill(ctx, model, ids)
        graphs_before = _dynamo_graphs()
        first_s, first_new = timed_generate(ctx, model, ids, **kw)
        out["first_call"] = decode_rate(first_s, out["prefill_s"], first_new)
        out["compiled"] = hasattr(model, "_compiled_call")
        out["dynamo_graphs"] = _dynamo_graphs() - graphs_before
        cc = getattr(model.generation_config, "compile_config", None)
        out["compile_config"] = repr(cc) if cc is not None else "transformers default"
        if not out["compiled"]:
            out["note"] = (
                "generate did not compile (transformers auto-compiles only on CUDA "
                "with a static cache); timings are of the uncompiled static cache"
            )
        runs = []
        for _ in range(max(2, a.repeats)):  # second call is the measurement; third as a check
            s, new = timed_generate(ctx, model, ids, **kw)
            runs.append(decode_rate(s, out["prefill_s"], new))
        out["b1_runs"] = runs
        out["b1_ms_per_token"] = runs[0]["ms_per_token"]
        return out
    finally:
        model = None
        if hasattr(torch, "_dynamo"):
            torch._dynamo.reset()  # drop compiled graphs and their CUDA graph pools


def _dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - informational only
        return -1


def step_hf_cb(ctx: Ctx) -> dict[str, Any]:
    from transformers import GenerationConfig

    a = ctx.args
    model, load_s = load_hf(ctx)
    out: dict[str, Any] = {"load_s": load_s, "attempts": []}
    try:
        sig = inspect.signature(model.generate_batch).parameters
        kwargs: dict[str, Any] = {}
        for name, value in (
            ("progress_bar", False),
            ("persistent_manager", True),
            ("warmup", True),
        ):
            if name in sig:
                kwargs[name] = value
        cb_config = _cb_config(ctx)
        if cb_config is not None and "continuous_batching_config" in sig:
            kwargs["continuous_batching_config"] = cb_config
        pad = gen_kwargs(model, 1)["pad_token_id"]

        def gen_config():
            # eos None: transformers disables EOS for continuous batching (ignore_eos).
            return GenerationConfig(
                max_new_tokens=a.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad
            )

        def run_once() -> tuple[float, int, int]:
            ctx.sync()
            t = time.perf_counter()
            res = model.generate_batch(
                inputs=ctx.batch_prompts, generation_config=gen_config(), **kwargs
            )
            ctx.sync()
            wall = time.perf_counter() - t
            outs = list(res.values())
            errors = [o.error for o in outs if getattr(o, "error", None)]
            if len(outs) != len(ctx.batch_prompts) or errors:
                raise BenchError(
                    f"generate_batch returned {len(outs)} of "
                    f"{len(ctx.batch_prompts)} results; errors: {errors[:2]}"
                )
            return wall, sum(len(o.generated_tokens) for o in outs), len(outs)

        for attn in (None, *CB_ATTN_FALLBACKS):
            try:
                if attn is not None:
                    model.set_attn_implementation(attn)
                used = model.config._attn_implementation
                first = run_once()
                second = run_once()
                out["attn"] = model.config._attn_implementation
                out["requested_attn"] = used
                out["first_call"] = {
                    "wall_s": first[0],
                    "tokens": first[1],
                    "tok_s": first[1] / first[0],
                }
                out["measured"] = {
                    "wall_s": second[0],
                    "tokens": second[1],
                    "tok_s": second[1] / second[0],
                }
                out["batch_tok_s"] = second[1] / second[0]
                out["expected_tokens"] = a.batch * a.new_tokens
                return out
            except Exception as exc:  # noqa: BLE001 - try the next attention name
                out["attempts"].append(
                    {"attn": attn or "as loaded", "error": f"{type(exc).__name__}: {exc}"[:500]}
                )
                _destroy_cb_manager(model)
        raise BenchError("continuous batching failed with every attention implementation tried")
    finally:
        _destroy_cb_manager(model)
        model = None


def _cb_config(ctx: Ctx):
    """Small explicit cache on CPU (the default sizes it to host memory: slow to allocate)."""
    if ctx.cuda:
        return None
    try:
        import dataclasses

        from transformers.generation import ContinuousBatchingConfig

        names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        want = {"num_blocks": 64, "max_batch_tokens": 512}
        return ContinuousBatchingConfig(**{k: v for k, v in want.items() if k in names})
    except Exception:  # noqa: BLE001 - older versions: use their defaults
        return None


def _destroy_cb_manager(model) -> None:
    destroy = getattr(model, "destroy_cached_continuous_batching_manager", None)
    if destroy is not None:
        try:
            destroy()
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass


STEP_FUNCS = {
    "ours": step_ours,
    "hf_eager": step_hf_eager,
    "hf_continuous_batching": step_hf_cb,
    "hf_static_compile": step_hf_static_compile,
}


# ============================================================================ main
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default=None, help="checkpoint directory (default: the embedded default model)"
    )
    ap.add_argument("--device", default="auto", choices=("auto", "cpu"))
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64, help="prompts in the batch workload")
    ap.add_argument("--repeats", type=int, default=3, help="timed batch-1 runs per step")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma list of: " + ", ".join(STEPS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load-timeout", type=float, default=300.0)
    ap.add_argument(
        "--time-budget-s",
        type=float,
        default=450.0,
        help="a step is not started with less than its reserve left (see RESERVE_S); leaves "
        "room for writing the checkpoint in the same call",
    )
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CPU check of the script: embedded model, tiny sizes, seconds",
    )
    args = ap.parse_args()
    if args.smoke:
        args.prompt_len, args.new_tokens, args.batch, args.repeats = 32, 8, 4, 2
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    for s in steps:
        if s not in STEPS:
            ap.error(f"unknown step {s!r}; choose from {', '.join(STEPS)}")
    if args.new_tokens < 2 or args.prompt_len < 1 or args.batch < 1:
        ap.error("--new-tokens must be >= 2, --prompt-len and --batch >= 1")

    t_start = time.perf_counter()
    import torch
    import transformers

    ctx = Ctx(args)
    result: dict[str, Any] = {
        "script": "peers",
        "smoke": args.smoke,
        "args": vars(args),
        "environment": environment(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": importlib.util.find_spec("accelerate") is not None,
            "flash_attn": importlib.util.find_spec("flash_attn") is not None,
        },
        "device": torch.cuda.get_device_name() if ctx.cuda else "cpu",
        "model": ctx.model_path,
        "workloads": {
            "b1": f"1 x {args.prompt_len} -> {args.new_tokens}",
            "batch": f"{args.batch} x {args.prompt_len} -> {args.new_tokens}",
        },
        "steps": {},
    }
    for name in steps:
        left = args.time_budget_s - (time.perf_counter() - t_start)
        if left < RESERVE_S[name] and not args.smoke:
            result["steps"][name] = {"skipped": f"time budget: {left:.0f} s left"}
            print(f"[{name}] skipped: {left:.0f} s left of the time budget", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            rec = STEP_FUNCS[name](ctx)
        except Exception as exc:  # noqa: BLE001 - one shot on the GPU: record and go on
            rec = {
                "error": f"{type(exc).__name__}: {exc}"[:2000],
                "traceback": traceback.format_exc()[-3000:],
            }
        rec["wall_s"] = time.perf_counter() - t0
        rec["memory_after_free"] = ctx.free()
        result["steps"][name] = rec
        write_json(args.out, result)
        summary = (
            rec.get("error", "").splitlines()[0]
            if "error" in rec
            else (
                f"b1 {fmt(rec.get('b1_ms_per_token'), '.2f')} ms/token, batch "
                f"{fmt(rec.get('batch_tok_s'), '.0f')} tok/s"
            )
        )
        print(f"[{name}] {rec['wall_s']:.1f} s: {summary}", flush=True)

    ours = result["steps"].get("ours", {})
    ratios = {}
    for name, rec in result["steps"].items():
        if name == "ours":
            continue
        ratios[name] = {
            # > 1: we are faster.
            "b1_speedup": ratio(rec.get("b1_ms_per_token"), ours.get("b1_ms_per_token")),
            "batch_throughput_ratio": ratio(ours.get("batch_tok_s"), rec.get("batch_tok_s")),
        }
    result["ratios"] = ratios
    result["wall_s"] = time.perf_counter() - t_start
    write_json(args.out, result)

    print()
    print(
        f"{result['device']}  torch {torch.__version__}  transformers "
        f"{transformers.__version__}  b1: {result['workloads']['b1']}  batch: "
        f"{result['workloads']['batch']}"
    )
    rows = []
    for name in steps:
        rec = result["steps"].get(name, {})
        r = ratios.get(name, {})
        status = "skipped" if "skipped" in rec else ("ERROR" if "error" in rec else "ok")
        rows.append(
            [
                name,
                status,
                fmt(rec.get("b1_ms_per_token"), ".2f"),
                fmt(rec.get("batch_tok_s"), ".0f"),
                fmt(r.get("b1_speedup"), ".2f"),
                fmt(r.get("batch_throughput_ratio"), ".2f"),
            ]
        )
    print_table(("step", "status", "b1 ms/tok", "batch tok/s", "ours b1 x", "ours batch x"), rows)
    print(
        "ours b1 x = peer ms/token / ours; ours batch x = ours tok/s / peer tok/s (>1: ours faster)"
    )
    for name in steps:
        rec = result["steps"].get(name, {})
        if "error" in rec:
            print(f"{name}: {rec['error'].splitlines()[0][:300]}")
        for att in rec.get("attempts", []):
            print(f"{name} attempt attn={att['attn']}: {att['error'][:200]}")
    st = result["steps"].get("hf_static_compile", {})
    if "compiled" in st:
        print(
            f"hf_static_compile: compiled={st['compiled']} dynamo graphs={st['dynamo_graphs']}"
            f" first call {fmt(st['first_call']['generate_s'], '.1f')} s"
        )
    if args.out:
        print(f"full results: {args.out}")


if __name__ == "__main__":
    main()
