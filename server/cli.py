"""`graphserve` command line: flags -> ServerConfig, logging, port binding, uvicorn, signals.

Start-up order matters: parse flags and validate (exit 2 on a bad value), configure logging,
bind the listening socket, start the stdlib health responder on it (`server/early_health.py`),
and only then import FastAPI/uvicorn and build the app; the responder steps aside right before
uvicorn accepts. Torch is never imported here; the app imports the engine in the background once
it is serving. So `/health` answers as soon as the interpreter is up and the port is bound,
however long the HTTP stack takes to import.

SIGTERM/SIGINT are taken over from uvicorn (which would close the socket at once and re-raise
the signal, exiting non-zero): the first one drains (readiness 503, new `/v1` requests 503,
in-flight requests finish or are aborted after `--drain-timeout`) and then exits 0; a second one
exits at once. The same holds for signals that arrive while the HTTP stack is still importing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from server import __version__
from server.config import (
    DEVICES,
    DTYPES,
    GRAPH_CAPTURE_MODES,
    LOADERS,
    ConfigError,
    EngineConfig,
    ServerConfig,
)

if TYPE_CHECKING:
    from server.early_health import EarlyHealthResponder
    from server.health import Lifecycle

logger = logging.getLogger("graphserve.cli")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
EXIT_CONFIG_ERROR = 2
EXIT_STARTUP_FAILURE = 1
_SUBCOMMANDS = ("serve",)


# ============================================================================ parsing
def _graph_sizes(text: str) -> list[int]:
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas or spaces, got {text!r}"
        ) from None


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a flag's default unless its help already explains it (or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False,
                                                                   argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The `graphserve` parser with its `serve` subcommand."""
    parser = argparse.ArgumentParser(
        prog="graphserve",
        description="OpenAI-compatible LLM server that is ready as soon as its largest CUDA "
        "graph is captured. Without a subcommand, runs `serve`.",
    )
    parser.add_argument("--version", action="version", version=f"graphserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the OpenAI-compatible HTTP server. /health answers at once; "
        "/health/ready turns 200 once the model is loaded and its largest decode graph is "
        "captured.",
        formatter_class=_HelpFormatter,
    )
    add_serve_arguments(serve)
    return parser


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    eng = EngineConfig()
    srv = ServerConfig()

    model = p.add_argument_group("model")
    model.add_argument("--model", default=None, metavar="PATH",
                       help="local Hugging Face model directory (default: the embedded "
                       "demo model, built on first use)")
    model.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="model name reported by /v1/models and expected in requests "
                       "(default: the model directory's name)")
    model.add_argument("--dtype", default=eng.dtype, choices=DTYPES,
                       help="weight and activation dtype; auto = bfloat16 on CUDA, float32 on CPU")
    model.add_argument("--device", default=eng.device, choices=DEVICES,
                       help="auto = cuda if available, else cpu")
    model.add_argument("--loader", default=eng.loader, choices=LOADERS,
                       help="auto = read safetensors and tokenizer.json directly, falling back to "
                       "transformers when the checkpoint needs it; fast = never import "
                       "transformers; transformers = always use its Auto classes")
    model.add_argument("--max-model-len", type=int, default=None, metavar="N",
                       help="context length (prompt + output) in tokens (default: the model's "
                       "limit, shrunk to fit the KV cache)")
    model.add_argument("--seed", type=int, default=eng.seed,
                       help="base seed for requests that give none")

    sched = p.add_argument_group("scheduling")
    sched.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                       help="requests decoded together (default: 64 on CUDA, 8 on CPU)")
    sched.add_argument("--max-queue", type=int, default=eng.max_queue, metavar="N",
                       help="waiting requests beyond this are refused with HTTP 429")
    sched.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                       help="prefill chunk size in tokens (default: 2048 on CUDA, 256 on CPU)")
    sched.add_argument("--gpu-memory-utilization", type=float, default=eng.gpu_memory_utilization,
                       metavar="FRACTION", help="share of GPU memory the server may use")

    graphs = p.add_argument_group("CUDA graphs")
    graphs.add_argument("--graph-capture", default=None, choices=GRAPH_CAPTURE_MODES,
                        help="lazy: capture the largest size before ready, the rest while "
                        "serving and idle; eager: all sizes before ready; off: never "
                        f"(default: {eng.graph_capture})")
    graphs.add_argument("--enforce-eager", action="store_true",
                        help="same as --graph-capture off")
    graphs.add_argument("--cuda-graph-sizes", nargs="+", default=None, metavar="SIZES",
                        help="decode batch sizes to capture, comma- or space-separated "
                        "(default: 1 2 4 8 16 24 ... max-num-seqs)")
    graphs.add_argument("--capture-budget-ms", type=float, default=eng.capture_budget_ms,
                        metavar="MS", help="longest predicted capture allowed between two "
                        "decode steps while serving")
    graphs.add_argument("--capture-min-interval-ms", type=float,
                        default=eng.capture_min_interval_ms, metavar="MS",
                        help="spacing of captures while requests are running")
    graphs.add_argument("--idle-debounce-ms", type=float, default=eng.idle_debounce_ms,
                        metavar="MS", help="quiet time before idle capture starts")

    server = p.add_argument_group("server")
    server.add_argument("--host", default=srv.host, help="address to listen on")
    server.add_argument("--port", type=int, default=srv.port, help="port to listen on (0: any)")
    server.add_argument("--api-key", default=os.environ.get("GRAPHSERVE_API_KEY") or None,
                        metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on /v1 routes; health and "
                        "metrics stay open (default: $GRAPHSERVE_API_KEY, which keeps the key "
                        "out of the process list)")
    server.add_argument("--drain-timeout", type=float, default=srv.drain_timeout,
                        metavar="SECONDS",
                        help="after SIGTERM, how long in-flight requests may take before "
                        "they are aborted")
    server.add_argument("--startup-failure-grace", type=float, default=srv.startup_failure_grace,
                        metavar="SECONDS",
                        help="after a failed startup, how long /health/ready reports the "
                        "reason before the process exits 1")
    server.add_argument("--log-format", default=srv.log_format, choices=("text", "json"),
                        help="json: one JSON object per line")
    server.add_argument("--log-level", default=srv.log_level, choices=LOG_LEVELS,
                        help="least severe level logged, uvicorn's loggers included")
    server.add_argument("--disable-access-log", action="store_true",
                        help="do not log one line per HTTP request")
    # Test seam: a 'module:callable' building the engine (e.g. tests.fake_engine:env_engine).
    server.add_argument("--engine-class", default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Map parsed flags onto the config dataclasses and validate them (raises ConfigError)."""
    if args.enforce_eager and args.graph_capture not in (None, "off"):
        raise ConfigError(f"--enforce-eager conflicts with --graph-capture {args.graph_capture}")
    graph_capture = "off" if args.enforce_eager else (args.graph_capture or "lazy")
    sizes = None
    if args.cuda_graph_sizes is not None:
        try:
            sizes = _graph_sizes(" ".join(args.cuda_graph_sizes))
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"--cuda-graph-sizes: {exc}") from None
    engine = EngineConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        device=args.device,
        loader=args.loader,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        graph_capture=graph_capture,
        cuda_graph_sizes=sizes,
        capture_budget_ms=args.capture_budget_ms,
        capture_min_interval_ms=args.capture_min_interval_ms,
        idle_debounce_ms=args.idle_debounce_ms,
        seed=args.seed,
    )
    config = ServerConfig(
        engine=engine,
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        drain_timeout=args.drain_timeout,
        startup_failure_grace=args.startup_failure_grace,
        log_format=args.log_format,
        log_level=args.log_level,
    )
    config.validate()
    if config.startup_failure_grace < 0:
        raise ConfigError(
            f"--startup-failure-grace must be >= 0, got {config.startup_failure_grace}"
        )
    return config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Plain `graphserve [flags]` means `graphserve serve [flags]`.
    if not argv or (argv[0] not in _SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    return build_parser().parse_args(argv)


# ============================================================================ logging
class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(log_format: str = "text", level: str = "info") -> None:
    """Route our loggers and uvicorn's through one stderr handler in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
            datefmt="%Y-%m-%d %H:%M:%S",
        ))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # warnings.warn() output would bypass the formatter (and break one-JSON-object-per-line).
    logging.captureWarnings(True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        lg.setLevel(level.upper())


# ============================================================================ serving
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


def serve(config: ServerConfig, *, engine_class: str | None = None,
          access_log: bool = True) -> int:
    """Run the server until drained or failed; returns the process exit code."""
    try:
        sock = bind_socket(config.host, config.port)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        return EXIT_STARTUP_FAILURE
    # Progress bars (weight loading) are terminal art, not log lines; and transformers logs
    # through its own stderr handler, so keep it to errors. Both read at their first import,
    # which happens later on the engine thread; explicit settings in the environment win.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    # Until uvicorn serves, a stdlib responder answers the health probes on this socket: the
    # imports below take ~1 s on some machines, and liveness must not wait for them. Signals
    # that come meanwhile are held and replayed once uvicorn's loop handles them.
    held = _HeldSignals()
    early: EarlyHealthResponder | None = None
    try:
        from server.early_health import EarlyHealthResponder
        from server.health import Lifecycle

        lifecycle = Lifecycle()
        try:
            early = EarlyHealthResponder(sock, lifecycle, config.api_key)
            early.start()
        except OSError as exc:  # e.g. out of descriptors: uvicorn will answer, just later
            logger.warning("early health responder not started (%s); /health waits for "
                           "uvicorn", exc)
            early = None
        return _serve_app(config, sock, lifecycle, early, held, engine_class=engine_class,
                          access_log=access_log)
    except _ExitNow:
        logger.warning("signal again before serving: exiting without waiting")
        return 0
    finally:
        held.release()
        if early is not None:
            early.stop(wait=0)  # no-op after a handover; else it must not outlive the socket
        sock.close()


class _ExitNow(SystemExit):
    """A second SIGTERM/SIGINT before uvicorn serves: leave at once (still exit code 0)."""


class _HeldSignals:
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
               early: EarlyHealthResponder | None, held: _HeldSignals, *,
               engine_class: str | None, access_log: bool) -> int:
    """Import the HTTP stack, build the app and run uvicorn on `sock` until it exits."""
    host, port = sock.getsockname()[:2]
    # Heavy-ish imports only now that probes are answered (FastAPI, pydantic, uvicorn).
    import asyncio

    import uvicorn

    from server.api import DEFAULT_ENGINE_CLASS, create_app

    class Server(uvicorn.Server):
        """uvicorn.Server with drain-on-SIGTERM instead of close-at-once."""

        exit_code = 0
        _signals = 0

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.on_signal, sig)
            for sig in held.take():  # came during the imports: handle it now, as if just sent
                self.on_signal(sig)
            try:
                yield
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

        def on_signal(self, sig: int) -> None:
            self._signals += 1
            name = signal.Signals(sig).name
            if self._signals > 1:
                logger.warning("%s again: exiting without waiting", name)
                self.should_exit = self.force_exit = True
                return
            logger.info("%s: draining (up to %.1fs), then exiting", name, config.drain_timeout)
            task = asyncio.get_running_loop().create_task(state.drain(config.drain_timeout))
            task.add_done_callback(lambda _t: setattr(self, "should_exit", True))

        def request_exit(self, code: int) -> None:
            self.exit_code = code
            self.should_exit = True

        async def startup(self, sockets=None) -> None:
            # Hand the socket over: the responder stops accepting before uvicorn starts to.
            # Queued connections stay in the kernel's queue for uvicorn; none is dropped. A
            # slow client the responder accepted is finished on its thread, not waited for.
            if early is not None:
                early.stop(wait=0.1)
            await super().startup(sockets=sockets)

    server: Server | None = None

    def on_exit(code: int) -> None:
        if server is not None:
            server.request_exit(code)

    app = create_app(config, engine_class=engine_class or DEFAULT_ENGINE_CLASS,
                     lifecycle=lifecycle, on_exit=on_exit)
    state = app.state.graphserve
    uv_config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=access_log,
        timeout_graceful_shutdown=5, lifespan="on",
        timeout_keep_alive=5,
    )
    server = Server(uv_config)
    logger.info("graphserve %s listening on http://%s:%d", __version__,
                f"[{host}]" if ":" in host else host, port)
    server.run(sockets=[sock])
    return server.exit_code


def main(argv: list[str] | None = None) -> int:
    """Entry point of `graphserve` and `python -m server`; returns the exit code."""
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"graphserve: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    setup_logging(config.log_format, config.log_level)
    code = serve(config, engine_class=args.engine_class,
                 access_log=not args.disable_access_log)
    logger.info("exiting with code %d", code)
    logging.shutdown()
    stuck = [t for t in threading.enumerate()
             if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if stuck:
        # A non-daemon thread still running (an engine that ignored shutdown) would keep the
        # interpreter alive forever; a server that was asked to exit must exit.
        sys.stderr.write(f"graphserve: forcing exit past running threads: "
                         f"{', '.join(t.name for t in stuck)}\n")
        sys.stderr.flush()
        os._exit(code)
    return code
