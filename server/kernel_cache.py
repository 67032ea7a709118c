"""Seed Triton's kernel cache with kernels compiled ahead (`graphserve precompile-kernels`).

A container scaled from zero starts with an empty `TRITON_CACHE_DIR`: without help, Triton
JIT-compiles every kernel variant during the startup warm-ups (4.3-6.4 s measured for the 8B
on the H200) and gcc-builds a launcher stub per kernel signature. The image ships those
binaries, compiled on the build machine without a GPU (`server.kernel_precompile`), in a
read-only directory; at startup this module copies the entries the cache lacks into
`TRITON_CACHE_DIR` (the image's one is a writable emptyDir) before Triton looks anything up.

Why copy rather than point `TRITON_CACHE_DIR` at the shipped directory: Triton writes into its
cache (any variant that was not shipped) and the Kubernetes manifests mount the root read-only.
Why rewrite on copy: Triton 3.x records each kernel's files by *absolute* path in the entry's
`__grp__*.json` and treats an entry whose files are not at those paths as a miss.

Stdlib only, no torch or triton import: it runs beside the engine thread's `import torch` and
is joined before Triton's first lookup. Every failure is logged and ignored: Triton then
compiles what it lacks, as before.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

log = logging.getLogger("graphserve.kernels")

MANIFEST = "graphserve_kernels.json"  # written by server.kernel_precompile
KERNEL_CACHE_ENV = "GRAPHSERVE_KERNEL_CACHE"  # the image's shipped directory


@dataclass(frozen=True)
class SeedResult:
    copied: int  # entries copied into the cache
    present: int  # entries the cache already had
    seconds: float
    skipped: str | None = None  # why nothing was copied, if so


def triton_cache_dir() -> Path:
    """Where Triton looks: `TRITON_CACHE_DIR`, else its default under the home directory."""
    configured = os.environ.get("TRITON_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".triton" / "cache"


def runtime_fingerprint() -> dict[str, str | None]:
    """What the shipped keys were computed for: Triton hashes its own build (which differs per
    Python version) into every key, so kernels built under another Python or Triton all miss."""
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    return {"python": f"{sys.version_info[0]}.{sys.version_info[1]}", "triton": triton}


def seed_triton_cache(shipped: str | os.PathLike[str], cache: Path | None = None) -> SeedResult:
    """Copy the kernel entries of `shipped` that `cache` lacks, pointing their group files at
    their new place. Entries appear atomically (a temporary name, then a rename), so servers
    starting at once on one cache, or a Triton reading it meanwhile, never see half an entry."""
    t0 = time.perf_counter()
    src, dest = Path(shipped), cache or triton_cache_dir()
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return _skip(t0, f"no readable {MANIFEST} in {src}: {exc}")
    built_for = manifest.get("runtime") or {}
    here = runtime_fingerprint()
    if {k: built_for.get(k) for k in here} != here:
        return _skip(t0, f"built for {built_for}, this runtime is {here}: every key would miss")
    copied = present = 0
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for entry in sorted(p for p in src.iterdir() if p.is_dir()):
            target = dest / entry.name
            if target.exists():
                present += 1
                continue
            staging = dest / f".{entry.name}.seed-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(entry, staging)
            _point_groups_at(staging, target)
            try:
                os.rename(staging, target)
                copied += 1
            except OSError:  # another process published it first
                shutil.rmtree(staging, ignore_errors=True)
                present += 1
    except OSError as exc:
        return _skip(t0, f"copying into {dest} failed: {exc}", copied, present)
    return SeedResult(copied, present, time.perf_counter() - t0)


def _point_groups_at(staging: Path, final: Path) -> None:
    for group in staging.glob("__grp__*.json"):
        data = json.loads(group.read_text())
        paths = data.get("child_paths")
        if isinstance(paths, dict):
            data["child_paths"] = {k: str(final / Path(p).name) for k, p in paths.items()}
            group.write_text(json.dumps(data))


def _skip(t0: float, reason: str, copied: int = 0, present: int = 0) -> SeedResult:
    return SeedResult(copied, present, time.perf_counter() - t0, reason)


class Seeding:
    """A seeding in progress: `join()` waits for its end (at most `timeout` seconds)."""

    def __init__(self, proc: subprocess.Popen | None = None,
                 thread: threading.Thread | None = None):
        self._proc = proc
        self._thread = thread

    def join(self, timeout: float | None = None) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout)  # waitpid: the GIL is free meanwhile
            except subprocess.TimeoutExpired:
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._thread is not None and self._thread.is_alive()


def start_seeding(shipped: str | None) -> Seeding | None:
    """`seed_from_config` in a process of its own (None when nothing is configured; a thread
    if the process cannot start). Join it before Triton's first lookup.

    Why a process: the copy is many small file operations, each of which gives up the GIL and
    must win it back. On a thread beside the engine's `import torch` each of them waited out
    the import's switch interval: 53 entries took 1.8-2.3 s on the H200 box, longer than the
    import itself, so the engine waited for it (docs/benchmarks.md 8r). Alone it takes tens of
    milliseconds.
    """
    if not (shipped or os.environ.get(KERNEL_CACHE_ENV)):
        return None
    from server.child_process import spawn_module

    try:
        proc = spawn_module("server.kernel_cache", *([shipped] if shipped else []))
    except OSError as exc:
        log.info("kernel seeding on a thread (no process: %s)", exc)
        thread = threading.Thread(target=seed_from_config, args=(shipped,),
                                  name="graphserve-kernel-seed", daemon=True)  # fmt: skip
        thread.start()
        return Seeding(thread=thread)
    return Seeding(proc=proc)


def seed_from_config(shipped: str | None) -> SeedResult | None:
    """The engine's startup hook: seed from `--kernel-cache` (default: $GRAPHSERVE_KERNEL_CACHE)
    and log one line. None when no shipped directory is configured."""
    shipped = shipped or os.environ.get(KERNEL_CACHE_ENV)
    if not shipped:
        return None
    try:
        result = seed_triton_cache(shipped)
    except Exception as exc:  # never fail a start over an optimisation: Triton compiles instead
        log.warning("kernels compiled ahead not used: %s: %s", type(exc).__name__, exc)
        return None
    if result.skipped:
        log.warning("kernels compiled ahead not used: %s", result.skipped)
    else:
        log.info("Triton cache %s: %d kernel entries copied from %s, %d already there (%.0f ms)",
                 triton_cache_dir(), result.copied, shipped, result.present,
                 result.seconds * 1e3)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m server.kernel_cache [DIR]`: the seeding process (`start_seeding`)."""
    from server.child_process import child_arguments, start_logging

    ap = child_arguments("server.kernel_cache")
    ap.add_argument("shipped", nargs="?", default=None)
    args = ap.parse_args(argv)
    start_logging(args)
    seed_from_config(args.shipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
