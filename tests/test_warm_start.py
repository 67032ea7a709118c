"""server.warm_start: the startup threads never fail a start and skip cleanly without a GPU."""

from __future__ import annotations

import ctypes
import importlib.util
import subprocess
import sys

import pytest

from server import warm_start


class FakeDriver:
    """The four driver entry points start_cuda_init calls; `fail` makes one return an error."""

    def __init__(self, fail: str | None = None):
        self.calls: list[str] = []
        self.fail = fail

    def _call(self, name: str, *args) -> int:
        self.calls.append(name)
        return 999 if name == self.fail else 0

    def cuInit(self, flags):
        return self._call("cuInit", flags)

    def cuDeviceGet(self, dev, ordinal):
        self.calls.append(f"ordinal={ordinal}")
        return self._call("cuDeviceGet", dev, ordinal)

    def cuDevicePrimaryCtxRetain(self, ctx, dev):
        return self._call("cuDevicePrimaryCtxRetain", ctx, dev)

    def cuDeviceGetAttribute(self, value, attr, dev):
        value._obj.value = {75: 9, 76: 0}[attr]
        return self._call("cuDeviceGetAttribute", value, attr, dev)


def test_worker_thread_records_failure_instead_of_raising():
    def boom():
        raise RuntimeError("no driver")

    t = warm_start.WarmStart("test-warm", boom)
    t.start()
    t.finish(timeout=10)
    assert t.error == "RuntimeError: no driver"
    assert t.seconds is not None and t.seconds >= 0


def test_cuda_init_skipped_without_driver_or_devices(monkeypatch):
    def no_lib(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_lib)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert warm_start.start_cuda_init(0) is None
    assert warm_start.start_triton_prime(0) is None
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeDriver())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CUDA hidden: not even the library is opened
    assert warm_start.start_cuda_init(0) is None


def test_cuda_init_retains_the_requested_devices_context(monkeypatch):
    driver = FakeDriver()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: driver)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_MODULE_LOADING", raising=False)
    t = warm_start.start_cuda_init(1)
    assert t is not None
    t.finish(timeout=10)
    assert t.error is None
    assert driver.calls == ["cuInit", "ordinal=1", "cuDeviceGet", "cuDevicePrimaryCtxRetain"]
    # Set before cuInit: the driver reads it there, and torch would set it only later.
    import os

    assert os.environ["CUDA_MODULE_LOADING"] == "LAZY"


def test_cuda_init_error_is_recorded_not_raised(monkeypatch):
    driver = FakeDriver(fail="cuDeviceGet")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: driver)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    t = warm_start.start_cuda_init(0)
    t.finish(timeout=10)
    assert t.error == "RuntimeError: cuDeviceGet returned CUDA error 999"
    assert "cuDevicePrimaryCtxRetain" not in driver.calls


def test_capability_reads_major_and_minor():
    assert warm_start._capability(FakeDriver(), 0) == 90
    assert warm_start._capability(FakeDriver(fail="cuInit"), 0) is None
    assert warm_start._capability(FakeDriver(fail="cuDeviceGetAttribute"), 0) is None


def test_triton_prime_skipped_without_triton(monkeypatch):
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeDriver())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    assert warm_start.start_triton_prime(0) is None


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_prime_fills_tritons_caches():
    """In a fresh interpreter (Triton's caches are per process): after the prime, the key and
    the sm_90 backend's hash are cached, so a kernel's first lookup does not compute them."""
    code = """
import ctypes, sys
sys.path.insert(0, ".")
from tests.test_warm_start import FakeDriver
ctypes.CDLL = lambda name: FakeDriver()
from server import warm_start
t = warm_start.start_triton_prime(0)
t.finish(timeout=120)
assert t.error is None, t.error
from triton.runtime.cache import triton_key
from triton.backends.nvidia.compiler import get_ptxas_version
assert triton_key.cache_info().currsize == 1
assert get_ptxas_version.cache_info().currsize == 1
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
