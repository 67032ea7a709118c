"""Rank 0's side of tensor parallelism: the worker processes, their message stream, agreements.

`TPLauncher` starts ranks 1..N-1 as `python -m server.distributed.worker` processes from the
engine thread, once the HTTP port answers (the engine boots after the app serves, so liveness
never waits for a worker), and then:

* sends every order to all workers in one ordered stream (`send`): a write to a worker that
  has exited raises `FatalEngineError` at once;
* runs each agreement (`collect`): one reply per worker, matched by kind and sequence number,
  within a deadline; a worker that reports an error, exits, answers out of turn or stays
  silent past the deadline makes it raise `FatalEngineError`, never wait forever;
* watches the workers (one thread each, blocked in `wait()`): a worker that exits while the
  engine is not closing is reported through `on_failure(reason)` at once, whatever the engine
  thread is doing, so the server turns `failed` and exits non-zero.

Each worker also holds the read end of a "lifeline" pipe whose write end only this process
has: when rank 0 exits, for any reason, the worker sees end-of-file and exits too, so no
worker outlives the server holding a GPU.

Threads: the engine thread calls everything except `failure` (any thread); the watch threads
call `on_failure`. Torch-free.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.distributed.protocol import (
    Kind,
    PeerGone,
    ProtocolError,
    enlarge_pipe,
    frame,
    frame_json,
    json_payload,
    read_message,
    write_all,
)
from server.distributed.sharding import check_divisible
from server.errors import FatalEngineError
from server.logging_setup import current_settings

log = logging.getLogger("graphserve.tp")

# NVLink multicast (NVLS) stays off unless the operator turns it on: on shared multi-GPU hosts a
# program using it has taken the host's GPUs out of service, and two to eight GPUs of one host
# gain little from it. Set for rank 0 before its first NCCL call and inherited by the workers.
NCCL_ENV_DEFAULTS = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def start_workers(config, on_failure: Callable[[str], None] | None = None) -> TPLauncher:
    """Check that the model splits over `config.tensor_parallel_size` ranks, then start ranks
    1..N-1 loading. Torch-free: the engine thread calls this before it imports torch, so the
    workers' imports and weight reads overlap rank 0's. Raises StartupError."""
    from server.hf_config import ConfigReadError, load_config
    from server.model_loader import resolve_model_path

    world = config.tensor_parallel_size
    # The default model is built here, once, before the workers read it.
    path = resolve_model_path(config.model)
    try:
        check_divisible(load_config(path), world)
    except ConfigReadError:
        pass  # rank 0's load reports an unreadable config.json with the path and the reason
    apply_env_defaults()
    launcher = TPLauncher(world, config.tp_timeout_s, on_failure=on_failure)
    launcher.start({"engine": dataclasses.asdict(config), "model_path": str(path)})
    return launcher


def apply_env_defaults(env: dict[str, str] | None = None) -> dict[str, str]:
    """Put `NCCL_ENV_DEFAULTS` into `env` (default: this process's environment) where unset."""
    env = os.environ if env is None else env
    for key, value in NCCL_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    return env


@dataclass
class _Worker:
    rank: int
    proc: subprocess.Popen
    control: int  # write end of rank 0 -> worker
    reply: int  # read end of worker -> rank 0
    lifeline: int  # write end; never written, closed only when this process exits
    error: str | None = None  # the worker's own account of its failure (an ERROR reply)
    alive: bool = True
    returncode: int | None = None
    watcher: threading.Thread | None = field(default=None, repr=False)


class TPLauncher:
    """Workers of one tensor-parallel group, as rank 0 sees them."""

    def __init__(self, world: int, timeout_s: float,
                 on_failure: Callable[[str], None] | None = None,
                 worker_module: str = "server.distributed.worker"):
        if world < 2:
            raise ValueError(f"a tensor-parallel group needs >= 2 ranks, got {world}")
        self.world = world
        self._module = worker_module  # tests run protocol-speaking stand-ins
        self.timeout_s = timeout_s
        self._on_failure = on_failure
        self._workers: list[_Worker] = []
        self._seq = 0
        self._closing = False
        self._failure: str | None = None
        self._reply_lock = threading.Lock()

    # -- processes --------------------------------------------------------------------------

    def start(self, config: dict[str, Any]) -> None:
        """Start ranks 1..world-1 and send each its `CONFIG` (`config` plus its rank)."""
        env = apply_env_defaults(dict(os.environ))
        # The workers import this package the way this process did, wherever that was from.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        logging_config = _logging_config()
        for rank in range(1, self.world):
            self._workers.append(self._spawn(rank, env))
        for w in self._workers:
            self._write(w, frame_json(Kind.CONFIG, 0, {
                **config, **logging_config, "rank": w.rank, "world": self.world,
            }))  # fmt: skip
        log.info("started tensor-parallel workers: %s",
                 ", ".join(f"rank {w.rank} pid {w.proc.pid}" for w in self._workers))

    def _spawn(self, rank: int, env: dict[str, str]) -> _Worker:
        control_r, control_w = os.pipe()
        reply_r, reply_w = os.pipe()
        life_r, life_w = os.pipe()
        enlarge_pipe(control_w)
        child_fds = (control_r, reply_w, life_r)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", self._module, "--rank", str(rank),
                 "--control-fd", str(control_r), "--reply-fd", str(reply_w),
                 "--lifeline-fd", str(life_r)],
                env=env, pass_fds=child_fds, stdin=subprocess.DEVNULL,
                # Its own session: a Ctrl-C in a terminal reaches rank 0, which drains and
                # then stops the workers; the workers never stop on their own.
                start_new_session=True,
            )  # fmt: skip
        finally:
            for fd in child_fds:  # the child's ends: ours must close, or EOF never comes
                os.close(fd)
        worker = _Worker(rank, proc, control_w, reply_r, life_w)
        worker.watcher = threading.Thread(
            target=self._watch, args=(worker,), name=f"graphserve-tp-watch-{rank}", daemon=True
        )
        worker.watcher.start()
        return worker

    def _watch(self, worker: _Worker) -> None:
        code = worker.proc.wait()
        worker.returncode = code
        worker.alive = False
        if self._closing:
            return
        self._read_pending_error(worker)
        reason = self._describe_exit(worker)
        if self._failure is None:
            self._failure = reason
        log.error("%s", reason)
        if self._on_failure is not None:
            try:
                self._on_failure(reason)
            except Exception:  # the observer must not kill the watcher silently
                log.exception("tensor-parallel failure callback failed")

    def _read_pending_error(self, worker: _Worker) -> None:
        """Pick up an ERROR the worker wrote before exiting, unless the engine thread is
        reading replies right now (it will see the error itself)."""
        if not self._reply_lock.acquire(timeout=0.5):
            return
        try:
            while select.select([worker.reply], [], [], 0)[0]:
                msg = read_message(worker.reply, timeout=0.5)
                if msg.kind == Kind.ERROR:
                    worker.error = str((msg.json() or {}).get("message"))
        except (PeerGone, TimeoutError, ProtocolError, OSError, ValueError):
            pass
        finally:
            self._reply_lock.release()

    def _describe_exit(self, worker: _Worker) -> str:
        code = worker.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else (
            f"exited with code {code}")
        text = f"tensor-parallel rank {worker.rank} (pid {worker.proc.pid}) {how}"
        return f"{text}: {worker.error}" if worker.error else text

    @property
    def failure(self) -> str | None:
        """Why the group broke (the first worker that exited unasked), or None."""
        return self._failure

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def describe(self) -> list[dict[str, Any]]:
        """Per worker: rank, pid, alive, exit code (for /health/graphs)."""
        return [{"rank": w.rank, "pid": w.proc.pid, "alive": w.alive,
                 "returncode": w.returncode} for w in self._workers]  # fmt: skip

    # -- the ordered stream -----------------------------------------------------------------

    def send(self, kind: Kind, payload: bytes = b"") -> int:
        """Send one order to every worker; returns its sequence number."""
        self._seq += 1
        data = frame(kind, self._seq, payload)
        for w in self._workers:
            self._write(w, data)
        return self._seq

    def send_json(self, kind: Kind, obj: Any) -> int:
        return self.send(kind, json_payload(obj))

    def _write(self, worker: _Worker, data: bytes) -> None:
        try:
            write_all(worker.control, data)
        except (PeerGone, OSError) as exc:
            raise FatalEngineError(self._gone(worker, f"cannot send to it ({exc})")) from None

    def _gone(self, worker: _Worker, what: str) -> str:
        if not worker.alive or worker.proc.poll() is not None:
            worker.returncode = worker.proc.returncode
            worker.alive = False
            return self._describe_exit(worker)
        return f"tensor-parallel rank {worker.rank} (pid {worker.proc.pid}): {what}"

    def collect(self, kind: Kind, seq: int, timeout_s: float | None = None) -> list[dict]:
        """Every worker's reply of `kind` to order `seq`, in rank order (ranks 1..N-1).

        Raises FatalEngineError if a worker replies ERROR, exits, answers with another kind or
        sequence number, or has not answered within `timeout_s` (default: `self.timeout_s`).
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        replies: dict[int, dict] = {}
        pending = {w.reply: w for w in self._workers}
        with self._reply_lock:
            while pending:
                wait = deadline - time.monotonic()
                ready = select.select(list(pending), [], [], max(0.0, wait))[0] if wait > 0 else []
                if not ready:
                    late = ", ".join(str(w.rank) for w in pending.values())
                    raise FatalEngineError(
                        f"tensor-parallel rank(s) {late} did not answer {kind.name} (order "
                        f"{seq}) within {timeout_s:g} s (--tp-timeout)"
                    )
                for fd in ready:
                    worker = pending.pop(fd)
                    replies[worker.rank] = self._reply(worker, kind, seq, deadline)
        return [replies[w.rank] for w in self._workers]

    def _reply(self, worker: _Worker, kind: Kind, seq: int, deadline: float) -> dict:
        try:
            msg = read_message(worker.reply, timeout=max(0.0, deadline - time.monotonic()))
        except PeerGone:
            worker.proc.wait(5)
            raise FatalEngineError(self._gone(worker, "closed its reply pipe")) from None
        except (TimeoutError, ProtocolError) as exc:
            raise FatalEngineError(self._gone(worker, f"broken reply ({exc!r})")) from None
        if msg.kind == Kind.ERROR:
            worker.error = str((msg.json() or {}).get("message"))
            raise FatalEngineError(f"tensor-parallel rank {worker.rank}: {worker.error}")
        if msg.kind != kind or msg.seq != seq:
            raise FatalEngineError(
                f"tensor-parallel rank {worker.rank} answered {msg.kind.name} to order "
                f"{msg.seq} where {kind.name} to order {seq} was due: the ranks are out of step"
            )
        return msg.json() or {}

    # -- shutdown ---------------------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every worker: `shutdown`, then `join`."""
        self.shutdown()
        self.join(timeout_s)

    def shutdown(self) -> None:
        """Tell every worker to stop (it leaves the process group and exits 0)."""
        if self._closing:
            return
        self._closing = True
        data = frame(Kind.SHUTDOWN, self._seq + 1)
        for w in self._workers:
            if w.alive:
                try:
                    write_all(w.control, data)
                except (PeerGone, OSError):
                    pass

    def join(self, timeout_s: float = 10.0) -> None:
        """Wait for the workers to exit; SIGKILL whatever has not exited in time."""
        deadline = time.monotonic() + timeout_s
        for w in self._workers:
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("tensor-parallel rank %d did not stop in time; killing it", w.rank)
                w.proc.kill()
                w.proc.wait()
            _release(w)

    def kill(self) -> None:
        """Kill every worker now (the group is broken; nothing is sent)."""
        self._closing = True
        for w in self._workers:
            if w.proc.poll() is None:
                w.proc.kill()
        for w in self._workers:
            w.proc.wait()
            _release(w)


def _release(worker: _Worker) -> None:
    """Close rank 0's ends of a stopped worker's pipes (once)."""
    for name in ("control", "reply", "lifeline"):
        fd = getattr(worker, name)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
            setattr(worker, name, -1)


def _logging_config() -> dict[str, str]:
    """The workers log like this process: same format, same level, to the same stderr."""
    settings = current_settings()
    return {"log_format": settings["log_format"], "log_level": settings["level"]}
