"""What survives a restart (`--state-dir`): the decode batch-size demand and startup timings.

A server restarts into the same traffic it left: the batch sizes its decode steps wanted last
time are the ones worth capturing first this time. One JSON file per model directory
(`capture-plan-<hash of the model path>.json`) holds

* a fingerprint of everything that makes the plan valid: the model path and a hash of its
  config.json, max_num_seqs, the capture sizes, dtype, graph mode, torch and graphserve
  versions, the GPU name. A file whose fingerprint differs is *stale* and ignored;
* `demand`: per capture size, how many decode steps wanted it (their exact size), summed over
  runs with older runs' counts halved at every restart (`DECAY`), so the plan follows traffic
  that changes;
* `startup_timings`: the last `MAX_RUNS` runs' phase timings and capture times.

A missing, stale or corrupt file is ignored with one log line and replaced at the next save.
Writes are atomic (a temporary file in the same directory, fsync, `os.replace`), so a crash or
a second replica writing the same file never leaves a torn one; the last writer wins.

Torch-free and free of policy logic: `CapturePlanStore` is file IO only and `PlanKeeper` moves
data between it and `CapturePolicy.apply_saved_plan` / `demand_histogram`. Thread ownership:
the engine thread calls `PlanKeeper.maybe_save(idle=...)` between steps (a save is due only
when idle, at most every `SAVE_PERIOD_S`, and right after the capture plan completes) and
`close()` at shutdown; the write itself, fsync included, runs on the keeper's writer thread.
Why: the first save comes in the engine's first idle moment after ready, which is when a client
waiting for readiness sends its first request, and an fsync can take long on a busy disk or a
network volume (the K8s manifests put the state dir on one). The rare 0.64 and 1.1 s first
answers after ready (docs/benchmarks.md 8p) may have waited in that stretch of the engine loop;
an fsync there could not be made slow on purpose (12 launches under forced writeback), so it
is a candidate cause, not a proven one. Either way no file IO is left on the serving thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("graphserve.state")

STATE_VERSION = 1
DECAY = 0.5
MAX_RUNS = 10
SAVE_PERIOD_S = 60.0
CLOSE_FLUSH_S = 5.0  # at shutdown, the longest `close()` waits for the last write
SLOW_WRITE_S = 0.1  # a write (fsync included) slower than this is logged


def default_state_dir() -> Path:
    """`$XDG_CACHE_HOME/graphserve`, else `~/.cache/graphserve` (the XDG default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graphserve"


def resolve_state_dir(setting: str | None) -> Path | None:
    """The directory for `--state-dir` (None: the default; "": keep no state -> None)."""
    if setting == "":
        return None
    return Path(setting).expanduser() if setting is not None else default_state_dir()


def config_sha256(model_dir: Path) -> str | None:
    try:
        return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass
class SavedPlan:
    """A plan file as read at startup. `status`: loaded, missing, stale or corrupt."""

    status: str
    path: Path
    demand: dict[int, float] = field(default_factory=dict)
    runs: int = 0
    saved_at: float | None = None  # wall-clock seconds
    startup_timings: list[dict] = field(default_factory=list)
    reason: str | None = None

    def report(self) -> dict[str, Any]:
        """The `saved_plan` block of /health/graphs (the policy adds the order it derived)."""
        return {
            "status": self.status,
            "path": str(self.path),
            "reason": self.reason,
            "runs": self.runs,
            "saved_at": self.saved_at,
            "previous_startup": self.startup_timings[-1] if self.startup_timings else None,
        }


class CapturePlanStore:
    """The plan file of one model in `state_dir`; pure file IO, no policy."""

    def __init__(self, state_dir: Path, model_key: str, fingerprint: dict[str, Any]):
        self.state_dir = Path(state_dir)
        digest = hashlib.sha256(model_key.encode()).hexdigest()[:16]
        self.path = self.state_dir / f"capture-plan-{digest}.json"
        self.fingerprint = json.loads(json.dumps(fingerprint))  # plain JSON types, comparable

    def load(self) -> SavedPlan:
        """Read the plan; never raises. Anything but a valid matching file logs one line."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            log.info("no saved capture plan at %s: idle captures go largest first", self.path)
            return SavedPlan("missing", self.path)
        except (OSError, UnicodeDecodeError) as exc:
            return self._ignored("corrupt", f"unreadable: {exc}")
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError(f"not a version-{STATE_VERSION} plan file")
            if data.get("fingerprint") != self.fingerprint:
                old = data.get("fingerprint")
                old = old if isinstance(old, dict) else {}
                changed = sorted(k for k in set(old) | set(self.fingerprint)
                                 if old.get(k) != self.fingerprint.get(k))
                return self._ignored("stale", f"written for another setup ({', '.join(changed)} "
                                     "differ)")
            plan = SavedPlan("loaded", self.path, demand=_demand(data.get("demand")),
                             runs=_count(data.get("runs")), saved_at=_number(data.get("saved_at")),
                             startup_timings=_timings(data.get("startup_timings")))
        except (ValueError, TypeError) as exc:
            return self._ignored("corrupt", str(exc))
        log.info("capture plan from %d earlier run(s) loaded from %s", plan.runs, self.path)
        return plan

    def _ignored(self, status: str, why: str) -> SavedPlan:
        log.warning("ignoring the saved capture plan %s: %s", self.path, why)
        return SavedPlan(status, self.path, reason=why)

    def save(self, demand: dict[int, float], runs: int, startup_timings: list[dict]) -> None:
        """Write atomically; raises OSError (the caller decides how loud to be)."""
        data = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "saved_at": time.time(),
            "runs": runs,
            "demand": {str(s): round(d, 3) for s, d in sorted(demand.items()) if d > 0},
            "startup_timings": startup_timings[-MAX_RUNS:],
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".capture-plan-", suffix=".tmp", dir=self.state_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # atomic: readers see the old file or the new one
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _count(value) -> int:
    number = _number(value)
    if number is None or number < 0:
        raise ValueError(f"runs must be a count, got {value!r}")
    return int(number)


def _demand(value) -> dict[int, float]:
    if not isinstance(value, dict):
        raise ValueError("demand is not an object")
    out = {}
    for size, count in value.items():
        number = _number(count)
        if not str(size).isdigit() or number is None or number < 0:
            raise ValueError(f"bad demand entry {size!r}: {count!r}")
        out[int(size)] = number
    return out


def _timings(value) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError("startup_timings is not a list of objects")
    return value


class _Writer:
    """One daemon thread writing the latest plan handed to it (`submit`): the file IO and its
    fsync never run on the engine thread. A plan submitted while another waits replaces it
    (only the newest matters); `flush` waits until nothing is queued or being written.
    Thread ownership: `submit` and `flush` from the engine thread; the thread it starts
    (at the first submit) only calls `store.save` and `on_error`."""

    def __init__(self, store: CapturePlanStore, on_error):
        self._store = store
        self._on_error = on_error
        self._cond = threading.Condition()
        self._pending: tuple | None = None
        self._writing = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    def submit(self, args: tuple) -> None:
        with self._cond:
            self._stopping = False
            self._pending = args
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="graphserve-state-writer",
                                                daemon=True)  # fmt: skip
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the queued and in-progress writes; False if `timeout` ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._writing,
                                       timeout)

    def stop(self) -> None:
        """Let the thread end once nothing is queued (a later `submit` starts another)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._stopping)
                if self._pending is None:  # stopping, nothing left to write
                    self._thread = None
                    return
                args, self._pending = self._pending, None
                self._writing = True
            t0 = time.perf_counter()
            try:
                self._store.save(*args)
            except (OSError, TypeError, ValueError) as exc:
                self._on_error(exc)
            else:
                seconds = time.perf_counter() - t0
                if seconds >= SLOW_WRITE_S:  # what the engine thread no longer waits for
                    log.info("capture plan written to %s in %.2f s (off the engine thread)",
                             self._store.path, seconds)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()


