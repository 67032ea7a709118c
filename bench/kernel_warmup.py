"""Kernels compiled ahead vs JIT: the server's startup warm-ups for a model shape, on the GPU,
with an empty Triton cache (a fresh container) and with one seeded from
`graphserve precompile-kernels` — the baseline and the candidate in the same run.

Each case runs in a fresh process (Triton keeps compiled kernels in memory too): it points
`TRITON_CACHE_DIR` at a new directory (seeded through `server.kernel_cache`, as the server does,
or left empty), runs `server.kernel_precompile.drive_startup` on CUDA with the Triton kernels
(real launches), and counts what Triton compiled (its compilation listener's cache misses) and
the C modules it gcc-built (launcher stubs, its CUDA utilities), with the wall time.

    python -m bench.kernel_warmup --preset llama-3.1-8b --out bench/results/kernel-warmup-8b.json
    python -m bench.kernel_warmup --model /tmp/llama-8b --kernels /opt/graphserve/kernels

Without `--kernels` the cache is first compiled here, in a process that sees no GPU
(`CUDA_VISIBLE_DEVICES=`), as an image build would. Target: the seeded case compiles nothing
and builds nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import environment, print_table, print_targets, target, write_json

_CASE = """
import json, sys, time
import torch
import triton.runtime.build as build
from triton import knobs
from server import ops
from server.kernel_precompile import drive_startup

raw, out = json.loads(sys.argv[1]), sys.argv[2]
compiles, gcc = [], []
knobs.compilation.listener = lambda *, cache_hit, **_: compiles.append(cache_hit)
_build = build._build
def counted(name, *args, **kwargs):
    t0 = time.perf_counter()
    so = _build(name, *args, **kwargs)
    gcc.append([name, time.perf_counter() - t0])
    return so
build._build = counted
assert ops.use_triton(True), "triton kernels unavailable"
t0 = time.perf_counter()
drive_startup(raw, device="cuda")
torch.cuda.synchronize()
json.dump({"warmups_s": time.perf_counter() - t0, "compile_calls": len(compiles),
           "compiled": compiles.count(False), "gcc_builds": gcc,
           "device": torch.cuda.get_device_name(), "torch": torch.__version__},
          open(out, "w"))
"""


def child_env() -> dict[str, str]:
    """This environment, with the repository importable by child processes."""
    repo = str(Path(__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [repo, os.environ.get("PYTHONPATH")])))  # fmt: skip


def run_case(raw: dict, cache: Path, seed: Path | None, env: dict[str, str]) -> dict[str, Any]:
    """One fresh process: seed (or not) `cache`, then the warm-ups on CUDA against it."""
    from server.kernel_cache import seed_triton_cache

    seeded = seed_triton_cache(seed, cache) if seed is not None else None
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", _CASE, json.dumps(raw), out.name], check=True,
                       env=dict(env, TRITON_CACHE_DIR=str(cache)), timeout=600)  # fmt: skip
        result = json.loads(Path(out.name).read_text())
    result["process_s"] = time.perf_counter() - t0
    if seeded is not None:
        result["seeded"] = {"copied": seeded.copied, "seconds": seeded.seconds,
                            "skipped": seeded.skipped}  # fmt: skip
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--preset", default=None, help="a precompile-kernels preset name")
    ap.add_argument("--model", default=None, help="a checkpoint directory (its config.json)")
    ap.add_argument("--kernels", default=None, metavar="DIR",
                    help="kernels compiled ahead (default: compile them here, GPU hidden)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args()

    from server.kernel_precompile import shapes_from

    shapes = shapes_from([args.preset] if args.preset else [], [args.model] if args.model else [])
    (label, raw), *rest = shapes.items()
    if rest:
        ap.error("name one --preset or --model")
    env = child_env()
    result: dict[str, Any] = {"script": "kernel_warmup", "shape": label, "args": vars(args),
                              "environment": environment(), "cases": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="graphserve-kernel-warmup-") as tmp:
        kernels = Path(args.kernels) if args.kernels else Path(tmp, "shipped")
        if not args.kernels:
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "server", "precompile-kernels", "--out", str(kernels)]
            cmd += ["--preset", args.preset] if args.preset else ["--model", args.model]
            subprocess.run(cmd, check=True, env=dict(env, CUDA_VISIBLE_DEVICES=""), timeout=900)
            result["precompile_s"] = time.perf_counter() - t0
        for case, seed in (("empty cache", None), ("kernels compiled ahead", kernels)):
            result["cases"][case] = run_case(raw, Path(tmp, case.replace(" ", "-")), seed, env)
    cases = result["cases"]
    rows = [[name, c["compiled"], len(c["gcc_builds"]), f"{c['warmups_s']:.2f}",
             f"{c['process_s']:.2f}"] for name, c in cases.items()]  # fmt: skip
    print(f"{label}: the server's startup warm-ups on {cases['empty cache']['device']} "
          f"(torch {cases['empty cache']['torch']})")
    print_table(("Triton cache", "kernels compiled", "gcc builds", "warm-ups s", "process s"),
                rows)  # fmt: skip
    empty, ahead = cases["empty cache"], cases["kernels compiled ahead"]
    result["targets"] = [
        target("kernels compiled with the cache seeded", ahead["compiled"], 0),
        target("launcher stubs gcc-built with the cache seeded", len(ahead["gcc_builds"]), 0),
        target("warm-ups seeded vs empty (ratio)", ahead["warmups_s"] / empty["warmups_s"], 0.5),
    ]
    write_json(args.out, result)
    print_targets(result["targets"])


if __name__ == "__main__":
    main()
