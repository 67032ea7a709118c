"""Helpers shared by the benchmark scripts: server subprocesses, statistics, output.

Torch-free on purpose: the load generators and the cold-start poller must not compete with the
server they measure for CPU while it imports torch, so nothing here imports the model stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

# Token ids used for synthetic prompts: above the embedded tokenizer's special tokens (0..4) and
# below its vocabulary size (2048), so they are valid for the default model and for the
# make_checkpoint.py checkpoints (which reuse that tokenizer with a 128k-row embedding).
PROMPT_ID_LOW = 5
PROMPT_ID_HIGH = 2000


def random_prompt(rng: random.Random, n: int) -> list[int]:
    """`n` token ids drawn from `rng` in [PROMPT_ID_LOW, PROMPT_ID_HIGH): a synthetic prompt
    that shares no prefix with another (for the prefix cache) unless a bench builds one."""
    return [rng.randrange(PROMPT_ID_LOW, PROMPT_ID_HIGH) for _ in range(n)]


# Idle seconds before the benches' HTTP clients drop a pooled connection: below the server's
# `--keep-alive-timeout` (5 s). At equal timeouts a client can send a request on a connection
# at the moment the server closes it as idle, and that request fails with a ReadError instead
# of being answered (a bench then counts an error the server did not make).
CLIENT_KEEPALIVE_S = 2.0


def client_limits(connections: int):
    """httpx pool limits for `connections` concurrent requests (see CLIENT_KEEPALIVE_S)."""
    import httpx

    return httpx.Limits(max_connections=connections, max_keepalive_connections=connections,
                        keepalive_expiry=CLIENT_KEEPALIVE_S)


class BenchError(RuntimeError):
    """A benchmark step cannot go on (server did not start, bad arguments); message says why."""


# ============================================================================ processes
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m server serve ...` as a child process, with its log in a file.

    `started_at` is `time.perf_counter()` taken right before the fork/exec, so intervals measured
    from it include interpreter start-up, as an orchestrator's probes would see it. The child runs
    in its own session so a forced stop also reaches anything it spawned.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.args = ["--host", host, "--port", str(self.port), *args]
        self.command = [sys.executable, "-m", "server", "serve", *self.args]
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="graphserve-bench-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self._env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        # Another checkout's server (e.g. the previous design, measured in the same run).
        self._cwd = Path(cwd) if cwd is not None else REPO_ROOT
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.stopped_by: str | None = None

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it until it exits
        try:
            self.started_at = time.perf_counter()
            self.proc = subprocess.Popen(
                self.command,
                cwd=self._cwd,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        return self

    def since_start(self) -> float:
        if self.started_at is None:
            raise BenchError("server not started")
        return time.perf_counter() - self.started_at

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM (the server drains and exits), wait, then SIGKILL its session. Idempotent."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
                self.stopped_by = "sigterm"
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                self.stopped_by = "sigkill"
        return proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def wait_ready(
    client, server: ServerProcess, timeout_s: float, interval_s: float = 0.01
) -> float:
    """Poll `server`'s `/health/ready` with an httpx.AsyncClient until 200; return the
    `time.perf_counter()` at which the 200 arrived.

    Raises BenchError if the server exits, reports `failed`, or `timeout_s` passes.
    (cold_start.py polls by itself: it records every phase on the way, not just the end.)
    """
    import httpx

    deadline = time.perf_counter() + timeout_s
    body: dict[str, Any] = {}
    while time.perf_counter() < deadline:
        code = server.exited()
        if code is not None:
            raise BenchError(
                f"server exited with code {code} before ready; log tail:\n" + server.log_tail()
            )
        try:
            r = await client.get(f"{server.url}/health/ready", timeout=2.0)
            if r.status_code == 200:
                return time.perf_counter()
            body = _json_or_empty(r)
            if body.get("phase") == "failed":
                raise BenchError(f"server startup failed: {body.get('reason')}")
        except httpx.TransportError:
            pass
        await asyncio.sleep(interval_s)
    raise BenchError(
        f"server not ready after {timeout_s:.0f} s (last answer: {body}); log tail:\n"
        + server.log_tail()
    )


def _json_or_empty(response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def graph_mode_effective(graphs: dict[str, Any]) -> str | None:
    """The capture mode the server actually runs ("off" on CPU even when lazy was asked)."""
    return graphs.get("mode")


def coverage_complete(graphs: dict[str, Any]) -> bool:
    """True once every configured graph size is captured (or failed, which ends capture too)."""
    cov = graphs.get("coverage") or {}
    return bool(graphs.get("complete")) or cov.get("ratio") == 1


def traffic_of(graphs: dict[str, Any]) -> dict[str, Any]:
    t = graphs.get("traffic") or {}
    return {k: t.get(k) for k in ("exact_steps", "padded_steps", "eager_steps", "hit_rate")}


def traffic_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Decode steps by kind between two /health/graphs snapshots, and the exact-hit rate."""
    out: dict[str, Any] = {}
    for k in ("exact_steps", "padded_steps", "eager_steps"):
        a, b = after.get(k), before.get(k)
        out[k] = None if a is None or b is None else a - b
    total = sum(v for v in out.values() if v is not None)
    out["hit_rate"] = (
        (out["exact_steps"] / total) if total and out["exact_steps"] is not None else None
    )
    return out


