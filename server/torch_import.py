"""`import torch` without the work it does that the engine never uses: `defer_unused()`, called
before torch's first import in an engine's process (the engine thread, a TP worker).

Why: `import torch` is most of the engine's path to ready (1.2-1.9 s on the H200 box, holding
the GIL; docs/benchmarks.md 8s). Two pieces of it serve nothing the engine does:

* `pynvml` (0.06-0.08 s): `torch.cuda` imports it for `utilization()`, `temperature()` and the
  like, which the server never asks. Torch's import only binds it by name, so it is put in
  `sys.modules` first as a `DeferredModule`: the module object with the real spec, empty, whose
  first missing attribute runs the real module's code into it (logged). Whoever uses it gets the
  same module as before; the first use pays the import.
* The device-plugin autoload (~0.02 s: an entry-point scan of every installed distribution):
  `TORCH_DEVICE_BACKEND_AUTOLOAD`, torch's documented switch, becomes 0 in this process unless
  the environment sets it. The engine knows CUDA and CPU only.

Not deferred, although the engine never uses it either: `torch._meta_registrations` (~0.3 s with
the decompositions and prims under it). Deferred, it left torch 2.13 unable to create a
`torch.Generator` (its metaclass is set by `torch._prims.rng_prims`, imported only through that
chain), so dummy weights and the embedded model's first build failed. Torch's internal import
order is not an interface; only leaf modules outside torch are deferred here.

`GRAPHSERVE_DEFER_TORCH_MODULES=0` leaves torch's import as it is, both parts.

Torch-free. Thread ownership: `defer_unused()` runs once, on the thread about to import torch;
a deferred module's load is serialised by its own lock, so whichever thread touches it first
runs it, once.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys
import threading
import time
import types

log = logging.getLogger("graphserve.torch_import")

DEFER_ENV = "GRAPHSERVE_DEFER_TORCH_MODULES"  # "0": import torch as it comes
DEFERRED = ("pynvml",)  # top-level source modules only (`_find_leaf`)


class DeferredModule(types.ModuleType):
    """A leaf module whose code runs on its first missing attribute, in this module object.

    Dunder lookups other than `__all__` never trigger the load: the import system and tools
    probe modules for `__path__`, `__wrapped__` and the like, and a leaf module has none.
    """

    def __init__(self, spec: importlib.machinery.ModuleSpec):
        super().__init__(spec.name)
        self.__spec__ = spec
        self.__loader__ = spec.loader
        self.__file__ = spec.origin
        self.__cached__ = spec.cached
        self.__package__ = spec.parent
        # Set through the instance dict: `__getattr__` must find them without recursing.
        self.__dict__["_deferred_lock"] = threading.RLock()
        self.__dict__["_deferred_state"] = "deferred"  # -> "loading" -> "loaded" | "failed"

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__") and name != "__all__":
            raise AttributeError(name)
        self._deferred_load(f"attribute {name!r}")
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}") from None

    def _deferred_load(self, why: str) -> None:
        with self._deferred_lock:
            if self._deferred_state != "deferred":  # loaded, failed, or loading on this thread
                return
            self.__dict__["_deferred_state"] = "loading"
            t0 = time.perf_counter()
            try:
                self.__spec__.loader.exec_module(self)
            except BaseException:
                self.__dict__["_deferred_state"] = "failed"
                raise
            self.__dict__["_deferred_state"] = "loaded"
        log.info("%s imported on first use (%s) in %.3f s", self.__name__, why,
                 time.perf_counter() - t0)


def defer_unused() -> list[str]:
    """Before torch's first import: put the `DEFERRED` modules in `sys.modules` as
    `DeferredModule`s; returns the names deferred (none if torch is imported already, the
    switch is off, or a module is absent or imported already)."""
    if os.environ.get(DEFER_ENV, "1") == "0" or "torch" in sys.modules:
        return []
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    deferred = []
    for name in DEFERRED:
        if name in sys.modules:
            continue
        spec = _find_leaf(name)
        if spec is None:
            continue
        sys.modules[name] = DeferredModule(spec)
        deferred.append(name)
    if deferred:
        log.debug("deferred until first use: %s", ", ".join(deferred))
    return deferred


def _find_leaf(name: str) -> importlib.machinery.ModuleSpec | None:
    """Top-level `name`'s spec, found without importing it; None unless it is a plain source
    or bytecode module (a package or an extension is left to the normal import)."""
    if "." in name:
        return None  # a submodule's spec would import its parent
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if (spec is None or spec.submodule_search_locations is not None
            or not isinstance(spec.loader, importlib.machinery.SourceFileLoader
                              | importlib.machinery.SourcelessFileLoader)):
        return None
    return spec
