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


def _fresh(code: str, path: str | None = None, **env: str) -> dict:
    """Run `code` in a fresh interpreter (torch not imported yet), with `path` first on the
    module path; its last line is JSON."""
    kept = os.environ.get("PYTHONPATH")
    full = {**os.environ, **env,
            "PYTHONPATH": os.pathsep.join(p for p in (path, str(REPO), kept) if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=full, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def fake_pynvml(tmp_path):
    """A `pynvml` of our own (CI has none): it records that it ran."""
    (tmp_path / "pynvml.py").write_text(
        "import os\nos.environ['GRAPHSERVE_TEST_PYNVML_RAN'] = '1'\n"
        "def nvmlInit():\n    return 'initialised'\n"
    )
    return str(tmp_path)


def test_torch_imports_and_works_with_pynvml_deferred(fake_pynvml):
    got = _fresh(
        "import json, os, sys\n"
        "from server.torch_import import defer_unused\n"
        "deferred = defer_unused()\n"
        "import torch\n"
        "nvml = sys.modules['pynvml']\n"
        "ran_at_import = os.environ.get('GRAPHSERVE_TEST_PYNVML_RAN')\n"
        "g = torch.Generator(device='cpu').manual_seed(0)  # torch 2.13: needs torch._prims\n"
        "x = torch.nn.functional.silu(torch.randn(8, 8, generator=g)) @ torch.randn(8, 8)\n"
        "meta = (torch.empty(4, 4, device='meta') @ torch.empty(4, 4, device='meta')).shape\n"
        "print(json.dumps({'deferred': deferred, 'ran_at_import': ran_at_import,\n"
        "  'torch_has_it': bool(torch.cuda._HAS_PYNVML), 'state': nvml._deferred_state,\n"
        "  'init': nvml.nvmlInit(), 'state_after': nvml._deferred_state,\n"
        "  'meta_module': type(sys.modules['torch._meta_registrations']).__name__,\n"
        "  'meta': list(meta), 'autoload': os.environ.get('TORCH_DEVICE_BACKEND_AUTOLOAD')}))\n",
        path=fake_pynvml,
    )
    assert got["deferred"] == ["pynvml"]
    assert got["ran_at_import"] is None  # torch bound it by name only
    assert got["torch_has_it"]  # and believes it has it, as it would
    assert got["state"] == "deferred"
    assert got["init"] == "initialised" and got["state_after"] == "loaded"  # the first use
    assert got["meta_module"] == "module"  # torch's own modules are imported as they come
    assert got["meta"] == [4, 4]
    assert got["autoload"] == "0"


def test_dummy_weights_and_the_embedded_model_build_with_the_deferral(tmp_path):
    """Both draw with a `torch.Generator`; the engine process builds the embedded model on a
    first run and dummy weights under `--load-format dummy` (a deferral of torch's own
    `_meta_registrations` once broke both on torch 2.13)."""
    got = _fresh(
        "import json, sys\n"
        "from server.torch_import import defer_unused\n"
        "defer_unused()\n"
        "import torch\n"
        "from server.default_model import build_default_model, is_complete\n"
        "from server.weights import DummyWeights\n"
        "w = DummyWeights('cpu', torch.float32).take('layers.0.mlp.down_proj.weight', (8, 4))\n"
        f"build_default_model({str(tmp_path / 'model')!r})\n"
        f"print(json.dumps([list(w.shape), is_complete({str(tmp_path / 'model')!r})]))\n",
    )
    assert got == [[8, 4], True]


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
        "gen = torch.Generator(device='cuda').manual_seed(1)\n"
        "r = torch.randn(4, device='cuda', generator=gen)\n"
        "util = None\n"
        "if 'pynvml' in deferred:\n"
        "    util = torch.cuda.utilization()\n"
        "print(json.dumps({'eye': bool(torch.equal(y, x)), 'deferred': deferred,\n"
        "  'util': util, 'nvml': getattr(sys.modules.get('pynvml'), '_deferred_state', None)}))\n"
    )
    assert got["eye"]
    if "pynvml" in got["deferred"]:
        assert got["nvml"] == "loaded" and isinstance(got["util"], int)


def test_first_use_through_from_import(fake_pynvml):
    got = _fresh(
        "import json, sys\n"
        "from server.torch_import import defer_unused\n"
        "defer_unused()\n"
        "import torch\n"
        "from pynvml import nvmlInit\n"
        "print(json.dumps([nvmlInit(), sys.modules['pynvml']._deferred_state]))\n",
        path=fake_pynvml,
    )
    assert got == ["initialised", "loaded"]


def test_the_switch_leaves_torch_as_it_is(fake_pynvml):
    got = _fresh(
        "import json, os, sys\n"
        "from server.torch_import import defer_unused\n"
        "d = defer_unused()\n"
        "import torch\n"
        "print(json.dumps([d, type(sys.modules['pynvml']).__name__,\n"
        "                  os.environ.get('TORCH_DEVICE_BACKEND_AUTOLOAD')]))\n",
        path=fake_pynvml,
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
        spec = _find_leaf(name)
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
    module = DeferredModule(_find_leaf(name))
    try:
        with pytest.raises(RuntimeError, match="broken on purpose"):
            module.anything  # noqa: B018
        with pytest.raises(AttributeError):
            module.anything  # noqa: B018
    finally:
        sys.modules.pop(name, None)


def test_packages_submodules_and_missing_modules_are_not_deferred():
    assert _find_leaf("json") is None  # a package: left to the normal import
    assert _find_leaf("graphserve_no_such_module") is None
    assert _find_leaf("server.torch_import") is None  # a submodule: its parent would import