# ============================================================================ statistics
def drop_from_page_cache(path: str | os.PathLike[str]) -> None:
    """Evict a file's pages from the page cache (no root needed). Flushed first: the dirty
    pages of a file just written (a checkpoint made in the same run) cannot be dropped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between order statistics."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def summarize(values: Sequence[float], scale: float = 1.0) -> dict[str, Any]:
    """n, mean, p50, p90, p99, max of `values` multiplied by `scale` (e.g. 1e3 for ms)."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    xs = [v * scale for v in values]
    return {
        "n": len(xs),
        "mean": sum(xs) / len(xs),
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
        "max": max(xs),
    }


def median(values: Iterable[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return percentile(xs, 50) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ============================================================================ /metrics
def scrape_histograms(client, url: str, names: Sequence[str]) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts {le: count} of the named Prometheus histograms at `url/metrics`.

    Missing metrics (or an unreachable endpoint) give empty dicts: the server-side latency view is
    a cross-check, never a reason to abort a benchmark.
    """
    try:
        r = client.get(f"{url}/metrics", timeout=5.0)
    except Exception:  # noqa: BLE001 - diagnostics only
        return {n: {} for n in names}
    return _histogram_buckets(r, names)


async def scrape_histograms_async(client, url: str, names: Sequence[str]):
    """Async twin of `scrape_histograms` for an httpx.AsyncClient."""
    try:
        r = await client.get(f"{url}/metrics", timeout=5.0)
    except Exception:  # noqa: BLE001 - diagnostics only
        return {n: {} for n in names}
    return _histogram_buckets(r, names)


def _histogram_buckets(response, names: Sequence[str]) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts `{name: {le: count}}`, summed over labels, of a /metrics answer."""
    out: dict[str, dict[float, float]] = {n: {} for n in names}
    if response.status_code != 200:
        return out
    try:
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(response.text):
            if family.name not in out:
                continue
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    out[family.name][le] = out[family.name].get(le, 0.0) + sample.value
    except Exception:  # noqa: BLE001 - diagnostics only
        return {n: {} for n in names}
    return out


def histogram_quantile(
    before: dict[float, float], after: dict[float, float], q: float
) -> float | None:
    """Quantile q (0..1) of the observations between two cumulative-bucket scrapes.

    Linear interpolation inside the bucket, as Prometheus' histogram_quantile does; an answer in
    the +Inf bucket is reported as the largest finite bound.
    """
    bounds = sorted(after)
    if not bounds:
        return None
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def histogram_count(before: dict[float, float], after: dict[float, float]) -> float:
    if not after:
        return 0.0
    top = max(after)
    return after[top] - before.get(top, 0.0)


def histogram_count_above(before: dict[float, float], after: dict[float, float],
                          bound: float) -> float | None:
    """Observations above `bound` (a bucket edge) between two scrapes; None when the
    scrape has no such bucket."""
    if bound not in after:
        return None
    return histogram_count(before, after) - (after[bound] - before.get(bound, 0.0))


# ============================================================================ output
def environment() -> dict[str, Any]:
    """Host facts worth keeping next to numbers (no torch import: see the module docstring)."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if r.returncode == 0:
            env["git"] = r.stdout.strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if r.returncode == 0:
            env["gpus"] = [line.strip() for line in r.stdout.splitlines() if line.strip()]
    env["bytecode_cached"] = bytecode_cached()
    return env


BYTECODE_PACKAGES = ("torch", "fastapi", "server")
# What a server imports on its way to ready, by top-level package (`compile_bytecode`).
STARTUP_PACKAGES = ("torch", "triton", "fastapi", "starlette", "pydantic", "uvicorn", "anyio",
                    "llguidance", "server")


def bytecode_cached(packages: Sequence[str] = BYTECODE_PACKAGES) -> dict[str, bool | None]:
    """Whether each package's `__init__` has a compiled bytecode file next to it (None: not
    installed). Without one every launch compiles the package's Python sources on import:
    on the H200 box, whose wheels go in with `--no-compile` under PYTHONDONTWRITEBYTECODE=1,
    that added ~3.3 s to an 8B server's exec -> ready (docs/benchmarks.md 9c). An image's
    `pip install` writes the bytecode; `python -m compileall` does it for a bare checkout.
    Looked up without importing anything."""
    out: dict[str, bool | None] = {}
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            out[name] = None
            continue
        out[name] = os.path.exists(importlib.util.cache_from_source(spec.origin))
    return out


def compile_bytecode(packages: Sequence[str] = STARTUP_PACKAGES) -> dict[str, Any]:
    """Write the bytecode of these installed packages, as an image's `pip install` does, so
    a launch measures what a container pays (`bytecode_cached`). Up-to-date files are
    skipped; a package that is missing or not writable is listed, not an error."""
    import compileall

    t0 = time.perf_counter()
    done, partly, missing = [], [], []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith("__init__.py"):
            missing.append(name)
            continue
        # False when any file did not compile (torch ships a few that are not Python 3 source
        # on purpose, or are templates); the rest were written all the same.
        ok = compileall.compile_dir(os.path.dirname(spec.origin), quiet=2,
                                    workers=os.cpu_count() or 1)
        (done if ok else partly).append(name)
    return {"compiled": done, "compiled_but_some_files_failed": partly, "missing": missing,
            "seconds": round(time.perf_counter() - t0, 2)}


def write_json(path: str | os.PathLike[str] | None, data: Any) -> None:
    """Write `data` to `path` via a temporary file, so a killed run never leaves half a file."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str, allow_nan=False))
    tmp.replace(path)


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def print_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Right-aligned text table; cells are strings already (use `fmt`)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def target(
    name: str,
    value: float | None,
    limit: float | None,
    *,
    lower_is_better: bool = True,
    detail: str = "",
) -> dict[str, Any]:
    """One PASS/FAIL check; `passed` is None (n/a) when either side could not be measured."""
    if value is None or limit is None:
        passed = None
    else:
        passed = value <= limit if lower_is_better else value >= limit
    return {
        "target": name,
        "value": value,
        "op": "<=" if lower_is_better else ">=",
        "limit": limit,
        "passed": passed,
        "detail": detail,
    }


def print_targets(targets: Sequence[dict[str, Any]], note: str = "") -> None:
    for t in targets:
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[t["passed"]]
        line = f"{verdict}  {t['target']}: {fmt(t['value'])}"
        if t["limit"] is not None:
            line += f" (needs {t['op']} {fmt(t['limit'])})"
        if t.get("detail"):
            line += f"  [{t['detail']}]"
        print(line + (f"  {note}" if note else ""))


def run_and_report(main_async, args, print_summary) -> None:
    """A bench's `main`: run `main_async(args)`, write its JSON to `args.out`, print its
    summary and its targets (a `BenchError` exits with the message, no traceback)."""
    try:
        result = asyncio.run(main_async(args))
    except BenchError as exc:
        raise SystemExit(f"error: {exc}") from None
    write_json(args.out, result)
    print_summary(result)
    print_targets(result["targets"], "(smoke: CPU numbers, not meaningful)" if args.smoke else "")
    if args.out:
        print(f"full results: {args.out}")
