"""`graphserve` command line: flags -> ServerConfig, then logging and `server.launch.serve`.

Parsing and validation come first and import nothing heavy: a bad value exits 2 before a port
is bound. See `server/launch.py` for what happens after.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
from pathlib import Path

from server import __version__
from server.config import (
    BUSY_CAPTURE_MODES,
    DEVICES,
    DTYPES,
    GRAPH_CAPTURE_MODES,
    LOAD_FORMATS,
    LOADERS,
    TP_ALLREDUCE,
    ConfigError,
    EngineConfig,
    ServerConfig,
    parse_byte_size,
)
from server.gc_control import end_startup_pause, pause_until_ready
from server.launch import serve, tls_context
from server.logging_setup import LOG_LEVELS, setup_logging

logger = logging.getLogger("graphserve.cli")

EXIT_CONFIG_ERROR = 2
_SUBCOMMANDS = ("serve", "precompile-kernels")


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
    pre = sub.add_parser(
        "precompile-kernels",
        help="compile the Triton kernels ahead, without a GPU (image build)",
        description="Compile the kernels a server of the given model shapes JIT-compiles at "
        "startup, for a GPU architecture, on a machine without a GPU; `serve --kernel-cache "
        "DIR` (or $GRAPHSERVE_KERNEL_CACHE) then starts without compiling. Run it with the "
        "Python and triton the server runs with: Triton's cache keys include both.",
        formatter_class=_HelpFormatter,
    )
    pre.add_argument("--out", required=True, metavar="DIR", help="directory to fill")
    pre.add_argument("--preset", action="append", default=[], metavar="NAME",
                     help="a built-in model shape (repeat): llama-3.2-1b, llama-3.2-3b, "
                     "llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, qwen3-8b")
    pre.add_argument("--model", action="append", default=[], metavar="DIR",
                     help="a checkpoint directory whose config.json gives a shape (repeat)")
    pre.add_argument("--arch", type=int, default=90,
                     help="CUDA compute capability x 10 (90: H100/H200)")
    pre.add_argument("--block-size", type=int, default=EngineConfig.block_size,
                     help="KV-cache block size the servers will use")
    pre.add_argument("--tensor-parallel-size", type=int, action="append", default=None,
                     metavar="N", help="also the per-rank kernels of N-way tensor parallelism "
                     "(repeat; default: 1 only)")
    pre.add_argument("--no-launchers", action="store_true",
                     help="skip the gcc-built launcher stubs (then built at first launch)")
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
                       help="auto = read safetensors and tokenizer.json directly, taking the "
                       "tokenizer from transformers when tokenizer.json cannot reproduce it; "
                       "fast = never import transformers; transformers = always use its Auto "
                       "classes")
    model.add_argument("--load-format", default=eng.load_format, choices=LOAD_FORMATS,
                       help="auto = the checkpoint's safetensors files; dummy = random weights of "
                       "config.json's shapes, no weight file read (a directory with config.json "
                       "and tokenizer files is enough)")
    model.add_argument("--state-dir", default=None, metavar="PATH",
                       help="where the capture plan (decode batch-size demand) and startup "
                       "timings survive restarts (default: $XDG_CACHE_HOME/graphserve, else "
                       "~/.cache/graphserve)")
    model.add_argument("--no-state-dir", action="store_true",
                       help="keep no state across restarts")
    model.add_argument("--prefetch-threads", type=int, default=eng.prefetch_threads, metavar="N",
                       help="threads pulling the checkpoint into the page cache while torch "
                       "imports (0: none)")
    model.add_argument("--no-early-weights", dest="early_weights", action="store_false",
                       help="on one GPU, do not read the weights onto it while torch imports "
                       "(CUDA driver API through ctypes); the pipeline reads them after the "
                       "import instead (~1 s later to ready for an 8B on an H200)")
    model.add_argument("--kernel-cache", default=None, metavar="DIR",
                       help="Triton kernels compiled ahead (`graphserve precompile-kernels`), "
                       "copied into TRITON_CACHE_DIR at startup so nothing is JIT-compiled "
                       "(default: $GRAPHSERVE_KERNEL_CACHE; the image sets it)")
    model.add_argument("--max-model-len", type=int, default=None, metavar="N",
                       help="context length (prompt + output) in tokens (default: the model's "
                       "limit; shrunk only if the whole KV pool is smaller)")
    model.add_argument("--seed", type=int, default=eng.seed,
                       help="base seed for requests that give none")

    sched = p.add_argument_group("scheduling")
    sched.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                       help="requests running at once (default: 64 on CUDA, 8 on CPU)")
    sched.add_argument("--max-queue", type=int, default=eng.max_queue, metavar="N",
                       help="waiting requests beyond this are refused with HTTP 429")
    sched.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                       help="tokens per engine step: decode rows plus prompt chunks (default: "
                       "2048 on CUDA, 256 on CPU)")
    sched.add_argument("--decode-prefill-tokens", type=int, default=None, metavar="N",
                       help="prompt tokens a step may carry while other requests are decoding: "
                       "smaller keeps running streams' inter-token gaps even while a long prompt "
                       "is prefilled, larger prefills it sooner (default: 256)")
    sched.add_argument("--decode-prefill-depth", type=int, default=None, metavar="TOKENS",
                       help="context depth at which a prompt token beside decoding requests "
                       "counts double against --decode-prefill-tokens (its attention costs as much "
                       "as the rest of its step): deep in a long prompt the chunks shrink so "
                       "running streams' gaps stay flat; 0 counts every token once (default: from "
                       "the model's shape on CUDA, 0 on CPU)")
    sched.add_argument("--block-size", type=int, default=eng.block_size, metavar="N",
                       help="tokens per KV-cache block (8, 16, 32, 64 or 128); also the prefix "
                       "cache's granularity")
    sched.add_argument("--num-kv-blocks", type=int, default=None, metavar="N",
                       help="KV-cache blocks to allocate (default: all the memory budget holds "
                       "on CUDA; every sequence at full context on CPU)")
    sched.add_argument("--no-prefix-caching", dest="enable_prefix_caching",
                       action="store_false",
                       help="do not share KV blocks between requests with the same prefix")
    sched.add_argument("--gpu-memory-utilization", type=float, default=eng.gpu_memory_utilization,
                       metavar="FRACTION", help="share of GPU memory the server may use")

    par = p.add_argument_group("tensor parallelism")
    par.add_argument("--tensor-parallel-size", "-tp", type=int, default=eng.tensor_parallel_size,
                     metavar="N",
                     help="shard the model over N GPUs of this host, one process each (this "
                     "one is rank 0); N must divide the model's KV heads")
    par.add_argument("--tp-timeout", type=float, default=eng.tp_timeout_s, metavar="SECONDS",
                     help="longest wait for a peer rank at any agreement (load: 10x this); a "
                     "peer that misses it fails the server instead of hanging it")

    par.add_argument("--tp-allreduce", default=eng.tp_allreduce, choices=TP_ALLREDUCE,
                     help="symm-mem (CUDA, GPUs with peer access, e.g. NVLink): decode steps' "
                     "all-reduces as one kernel each over symmetric memory, fused with the "
                     "residual add and RMSNorm after them, nccl for prompt chunks; nccl: nccl "
                     "everywhere; auto: symm-mem where every pair of the GPUs has peer access "
                     f"(default: {eng.tp_allreduce})")

    graphs = p.add_argument_group("CUDA graphs")
    graphs.add_argument("--graph-capture", default=None, choices=GRAPH_CAPTURE_MODES,
                        help="lazy: capture the largest size before ready, the rest while "
                        "serving and idle; eager: all sizes before ready; off: never "
                        f"(default: {eng.graph_capture})")
    graphs.add_argument("--enforce-eager", action="store_true",
                        help="same as --graph-capture off")
    graphs.add_argument("--no-mixed-graphs", dest="mixed_graphs", action="store_false",
                        help="run every step that carries prompt tokens eagerly (by default "
                        "such steps replay CUDA graphs per token bucket once captured: "
                        "before ready under eager capture, in idle time under lazy)")
    graphs.add_argument("--cuda-graph-sizes", nargs="+", default=None, metavar="SIZES",
                        help="decode batch sizes to capture, comma- or space-separated "
                        "(default: 1 2 4 8 16 24 ... max-num-seqs)")
    graphs.add_argument("--capture-budget-ms", type=float, default=eng.capture_budget_ms,
                        metavar="MS", help="longest predicted capture allowed between two "
                        "decode steps while serving")
    graphs.add_argument("--busy-capture", choices=BUSY_CAPTURE_MODES, default=eng.busy_capture,
                        help="where a capture that traffic asks for runs while requests are "
                        "running: on a thread of its own while steps go on (background), or "
                        "between two steps, stalling every running stream for it (inline); "
                        "tensor parallelism always captures inline (default: %(default)s)")
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
    server.add_argument("--ssl-certfile", default=None, metavar="PEM",
                        help="serve HTTPS with this certificate chain (health probes too)")
    server.add_argument("--ssl-keyfile", default=None, metavar="PEM",
                        help="private key for --ssl-certfile (default: inside the certfile)")
    server.add_argument("--engine-process", action=argparse.BooleanOptionalAction,
                        default=srv.engine_process,
                        help="run the engine in a process of its own, which starts before the "
                        "HTTP stack imports and keeps HTTP work off the engine's GIL "
                        "(default: on; --no-engine-process runs it in the HTTP process)")

    limits = p.add_argument_group(
        "limits", "what one client may cost the server (docs/deployment.md, Reliability)")
    limits.add_argument("--max-request-bytes", default=None, metavar="SIZE",
                        help="largest request body (e.g. 4MiB); larger ones get 413 before "
                        "they are read (default: 16 bytes per token of context, at least 1 MiB)")
    limits.add_argument("--header-timeout", type=float, default=srv.header_timeout,
                        metavar="SECONDS",
                        help="time a connection has to send a complete request head, from "
                        "connecting or from its previous answer")
    limits.add_argument("--body-timeout", type=float, default=srv.body_timeout,
                        metavar="SECONDS",
                        help="time a request has to send its whole body once its head is in")
    limits.add_argument("--keep-alive-timeout", type=float, default=srv.keep_alive_timeout,
                        metavar="SECONDS", help="idle time before a keep-alive connection closes")
    limits.add_argument("--max-connections", type=int, default=srv.max_connections,
                        metavar="N",
                        help="open connections; beyond it the one waiting longest for a "
                        "request head is closed (never a request in progress)")
    # Test seam: a 'module:callable' building the engine (tests.helpers.fake_engine:env_engine).
    server.add_argument("--engine-class", default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Map parsed flags onto the config dataclasses and validate them (raises ConfigError)."""
    if args.enforce_eager and args.graph_capture not in (None, "off"):
        raise ConfigError(f"--enforce-eager conflicts with --graph-capture {args.graph_capture}")
    if args.no_state_dir and args.state_dir is not None:
        raise ConfigError("--no-state-dir conflicts with --state-dir")
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
        tensor_parallel_size=args.tensor_parallel_size,
        tp_timeout_s=args.tp_timeout,
        tp_allreduce=args.tp_allreduce,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue,
        max_num_batched_tokens=args.max_num_batched_tokens,
        decode_prefill_tokens=args.decode_prefill_tokens,
        decode_prefill_depth=args.decode_prefill_depth,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        enable_prefix_caching=args.enable_prefix_caching,
        gpu_memory_utilization=args.gpu_memory_utilization,
        graph_capture=graph_capture,
        mixed_graphs=args.mixed_graphs,
        cuda_graph_sizes=sizes,
        capture_budget_ms=args.capture_budget_ms,
        busy_capture=args.busy_capture,
        capture_min_interval_ms=args.capture_min_interval_ms,
        idle_debounce_ms=args.idle_debounce_ms,
        seed=args.seed,
        load_format=args.load_format,
        state_dir="" if args.no_state_dir else args.state_dir,
        prefetch_threads=args.prefetch_threads,
        early_weights=args.early_weights,
        kernel_cache=args.kernel_cache,
    )
    max_request_bytes = None
    if args.max_request_bytes is not None:
        try:
            max_request_bytes = parse_byte_size(args.max_request_bytes)
        except ConfigError as exc:
            raise ConfigError(f"--max-request-bytes: {exc}") from None
    config = ServerConfig(
        engine=engine,
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        drain_timeout=args.drain_timeout,
        startup_failure_grace=args.startup_failure_grace,
        log_format=args.log_format,
        log_level=args.log_level,
        max_request_bytes=max_request_bytes,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        max_connections=args.max_connections,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        engine_process=args.engine_process,
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of `graphserve` and `python -m server`; returns the exit code."""
    args = parse_args(argv)
    if args.command == "precompile-kernels":
        return precompile_kernels(args)
    try:
        config = config_from_args(args)
        tls = tls_context(config)
    except ConfigError as exc:
        print(f"graphserve: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    setup_logging(config.log_format, config.log_level)
    pause_until_ready()  # before the heavy imports: no collection slows the start (gc_control)
    try:
        code = serve(config, engine_class=args.engine_class,
                     access_log=not args.disable_access_log, tls=tls)
    finally:
        end_startup_pause()
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


def precompile_kernels(args: argparse.Namespace) -> int:
    """`graphserve precompile-kernels`: see server.kernel_precompile."""
    from server.kernel_precompile import precompile, shapes_from  # torch + triton: not for serve

    try:
        shapes = shapes_from(args.preset, args.model)
        tp_sizes = tuple(args.tensor_parallel_size or [1])
        manifest = precompile(shapes, Path(args.out), arch=args.arch,
                              block_size=args.block_size, launchers=not args.no_launchers,
                              tensor_parallel_sizes=tp_sizes)  # fmt: skip
    except (ValueError, OSError) as exc:
        print(f"graphserve: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(f"{len(manifest['kernels'])} kernels and {manifest['launchers']} launcher stubs for "
          f"{', '.join(manifest['shapes'])} ({manifest['target']}, python "
          f"{manifest['runtime']['python']}, triton {manifest['triton']}) in "
          f"{manifest['seconds']:.1f} s -> {args.out}")  # fmt: skip
    return 0
