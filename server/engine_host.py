"""The engine process: the engine of `server.engine`, in a process without the HTTP stack.

    python -m server.engine_host --fd N [--log-format F --log-level L]

Why a process of its own: startup is bound by Python work that holds the GIL, and in one
process the HTTP stack (FastAPI, pydantic, uvicorn: ~0.5 s) and the engine's `import torch`
(1.3-2.4 s, by box) took turns on it, one after the other (docs/benchmarks.md 8p, 8r). Here
they run at the same time on two cores. While serving, the HTTP layer's per-request and
per-token work (parsing, SSE framing, JSON) no longer competes with the engine thread for a GIL
either.

What runs here: `HostedEngine`, the in-process `AsyncEngine` with two seams changed — outputs
go to the socket instead of asyncio streams, and the waiting-queue bound is the HTTP side's
(this side reports each request that leaves the queue).
Everything else — the engine thread, loading, capture, the grammar process and tensor-parallel
workers (this process is rank 0) — is the same code as in one process.

Threads: the main thread reads the socket and applies each message in order (`ADD` queues a
request, `ABORT` an abort); a query thread answers `QUERY` (stats, the graph report); the
engine thread sends `PHASE`, `INFO`, `OUTPUTS` and `LEFT`.
End of file on the socket (the HTTP process closed it or died) stops the engine and ends this
process. SIGINT and SIGTERM are ignored: a terminal's Ctrl-C or a signal to the whole process
group is the HTTP process's to act on (it drains, then sends `SHUTDOWN`).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import sys
import threading

from server import stall_watch
from server.child_process import child_arguments, start_logging
from server.engine import AsyncEngine
from server.engine_ipc import Channel, ChannelClosed, Kind
from server.gc_control import pause_until_ready
from server.logging_setup import seconds_since_exec
from server.scheduler import Admission, NewRequest

log = logging.getLogger("graphserve.engine.host")

# After end of file (the HTTP process is gone): how long the engine may take to stop before
# this process ends anyway. Nobody is left to serve, so only the GPU's release matters.
ORPHAN_SHUTDOWN_S = 5.0


class ReportingAdmission(Admission):
    """No bound here (the HTTP side holds it): every request that leaves the waiting queue is
    reported at once (`LEFT`, a few microseconds, once per request), so the HTTP side's count
    stays exact."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(limit=1 << 62)
        self._channel = channel

    def leave(self, n: int = 1) -> None:
        super().leave(n)
        try:
            self._channel.send(Kind.LEFT, n)
        except ChannelClosed:
            pass  # the main thread sees the end of file and stops the engine


class HostedEngine(AsyncEngine):
    """`AsyncEngine` whose outputs, phases and queue exits go to the HTTP process.

    `submit` runs on the main thread (the socket's reader); `_deliver`, `_send_phase` and the
    admission's reports on the engine thread (and a TP launcher's watch thread sends
    "failed").
    """

    def __init__(self, config, channel: Channel) -> None:
        super().__init__(config, on_phase=self._send_phase)
        self._channel = channel
        self._admission = ReportingAdmission(channel)  # handed to the scheduler at load

    def _send_phase(self, phase: str, detail: str | None) -> None:
        try:
            if phase == "ready":
                # Before the phase itself: the HTTP side needs these to accept requests.
                checkpoint = self._core.runner.checkpoint if self._core is not None else None
                self._channel.send(Kind.INFO, {
                    "model_name": self.model_name,
                    "max_model_len": self.max_model_len,
                    "vocab_size": self.vocab_size,
                    "path": None if checkpoint is None else str(checkpoint.path),
                    "loader": None if checkpoint is None else checkpoint.loader,
                })  # fmt: skip
            self._channel.send(Kind.PHASE, (phase, detail))
        except ChannelClosed:
            pass  # the main thread sees the end of file and stops the engine

    def submit(self, request_id: str, prompt_ids: list[int], params, seed: int) -> None:
        """Main thread: the HTTP side already validated and admitted the request."""
        self._admission.try_enter()
        self._commands.put(("add", NewRequest(request_id, prompt_ids, params, seed)))

    def _deliver(self, outputs) -> None:
        # One message per step, whoever the outputs are for.
        try:
            self._channel.send(Kind.OUTPUTS, outputs)
        except ChannelClosed:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = child_arguments("server.engine_host")
    ap.add_argument("--fd", type=int, required=True)
    args = ap.parse_args(argv)
    pause_until_ready()  # as in the HTTP process: no collection before ready (gc_control)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    start_logging(args)
    channel = Channel(socket.socket(fileno=args.fd))
    try:
        kind, config = channel.recv()
    except ChannelClosed:
        return 0
    if kind is not Kind.CONFIG:
        log.error("engine process: expected CONFIG first, got %s", kind.name)
        return 1
    engine = HostedEngine(config, channel)
    stall_watch.start(serving=lambda: engine.phase == "ready")
    engine.start()
    age = seconds_since_exec()
    log.info("engine process %d: engine thread started%s", os.getpid(),
             "" if age is None else f" {age:.2f} s after this process's exec")
    code = serve_messages(channel, engine)
    logging.shutdown()
    # Past the engine's bounded shutdown: threads still running (a device call that never
    # returns) must not keep this process, and the GPU it holds, alive.
    os._exit(code)


def serve_messages(channel: Channel, engine: HostedEngine) -> int:
    """The main thread's loop: apply the HTTP process's messages in order until `SHUTDOWN` or
    end of file; returns the exit code. Reports (`QUERY`) are answered on a thread of their
    own, so a slow one never holds up the requests and aborts behind it."""
    queries: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_answer_queries, args=(channel, engine, queries),
                     name="graphserve-engine-queries", daemon=True).start()
    while True:
        try:
            kind, obj = channel.recv()
        except ChannelClosed:
            log.warning("the HTTP process is gone; stopping the engine")
            _bounded(engine.shutdown, ORPHAN_SHUTDOWN_S)
            return 0
        if kind is Kind.ADD:
            engine.submit(*obj)
        elif kind is Kind.ABORT:
            engine.abort(obj)
        elif kind is Kind.STOP_ACCEPTING:
            engine.stop_accepting()
        elif kind is Kind.QUERY:
            queries.put(obj)
        elif kind is Kind.SHUTDOWN:
            engine.shutdown(obj)
            return 0
        else:
            log.error("engine process: unexpected message %s", kind.name)


def _answer_queries(channel: Channel, engine: HostedEngine, queries: queue.SimpleQueue) -> None:
    """The query thread: each `(seq, "stats" | "graph_report")` answered with a `REPLY`."""
    while True:
        seq, what = queries.get()
        try:
            value = engine.stats() if what == "stats" else engine.graph_report()
            reply = (seq, True, plain(value))
        except Exception as exc:  # diagnostics: the asker reports it, the engine serves on
            reply = (seq, False, f"{type(exc).__name__}: {exc}")
        try:
            channel.send(Kind.REPLY, reply)
        except ChannelClosed:
            return  # the main thread sees the end of file


def plain(value):
    """`value` with builtin types only (a str subclass such as torch's version string becomes a
    str): the HTTP side unpickles nothing else (`engine_ipc`)."""
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def _bounded(fn, seconds: float) -> None:
    """Run `fn` on a daemon thread; wait for it at most `seconds`."""
    thread = threading.Thread(target=fn, name="graphserve-engine-stop", daemon=True)
    thread.start()
    thread.join(seconds)


if __name__ == "__main__":
    sys.exit(main())
