"""`import torch` without executing the two modules it imports that the engine never uses:
`defer_unused()`, called before torch's first import in an engine's process.

Why: `import torch` is most of the engine's path to ready (1.2-1.9 s on the H200 box, holding
the GIL), and two of the modules it executes serve nothing the engine does
(docs/benchmarks.md 8s, `-X importtime` on the box, torch 2.11):

* `torch._meta_registrations` (~0.3 s with the decompositions it imports): Python kernels for the
  Meta dispatch key, for meta and fake tensors (`torch.compile`, `torch.export`, models built on
  the meta device). The engine runs every op on real CUDA or CPU tensors.
* `pynvml` (~0.06 s): `torch.cuda` imports it for `utilization()`, `temperature()` and the like,
  which the server never asks.

Torch's own import only binds each by name; nothing reads from them while torch imports. So each
is put in `sys.modules` first as a `DeferredModule`: the module object with the real spec, empty,
whose first missing attribute runs the real module's code into it. Code that uses either module
sees the same module as before, and the first use pays the import (logged). What moves is only
the side effect of `torch._meta_registrations`: its kernels reach the dispatcher when something
first reads from the module (`torch._decomp`, fake tensors do), not at `import torch`. Code that
runs ops on meta tensors without that calls `load_deferred()` first.

Also: `TORCH_DEVICE_BACKEND_AUTOLOAD` (torch's documented switch for out-of-tree device plugins,
found through an entry-point scan of every installed distribution: ~0.02 s; the engine knows CUDA
and CPU only) becomes 0 in this process unless the environment sets it.
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
# (parent package or None for a top-level module, module name)
DEFERRED = (("torch", "torch._meta_registrations"), (None, "pynvml"))


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
    for parent, name in DEFERRED:
        if name in sys.modules:
            continue
        spec = _find_leaf(parent, name)
        if spec is None:
            continue
        sys.modules[name] = DeferredModule(spec)
        deferred.append(name)
    if deferred:
        log.debug("deferred until first use: %s", ", ".join(deferred))
    return deferred


def load_deferred() -> None:
    """Run every still-deferred module now (before ops on meta tensors, for instance)."""
    for _, name in DEFERRED:
        module = sys.modules.get(name)
        if isinstance(module, DeferredModule):
            module._deferred_load("load_deferred()")


def _find_leaf(parent: str | None, name: str) -> importlib.machinery.ModuleSpec | None:
    """`name`'s spec, found without importing `parent`; None unless it is a plain source or
    bytecode module (a package or an extension is left to the normal import)."""
    try:
        if parent is None:
            spec = importlib.util.find_spec(name)
        else:
            parent_spec = importlib.util.find_spec(parent)  # a top-level spec imports nothing
            if parent_spec is None or not parent_spec.submodule_search_locations:
                return None
            spec = importlib.machinery.PathFinder.find_spec(
                name, list(parent_spec.submodule_search_locations))
    except (ImportError, ValueError):
        return None
    if (spec is None or spec.submodule_search_locations is not None
            or not isinstance(spec.loader, importlib.machinery.SourceFileLoader
                              | importlib.machinery.SourcelessFileLoader)):
        return None
    return spec
