"""What the Triton kernel tests share: where they run, reference switching, poisoned outputs.

Kernels run compiled on CUDA (tests marked `gpu`) or on the CPU under Triton's interpreter,
opt-in with `TRITON_INTERPRET=1` in the environment (it must be set before triton is imported).
Import this module only after `pytest.importorskip("triton")`.
"""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch

from server import ops

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

CPU_SKIP = (
    None
    if INTERPRET
    else "CPU runs need Triton's interpreter: set TRITON_INTERPRET=1 in the environment"
)
CUDA_SKIP = (
    "TRITON_INTERPRET=1 runs kernels in the interpreter, not compiled on the GPU"
    if INTERPRET
    else None
)
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(CUDA_SKIP is not None, reason=str(CUDA_SKIP))]
DEVICES = [
    pytest.param("cuda", marks=GPU_ONLY, id="cuda"),
    pytest.param(
        "cpu", marks=pytest.mark.skipif(CPU_SKIP is not None, reason=str(CPU_SKIP)), id="interp"
    ),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@functools.cache
def interpreter_loops_work() -> bool:
    """Whether this triton + numpy pair can run a loop whose bound is a tensor in the interpreter.

    Triton < 3.7's interpreter turns a one-element array into an int with `int(array)`, which
    numpy >= 2.4 rejects; the attention kernels loop over cached positions up to a loaded length.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(n_ptr, out_ptr):
        n = tl.load(n_ptr)
        acc = 0
        for _ in range(0, n):
            acc += 1
        tl.store(out_ptr, acc)

    n = torch.tensor([3], dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _probe[(1,)](n, out)
    except Exception:  # the interpreter's own error type differs between versions
        return False
    return int(out[0]) == 3


def skip_without_interpreter_loops() -> None:
    if INTERPRET and not interpreter_loops_work():
        pytest.skip(
            "this triton's interpreter cannot run loops with tensor bounds under this numpy "
            "(fixed in triton 3.7); compiled GPU runs are unaffected"
        )


def poison(monkeypatch, module) -> None:
    """Every buffer `module`'s kernels allocate starts as NaN, so an unwritten element shows."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(module, "_empty", nan_empty)


@contextlib.contextmanager
def torch_reference():
    """Make `server.ops` run its torch path on every device for the duration."""
    enabled = ops.triton_enabled()
    ops.use_triton(False)
    try:
        yield
    finally:
        ops.use_triton(enabled)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
