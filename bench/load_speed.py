"""Weight-loading speed: the pipeline vs the old safetensors path vs the box's limits, one process.

Sections, in order (each skipped once `--time-budget-s` is spent, marked in the JSON):

1. checkpoint: made with bench/make_checkpoint.py unless `--ckpt` already holds one;
2. import overlap (fresh subprocesses, the page cache warmed first by `server.prefetch` at
   full speed): `import torch` + CUDA init alone, with the page-cache warmer running (with a
   warm page cache it only checks residency), and
   with 8 threads filling anonymous memory with the checkpoint (what handing bytes over to
   the pipeline would cost the import);
3. limits (the technique of shared/probes/load_limit.py): pinned H2D, page-cache reads with 1
   and 8 threads, a bare read -> pinned -> GPU pipeline into one flat buffer (8, 16 threads);
4. loads into `DecoderModel` (q/k/v and gate/up fused, as the server does): the old
   `SafetensorsWeights` and `PipelinedWeights` over a threads x chunk grid, each run twice
   (each pays its pinned staging allocation: the pipeline releases it), plus the pipeline as a
   bare weight source and the server's whole `load_checkpoint` (tokenizer included);
5. handover proxy: the checkpoint pre-read into anonymous memory, then the pipeline copying
   from there instead of pread (the best a prefetch-into-memory design could do after import);
6. `--cold`: page cache dropped for the checkpoint (posix_fadvise DONTNEED, no root needed),
   then exec -> torch imported -> weights loaded, without and with the warmer.

    python3 -m bench.load_speed --out /tmp/load-speed-8b.json               # H200: ~2.5 min
    python3 -m bench.load_speed --ckpt /tmp/tiny --device cpu --out /tmp/x.json   # smoke
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT as REPO
from bench.common import drop_from_page_cache, environment, fmt, print_table, write_json

GB = 1e9
MIB = 2**20


def _files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def _total(ckpt: Path) -> int:
    return sum(f.stat().st_size for f in _files(ckpt))


# -- section 2 and 6: subprocesses ------------------------------------------------------------

_CHILD = r"""
import json, os, sys, threading, time, mmap
t0 = time.perf_counter()
ckpt, mode, device, dtype = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[7]
out = {"mode": mode}
warmer = None
if mode == "warmer":
    from server import prefetch
    warmer = prefetch.start(ckpt, threads=int(sys.argv[5]))
