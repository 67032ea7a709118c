"""When our Triton launches use programmatic dependent launch (`server.pdl`): the decision
follows Triton's active driver's target, the environment and the interpreter. CPU-only; the GPU
side (graphs with PDL equal graphs without, bit for bit) is in tests/test_gpu.py, and the
ahead-of-time compile of the PDL variants in tests/test_kernel_cache.py."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from server import pdl  # noqa: E402


class _Driver:
    def __init__(self, backend, arch):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget(backend, arch, 32)

    def get_current_target(self):
        return self.target


@pytest.fixture
def driver(monkeypatch):
    """Swap Triton's active driver for one whose target the test sets."""
    from triton.runtime import driver as config

    monkeypatch.setattr(pdl, "_INTERPRET", False)
    monkeypatch.setattr(pdl, "_HAVE_GDC", True)
    monkeypatch.delenv("GRAPHSERVE_PDL", raising=False)
    monkeypatch.setattr(pdl, "_cuda_driver_version", lambda: 13000)
    previous = config._active
    pdl.set_enabled(None)

    def use(backend, arch):
        config.set_active(_Driver(backend, arch))

    yield use
    config._active = previous
    pdl.set_enabled(None)


def test_on_for_hopper_and_later_only(driver):
    for backend, arch, want in (("cuda", 90, True), ("cuda", 100, True), ("cuda", 89, False),
                                ("cuda", 80, False), ("hip", "gfx942", False)):
        driver(backend, arch)
        assert pdl.enabled() is want, (backend, arch)


def test_follows_a_driver_swapped_in_later(driver):
    """`graphserve precompile-kernels` swaps in a driver for the target architecture: the answer
    is decided again for it, not kept from an earlier driver."""
    driver("cuda", 80)
    assert not pdl.enabled()
    driver("cuda", 90)
    assert pdl.enabled()


def test_environment_interpreter_and_old_triton_turn_it_off(driver, monkeypatch):
    driver("cuda", 90)
    monkeypatch.setenv("GRAPHSERVE_PDL", "0")
    assert not pdl.enabled()
    monkeypatch.setenv("GRAPHSERVE_PDL", "auto")
    driver("cuda", 90)  # a new driver object: decided again
    assert pdl.enabled()
    monkeypatch.setattr(pdl, "_INTERPRET", True)
    driver("cuda", 90)
    assert not pdl.enabled()
    monkeypatch.setattr(pdl, "_INTERPRET", False)
    monkeypatch.setattr(pdl, "_HAVE_GDC", False)
    driver("cuda", 90)
    assert not pdl.enabled()


def test_a_driver_that_cannot_say_its_target_means_off(driver):
    class Broken:
        def get_current_target(self):
            raise RuntimeError("no CUDA driver")

    from triton.runtime import driver as config

    config.set_active(Broken())
    assert not pdl.enabled()


def test_forcing_overrides_until_cleared(driver):
    driver("cuda", 80)
    pdl.set_enabled(True)
    assert pdl.enabled()
    pdl.set_enabled(False)
    driver("cuda", 90)
    assert not pdl.enabled()
    pdl.set_enabled(None)
    assert pdl.enabled()


def test_only_steps_of_few_rows_take_part(driver):
    """Up to MAX_ROWS every kernel of a decode step is ours; above it the projections are
    cuBLAS's and the step measured slower with PDL, so those launches are ordinary ones."""
    from server import triton_ops

    assert pdl.MAX_ROWS == triton_ops.SKINNY_MAX_ROWS
    driver("cuda", 90)
    assert pdl.use(1) and pdl.use(pdl.MAX_ROWS) and not pdl.use(pdl.MAX_ROWS + 1)
    assert pdl.launch_options(True) == {"launch_pdl": True}
    assert pdl.launch_options(False) == {}  # a Triton without the option never sees it
    driver("cuda", 80)
    assert not pdl.use(1)


def test_a_cuda_driver_older_than_12_3_keeps_it_off(driver, monkeypatch):
    """Programmatic edges in captured graphs need CUDA 12.3; without libcuda (compiling ahead
    on a machine without a GPU) the variants of a current stack are compiled."""
    for version, want in ((12020, False), (12030, True), (13000, True), (None, True), (0, False)):
        monkeypatch.setattr(pdl, "_cuda_driver_version", lambda v=version: v)
        driver("cuda", 90)
        assert pdl.enabled() is want, version
