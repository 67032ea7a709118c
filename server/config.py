"""Configuration dataclasses shared by the CLI, the API and the engine.

Nothing here imports torch or transformers: the CLI builds these before the HTTP
port is bound, and the port must be bound before the heavy imports start.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

GRAPH_CAPTURE_MODES = ("lazy", "eager", "off")
BUSY_CAPTURE_MODES = ("background", "inline")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cuda", "cpu")
# auto: read the files directly unless the checkpoint needs transformers; fast: never import
# transformers (fail instead); transformers: always use its Auto classes.
LOADERS = ("auto", "fast", "transformers")
# auto: the checkpoint's safetensors files; dummy: random weights of config.json's shapes, no
# weight file read (config.json and tokenizer files are enough).
LOAD_FORMATS = ("auto", "dummy")
# How tensor-parallel ranks all-reduce: nccl everywhere, or, for decode-sized tensors, one
# kernel over symmetric memory (peer stores over NVLink, no multicast) fused with the norm after
# it (server.distributed.symm_allreduce), nccl for the rest; auto: symm-mem where every pair of
# the group's GPUs has peer access, else nccl (server.distributed.comm.choose_allreduce).
TP_ALLREDUCE = ("auto", "nccl", "symm-mem")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and why."""


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*", re.I)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_byte_size(text: str) -> int:
    """'1048576', '512KiB', '8MiB', '1.5G' -> bytes (binary units; K, KB, KiB all mean 1024)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ConfigError(f"expected a size like 1048576, 512KiB or 8MiB, got {text!r}")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "")[:1].lower()])


def format_bytes(n: int) -> str:
    """1048576 -> '1 MiB', 1536 -> '1.5 KiB', 100 -> '100 bytes' (for messages)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} bytes"


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """`[1, 2, 4, 8, 16, 24, ..., max_num_seqs]`: powers of two up to 8, then steps of 8.

    `max_num_seqs` itself is always included so every decode batch has a graph to pad into.
    """
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