elif mode == "anon":
    files = sorted(os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    jobs = [(f, off) for f in files for off in range(0, os.path.getsize(f), 64 << 20)]
    lock, bufs, done = threading.Lock(), [], [None]
    def fill():
        while True:
            with lock:
                if not jobs: return
                f, off = jobs.pop()
            n = min(64 << 20, os.path.getsize(f) - off)
            m = mmap.mmap(-1, n)
            fd = os.open(f, os.O_RDONLY)
            try: os.preadv(fd, [memoryview(m)], off)
            finally: os.close(fd)
            bufs.append(m)
    def run():
        ths = [threading.Thread(target=fill) for _ in range(8)]
        [t.start() for t in ths]; [t.join() for t in ths]
        done[0] = time.perf_counter() - t0
    threading.Thread(target=run, daemon=True).start()
import torch
out["import_torch_s"] = time.perf_counter() - t0
if device == "cuda":
    t1 = time.perf_counter(); torch.zeros(1, device="cuda"); torch.cuda.synchronize()
    out["cuda_init_s"] = time.perf_counter() - t1
if warmer is not None:
    out["warmer_at_import"] = dict(vars(warmer.stats))
if mode == "anon":
    out["anon_filled_at_import_GB"] = sum(len(b) for b in bufs) / 1e9
    while done[0] is None: time.sleep(0.01)
    out["anon_fill_done_s"] = done[0]
if sys.argv[6] == "read":
    # The read side of the GPU pipeline alone: 8 threads pread every byte into reused buffers.
    t1 = time.perf_counter()
    files = sorted(os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    jobs = [(f, off) for f in files for off in range(0, os.path.getsize(f), 32 << 20)]
    lock = threading.Lock()
    def reader():
        buf = memoryview(bytearray(32 << 20))
        while True:
            with lock:
                if not jobs: return
                f, off = jobs.pop(0)
            fd = os.open(f, os.O_RDONLY)
            try: os.preadv(fd, [buf], off)
            finally: os.close(fd)
    ths = [threading.Thread(target=reader) for _ in range(8)]
    [t.start() for t in ths]; [t.join() for t in ths]
    out["read_s"] = time.perf_counter() - t1
if sys.argv[6] == "load":
    from server.model_loader import load_checkpoint
    t1 = time.perf_counter()
    ckpt_obj = load_checkpoint(ckpt, device, dtype)
    if device == "cuda": torch.cuda.synchronize()
    out["load_checkpoint_s"] = time.perf_counter() - t1
    out["load_stats"] = ckpt_obj.load_stats
out["exec_to_done_s"] = time.perf_counter() - t0
print("CHILD " + json.dumps(out, default=str))
"""


def run_child(ckpt: Path, mode: str, device: str, threads: int, consumer: str = "-",
              timeout: float = 120, dtype: str = "auto") -> dict[str, Any]:
    argv = [sys.executable, "-c", _CHILD, str(REPO), str(ckpt), mode, device, str(threads),
            consumer, dtype]
    t0 = time.perf_counter()
    # The child imports `server` from the checkout: it runs there, with the checkout on its path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    for line in r.stdout.splitlines():
        if line.startswith("CHILD "):
            out = json.loads(line[6:])
            out["wall_s"] = wall
            return out
    return {"mode": mode, "error": (r.stderr or r.stdout)[-2000:]}


def evict(ckpt: Path) -> bool:
    """Drop the checkpoint's pages from the page cache; True if it worked."""
    from server.prefetch import _residency

    for f in _files(ckpt):
        drop_from_page_cache(f)
    vec = [_residency(f) for f in _files(ckpt)]
    return all(v is not None for v in vec) and sum(sum(v) for v in vec) < 0.05 * sum(
        len(v) for v in vec)


# -- section 3: the box's limits (shared/probes/load_limit.py's technique) ----------------------


def limits(ckpt: Path, device: str) -> dict[str, Any]:
    import torch

    files = [str(f) for f in _files(ckpt)]
    total = _total(ckpt)
    res: dict[str, Any] = {}
    chunk = 64 * MIB

    def read_all(nthreads: int) -> float:
        jobs = [(f, off) for f in files for off in range(0, os.path.getsize(f), chunk)]
        lock = threading.Lock()

        def worker():
            buf = bytearray(chunk)
            mv = memoryview(buf)
            while True:
                with lock:
                    if not jobs:
                        return
                    f, off = jobs.pop()
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.preadv(fd, [mv], off)
                finally:
                    os.close(fd)

        t = time.perf_counter()
        ths = [threading.Thread(target=worker) for _ in range(nthreads)]
        [x.start() for x in ths]
        [x.join() for x in ths]
        return total / (time.perf_counter() - t) / GB

    read_all(8)  # all in the page cache
    res["read_pagecache_1t_GBps"] = read_all(1)
    res["read_pagecache_8t_GBps"] = read_all(8)
    if device != "cuda":
        return res
    n = 1 << 30
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    d.copy_(h, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(8):
        d.copy_(h, non_blocking=True)
    torch.cuda.synchronize()
    res["h2d_pinned_GBps"] = 8 * n / (time.perf_counter() - t) / GB
    del h, d
    def pipeline(nthreads: int, gpu) -> float:
        jobs, pos = [], 0
        for f in files:
            sz = os.path.getsize(f)
            for off in range(0, sz, chunk):
                jobs.append((f, off, pos + off, min(chunk, sz - off)))
            pos += sz
        lock = threading.Lock()

        def worker():
            s = torch.cuda.Stream()
            bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            views = [memoryview((ctypes.c_char * chunk).from_address(b.data_ptr())).cast("B")
                     for b in bufs]
            evs: list = [None, None]
            i = 0
            while True:
                with lock:
                    if not jobs:
                        break
                    f, off, dst, ln = jobs.pop()
                if evs[i % 2] is not None:
                    evs[i % 2].synchronize()
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.preadv(fd, [views[i % 2][:ln]], off)
                finally:
                    os.close(fd)
                with torch.cuda.stream(s):
                    gpu[dst:dst + ln].copy_(bufs[i % 2][:ln], non_blocking=True)
                    e = torch.cuda.Event()
                    e.record(s)
                    evs[i % 2] = e
                i += 1
            s.synchronize()

        t = time.perf_counter()
        ths = [threading.Thread(target=worker) for _ in range(nthreads)]
        [x.start() for x in ths]
        [x.join() for x in ths]
        torch.cuda.synchronize()
        return total / (time.perf_counter() - t) / GB

    flat = torch.empty(total, dtype=torch.uint8, device="cuda")
    res["probe_pipeline_8t_GBps"] = pipeline(8, flat)
    res["probe_pipeline_16t_GBps"] = pipeline(16, flat)
    del flat
    torch.cuda.empty_cache()
    # The probe's pinned buffers sit in torch's host cache: release them, or a pipeline run
    # with the same buffer size would skip paying for its pinning.
    from server.weight_pipeline import _empty_host_cache

    _empty_host_cache()
    return res


# -- section 4 and 5: loads -------------------------------------------------------------------


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def load_once(ckpt: Path, device: str, dtype_name: str, source: str, threads: int | None = None,
              chunk: int | None = None, model: bool = True, memory=None) -> dict[str, Any]:
    """One load into DecoderModel (or just every tensor taken, `model=False`); timed to the
    device having the bytes."""
    import torch

    from server.hf_config import load_config
    from server.model import DecoderModel
    from server.model_loader import resolve_dtype
    from server.safetensors_index import load_plan, read_checkpoint
    from server.weight_pipeline import DEFAULT_CHUNK_BYTES, PipelinedWeights
    from server.weights import SafetensorsWeights

    config = load_config(ckpt)
    dtype = resolve_dtype(dtype_name, device)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    _free(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if source == "safetensors":
        weights = SafetensorsWeights(ckpt, device, dtype)
    else:
        cls = PipelinedWeights if memory is None else _from_memory_class(memory)
        weights = cls(ckpt, device, dtype, threads=threads,
                      chunk_bytes=chunk or DEFAULT_CHUNK_BYTES, exclude=tied)
    try:
        if model:
            built = DecoderModel(config, weights)
            nbytes = built.weight_bytes
        else:
            plan = load_plan(read_checkpoint(ckpt), frozenset(tied))
            built = [weights.take(e.name, e.shape) for e in plan]
            nbytes = sum(t.numel() * t.element_size() for t in built)
        _sync(device)
        seconds = time.perf_counter() - t0
    finally:
        weights.close()
    out = {"source": source, "threads": threads, "chunk_MiB": (chunk or 0) // MIB or None,
           "model": model, "seconds": seconds, "GBps": _total(ckpt) / seconds / GB,
           "weight_bytes": nbytes}
    stats = getattr(weights, "stats", None)
    if stats is not None:
        out.update(staging_alloc_s=stats.staging_alloc_s, wait_s=stats.wait_s,
                   staging_MiB=stats.staging_bytes // MIB)
    if device == "cuda":
        out["peak_reserved_GB"] = torch.cuda.max_memory_reserved() / GB
        out["peak_over_weights_GB"] = out["peak_reserved_GB"] - nbytes / GB
    del built
    _free(device)
    return out


def _from_memory_class(memory: dict[Path, Any]):
    """A pipeline whose pieces come from anonymous memory (memmove, GIL released) not pread."""
    from server.weight_pipeline import PipelinedWeights

    addrs = {p: ctypes.addressof(ctypes.c_char.from_buffer(m)) for p, m in memory.items()}

    class FromMemory(PipelinedWeights):
        def _read(self, piece, dest):
            dst = ctypes.addressof(ctypes.c_char.from_buffer(dest))
            src = addrs[piece.slot.entry.path] + piece.offset
            for i in range(piece.runs):  # one run unless a tensor-parallel slice is planned
                ctypes.memmove(dst + i * piece.length, src + i * piece.stride, piece.length)

    return FromMemory


def fill_memory(ckpt: Path, threads: int = 8) -> tuple[dict[Path, Any], float]:
    files = _files(ckpt)
    mem = {f: mmap.mmap(-1, f.stat().st_size) for f in files}
    chunk = 64 * MIB
    jobs = [(f, off) for f in files for off in range(0, f.stat().st_size, chunk)]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not jobs:
                    return
                f, off = jobs.pop()
            view = memoryview(mem[f])[off:off + chunk]
            fd = os.open(f, os.O_RDONLY)
            try:
                os.preadv(fd, [view], off)
            finally:
                os.close(fd)
            view.release()

    t = time.perf_counter()
    ths = [threading.Thread(target=worker) for _ in range(threads)]
    [x.start() for x in ths]
    [x.join() for x in ths]
    return mem, time.perf_counter() - t


def full_loader(ckpt: Path, device: str, dtype: str) -> dict[str, Any]:
    from server.model_loader import load_checkpoint

    _free(device)
    t0 = time.perf_counter()
    ckpt_obj = load_checkpoint(str(ckpt), device, dtype)
    _sync(device)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "GBps": _total(ckpt) / seconds / GB, "loader": ckpt_obj.loader,
           "stats": ckpt_obj.load_stats}
    del ckpt_obj
    _free(device)
    return out


# -- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--shape", default="8b", choices=("1b", "8b"))
    ap.add_argument("--ckpt", default=None, help="checkpoint dir (made if absent; default "
                    "/tmp/llama-<shape>)")
    ap.add_argument("--device", default=None, choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                    help="target dtype (auto: the server's, bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--grid", default="16x32,8x32,16x16,16x64,8x64",
                    help="pipeline variants THREADSxCHUNK_MiB, the first is the default")
    ap.add_argument("--cold", action="store_true", help="also drop the page cache and time "
                    "exec -> weights loaded without and with the warmer")
    ap.add_argument("--cold-read", action="store_true", help="in --cold, time only the reads "
                    "(8 threads into reused buffers, the pipeline's read side) instead of the "
                    "whole load")
    ap.add_argument("--cold-repeats", type=int, default=2)
    ap.add_argument("--sections", default="overlap,limits,loads,memory",
                    help="comma-separated subset of overlap, limits, loads, memory (and --cold)")
    ap.add_argument("--time-budget-s", type=float, default=170.0)
    args = ap.parse_args()
    t_start = time.perf_counter()
    ckpt = Path(args.ckpt or f"/tmp/llama-{args.shape}")
    result: dict[str, Any] = {"env": environment(), "skipped": [], "args": vars(args)}

    def left() -> float:
        return args.time_budget_s - (time.perf_counter() - t_start)

    if not (ckpt / "config.json").is_file() or not _files(ckpt):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.make_checkpoint", "--shape",
                        args.shape, "--out", str(ckpt)], check=True, cwd=REPO)
        result["make_checkpoint_s"] = time.perf_counter() - t
    total = _total(ckpt)
    result["checkpoint"] = {"path": str(ckpt), "bytes": total, "files": len(_files(ckpt))}

    device = args.device or ("cuda" if _cuda_available() else "cpu")
    result["device"] = device
    grid = [tuple(int(x) for x in v.split("x")) for v in args.grid.split(",")]
    default_threads = grid[0][0]

    # 2: import overlap, fresh interpreters, warm page cache (made sure of first).
    overlap = []
    sections = set(args.sections.split(","))
    if "overlap" in sections:
        from server.prefetch import PageCacheWarmer

        warmer = PageCacheWarmer(ckpt, threads=8, start=False)
        warmer.run()
        warmer.wait()
        result["page_cache_warmup"] = dict(vars(warmer.stats))
    for mode in ("plain", "warmer", "anon", "plain") if "overlap" in sections else ():
        if left() < 60:
            result["skipped"].append(f"import_overlap:{mode}")
            continue
        overlap.append(run_child(ckpt, mode, device, 4))
    result["import_overlap"] = overlap

    # 3: limits (torch is imported in this process from here on).
    result["limits"] = limits(ckpt, device) if left() > 40 and "limits" in sections else None
    # 4: loads.
    loads = []
    plan = [("safetensors", None, None, True)]
    for threads, chunk in grid:
        plan += [("pipeline", threads, chunk * MIB, True)] * 2
    plan.append(("pipeline", default_threads, grid[0][1] * MIB, False))
    for source, threads, chunk, model in plan if "loads" in sections else ():
        if left() < 25:
            result["skipped"].append(f"load:{source}:{threads}x{chunk}")
            continue
        loads.append(load_once(ckpt, device, args.dtype, source, threads, chunk, model))
    result["loads"] = loads
    result["load_checkpoint"] = [full_loader(ckpt, device, args.dtype) for _ in range(2)] \
        if left() > 20 and "loads" in sections else None

    # 5: handover proxy.
    if left() > 20 and "memory" in sections:
        memory, fill_s = fill_memory(ckpt)
        r = load_once(ckpt, device, args.dtype, "pipeline-from-memory", default_threads,
                      grid[0][1] * MIB, True, memory=memory)
        r["anon_fill_s"] = fill_s
        r["anon_fill_GBps"] = total / fill_s / GB
        result["from_memory"] = r
        del memory
    else:
        result["skipped"].append("from_memory")

    # 6: cold page cache: exec -> import -> the whole load, or only its reads (--cold-read).
    if args.cold:
        cold = []
        for mode in ("plain", "warmer") * args.cold_repeats:
            if left() < 30 or not evict(ckpt):
                result["skipped"].append(f"cold:{mode}")
                continue
            cold.append(run_child(ckpt, mode, device, 4, timeout=max(30, left()),
                                  consumer="read" if args.cold_read else "load",
                                  dtype=args.dtype))
        result["cold"] = cold

    result["total_s"] = time.perf_counter() - t_start
    report(result)
    write_json(args.out, result)
    return 0


def _cuda_available() -> bool:
    import torch  # this process needs it later anyway; the subprocesses import their own

    return torch.cuda.is_available()


def report(r: dict[str, Any]) -> None:
    ck = r["checkpoint"]
    print(f"\ncheckpoint {ck['path']}: {ck['bytes'] / GB:.2f} GB in {ck['files']} file(s), "
          f"device {r['device']}")
    print("\nimport overlap (fresh process, warm page cache):")
    print_table(["mode", "import torch s", "cuda init s", "note"], [
        [o.get("mode"), fmt(o.get("import_torch_s"), ".2f"), fmt(o.get("cuda_init_s"), ".2f"),
         o.get("error", "")[-60:] if o.get("error") else
         (f"anon filled {o['anon_filled_at_import_GB']:.1f} GB by import end, all at "
          f"{o['anon_fill_done_s']:.2f} s" if o.get("mode") == "anon" else
          (f"resident {o['warmer_at_import']['resident_bytes'] / GB:.1f} of "
           f"{o['warmer_at_import']['planned_bytes'] / GB:.1f} GB" if o.get("mode") == "warmer"
           else ""))]
        for o in r.get("import_overlap") or []])
    if r.get("limits"):
        print("\nlimits: " + ", ".join(f"{k} {v:.1f}" for k, v in r["limits"].items()))
    print("\nloads (GB/s over the checkpoint's bytes):")
    rows = [[x["source"], x["threads"] or "", x["chunk_MiB"] or "", "model" if x["model"]
             else "tensors", fmt(x["seconds"], ".2f"), fmt(x["GBps"], ".1f"),
             fmt(x.get("staging_alloc_s"), ".3f"), fmt(x.get("wait_s"), ".2f"),
             fmt(x.get("peak_over_weights_GB"), ".2f")]
            for x in (r.get("loads") or []) + ([r["from_memory"]] if r.get("from_memory") else [])]
    print_table(["source", "threads", "chunk MiB", "into", "s", "GB/s", "pin alloc s",
                 "waited s", "peak-weights GB"], rows)
    if r.get("from_memory"):
        fm = r["from_memory"]
        print(f"(from-memory: the anonymous copy took {fm['anon_fill_s']:.2f} s to fill, "
              f"{fm['anon_fill_GBps']:.1f} GB/s with 8 threads)")
    for x in r.get("load_checkpoint") or []:
        print(f"load_checkpoint (tokenizer + weights): {x['seconds']:.2f} s, {x['GBps']:.1f} GB/s")
    for c in r.get("cold") or []:
        pre = c.get("warmer_at_import") or {}
        print(f"cold page cache, {c.get('mode')}: exec -> done "
              f"{fmt(c.get('exec_to_done_s'), '.2f')} s (import "
              f"{fmt(c.get('import_torch_s'), '.2f')} s, then load "
              f"{fmt(c.get('load_checkpoint_s'), '.2f')} s / read {fmt(c.get('read_s'), '.2f')} s"
              f"; warmer had read {pre.get('read_bytes', 0) / GB:.2f} GB by import end) "
              f"{c.get('error', '')[-200:]}")
    if r["skipped"]:
        print("skipped (time budget or no eviction):", ", ".join(r["skipped"]))
    print(f"total {r['total_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
