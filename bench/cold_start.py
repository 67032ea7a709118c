"""Cold start: exec -> live, exec -> ready, exec -> full CUDA graph coverage, per capture policy.

Launches `python -m server serve` once per (run, size list, policy) and polls, every
`--poll-ms`, `/health` (until 200), then `/health/ready` and `/health/graphs` (until ready, then
until every graph size is captured). Recorded per launch:

* exec -> `/health` 200, exec -> `/health/ready` 200, exec -> coverage complete while idle (lazy
  and eager; n/a when capture is off or impossible, e.g. on CPU);
* the phase transitions seen in `/health/ready` bodies, and the server's own record of them
  (its `phases` list, shifted onto the exec clock via the `/health` uptime);
* the server's startup timings (`startup_timings_s`: import, weights, KV cache, graphs, total)
  and per-size capture times from `/health/graphs`.

Policies `lazy`, `eager` and `off` run interleaved within each run, for the server's default
size list and for a 51-size list like vLLM's default (max 512), so the growing gap between
`eager` and `lazy` readiness shows. One discarded warm-up launch first pays cold imports and
Triton compilation (unless `--no-warmup`). Each server is stopped with SIGTERM, then SIGKILL.

Targets (medians): /health <= 1 s; ready(lazy) <= ready(off) + 0.5 s; time to full coverage when
idle under lazy, counted from ready, <= 1.1x eager's capture time (its graph phase beyond off's,
from the servers' own startup_timings_s).

Caches (`--caches`): `shared` leaves the environment's Triton/CUDA/XDG caches as they are;
`fresh` gives every launch empty ones in a temporary directory, as a container scaled from zero
has (`TRITON_CACHE_DIR`, `XDG_CACHE_HOME` (the state dir too), `CUDA_CACHE_PATH`,
`TORCHINDUCTOR_CACHE_DIR`); `--kernel-cache DIR` passes the server kernels compiled ahead
(`graphserve precompile-kernels`, as the image ships them), which it copies into its fresh
Triton cache at startup. `--page-cache cold` evicts
the checkpoint's files from the page cache before every launch (`posix_fadvise(DONTNEED)`, no
root needed; the bytes still resident afterwards are in the server's own load log line).
`--first-request-tokens N` sends one completion of an N-token prompt right after ready and
records exec -> its answer (target: within 0.1 s of ready). `--bytecode compile` (the default)
first writes the bytecode of the packages a server imports on its way to ready, as an image's
pip install has it: without it every launch compiles their sources (~3.3 s of an 8B start on
the H200 box, docs/benchmarks.md 9c); `as-is` measures whatever is installed.

`--baseline-dir DIR` launches another checkout (its `server` package first on the path), with
the same flags, right after each of this checkout's launches, and prints the median ready ratio:
the before/after of a change measured in one run on one box (startup times on the GPU boxes vary
by ~1 s between calls, docs/benchmarks.md 9d).

Wall time: warm-up + runs x 3 policies x 2 size lists launches; with the 8B checkpoint each takes
roughly weights-load + capture + a few seconds, so `--runs 2` keeps it well inside 10 minutes.
`--time-budget-s` stops launching (output marked truncated) rather than overrun.

    python -m bench.cold_start --model /tmp/llama-8b --out bench/results/cold-start-8b.json
    python -m bench.cold_start --smoke --out /tmp/cold.json     # CPU, embedded model, seconds
    python -m bench.cold_start --model /tmp/llama-8b --modes lazy --variants default --no-warmup \
        --caches fresh --kernel-cache /tmp/k8 --first-request-tokens 512 --runs 3 \
        --baseline-dir ../previous-checkout --out bench/results/cold-start-8b-ab.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BenchError,
    ServerProcess,
    bytecode_cached,
    compile_bytecode,
    coverage_complete,
    drop_from_page_cache,
    environment,
    fmt,
    median,
    print_table,
    print_targets,
    target,
    write_json,
)

MODES = ("lazy", "eager", "off")
VARIANTS = ("default", "vllm51")
METRICS = (
    "health_s",
    "ready_s",
    "coverage_complete_s",
    "coverage_after_ready_s",
    "import_s",
    "weights_s",
    "kv_cache_s",
    "graphs_s",
    "load_total_s",
    "capture_sum_s",
    "first_token_after_ready_s",
)


def vllm_like_sizes(max_size: int = 512) -> list[int]:
    """`[1, 2, 4] + 8..256 step 8 + 272..max step 16`: 51 sizes at max 512, like vLLM's default."""
    sizes = [1, 2, 4] + list(range(8, min(256, max_size) + 1, 8))
    sizes += list(range(272, max_size + 1, 16))
    return [s for s in sizes if s <= max_size]