@dataclass(frozen=True)
class DeviceDefaults:
    """Defaults that depend on the device the engine ends up on (known only after `import
    torch`): what the flags left as None resolve to."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int | None  # None: the model's limit (shrunk to fit the KV budget on CUDA)
    decode_prefill_tokens: int  # prompt tokens a step may add to running decode rows


# A GPU step of 64 rows costs little more than one (decode reads the weights once per step); on
# the CPU every row costs, and a CI box has two cores, so fewer rows and smaller prefill chunks.
DEVICE_DEFAULTS = {
    "cuda": DeviceDefaults(
        max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=None,
        # 8B on an H200 (bench/results/decode-8b-h200-mixed.json): on mixed-step graphs a step
        # of a few hundred tokens is compute-bound, ~27 us per token at 260 and at 516 alike,
        # so 256 prompt tokens beside the decode rows prefill as fast as 512 while the running
        # streams wait half as long per step (~8 vs ~15 ms; eager, before those graphs, both
        # were launch-bound and 512 was the better trade).
        decode_prefill_tokens=256,
    ),
    "cpu": DeviceDefaults(
        max_num_seqs=8, max_num_batched_tokens=256, max_model_len=4096, decode_prefill_tokens=256
    ),
}


@dataclass
class EngineConfig:
    """Everything the engine needs to load a model and schedule requests."""

    model: str | None = None  # local HF directory; None means the embedded default model
    served_model_name: str | None = None  # name reported by /v1/models; default: directory name
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu
    loader: str = "auto"  # auto | fast | transformers (see LOADERS)
    tensor_parallel_size: int = 1  # processes (GPUs) the model is sharded over
    tp_timeout_s: float = 60.0  # longest wait for a tensor-parallel peer at any agreement
    tp_allreduce: str = "auto"  # auto | nccl | symm-mem (see TP_ALLREDUCE)
    max_model_len: int | None = None  # None: the model's limit, shrunk to fit the KV budget
    max_num_seqs: int | None = None  # None: 64 on CUDA, 8 on CPU
    max_queue: int = 1024  # waiting requests beyond this are rejected (HTTP 429)
    max_num_batched_tokens: int | None = None  # tokens per step; None: 2048 CUDA, 256 CPU
    # Prompt tokens a step may carry beside decode rows (ITL of running streams); None: 256.
    decode_prefill_tokens: int | None = None
    # Context depth at which a prompt token beside decode rows counts double (its attention
    # costs as much as its linear layers: `scheduler.ChunkCost`); 0: depth is free; None: from
    # the model's shape on CUDA, 0 on CPU.
    decode_prefill_depth: int | None = None
    block_size: int = 16  # tokens per KV-cache block (the prefix cache's granularity too)
    num_kv_blocks: int | None = None  # None: as many as the memory budget holds
    enable_prefix_caching: bool = True  # share full KV blocks between identical prefixes
    gpu_memory_utilization: float = 0.90  # fraction of total GPU memory the server may hold
    graph_capture: str = "lazy"  # lazy | eager | off
    mixed_graphs: bool = True  # steps with prompt tokens on graphs per token bucket
    cuda_graph_sizes: list[int] | None = None  # None: default_capture_sizes(max_num_seqs)
    capture_budget_ms: float = 50.0  # max predicted capture time allowed between two steps
    # Busy-time captures (decode sizes, mixed-step buckets): on a thread of their own while
    # steps go on (background), or between two steps (inline). TP always captures inline.
    busy_capture: str = "background"
    capture_min_interval_ms: float = 250.0  # spacing of captures while requests are running
    idle_debounce_ms: float = 20.0  # quiet time before idle capture starts
    seed: int = 0  # base seed for requests that give none
    # -- startup (weights, state dir) --
    load_format: str = "auto"  # auto | dummy (see LOAD_FORMATS)
    # Capture plan + startup timings kept across restarts: None = server.state_dir's default
    # ($XDG_CACHE_HOME/graphserve), "" = keep nothing.
    state_dir: str | None = None
    prefetch_threads: int = 4  # page-cache warmers during the torch import (0: none)
    # One GPU: read the weights onto it with the driver API while torch imports
    # (`server.early_weights`); off: the pipeline reads them after the import, as before.
    early_weights: bool = True
    # Kernels compiled ahead (server.kernel_cache); None: $GRAPHSERVE_KERNEL_CACHE, if set.
    kernel_cache: str | None = None

    def validate(self) -> None:
        """Raise ConfigError for values that can never work (checked before any heavy import)."""
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.loader not in LOADERS:
            raise ConfigError(f"--loader must be one of {', '.join(LOADERS)}, got {self.loader!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(
                f"--load-format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}"
            )
        if self.tensor_parallel_size < 1:
            raise ConfigError(
                f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}"
            )
        if self.tp_allreduce not in TP_ALLREDUCE:
            raise ConfigError(
                f"--tp-allreduce must be one of {', '.join(TP_ALLREDUCE)}, "
                f"got {self.tp_allreduce!r}"
            )
        if not self.tp_timeout_s > 0:
            raise ConfigError(f"--tp-timeout must be > 0 seconds, got {self.tp_timeout_s}")
        if self.graph_capture not in GRAPH_CAPTURE_MODES:
            raise ConfigError(
                f"--graph-capture must be one of {', '.join(GRAPH_CAPTURE_MODES)}, "
                f"got {self.graph_capture!r}"
            )
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ConfigError(f"--block-size must be 8, 16, 32, 64 or 128, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ConfigError(f"--num-kv-blocks must be >= 2, got {self.num_kv_blocks}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens",
                     "decode_prefill_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.decode_prefill_depth is not None and self.decode_prefill_depth < 0:
            raise ConfigError(
                f"--decode-prefill-depth must be >= 0, got {self.decode_prefill_depth}")
        if self.prefetch_threads < 0:
            raise ConfigError(f"--prefetch-threads must be >= 0, got {self.prefetch_threads}")
        if self.max_queue < 0:
            raise ConfigError(f"--max-queue must be >= 0, got {self.max_queue}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.cuda_graph_sizes is not None:
            if not self.cuda_graph_sizes or any(s < 1 for s in self.cuda_graph_sizes):
                raise ConfigError(
                    "--cuda-graph-sizes must be a non-empty list of positive integers"
                )
        if self.busy_capture not in BUSY_CAPTURE_MODES:
            raise ConfigError(
                f"--busy-capture must be one of {', '.join(BUSY_CAPTURE_MODES)}, "
                f"got {self.busy_capture!r}"
            )
        if (
            self.capture_budget_ms < 0
            or self.idle_debounce_ms < 0
            or self.capture_min_interval_ms < 0
        ):
            raise ConfigError("capture timing options must be >= 0")

    def max_num_seqs_for(self, device_type: str) -> int:
        return self.max_num_seqs or DEVICE_DEFAULTS[device_type].max_num_seqs

    def max_num_batched_tokens_for(self, device_type: str) -> int:
        return self.max_num_batched_tokens or DEVICE_DEFAULTS[device_type].max_num_batched_tokens

    def decode_prefill_tokens_for(self, device_type: str) -> int:
        return self.decode_prefill_tokens or DEVICE_DEFAULTS[device_type].decode_prefill_tokens


@dataclass
class ServerConfig:
    """HTTP server settings plus the engine configuration."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    drain_timeout: float = 30.0  # seconds in-flight requests may take after SIGTERM
    startup_failure_grace: float = 5.0  # seconds a failed startup stays observable before exit
    log_format: str = "text"  # text | json
    log_level: str = "info"
    # Limits that keep one client from stalling the server (docs/deployment.md, Reliability).
    max_request_bytes: int | None = None  # None: from the context length (http.limits)
    header_timeout: float = 10.0  # seconds from connect (or the last answer) to a full head
    body_timeout: float = 30.0  # seconds to receive a request body once its head is in
    keep_alive_timeout: float = 5.0  # idle seconds before a keep-alive connection is closed
    max_connections: int = 4096  # open connections; idle ones are closed first beyond it
    ssl_certfile: str | None = None  # PEM certificate chain: serve HTTPS
    ssl_keyfile: str | None = None  # PEM private key (may be inside ssl_certfile)
    # The engine in a process of its own (server.engine_process); False: in the HTTP process.
    engine_process: bool = True

    def validate(self) -> None:
        self.engine.validate()
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if self.drain_timeout < 0:
            raise ConfigError(f"--drain-timeout must be >= 0, got {self.drain_timeout}")
        if self.max_request_bytes is not None and self.max_request_bytes < 1024:
            raise ConfigError(
                f"--max-request-bytes must be at least 1 KiB, got {self.max_request_bytes}"
            )
        for flag, value in (("--header-timeout", self.header_timeout),
                            ("--body-timeout", self.body_timeout),
                            ("--keep-alive-timeout", self.keep_alive_timeout)):
            if not value > 0:
                raise ConfigError(f"{flag} must be > 0 seconds, got {value}")
        if self.max_connections < 16:
            raise ConfigError(f"--max-connections must be >= 16, got {self.max_connections}")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ConfigError("--ssl-keyfile needs --ssl-certfile")
        for flag, path in (("--ssl-certfile", self.ssl_certfile),
                           ("--ssl-keyfile", self.ssl_keyfile)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"{flag}: no such file: {path}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"--log-format must be text or json, got {self.log_format!r}")
