"""The HTTP process's side of an engine that runs in a process of its own (`server.engine_host`).

`EngineProcess` implements `server.engine_protocol.EngineProtocol`, so the HTTP layer cannot
tell it from the in-process `AsyncEngine`. `server.launch` spawns it first thing, before it
imports the HTTP stack: the engine process imports torch and loads the model on another core
while this process imports FastAPI, starts uvicorn and parses the tokenizer for the prompt
workers (docs/benchmarks.md 8r). `--no-engine-process` keeps the engine in this process.

What stays here: admission (`Admission.admit`, as in `AsyncEngine.add_request`, so a bad or
excess request is still refused before anything is queued; the waiting-queue bound is counted
here, and the engine process reports each request that leaves the queue), the seeds drawn for
unseeded requests, and the API tokenizer. What crosses the socket: each accepted request once,
aborts, and one message of outputs per engine step (`server.engine_ipc`).

Readiness: the engine process reports `ready` after its own checks (largest graph captured);
this side passes it on once its tokenizer is loaded too (parsed beside the engine's start when
the checkpoint directory is known up front, else after `INFO` names it). A tokenizer the fast
loader declines (or `--loader transformers`) is loaded with transformers here too, which then
imports torch into this process: the exception, not the rule.

Failure: when the engine process dies, every unfinished request ends with an error and the
phase becomes `failed` (the server then exits non-zero, as for a failed in-process engine).

Thread ownership: `add_request` on the event loop; `abort`, `stop_accepting`, `stats`,
`graph_report` and `shutdown` from any thread (`stats` and `graph_report` wait up to
`QUERY_TIMEOUT_S` for the engine process: call them off the event loop); the reader thread
receives every message, delivers outputs and reports phases.

Torch-free: imported by the HTTP process.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import random
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

from server.config import EngineConfig
from server.engine_ipc import Channel, ChannelClosed, Kind
from server.engine_protocol import PhaseCallback, RequestStream, deliver, route
from server.errors import EngineNotReadyError
from server.request import RequestOutput, SamplingParams

log = logging.getLogger("graphserve.engine.process")

# A stats or graph report not answered by then is reported unavailable (the engine process
# answers in well under 1 ms; a loaded 2-core box can hold its main thread off for a while).
QUERY_TIMEOUT_S = 5.0
SHUTDOWN_GRACE_S = 5.0  # past the engine's own shutdown timeout, before the process is killed


class EngineProcess:
    """An engine in a child process, driven over a socket pair (see the module docstring)."""

    def __init__(self, config: EngineConfig):
        config.validate()
        self.config = config
        self.phase = "starting"
        self.error: str | None = None
        self.model_name: str | None = None
        self.max_model_len: int | None = None
        self.vocab_size: int | None = None
        self.tokenizer: Any = None
        self._proc: subprocess.Popen | None = None
        self._channel: Channel | None = None
        self._reader: threading.Thread | None = None
        self._remotes: dict[str, RequestStream] = {}  # requests in the engine process
        from server.scheduler import Admission  # torch-free; bounds the waiting queue

        self._admission = Admission(config.max_queue)
        self._seed_rng = random.Random(config.seed)
        self._accepting = False
        self._closing = False
        self._on_phase: PhaseCallback | None = None
        self._held: list[tuple[str, str | None]] = []  # phases before `attach`
        self._phase_lock = threading.Lock()
        self._queries: dict[int, list] = {}
        self._query_seq = itertools.count(1)
        self._query_cv = threading.Condition()
        self._tokenizer_job: _TokenizerJob | None = None
        self._info_error: str | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the engine process and its reader thread (phases are held until `attach`).
        Raises OSError when the process cannot start."""
        from server.child_process import spawn_module
        from server.logging_setup import seconds_since_exec

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = spawn_module("server.engine_host", "--fd", str(theirs.fileno()),
                                      pass_fds=(theirs.fileno(),))
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self._channel = Channel(ours, strict=True)
        self._channel.send(Kind.CONFIG, self.config)
        age = seconds_since_exec()
        log.info("engine process started (pid %d)%s", self._proc.pid,
                 "" if age is None else f", {age:.2f} s after exec")
        self._reader = threading.Thread(target=self._read, name="graphserve-engine-reader",
                                        daemon=True)
        self._reader.start()
        # The API tokenizer, beside the engine's start, when the directory is known now.
        path = _known_checkpoint(self.config.model)
        if path is not None:
            self._tokenizer_job = _TokenizerJob(path, self.config.loader)

    def attach(self, config: EngineConfig | None = None,
               on_phase: PhaseCallback | None = None) -> EngineProcess:
        """The engine factory handed to the app (`factory(config, on_phase=cb)`): from now on
        phases go to `on_phase`, the held ones first, in order."""
        with self._phase_lock:  # the reader's next phase waits for the held ones
            held, self._held = self._held, []
            self._on_phase = on_phase
            for phase, detail in held:
                self._report(on_phase, phase, detail)
        return self

    def start(self) -> None:
        """Nothing to do: `spawn` started the process before the HTTP stack was imported."""

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine process; unfinished requests end with finish_reason "abort" (sent by
        the engine as it stops). Waits up to `timeout` + `SHUTDOWN_GRACE_S`, then kills it."""
        self._accepting = False
        self._closing = True
        if self._channel is not None:
            try:
                self._channel.send(Kind.SHUTDOWN, timeout)
            except ChannelClosed:
                pass
        self._reap(timeout + SHUTDOWN_GRACE_S)

    def close(self) -> None:
        """End the process now if it still runs (a server that stopped before the engine was
        ready, or whose shutdown gave up on it)."""
        self._closing = True
        if self._proc is not None and self._proc.poll() is None:
            log.info("ending the engine process (pid %d)", self._proc.pid)
            self._kill()
        self._reap(SHUTDOWN_GRACE_S)

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def _reap(self, wait_s: float) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            log.error("engine process %d did not exit within %.0f s; killing it", proc.pid,
                      wait_s)
            proc.kill()
            proc.wait()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(2.0)  # the reader delivers the last outputs first
        if self._channel is not None:
            self._channel.close()

    def stop_accepting(self) -> None:
        """New requests are refused from now on (draining); running ones continue."""
        self._accepting = False
        try:
            if self._channel is not None:
                self._channel.send(Kind.STOP_ACCEPTING)
        except ChannelClosed:
            pass

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int],
                    params: SamplingParams) -> RequestStream:
        """As `AsyncEngine.add_request`: raises before anything is queued."""
        import asyncio

        self._admission.admit(request_id, prompt_ids, params, accepting=self._accepting,
                              phase=self.phase, in_use=self._remotes, vocab_size=self.vocab_size,
                              max_model_len=self.max_model_len)  # fmt: skip
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(64)
        stream = RequestStream(request_id, asyncio.get_running_loop(), choices=params.n)
        self._remotes[request_id] = stream
        try:
            self._channel.send(Kind.ADD, (request_id, list(prompt_ids), params, seed))
        except ChannelClosed:
            self._remotes.pop(request_id, None)
            self._admission.leave()
            raise EngineNotReadyError("the engine process is gone") from None
        return stream

    def abort(self, request_id: str) -> None:
        """Thread-safe and idempotent."""
        try:
            if self._channel is not None:
                self._channel.send(Kind.ABORT, request_id)
        except ChannelClosed:
            pass

    # -- introspection ----------------------------------------------------------------------

    def stats(self) -> dict:
        local = {"running": 0, "waiting": self._admission.waiting, "phase": self.phase}
        if self.phase not in ("ready", "draining"):
            return local
        out = self._query("stats")
        out["waiting"] = self._admission.waiting  # counted here, messages in flight included
        return out

    def graph_report(self) -> dict:
        if self.phase not in ("ready", "draining", "failed"):
            return {"phase": self.phase, "mode": self.config.graph_capture, "complete": False}
        return self._query("graph_report")

    def _query(self, what: str) -> dict:
        seq = next(self._query_seq)
        slot: list = []
        with self._query_cv:
            self._queries[seq] = slot
        try:
            self._channel.send(Kind.QUERY, (seq, what))
            with self._query_cv:
                if not self._query_cv.wait_for(lambda: slot, QUERY_TIMEOUT_S):
                    raise TimeoutError(f"the engine process did not answer {what} within "
                                       f"{QUERY_TIMEOUT_S:.0f} s")
        except ChannelClosed:
            raise RuntimeError("the engine process is gone") from None
        finally:
            with self._query_cv:
                self._queries.pop(seq, None)
        ok, value = slot[0]
        if not ok:
            raise RuntimeError(value)
        return value

    # -- the reader thread ------------------------------------------------------------------

    def _read(self) -> None:
        channel = self._channel
        reason = None
        while True:
            try:
                kind, obj = channel.recv()
            except ChannelClosed as exc:
                reason = str(exc)
                break
            except pickle.UnpicklingError as exc:  # a bug on the engine side: say so, and end
                log.error("the engine process sent what the HTTP process may not load: %s", exc)
                reason = str(exc)
                self._kill()
                break
            try:
                if kind is Kind.OUTPUTS:
                    route(obj, self._remotes)
                elif kind is Kind.LEFT:
                    self._admission.leave(obj)
                elif kind is Kind.PHASE:
                    self._phase(*obj)
                elif kind is Kind.INFO:
                    self._info(obj)
                elif kind is Kind.REPLY:
                    seq, ok, value = obj
                    with self._query_cv:
                        if seq in self._queries:
                            self._queries[seq].append((ok, value))
                            self._query_cv.notify_all()
                else:
                    log.error("unexpected message from the engine process: %s", kind.name)
            except Exception:  # one bad message must not end the server's only reader
                log.exception("handling %s from the engine process failed", kind.name)
        self._gone(reason)

    def _info(self, info: dict) -> None:
        """`INFO` comes right before `PHASE` ready: take the tokenizer (waiting for its load,
        or loading it now when the engine named another directory) and the limits."""
        job = self._tokenizer_job
        path = info.get("path")
        try:
            if path is None:
                raise RuntimeError("the engine process did not name its checkpoint")
            if job is None or Path(path).resolve() != job.path.resolve():
                job = self._tokenizer_job = _TokenizerJob(Path(path), self.config.loader,
                                                          now=True)
            self.tokenizer = job.result()
        except Exception as exc:
            self._info_error = f"the API tokenizer cannot be loaded: {exc}"
            return
        self.model_name = info["model_name"]
        self.max_model_len = info["max_model_len"]
        self.vocab_size = info["vocab_size"]

    def _phase(self, phase: str, detail: str | None) -> None:
        if phase == "ready":
            if self.tokenizer is None:
                phase, detail = "failed", self._info_error or "the engine sent no INFO"
            else:
                from server.gc_control import freeze_startup_heap

                freeze_startup_heap()  # this process's startup heap: HTTP stack, tokenizer
                self._accepting = True
        if phase == "failed":
            from server.gc_control import end_startup_pause

            self._accepting = False
            self.error = detail
            end_startup_pause()  # this process lives on a while, failed: collect as usual
        self.phase = phase
        with self._phase_lock:  # in order with `attach`'s replay of the held ones
            if self._on_phase is None:
                self._held.append((phase, detail))
            else:
                self._report(self._on_phase, phase, detail)

    @staticmethod
    def _report(on_phase: PhaseCallback | None, phase: str, detail: str | None) -> None:
        if on_phase is None:
            return
        try:
            on_phase(phase, detail)
        except Exception:  # a broken observer must not stop the reader
            log.exception("phase callback failed")

    def _gone(self, reason: str | None) -> None:
        """End of the socket: a stop we asked for, or the engine process died."""
        code = None
        if self._proc is not None:
            try:
                code = self._proc.wait(SHUTDOWN_GRACE_S)
            except subprocess.TimeoutExpired:
                code = None
        with self._query_cv:
            for slot in self._queries.values():
                slot.append((False, "the engine process is gone"))
            self._query_cv.notify_all()
        why = ("the engine process exited" + (f" with code {code}" if code is not None else "")
               + ("" if not reason or reason == "end of file" else f" ({reason})"))
        self._accepting = False
        items = []
        for request_id, stream in list(self._remotes.items()):
            for index in sorted(stream.open_choices):
                items.append((stream, RequestOutput(request_id, finished=True,
                                                    finish_reason="error", error=why,
                                                    index=index)))  # fmt: skip
        self._remotes.clear()
        deliver(items)
        if self._closing:
            return
        log.error("%s", why)
        self._phase("failed", why)


def _known_checkpoint(model: str | None) -> Path | None:
    """The checkpoint directory, if it can be named without the engine: a local directory, or
    the embedded default model once built."""
    if model is None:
        from server.default_model import default_model_dir, is_complete

        path = default_model_dir()
        return path if is_complete(path) else None
    path = Path(model).expanduser()
    return path if (path / "config.json").is_file() else None


class _TokenizerJob:
    """The API tokenizer for the prompt workers, loaded on a thread of its own (or now)."""

    def __init__(self, path: Path, loader: str, now: bool = False):
        self.path = path
        self._loader = loader
        self._value: Any = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        if now:
            self._run()
        else:
            threading.Thread(target=self._run, name="graphserve-api-tokenizer",
                             daemon=True).start()

    def _run(self) -> None:
        try:
            from server.model_loader import load_api_tokenizer

            self._value = load_api_tokenizer(self.path, self._loader)
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value