def variant_args(args: argparse.Namespace, variant: str) -> list[str]:
    """Server flags of one size-list variant (the policy is added per launch)."""
    out: list[str] = []
    if args.model:
        out += ["--model", args.model]
    if variant == "default":
        if args.max_num_seqs:
            out += ["--max-num-seqs", str(args.max_num_seqs)]
        out += ["--max-model-len", str(args.max_model_len)]
    elif variant == "vllm51":
        sizes = vllm_like_sizes(args.wide_max_num_seqs)
        out += [
            "--max-num-seqs",
            str(args.wide_max_num_seqs),
            # The slot KV cache is max_num_seqs x max_model_len: keep it small at 512 slots.
            "--max-model-len",
            str(args.wide_max_model_len),
            "--cuda-graph-sizes",
            ",".join(map(str, sizes)),
        ]
    else:
        raise BenchError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    # Access logs of 100 polls a second would cost the server CPU while it starts.
    out += ["--disable-access-log", "--drain-timeout", "5", *args.server_arg]
    return out


def fresh_caches(root: Path) -> dict[str, str]:
    """Empty compiler and state caches under `root` (a container scaled from zero). Returns the
    environment that points at them."""
    env = {
        "TRITON_CACHE_DIR": str(root / "triton"),
        "XDG_CACHE_HOME": str(root / "xdg"),
        "CUDA_CACHE_PATH": str(root / "nv"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
    }
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    return env


def evict_page_cache(model_dir: str | None) -> dict[str, Any]:
    """Drop the checkpoint's files from the page cache (clean pages: no root needed)."""
    files = sorted(Path(model_dir).glob("*.safetensors")) if model_dir else []
    done, failed = 0, []
    for path in files:
        try:
            drop_from_page_cache(path)
            done += path.stat().st_size
        except OSError as exc:
            failed.append(f"{path.name}: {exc}")
    return {"files": len(files), "bytes": done, "errors": failed}


def measure_launch(
    args: argparse.Namespace, server_args: list[str], mode: str, log_path: Path,
    tree: str | None = None,
) -> dict[str, Any]:
    """Start one server, poll it to readiness and (if capturing) full coverage, stop it.
    `tree`: another checkout whose server to start (its own `server` package first on the
    path), else this one's."""
    with tempfile.TemporaryDirectory(prefix="graphserve-fresh-") as tmp:
        env = fresh_caches(Path(tmp)) if args.caches == "fresh" else {}
        if tree is not None:
            path = os.environ.get("PYTHONPATH")
            env["PYTHONPATH"] = str(Path(tree).resolve()) + (os.pathsep + path if path else "")
        evicted = evict_page_cache(args.model) if args.page_cache == "cold" else None
        run = _measure(args, server_args, mode, log_path, env, tree)
    run["caches"] = args.caches + (" + kernels compiled ahead" if args.kernel_cache else "")
    run["page_cache"] = args.page_cache
    run["evicted"] = evicted
    return run


def first_request(client, server: ServerProcess, run: dict[str, Any], tokens: int) -> None:
    """The first completion right after ready: a `tokens`-token prompt (ids, no tokenizer
    needed), one output token. Records exec -> its answer and how long after ready that was."""
    prompt = [3 + (7 * i) % 97 for i in range(tokens)]
    r = client.post(f"{server.url}/v1/completions", timeout=120.0,
                    json={"prompt": prompt, "max_tokens": 1, "temperature": 0.0})  # fmt: skip
    done = server.since_start()
    if r.status_code != 200:
        raise BenchError(f"first request answered {r.status_code}: {r.text[:300]}")
    run["first_token_s"] = done
    run["first_token_after_ready_s"] = done - run["ready_s"]


def _measure(args: argparse.Namespace, server_args: list[str], mode: str, log_path: Path,
             env: dict[str, str], tree: str | None = None) -> dict[str, Any]:  # fmt: skip
    import httpx

    server = ServerProcess([*server_args, "--graph-capture", mode], log_path=log_path, env=env,
                           cwd=tree)  # fmt: skip
    run: dict[str, Any] = {
        "mode": mode,
        "health_s": None,
        "ready_s": None,
        "coverage_complete_s": None,
        "coverage_after_ready_s": None,
        "observed_phases": {},
        "error": None,
        "log": str(log_path),
    }
    poll = args.poll_ms / 1e3
    graphs: dict[str, Any] = {}
    ready_body: dict[str, Any] = {}
    offset = None  # exec clock minus the server lifecycle clock
    with httpx.Client(timeout=2.0) as client:
        server.start()
        try:
            while True:
                tick = time.perf_counter()
                now = server.since_start()
                code = server.exited()
                if code is not None:
                    raise BenchError(
                        f"server exited with code {code}; log tail:\n" + server.log_tail()
                    )
                if run["ready_s"] is None and now > args.ready_timeout:
                    raise BenchError(f"not ready after {args.ready_timeout:.0f} s")
                if run["ready_s"] is not None and now - run["ready_s"] > args.coverage_timeout:
                    run["error"] = f"coverage incomplete {args.coverage_timeout:.0f} s after ready"
                    break
                try:
                    if run["health_s"] is None:
                        r = client.get(f"{server.url}/health")
                        if r.status_code == 200:
                            run["health_s"] = server.since_start()
                            uptime = r.json().get("uptime_s")
                            if isinstance(uptime, (int, float)):
                                offset = run["health_s"] - uptime
                        elif r.status_code == 503:
                            raise BenchError(f"/health says failed: {r.text[:500]}")
                    else:
                        if run["ready_s"] is None:
                            r = client.get(f"{server.url}/health/ready")
                            seen = server.since_start()
                            ready_body = r.json()
                            phase = ready_body.get("phase")
                            if phase == "failed":
                                raise BenchError(f"startup failed: {ready_body.get('reason')}")
                            run["observed_phases"].setdefault(phase, round(seen, 4))
                            if r.status_code == 200:
                                run["ready_s"] = seen
                                if args.first_request_tokens:
                                    first_request(client, server, run, args.first_request_tokens)
                        r = client.get(f"{server.url}/health/graphs")
                        seen = server.since_start()
                        if r.status_code == 200:
                            graphs = r.json()
                        if run["ready_s"] is not None:
                            if graphs.get("mode") == "off":
                                break  # nothing will ever be captured
                            if coverage_complete(graphs):
                                run["coverage_complete_s"] = seen
                                run["coverage_after_ready_s"] = seen - run["ready_s"]
                                break
                except httpx.TransportError:
                    pass  # not listening yet, or a poll raced the shutdown
                time.sleep(max(0.0, poll - (time.perf_counter() - tick)))
            # One last look with the final numbers (timings are filled in at ready).
            r = client.get(f"{server.url}/health/graphs")
            if r.status_code == 200:
                graphs = r.json()
            r = client.get(f"{server.url}/health/ready")
            ready_body = r.json()
        except BenchError as exc:
            run["error"] = str(exc)
        except (httpx.HTTPError, ValueError) as exc:
            run["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            run["returncode"] = server.stop()
            run["stopped_by"] = server.stopped_by
    if run["error"]:
        run["log_tail"] = server.log_tail(40)
    timings = graphs.get("startup_timings_s") or {}
    for key in ("import_s", "weights_s", "kv_cache_s", "graphs_s", "load_total_s"):
        run[key] = timings.get(key)
    sizes = graphs.get("sizes") or []
    captured = [s for s in sizes if s.get("capture_ms") is not None]
    run["capture_sum_s"] = sum(s["capture_ms"] for s in captured) / 1e3 if captured else None
    run["effective_mode"] = graphs.get("mode")
    run["mode_reason"] = graphs.get("reason")
    run["coverage"] = graphs.get("coverage")
    run["policy_timings"] = graphs.get("timings")
    run["n_sizes"] = len(sizes)
    run["capture_ms_by_size"] = {s["size"]: s.get("capture_ms") for s in sizes}
    run["captured_in"] = {s["size"]: s.get("captured_in") for s in sizes}
    run["device"] = graphs.get("device")
    if offset is not None:
        run["lifecycle_offset_s"] = offset
        run["server_phases"] = [
            {"phase": p["phase"], "since_exec_s": round(p["at_s"] + offset, 4)}
            for p in ready_body.get("phases", [])
            if isinstance(p.get("at_s"), (int, float))
        ]
    return run


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if not r.get("error")]
    out: dict[str, Any] = {"runs": len(runs), "failed": len(runs) - len(ok)}
    for key in METRICS:
        values = [r[key] for r in ok if r.get(key) is not None]
        out[key] = {"median": median(values), "values": values}
    out["effective_mode"] = ok[0]["effective_mode"] if ok else None
    out["n_sizes"] = ok[0]["n_sizes"] if ok else None
    return out


def evaluate(variant: str, summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    def med(mode: str, key: str) -> float | None:
        s = summary.get(mode)
        return None if s is None else s[key]["median"]

    checks = []
    healths = [med(m, "health_s") for m in summary if med(m, "health_s") is not None]
    checks.append(
        target(
            f"[{variant}] exec -> /health 200 (worst policy median), s",
            max(healths) if healths else None,
            1.0,
        )
    )
    off_ready = med("off", "ready_s")
    checks.append(
        target(
            f"[{variant}] ready(lazy) vs ready(off) + 0.5 s",
            med("lazy", "ready_s"),
            None if off_ready is None else off_ready + 0.5,
            detail=f"ready(off) = {fmt(off_ready)} s",
        )
    )
    # Phase-level check on the server's own clock: end-to-end ready times carry the launch's
    # import noise (±2 s between launches on the H100 box), the graph phase does not.
    off_graphs = med("off", "graphs_s")
    checks.append(
        target(
            f"[{variant}] graph phase lazy vs off + 0.5 s (server's startup_timings_s)",
            med("lazy", "graphs_s"),
            None if off_graphs is None else off_graphs + 0.5,
            detail=f"graphs_s(off) = {fmt(off_graphs)} s",
        )
    )
    # Eager's capture time is what its graph phase spends beyond `off`'s (both pay the same
    # eager warm-up and kernel loading); differences of end-to-end ready times would again
    # be dominated by import noise.
    eager_graphs = med("eager", "graphs_s")
    eager_capture = (
        None if eager_graphs is None or off_graphs is None else eager_graphs - off_graphs
    )
    lazy_cov = med("lazy", "coverage_after_ready_s")
    lazy_mode = (summary.get("lazy") or {}).get("effective_mode")
    detail = (
        f"eager capture = graphs_s(eager) - graphs_s(off) = {fmt(eager_capture)} s; "
        f"sum of eager's per-size captures = {fmt(med('eager', 'capture_sum_s'))} s"
    )
    if lazy_mode == "off":
        detail += "; n/a: graph capture is off on this device"
        lazy_cov = None
    checks.append(
        target(
            f"[{variant}] lazy idle coverage after ready vs 1.1x eager capture, s",
            lazy_cov,
            None if eager_capture is None else 1.1 * max(eager_capture, 0.0),
            detail=detail,
        )
    )
    return checks


def ready_ratios(result: dict[str, Any]) -> list[tuple[str, str, float | None]]:
    """(variant, policy, median ready of this checkout / the baseline's) where both ran."""
    out = []
    for v, data in (result.get("baseline") or {}).get("variants", {}).items():
        ours = result["variants"][v]["summary"]
        for m, base in data["summary"].items():
            a = (ours.get(m) or {}).get("ready_s", {}).get("median")
            b = base["ready_s"]["median"]
            out.append((v, m, a / b if a is not None and b else None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default=None, help="checkpoint directory (default: the embedded default model)"
    )
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of capture policies")
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="size lists: default (the server's) and/or vllm51 (51 sizes, max 512)",
    )
    ap.add_argument("--runs", type=int, default=3, help="launches per (variant, policy)")
    ap.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the discarded first launch that pays cold imports",
    )
    ap.add_argument("--max-model-len", type=int, default=4096, help="default variant")
    ap.add_argument(
        "--max-num-seqs",
        type=int,
        default=64,
        help="default variant: sizes are the server's default list up to this; "
        "pinned so the KV cache (slots x max-model-len) fits an 8B model's GPU",
    )
    ap.add_argument("--wide-max-num-seqs", type=int, default=512, help="vllm51 variant")
    ap.add_argument(
        "--wide-max-model-len",
        type=int,
        default=512,
        help="vllm51 variant; 513 slots x 512 tokens of an 8B model's KV is 32 GiB, "
        "x 1024 would not fit next to its weights on an 80 GB GPU",
    )
    ap.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra flag for every server (repeat; use --server-arg=--flag=value)",
    )
    ap.add_argument("--poll-ms", type=float, default=10.0)
    ap.add_argument("--ready-timeout", type=float, default=300.0, help="seconds per launch")
    ap.add_argument(
        "--coverage-timeout",
        type=float,
        default=180.0,
        help="seconds after ready to wait for full coverage",
    )
    ap.add_argument(
        "--time-budget-s",
        type=float,
        default=450.0,
        help="stop launching when the next launch would end past this (output is still "
        "written, marked truncated); leaves room for writing the checkpoint in the same call",
    )
    ap.add_argument("--caches", choices=("shared", "fresh"), default="shared",
                    help="fresh: empty Triton/CUDA/XDG caches per launch (a new container)")
    ap.add_argument("--kernel-cache", default=None, metavar="DIR",
                    help="serve --kernel-cache DIR: kernels compiled ahead")
    ap.add_argument("--page-cache", choices=("warm", "cold"), default="warm",
                    help="cold: evict the checkpoint from the page cache before each launch")
    ap.add_argument("--bytecode", choices=("compile", "as-is"), default="compile",
                    help="compile: write the startup packages' bytecode first, as an image "
                         "has it (default); as-is: launch on whatever is installed")
    ap.add_argument("--first-request-tokens", type=int, default=0, metavar="N",
                    help="right after ready, time one completion of an N-token prompt "
                    "(target: its answer within 0.1 s of ready)")
    ap.add_argument("--ready-target-s", type=float, default=None,
                    help="also check exec -> ready (lazy median) against this many seconds")
    ap.add_argument("--log-dir", default=None, help="server logs (default: next to --out)")
    ap.add_argument("--baseline-dir", default=None, metavar="DIR",
                    help="another checkout (e.g. the previous commit's tree) launched with the "
                    "same flags right after each of this checkout's launches; medians and the "
                    "ready ratio are reported side by side")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CPU check of the script: embedded model, 1 run, default sizes only",
    )
    args = ap.parse_args()
    if args.smoke:
        args.runs, args.no_warmup, args.variants = 1, True, "default"
        args.max_model_len = min(args.max_model_len, 256)
        args.ready_timeout = min(args.ready_timeout, 180.0)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if args.kernel_cache:
        args.server_arg.append(f"--kernel-cache={args.kernel_cache}")
    log_dir = Path(
        args.log_dir
        or (Path(args.out).parent / "logs" if args.out else Path("/tmp/graphserve-bench-logs"))
    )

    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "script": "cold_start",
        "smoke": args.smoke,
        "args": vars(args),
        "environment": environment(),
        "warmup": None,
        "variants": {},
        "targets": [],
        "truncated": False,
    }
    if args.bytecode == "compile":
        result["bytecode"] = compile_bytecode()
        result["environment"]["bytecode_cached"] = bytecode_cached()
        written = result["bytecode"]["compiled"] + result["bytecode"][
            "compiled_but_some_files_failed"]
        print(f"bytecode written for {', '.join(written) or 'nothing'} in "
              f"{result['bytecode']['seconds']} s", flush=True)
    missing = [k for k, v in result["environment"]["bytecode_cached"].items() if v is False]
    if missing:
        print(f"note: no bytecode cache for {', '.join(missing)}: every launch compiles their "
              "Python sources, which an image's pip install would not (run `python -m "
              "compileall` on them to measure what a container sees)", flush=True)
    sides = [result["variants"]]  # this checkout's, then the baseline's
    if args.baseline_dir:
        result["baseline"] = {"dir": str(Path(args.baseline_dir).resolve()), "variants": {}}
        sides.append(result["baseline"]["variants"])
    for v in variants:
        for side in sides:
            side[v] = {"server_args": variant_args(args, v), "runs": {m: [] for m in modes},
                       "summary": {}}  # fmt: skip
    longest = 0.0

    def budget_allows() -> bool:
        return time.perf_counter() - t_start + longest * 1.2 <= args.time_budget_s

    def launch(variant: str, mode: str, label: str, tree: str | None = None) -> dict[str, Any]:
        nonlocal longest
        t0 = time.perf_counter()
        tag = "baseline-" if tree else ""
        run = measure_launch(
            args, variant_args(args, variant), mode,
            log_dir / f"cold-{tag}{variant}-{mode}-{label}.log", tree,
        )  # fmt: skip
        run["wall_s"] = time.perf_counter() - t0
        longest = max(longest, run["wall_s"])
        status = run["error"] or "ok"
        print(
            f"[{tag}{variant} {mode} {label}] health {fmt(run['health_s'])} s, ready "
            f"{fmt(run['ready_s'])} s, full coverage {fmt(run['coverage_complete_s'])} s "
            f"({fmt(run.get('effective_mode'))}); {status.splitlines()[0]}",
            flush=True,
        )
        return run

    if not args.no_warmup:
        print("warm-up launch (discarded: pays cold imports, Triton compilation, page cache)")
        result["warmup"] = launch(variants[0], modes[0], "warmup")
    # Run index outermost: if the time budget runs out, every configuration still has a run.
    for i in range(args.runs):
        for v in variants:
            for m in modes:
                if not budget_allows():
                    result["truncated"] = True
                    break
                result["variants"][v]["runs"][m].append(launch(v, m, f"run{i + 1}"))
                if args.baseline_dir:  # right after, so both see the same box state
                    result["baseline"]["variants"][v]["runs"][m].append(
                        launch(v, m, f"run{i + 1}", args.baseline_dir))
                write_json(args.out, result)

    for v in variants:
        if args.baseline_dir:
            base = result["baseline"]["variants"][v]
            base["summary"] = {m: summarize_runs(r) for m, r in base["runs"].items() if r}
        summary = {m: summarize_runs(r) for m, r in result["variants"][v]["runs"].items() if r}
        result["variants"][v]["summary"] = summary
        result["targets"] += evaluate(v, summary)
        lazy = summary.get("lazy")
        if args.ready_target_s is not None and lazy is not None:
            name = (f"[{v}] exec -> ready (lazy, caches {args.caches}, page cache "
                    f"{args.page_cache}), s")  # fmt: skip
            result["targets"].append(
                target(name, lazy["ready_s"]["median"], args.ready_target_s)
            )
        if args.first_request_tokens and lazy is not None:
            result["targets"].append(target(
                f"[{v}] first {args.first_request_tokens}-token completion after ready (lazy), s",
                lazy["first_token_after_ready_s"]["median"], 0.1))  # fmt: skip
    result["wall_s"] = time.perf_counter() - t_start
    write_json(args.out, result)

    print()
    if result["warmup"]:
        w = result["warmup"]
        print(
            f"warm-up launch (discarded): health {fmt(w['health_s'])} s, "
            f"ready {fmt(w['ready_s'])} s"
        )
    header = (
        "variant",
        "policy",
        "runs",
        "sizes",
        "health",
        "ready",
        "full cov",
        "cov-ready",
        "import",
        "weights",
        "kv",
        "graphs",
        "total",
        "capt sum",
        "1st tok",
        "ready, all runs",
    )
    rows = []
    for v in variants:
        sides = [("", result["variants"][v]["summary"])]
        if args.baseline_dir:
            sides.append(("baseline ", result["baseline"]["variants"][v]["summary"]))
        for tag, summaries in sides:
            for m, s in summaries.items():
                mode = m if s["effective_mode"] in (None, m) else f"{m}->{s['effective_mode']}"
                rows.append(
                    [tag + v, mode, f"{s['runs'] - s['failed']}/{s['runs']}", fmt(s["n_sizes"])]
                    + [fmt(s[k]["median"], ".2f") for k in METRICS]
                    + ["/".join(f"{x:.2f}" for x in s["ready_s"]["values"]) or "-"]
                )
    print(
        "medians in seconds from exec (cov-ready: full coverage minus ready; capt sum: sum of "
        "per-size capture times; 1st tok: first completion's answer minus ready)"
    )
    print_table(header, rows)
    for v, m, ratio in ready_ratios(result):
        print(f"[{v} {m}] exec -> ready, median: this checkout / baseline = {fmt(ratio, '.3f')}")
    if result["truncated"]:
        print(f"TRUNCATED: time budget {args.time_budget_s:.0f} s reached; fewer runs than asked")
    print_targets(result["targets"], "(smoke: CPU numbers, not meaningful)" if args.smoke else "")
    if args.out:
        print(f"full results: {args.out}")


if __name__ == "__main__":
    main()