class PlanKeeper:
    """Feeds the saved plan to the policy at start and saves this run's demand. Engine thread
    (the writes go to a `_Writer` thread of its own).

    `policy`: a `CapturePolicy`; `run_info()`: this run's timings as a JSON-able dict, called at
    each save (so it reflects the latest captures).
    """

    def __init__(self, store: CapturePlanStore, policy, run_info, *, clock=time.monotonic,
                 period_s: float = SAVE_PERIOD_S):
        self.store = store
        self._policy = policy
        self._run_info = run_info
        self._clock = clock
        self._period_s = period_s
        self._run_id = uuid.uuid4().hex[:12]
        self._prior = SavedPlan("missing", store.path)
        self._last_save: float | None = None
        self._saved_state: tuple | None = None
        # One failed write: stop trying (and logging) for this run. Set by the writer thread.
        self._broken = False
        self._writer = _Writer(store, self._write_failed)

    def start(self) -> SavedPlan:
        self._prior = self.store.load()
        self._policy.apply_saved_plan(self._prior.demand, self._prior.report())
        return self._prior

    def merged_demand(self) -> dict[int, float]:
        """The prior runs' demand, decayed once for this restart, plus this run's."""
        merged = {s: d * DECAY for s, d in self._prior.demand.items()}
        for size, count in self._policy.demand_histogram().items():
            merged[size] = merged.get(size, 0.0) + count
        return merged

    def maybe_save(self, idle: bool) -> bool:
        """While idle only: save if something changed and either the capture plan just
        completed or the last save is `period_s` old. Cheap when there is nothing to do."""
        if self._broken or not idle:
            return False
        state = (self._policy.complete, tuple(sorted(self._policy.demand_histogram().items())))
        if state == self._saved_state:
            return False
        completed = state[0] and (self._saved_state is None or not self._saved_state[0])
        due = self._last_save is None or self._clock() - self._last_save >= self._period_s
        if not (completed or due):
            return False
        return self._save(state)

    def close(self, timeout: float = CLOSE_FLUSH_S) -> bool:
        """At shutdown: save whatever changed since the last save and wait (up to `timeout`)
        for the writes; True if this call saved something and every write so far succeeded."""
        if self._broken:
            self._writer.stop()
            return False
        state = (self._policy.complete, tuple(sorted(self._policy.demand_histogram().items())))
        saved = state != self._saved_state and self._save(state)
        flushed = self.flush(timeout)
        self._writer.stop()  # its thread ends after the last write
        if not flushed:
            log.warning("the capture plan's last write to %s did not finish within %.0f s",
                        self.store.path, timeout)
            return False
        return saved and not self._broken

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the queued writes are done (tests, shutdown); False on timeout."""
        return self._writer.flush(timeout)

    def _save(self, state: tuple) -> bool:
        """Hand this run's plan to the writer thread (callers checked `_broken`); True."""
        timings = [t for t in self._prior.startup_timings if t.get("run_id") != self._run_id]
        timings.append({"run_id": self._run_id, "started_at": time.time(), **self._run_info()})
        self._writer.submit((self.merged_demand(), self._prior.runs + 1, timings))
        self._saved_state = state
        self._last_save = self._clock()
        return True

    def _write_failed(self, exc: Exception) -> None:
        """Writer thread: saving must never stop serving; one warning, no more attempts."""
        if not self._broken:
            self._broken = True
            log.warning("cannot save the capture plan to %s (%s); not trying again this run",
                        self.store.path, exc)


