"""Launch: bind the port, answer health probes at once, then run uvicorn with drain-on-SIGTERM.

Start-up order matters: bind the listening socket, start the stdlib health responder on it
(`server/early_health.py`), and only then import FastAPI/uvicorn and build the app; the
responder steps aside right before uvicorn accepts. Torch is never imported here; the app
imports the engine in the background once it is serving. So `/health` answers as soon as the
interpreter is up and the port is bound, however long the HTTP stack takes to import.

SIGTERM/SIGINT are taken over from uvicorn (which would close the socket at once and re-raise
the signal, exiting non-zero): the first one drains (readiness 503, new `/v1` requests 503,
in-flight requests finish or are aborted after `--drain-timeout`) and then exits 0; a second one
exits at once. The same holds for signals that arrive while the HTTP stack is still importing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
import threading
from typing import TYPE_CHECKING, Any

from server import __version__
from server.config import ConfigError, ServerConfig

if TYPE_CHECKING:
    from server.early_health import EarlyHealthResponder
    from server.health import Lifecycle

logger = logging.getLogger("graphserve.cli")

EXIT_STARTUP_FAILURE = 1
# After the server asked itself to exit (a failed engine), the longest the orderly way out may
# take: uvicorn's graceful shutdown (5 s) and the engine's bounded shutdown (15 s) fit well
# inside. Past it the process ends anyway: a thread wedged in a device call (a collective
# whose peer died) must not keep a failed server alive, holding its GPUs.
EXIT_WATCHDOG_S = 60.0


def bind_socket(host: str, port: int) -> socket.socket:
    """Create, bind and listen; from here on connections queue in the kernel."""
    # Like uvicorn: IPv6 only for IPv6 literals, so "localhost" means 127.0.0.1, not ::1.
    family = socket.AF_INET6 if ":" in (host or "") else socket.AF_INET
    infos = socket.getaddrinfo(host or None, port, family=family, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context from `--ssl-certfile`/`--ssl-keyfile`, or None for plain HTTP.

    Built once, before the port is bound, so a bad certificate is a configuration error (exit
    2) rather than a server that listens and then fails; the early health responder and uvicorn
    share it, so a client sees the same certificate before and after the handover. TLS 1.2 at
    least, Python's default ciphers (uvicorn's own default cipher string would narrow TLS 1.2 to
    the old CBC/SHA-1 suites).
    """
    if not config.ssl_certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ssl-certfile/--ssl-keyfile cannot be loaded: {exc}") from None
    return context


def raise_open_file_limit(wanted: int) -> int:
    """Raise the soft limit on open files towards `wanted` (up to the hard limit, as far as
    the system allows); returns the soft limit in force afterwards."""
    try:
        import resource
    except ImportError:  # not POSIX
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return wanted if soft == resource.RLIM_INFINITY else soft


# Descriptors kept free beside client connections: model files, the engine, logs, the early
# responder and the sockets it hands over.
_RESERVED_FDS = 256


def serve(config: ServerConfig, *, engine_class: str | None = None,
          access_log: bool = True, tls: ssl.SSLContext | None = None) -> int:
    """Run the server until drained or failed; returns the process exit code."""
    fd_limit = raise_open_file_limit(config.max_connections + _RESERVED_FDS)
    if fd_limit < config.max_connections + _RESERVED_FDS:
        capped = max(16, fd_limit - _RESERVED_FDS)
        logger.warning("open-file limit is %d: serving at most %d connections instead of "
                       "--max-connections %d", fd_limit, capped, config.max_connections)
        config.max_connections = capped
    try:
        sock = bind_socket(config.host, config.port)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        return EXIT_STARTUP_FAILURE
    # The engine process first: it imports torch and loads the model on another core while
    # this process imports the HTTP stack below (`server.engine_process`).
    engine = _spawn_engine(config) if config.engine_process and engine_class is None else None
    # Progress bars (weight loading) are terminal art, not log lines; and transformers logs
    # through its own stderr handler, so keep it to errors. Both read at their first import,
    # which happens later on the engine thread; explicit settings in the environment win.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    # Until uvicorn serves, a stdlib responder answers the health probes on this socket: the
    # imports below take ~1 s on some machines, and liveness must not wait for them. Signals
    # that come meanwhile are held and replayed once uvicorn's loop handles them.
    held = HeldSignals()
    early: EarlyHealthResponder | None = None
    try:
        from server import stall_watch
        from server.early_health import EarlyHealthResponder
        from server.health import DRAINING, READY, Lifecycle

        lifecycle = Lifecycle()
        # For the process's life: names the thread behind any stall of the whole process.
        stall_watch.start(serving=lambda: lifecycle.phase in (READY, DRAINING))
        try:
            early = EarlyHealthResponder(sock, lifecycle, config.api_key, tls=tls)
            early.start()
        except OSError as exc:  # e.g. out of descriptors: uvicorn will answer, just later
            logger.warning("early health responder not started (%s); /health waits for "
                           "uvicorn", exc)
            early = None
        return _serve_app(config, sock, lifecycle, early, held, engine_class=engine_class,
                          engine_factory=None if engine is None else engine.attach,
                          access_log=access_log, tls=tls)
    except _ExitNow:
        logger.warning("signal again before serving: exiting without waiting")
        return 0
    finally:
        held.release()
        if early is not None:
            early.stop(wait=0)  # no-op after a handover; else it must not outlive the socket
        sock.close()
        if engine is not None:
            engine.close()  # normally stopped by the app's shutdown already; else ended here


