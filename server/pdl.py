"""Programmatic dependent launch (PDL) for our Triton kernels: a launch overlaps the one before.

Between two kernels of a decode graph the GPU normally drains the first (every block retired,
its writes flushed) before it starts the second, so each of the ~10 kernels of a decoder layer
pays that gap (~320 per 8B step at batch 1, where every kernel is ours). On Hopper and later a
kernel launched with the programmatic-stream-serialization attribute may start while its
predecessor still runs; it must then execute `griddepcontrol.wait` before touching anything the
predecessor may read or write, and that wait returns once the predecessor has completed and its
memory is visible. Stream capture keeps the relation as a programmatic edge of the CUDA graph,
so replays overlap the same way. Measured on the H200 (8B, one process, replays interleaved,
`bench.decode_routes_ab --pdl-ab`): the decode graph step 4.368 -> 4.209 ms at batch 1, 4.593 ->
4.504 at 8, 4.863 -> 4.817 at 16.

The rule every kernel here follows (`wait_for_previous` first, nothing before it):

* **Wait at the top.** No load or store precedes the wait, so there is no hazard with the
  predecessor in either direction (it may read a buffer this kernel writes: the graph pool
  reuses buffers). Weights could be loaded before the wait, but prefetching them measured
  slower than not (a 32-layer chain of a TP=2 rank's four skinny GEMMs: 62.8 us per layer
  plain, 61.8 with the wait at the top, 65.7-92.3 with a 64 KiB-1 MiB L2 prefetch of each
  program's slice before the wait).
* **Kernels release their dependents at once** (`EARLY`): norms, SiLU, RoPE, the skinny
  GEMM, the attention's reduce, the all-reduce; the next kernel's blocks then reach the SMs
  while they run and wait there. The attention's split kernel does not; its dependents launch
  as its last blocks retire. Measured: in a chain of GEMMs where a GEMM follows a GEMM, early
  release cost 74.5 against 61.8 us a layer (the waiting GEMM's blocks hold SM slots the
  running one's later blocks need), but no GEMM follows a GEMM in the server's decode layer,
  and there (8B, one H200, one process, replays interleaved) the GEMMs releasing early took
  the step from 4.262 to 4.226 ms at batch 1, 4.540 -> 4.502 at 8, 4.866 -> 4.772 at 16; the
  split kernel releasing early gained 0.02 ms at batch 1 and lost 0.08 at 8, so it stays out
  (`bench/results/probe-skinny-early-h200.json`).
* **Only steps of up to `MAX_ROWS` rows take part** (`use`): there every kernel of a decode
  step is ours. Above it the projections are cuBLAS kernels, and with PDL at every size the
  steps of 32-64 rows measured 0.5-1.6 % slower (24 rows even), so those launches stay
  ordinary. Prefill attention never takes part.
* The order of kernels is unchanged: a kernel's wait returns only after its predecessor has
  completed, which waited for its own predecessor, and so on, so every kernel still sees all
  earlier kernels' writes (the symmetric-memory all-reduce's slot argument relies on this).
  Kernels of torch, cuBLAS and NCCL do not take part; next to them a launch is an ordinary one.

The cost is at startup: the kernels launched on both sides of `MAX_ROWS` (norms, SiLU, RoPE,
decode attention) have two compiled variants each, which the warm-ups at the largest size and
at 1 load (8B, kernels compiled ahead: warm-ups 1.06 -> 1.19 s; empty cache: 16 -> 24
compiles).

`enabled()` decides per process and target: Triton's active driver targets CUDA compute
capability 9.0 or later, the CUDA driver is 12.3 or later (programmatic edges in captured
graphs), Triton has the `griddepcontrol` builtins, not the interpreter, and `$GRAPHSERVE_PDL`
is not `0` (the escape hatch). The answer follows the active driver, so
`graphserve precompile-kernels` (which swaps in a driver for the target architecture) compiles
the variants a server on that GPU launches: `launch_pdl` is one of a compiled kernel's options
and so part of Triton's cache key.

Thread ownership: none; `enabled()` caches per driver object and is safe from any thread.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

try:  # Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _HAVE_GDC = True
except ImportError:  # an older Triton: never enabled, so `if PDL:` below is never emitted
    gdc_launch_dependents = gdc_wait = None
    _HAVE_GDC = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# = triton_ops.SKINNY_MAX_ROWS (a test holds them equal): up to this many rows every kernel of
# a decode step is ours; beyond it the projections are cuBLAS kernels (see the module docstring).
MAX_ROWS = 16
MIN_DRIVER = 12030  # CUDA 12.3: programmatic edges in captured graphs (see _decide)
_forced: bool | None = None  # set_enabled(); None: decide from the target and the environment
_cache: tuple[object, bool] | None = None  # (the driver it was decided for, the answer)


@triton.jit
def wait_for_previous(PDL: tl.constexpr, EARLY: tl.constexpr):
    """A kernel's first statement: with PDL, wait for the previous kernel to complete (and,
    with EARLY, let the next kernel's blocks launch now)."""
    if PDL:
        gdc_wait()
        if EARLY:
            gdc_launch_dependents()


def _decide(driver) -> bool:
    try:
        target = driver.get_current_target()
    except Exception:  # no GPU driver: nothing launches anyway
        return False
    arch = target.arch if isinstance(target.arch, int) else 0
    if target.backend != "cuda" or arch < 90:
        return False
    version = _cuda_driver_version()
    # Stream capture keeps PDL as a programmatic graph edge from CUDA 12.3 on; under an older
    # driver it is not worth finding out what a capture makes of it. No libcuda (a machine
    # compiling kernels ahead for another): compile the variants a current stack launches.
    return version is None or version >= MIN_DRIVER


def _cuda_driver_version() -> int | None:
    """The CUDA driver's version (12030 for 12.3), or None where there is no libcuda."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    return version.value if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 else 0


def enabled() -> bool:
    """Whether this process's Triton launches use PDL (see the module docstring)."""
    global _cache
    if _forced is not None:
        return _forced
    if _INTERPRET or not _HAVE_GDC or os.environ.get("GRAPHSERVE_PDL", "auto") == "0":
        return False  # decided before the driver is asked: the interpreter has none
    try:
        driver = triton.runtime.driver.active
    except Exception:  # no GPU driver: nothing launches anyway
        return False
    if _cache is None or _cache[0] is not driver:
        _cache = (driver, _decide(driver))
    return _cache[1]


def set_enabled(value: bool | None) -> None:
    """Force PDL on or off for later launches (A/B benchmarks and tests); None: decide again.
    Forcing it on where the target has no `griddepcontrol` fails at compile time."""
    global _forced, _cache
    _forced, _cache = value, None


def use(rows: int) -> bool:
    """Whether a launch over `rows` tokens (or decode rows) takes part: PDL is `enabled()` and
    the step is small enough that every kernel in it is ours (`MAX_ROWS`)."""
    return rows <= MAX_ROWS and enabled()


def launch_options(on: bool) -> dict:
    """Extra keyword arguments of a kernel launch: `launch_pdl` where it takes part, else none
    (so a Triton without the option is never handed it)."""
    return {"launch_pdl": True} if on else {}
