"""`server.torch_import`: torch's unused modules deferred until their first use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from server import torch_import
from server.torch_import import DeferredModule, _find_leaf
from tests.helpers import REPO


def _fresh(code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter (torch not imported yet); its last line is JSON."""
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=full, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_torch_imports_and_runs_with_its_meta_kernels_deferred():
    got = _fresh(
        "import json, os, sys\n"
        "from server.torch_import import defer_unused, load_deferred\n"
        "deferred = defer_unused()\n"
        "import torch\n"
        "m = sys.modules['torch._meta_registrations']\n"
        "x = torch.nn.functional.silu(torch.randn(8, 8)) @ torch.randn(8, 8)\n"
        "after_ops = m._deferred_state\n"
        "meta = (torch.empty(4, 4, device='meta') @ torch.empty(4, 4, device='meta')).shape\n"
        "load_deferred()\n"
        "print(json.dumps({'deferred': deferred, 'same': torch._meta_registrations is m,\n"
        "  'after_ops': after_ops, 'state': m._deferred_state, 'meta': list(meta),\n"
        "  'fn': callable(m.activate_meta),\n"
        "  'autoload': os.environ.get('TORCH_DEVICE_BACKEND_AUTOLOAD')}))\n"
    )
    assert "torch._meta_registrations" in got["deferred"]
    assert got["same"]  # torch's own name for it is the deferred module itself
    assert got["after_ops"] == "deferred"  # ops on real tensors never needed it
    assert got["state"] == "loaded" and got["fn"]
    assert got["meta"] == [4, 4]
    assert got["autoload"] == "0"


@pytest.mark.gpu
def test_cuda_graphs_and_pynvml_with_the_deferral():
    """On the CUDA build: kernels, a captured graph's replay, and torch's NVML queries (which
    import the deferred `pynvml` on their first use, where it is installed)."""
    got = _fresh(
        "import json, sys\n"
        "from server.torch_import import defer_unused\n"
        "deferred = defer_unused()\n"
        "import torch\n"
        "x = torch.randn(64, 64, device='cuda', dtype=torch.bfloat16)\n"
        "y = torch.empty_like(x)\n"
        "torch.matmul(x, x, out=y)  # cuBLAS's workspace outside the graph\n"
        "torch.cuda.synchronize()\n"
        "g = torch.cuda.CUDAGraph()\n"
        "with torch.cuda.graph(g):\n"
        "    torch.matmul(x, x, out=y)\n"
        "x.copy_(torch.eye(64, device='cuda', dtype=torch.bfloat16))\n"
        "g.replay(); torch.cuda.synchronize()\n"
        "util = None\n"
        "if 'pynvml' in deferred:\n"
        "    util = torch.cuda.utilization()\n"
        "print(json.dumps({'eye': bool(torch.equal(y, x)), 'deferred': deferred,\n"
        "  'util': util, 'meta': sys.modules['torch._meta_registrations']._deferred_state,\n"
        "  'nvml': getattr(sys.modules.get('pynvml'), '_deferred_state', None)}))\n"
    )
    assert got["eye"]
    assert got["meta"] == "deferred"  # CUDA kernels and graphs never needed it
    if "pynvml" in got["deferred"]:
        assert got["nvml"] == "loaded" and isinstance(got["util"], int)


def test_first_attribute_use_imports_it():
    got = _fresh(
        "import json, sys\n"
        "from server.torch_import import defer_unused\n"
        "defer_unused()\n"
        "import torch\n"
        "from torch._meta_registrations import activate_meta\n"
        "print(json.dumps(sys.modules['torch._meta_registrations']._deferred_state))\n"
    )
    assert got == "loaded"


def test_the_switch_leaves_torch_as_it_is():
    got = _fresh(
        "import json, os, sys\n"
        "from server.torch_import import defer_unused\n"
        "d = defer_unused()\n"
        "import torch\n"
        "print(json.dumps([d, type(sys.modules['torch._meta_registrations']).__name__,\n"
        "                  os.environ.get('TORCH_DEVICE_BACKEND_AUTOLOAD')]))\n",
        GRAPHSERVE_DEFER_TORCH_MODULES="0",
    )
    assert got == [[], "module", None]


def test_an_explicit_autoload_setting_wins():
    got = _fresh(
        "import json, os\n"
        "from server.torch_import import defer_unused\n"
        "defer_unused()\n"
        "print(json.dumps(os.environ['TORCH_DEVICE_BACKEND_AUTOLOAD']))\n",
        TORCH_DEVICE_BACKEND_AUTOLOAD="1",
    )
    assert got == "1"


def test_nothing_is_deferred_once_torch_is_imported():
    import torch  # noqa: F401  (as in this test process anyway)

    assert torch_import.defer_unused() == []


# -- the mechanism, on a module of our own ---------------------------------------------------

@pytest.fixture
def leaf(tmp_path, monkeypatch):
    """A leaf module that counts its executions in `sys.graphserve_test_runs`; yields a
    function deferring it and returning the DeferredModule."""
    name = f"graphserve_deferred_probe_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(
        "import sys, time\n"
        "sys.graphserve_test_runs = getattr(sys, 'graphserve_test_runs', 0) + 1\n"
        "time.sleep(0.05)  # a window for the racing threads\n"
        "VALUE = 42\n"
        "def twice(x):\n"
        "    return 2 * x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.graphserve_test_runs = 0

    def defer() -> DeferredModule:
        spec = _find_leaf(None, name)
        assert spec is not None
        module = DeferredModule(spec)
        sys.modules[name] = module
        return module

    yield name, defer
    sys.modules.pop(name, None)
    del sys.graphserve_test_runs


def test_import_binds_without_running_it(leaf):
    name, defer = leaf
    module = defer()
    imported = __import__(name)
    assert imported is module
    assert not hasattr(module, "__path__")  # the import system's probes do not load it
    assert sys.graphserve_test_runs == 0
    assert module.twice(module.VALUE) == 84
    assert sys.graphserve_test_runs == 1
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        module.missing  # noqa: B018
    assert sys.graphserve_test_runs == 1


def test_racing_first_uses_run_it_once(leaf):
    _, defer = leaf
    module = defer()
    barrier = threading.Barrier(8)
    seen = []

    def use():
        barrier.wait()
        seen.append(module.VALUE)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [42] * 8
    assert sys.graphserve_test_runs == 1


def test_a_failing_module_raises_once_then_has_nothing(tmp_path, monkeypatch):
    name = f"graphserve_deferred_broken_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = DeferredModule(_find_leaf(None, name))
    try:
        with pytest.raises(RuntimeError, match="broken on purpose"):
            module.anything  # noqa: B018
        with pytest.raises(AttributeError):
            module.anything  # noqa: B018
    finally:
        sys.modules.pop(name, None)


def test_packages_and_missing_modules_are_not_deferred():
    assert _find_leaf(None, "json") is None  # a package: left to the normal import
    assert _find_leaf(None, "graphserve_no_such_module") is None
    assert _find_leaf("graphserve_no_such_package", "graphserve_no_such_package.x") is None