def _spawn_engine(config: ServerConfig):
    """The engine's process, started; None (the engine then runs in this process) if it
    cannot start."""
    from server.engine_process import EngineProcess

    engine = EngineProcess(config.engine)
    try:
        engine.spawn()
    except OSError as exc:
        logger.error("the engine process could not start (%s); running the engine in this "
                     "process", exc)
        return None
    return engine


class _ExitNow(SystemExit):
    """A second SIGTERM/SIGINT before uvicorn serves: leave at once (still exit code 0)."""


class HeldSignals:
    """SIGTERM/SIGINT that arrive before uvicorn's loop takes the signals over.

    Without this, a SIGTERM during the imports would kill the process with the default action
    (and SIGINT would print a traceback). The first signal is kept and replayed into the drain
    path as soon as the loop handles signals (nothing is in flight yet, so that exits 0); a
    second one means "now", as it does while serving.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, _frame: Any) -> None:
        self.received.append(sig)
        if len(self.received) > 1:
            raise _ExitNow(0)

    def take(self) -> list[int]:
        """The signals held so far; from now on the caller's handlers are in charge."""
        self._previous.clear()
        received, self.received = self.received, []
        return received

    def release(self) -> None:
        """Put the previous handlers back if `take()` never ran (serving did not start)."""
        for sig, handler in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, handler)
        self._previous.clear()


def _serve_app(config: ServerConfig, sock: socket.socket, lifecycle: Lifecycle,
               early: EarlyHealthResponder | None, held: HeldSignals, *,
               engine_class: str | None, engine_factory: Any = None, access_log: bool,
               tls: ssl.SSLContext | None) -> int:
    """Import the HTTP stack, build the app and run uvicorn on `sock` until it exits."""
    host, port = sock.getsockname()[:2]
    # Heavy-ish imports only now that probes are answered (FastAPI, pydantic, uvicorn).
    from server.api import create_app
    from server.http.state import DEFAULT_ENGINE_CLASS
    from server.uvicorn_server import DrainingServer, uvicorn_config

    server: DrainingServer | None = None

    def on_exit(code: int) -> None:
        if server is not None:
            server.request_exit(code)
        _start_exit_watchdog(code, EXIT_WATCHDOG_S)

    app = create_app(config, engine_class=engine_class or DEFAULT_ENGINE_CLASS,
                     engine_factory=engine_factory, lifecycle=lifecycle, on_exit=on_exit)
    uv_config, _ = uvicorn_config(app, config, host, port, access_log=access_log, tls=tls)
    server = DrainingServer(uv_config, state=app.state.graphserve,
                            drain_timeout=config.drain_timeout, held_signals=held.take,
                            early=early)
    logger.info("graphserve %s listening on %s://%s:%d", __version__,
                "https" if tls is not None else "http", f"[{host}]" if ":" in host else host,
                port)
    server.run(sockets=[sock])
    return server.exit_code


def _start_exit_watchdog(code: int, seconds: float) -> None:
    """End the process with `code` if it is still alive `seconds` from now (daemon thread:
    a normal exit before then cancels nothing and waits for nothing)."""

    def expire() -> None:
        logger.error("still running %.0f s after exiting was requested; exiting now", seconds)
        logging.shutdown()
        os._exit(code)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
