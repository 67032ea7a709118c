"""Compile the server's Triton kernels ahead, on a machine without a GPU (image build time).

`graphserve precompile-kernels --preset llama-3.1-8b --out DIR` (docker/Dockerfile runs it)
writes the kernel binaries a server of that shape would JIT-compile at startup, plus the C
launcher stubs Triton gcc-builds for them, into DIR in Triton's own cache layout, and a
manifest; at startup `server.kernel_cache` copies them into `TRITON_CACHE_DIR`. Measured on
the H200 (8B shapes, 2026-11-30): the warm-ups went from 12 compiles + 7 gcc builds (6.4 s) to
none (0.8 s, the remaining time being module loads).

How, without a GPU: the server's own code runs on CPU tensors - a one-layer `DecoderModel`
of the shape, its `StepExecutor`, the startup warm-up plans (`step_plan.warmup_plans`) and
decode warm-ups - while Triton's active driver reports the GPU target (cuda sm_90 by default)
and every kernel launch becomes `JITFunction`'s warm-up: the JIT's own binder specialises the
arguments (16-divisibility, constexprs), computes its own cache key and compiles with the ptxas
bundled in the triton wheel; nothing is launched. Two table widths are compiled (a multiple of
16 columns and not: the block-table stride's divisibility makes separate variants), and each
launcher stub is built against a stub `libcuda.so.1` (only linking needs it).

Keys: Triton hashes its own build into every key, and its compiled `libtriton.so` differs per
Python version; the kernel's source and line numbers, the specialisation, the ptxas version,
the arch and the options go in too. So build with the Python, triton and graphserve commit
the image runs (the Dockerfile does); the manifest records the runtime, and the seeding skips
a directory built for another. Build-time tooling only: the server never imports this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from server.kernel_cache import MANIFEST, runtime_fingerprint

# config.json fields of common shapes (what specialises the kernels: hidden, intermediate,
# head counts, head_dim; the vocabulary and layer count do not).
_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
              max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
              rope_theta=500000.0, tie_word_embeddings=False)  # fmt: skip
PRESETS: dict[str, dict] = {
    "llama-3.2-1b": dict(_LLAMA, hidden_size=2048, intermediate_size=8192,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "llama-3.2-3b": dict(_LLAMA, hidden_size=3072, intermediate_size=8192,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128),
    "llama-3.1-8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "llama-3.1-70b": dict(_LLAMA, hidden_size=8192, intermediate_size=28672,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=128),
    # A group of 7 query heads per KV head: the per-head prefill kernel for every chunk.
    "qwen2.5-7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                       vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, rope_theta=1000000.0),
    # Per-head RMSNorms of q and k (another rms_norm variant).
    "qwen3-8b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                     vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1000000.0),
}  # fmt: skip
TABLE_WIDTHS = (256, 255)  # block-table columns: one multiple of 16, one not


class _EmptyWeights:
    """A weight source of uninitialised tensors: only shapes, strides and dtypes matter."""

    def __init__(self, dtype: torch.dtype, device: str):
        self.dtype, self.device = dtype, torch.device(device)

    def take(self, name, shape):
        return torch.empty(shape, dtype=self.dtype, device=self.device)


class _TargetDriver:
    """Just enough of Triton's active driver for `JITFunction.run(..., warmup=True)`."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def _compile_only(arch: int, compiled: list):
    """Kernel launches compile for `arch` and launch nothing; `server.ops` routes CPU tensors
    to the Triton wrappers; the LM head (no Triton kernel, the slowest CPU op) is skipped.
    Everything is restored on exit."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from server import model, ops, triton_attention, triton_ops

    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(kernel)
        return kernel

    def no_lm_head(self, x, out=None):
        # The GEMM's CPU run is skipped; its skinny-kernel variant is compiled (the LM head's
        # width may be the only one of its block class, as under tensor parallelism).
        if triton_ops.skinny_linear_fits(x, self.lm_head, None, None):
            triton_ops.skinny_linear(x, self.lm_head, checked=True)
        return out if out is not None else x.new_empty(x.shape[0], self.logits_width)

    torch_linear = ops.linear

    def linear(x, weight, bias=None, zero_bias=None, out=None):
        if triton_ops.skinny_linear_fits(x, weight, bias, out):
            return triton_ops.skinny_linear(x, weight, bias, out, checked=True)
        return torch_linear(x, weight, bias, zero_bias, out)

    routed = {"linear": linear, "rms_norm": triton_ops.rms_norm,
              "add_rms_norm": triton_ops.add_rms_norm,
              "silu_and_mul": triton_ops.silu_and_mul, "rope_write_kv": triton_ops.rope_write_kv,
              "decode_attention": triton_attention.decode_attention,
              "prefill_attention": triton_attention.prefill_attention}  # fmt: skip
    saved = {name: getattr(ops, name) for name in routed}
    lm_head = model.DecoderModel._lm_head
    # Restored as it was, not with reset_active(): that would build the real driver (and its
    # gcc-compiled utilities) now, into the cache being filled.
    previous_driver = driver._active
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run = compile_only
    model.DecoderModel._lm_head = no_lm_head
    for name, fn in routed.items():
        setattr(ops, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)
        model.DecoderModel._lm_head = lm_head
        JITFunction.run = run
        driver._active = previous_driver


def drive_startup(raw: dict, block_size: int = 16, max_num_seqs: int = 64,
                  max_batched_tokens: int = 2048, device: str = "cpu",
                  tensor_parallel_size: int = 1) -> None:  # fmt: skip
    """The startup warm-ups of a server of this shape, for each table width (on "cuda": real
    launches, which is how the GPU test checks a seeded cache serves them all). Under tensor
    parallelism every rank runs the same kernels on its head and column slices: rank 0's
    shard stands for all; on "cpu" its collectives are `_compile_only_comm`'s, which compiles the
    fused all-reduce + norm kernel that `--tp-allreduce auto` picks on GPUs with peer access
    (for the default `--tp-timeout`: its deadline is a compile-time constant)."""
    from server.config import DEVICE_DEFAULTS
    from server.distributed.sharding import TPShard
    from server.hf_config import ModelConfig
    from server.mixed_graph_policy import mixed_graph_sizes
    from server.model import DecoderModel
    from server.step_executor import StepExecutor
    from server.step_plan import warmup_plans

    # Mixed-step graphs (one process only) add the packed form's warm-ups.
    buckets = [] if tensor_parallel_size > 1 else mixed_graph_sizes(
        max_num_seqs, DEVICE_DEFAULTS["cuda"].decode_prefill_tokens, max_batched_tokens)

    config = ModelConfig(dict(raw, num_hidden_layers=1))
    shard = TPShard(0, tensor_parallel_size)
    for width in TABLE_WIDTHS:
        max_model_len = width * block_size
        weights = _EmptyWeights(torch.bfloat16, device)
        model = DecoderModel(config, weights, max_model_len, shard=shard)
        if tensor_parallel_size > 1 and device == "cpu":
            model.attach_comm(_compile_only_comm(tensor_parallel_size, max_num_seqs,
                                                 config.hidden_size))  # fmt: skip
        executor = StepExecutor.build(model, 8, block_size, max_model_len, max_num_seqs,
                                      emulate=False, tensor_parallel=tensor_parallel_size > 1,
                                      mixed_tokens=max(buckets, default=0))  # fmt: skip
        for plan in warmup_plans(executor.graphs.scratch_row, max_model_len, max_batched_tokens,
                                 buckets):  # fmt: skip
            executor.execute(plan, None)
        for n in sorted({max_num_seqs, 1}, reverse=True):
            executor.graphs.warm(n)


def _compile_only_comm(world: int, rows: int, hidden: int):
    """A sharded model's collectives while kernels are only compiled (`_compile_only`):
    `TPComm`'s own routing, with the decode-sized all-reduces going to `SymmAllReduce` as on
    GPUs with peer access (its launches compile and run nothing, so its peer pointers are never
    used) and the rest (prompt chunks) identities instead of NCCL calls."""
    from server.config import EngineConfig
    from server.distributed.comm import TPComm
    from server.distributed.symm_allreduce import SymmAllReduce

    class CompileOnlyComm(TPComm):
        def all_reduce(self, x):
            return x

    comm = CompileOnlyComm(None, 0, world)
    comm._fused = SymmAllReduce(0, world, rows, hidden, torch.bfloat16, "cpu", [0] * world,
                                [0] * world, EngineConfig.tp_timeout_s)  # fmt: skip
    return comm


def _build_launchers(kernels: list) -> int:
    """gcc-build `cuda_utils` and each kernel's launcher stub into the cache, exactly as
    Triton's CUDA driver would at first launch (key: the C source + platform), linked against
    a stub `libcuda.so.1` that defines the `cu*` symbols they import: with gcc's --as-needed a
    stub without them would drop the libcuda dependency and the module would not load on the
    GPU machine."""
    import triton.backends.nvidia.driver as nvidia
    from triton.runtime import build
    from triton.runtime.cache import get_cache_manager

    sources = {("cuda_utils", Path(nvidia.dirname, "driver.c").read_text())}
    for kernel in kernels:
        src = kernel.src
        constants = {(src.fn.arg_names.index(k),) if isinstance(k, str) else k: v
                     for k, v in src.constants.items()}  # fmt: skip
        launcher = nvidia.make_launcher(constants, dict(src.signature),
                                        getattr(kernel.metadata, "tensordesc_meta", None))
        sources.add(("__triton_launcher", launcher))
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    with tempfile.TemporaryDirectory(prefix="graphserve-launchers-") as tmp:

        def gcc(name: str, source: str, stub: str) -> tuple[bytes, set[str]]:
            work = tempfile.mkdtemp(dir=tmp)
            path = Path(work, name + ".c")
            path.write_text(source)
            so = build._build(name, str(path), work, [nvidia.libdevice_dir, stub],
                              nvidia.include_dirs, nvidia.libraries, [])  # fmt: skip
            undefined = subprocess.run(["nm", "-D", "--undefined-only", so], check=True,
                                       capture_output=True, text=True).stdout  # fmt: skip
            names = {line.split()[-1] for line in undefined.splitlines() if line.split()}
            return Path(so).read_bytes(), {n for n in names if n.startswith("cu")}

        def stub_libcuda(symbols: set[str]) -> str:
            work = tempfile.mkdtemp(dir=tmp)
            body = "".join(f"int {n}(void) {{ return 0; }}\n" for n in sorted(symbols))
            Path(work, "stub.c").write_text(body or "int graphserve_stub(void) { return 0; }\n")
            subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                            str(Path(work, "libcuda.so.1")), str(Path(work, "stub.c"))],
                           check=True)  # fmt: skip
            return work

        # Pass 1 learns the symbols the modules import, pass 2 links against a stub with them.
        first = stub_libcuda(set())
        stub = stub_libcuda(set().union(*(gcc(n, s, first)[1] for n, s in sources)))
        for name, source in sorted(sources):
            key = hashlib.sha256((source + build.platform_key()).encode()).hexdigest()
            get_cache_manager(key).put(gcc(name, source, stub)[0], name + suffix, binary=True)
    return len(sources)


def precompile(shapes: dict[str, dict], out: Path, *, arch: int = 90, block_size: int = 16,
               max_num_seqs: int = 64, max_batched_tokens: int = 2048, launchers: bool = True,
               tensor_parallel_sizes: tuple[int, ...] = (1,)) -> dict:  # fmt: skip
    """Compile every startup kernel variant of each shape (at each tensor-parallel size whose
    ranks split its KV heads) into `out`; returns the manifest."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(out)
    compiled: list = []
    t0 = time.perf_counter()
    try:
        with _compile_only(arch, compiled):
            for raw in shapes.values():
                kv_heads = raw.get("num_key_value_heads") or raw["num_attention_heads"]
                for tp in tensor_parallel_sizes:
                    if kv_heads % tp == 0:
                        drive_startup(raw, block_size, max_num_seqs, max_batched_tokens,
                                      tensor_parallel_size=tp)  # fmt: skip
        n_launchers = _build_launchers(compiled) if launchers else 0
    finally:
        if previous is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = previous
    import triton

    # launch_pdl: one of a compiled kernel's options (server.pdl), named so a reader can tell
    # the two variants of a kernel apart.
    kernels = sorted({(k.src.name, k.hash, bool(getattr(k.metadata, "launch_pdl", False)))
                      for k in compiled})  # fmt: skip
    manifest = {
        "runtime": runtime_fingerprint(),
        "triton": triton.__version__,
        "target": f"cuda:{arch}",
        "shapes": sorted(shapes),
        "block_size": block_size,
        "tensor_parallel_sizes": list(tensor_parallel_sizes),
        "kernels": [{"name": name, "hash": h, "launch_pdl": p} for name, h, p in kernels],
        "launchers": n_launchers,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def shapes_from(presets: list[str], models: list[str]) -> dict[str, dict]:
    """Preset names and checkpoint directories (their config.json) -> {label: config}."""
    shapes = {}
    for name in presets:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        shapes[name] = PRESETS[name]
    for path in models:
        shapes[path] = json.loads((Path(path) / "config.json").read_text())
    if not shapes:
        raise ValueError("name at least one --preset or --model")
    return shapes