def open_plan_keeper(config, runner) -> PlanKeeper | None:
    """The keeper for a loaded `server.model_runner.ModelRunner`, started; None when no state is
    kept (`--state-dir ""`) or graphs are off (nothing to plan: CPU, `--graph-capture off`).

    Reads `runner.checkpoint.path`, `.max_num_seqs`, `.policy`, `.model.dtype`, `.timings` and
    `.graphs.device_info()`; torch is already imported when this runs, its version is read from
    `sys.modules`, so this module still imports nothing heavy.
    """
    import sys

    from server import __version__

    state_dir = resolve_state_dir(config.state_dir)
    policy = runner.policy
    if state_dir is None or policy.mode == "off":
        return None
    model_dir = Path(runner.checkpoint.path).resolve()
    torch_mod = sys.modules.get("torch")
    fingerprint = {
        "model": str(model_dir),
        "config_sha256": config_sha256(model_dir),
        "load_format": config.load_format,
        "max_num_seqs": runner.max_num_seqs,
        "capture_sizes": list(policy.sizes),
        "dtype": str(runner.model.dtype),
        "graph_capture": config.graph_capture,
        "torch": getattr(torch_mod, "__version__", None),
        "graphserve": __version__,
        "device": runner.graphs.device_info().get("name"),
        # Every rank captures the same sizes, but what a capture costs depends on the group.
        "tensor_parallel_size": config.tensor_parallel_size,
    }

    def run_info() -> dict:
        snap = policy.snapshot()
        return {
            "timings_s": dict(runner.timings),
            "policy_timings_s": snap["timings"],
            "capture_ms": {str(s["size"]): s["capture_ms"] for s in snap["sizes"]
                           if s["capture_ms"] is not None},
        }

    keeper = PlanKeeper(CapturePlanStore(state_dir, str(model_dir), fingerprint), policy, run_info)
    keeper.start()
    return keeper
