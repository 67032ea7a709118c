"""Graph-pool memory: what all decode graphs will take, and a warning when that overflows.

Pure Python, owned by `server.graph_warmup.CapturePolicy` and called under its lock.

All graphs share one pool and the largest is captured first, so smaller graphs mostly reuse the
blocks it freed; the engine writes logits into a preallocated buffer, so persistent outputs do
not grow with the number of graphs. The estimate for the full size set is therefore the
largest graph's pool plus a per-graph overhead for each other size that can still be captured.
The overhead is the average growth measured over the graphs captured after the largest, or,
before any exists, a conservative assumed fraction of the largest pool. When all are captured
the estimate equals the measured total.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# Until a second graph has been captured, each additional graph is assumed to grow the shared
# pool by this fraction of the largest graph's pool. Smaller graphs capture after the largest
# and reuse its freed blocks, so real growth is usually far lower; the assumption errs on the
# side of warning early and is replaced by the measured growth as soon as one exists.
ASSUMED_PER_GRAPH_POOL_FRACTION = 0.02


def _check_bytes(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        kind = "None or an integer >= 0" if optional else "an integer >= 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


class GraphMemory:
    """Measured pool sizes, the budget, and the estimate derived from them."""

    def __init__(self, num_sizes: int):
        self.num_sizes = num_sizes
        self.pool_first: int | None = None  # pool after the largest graph
        self.pool_total = 0  # pool after every graph so far
        self.budget_bytes: int | None = None
        self.kv_cache_bytes = 0
        self.weights_bytes = 0
        self.estimate_full_bytes: int | None = None
        self.per_graph_bytes: int | None = None
        self.estimate_basis: str | None = None
        self.warning: str | None = None

    def set_budget(self, budget_bytes: int | None, kv_cache_bytes: int, weights_bytes: int):
        _check_bytes("kv_cache_bytes", kv_cache_bytes)
        _check_bytes("weights_bytes", weights_bytes)
        _check_bytes("budget_bytes", budget_bytes, optional=True)
        self.budget_bytes = budget_bytes
        self.kv_cache_bytes = kv_cache_bytes
        self.weights_bytes = weights_bytes

    def record(self, pool_bytes: int, largest: bool) -> None:
        """A capture succeeded; `pool_bytes` is the whole pool after it."""
        self.pool_total = max(self.pool_total, pool_bytes)
        if largest:
            self.pool_first = pool_bytes

    def update(self, captured: int, usable: int) -> None:
        """Recompute the estimate for `usable` (not failed) sizes, `captured` of them done."""
        if self.pool_first is None:
            self.estimate_full_bytes = self.per_graph_bytes = self.estimate_basis = None
        else:
            if captured >= 2:
                per_graph = max(0.0, (self.pool_total - self.pool_first) / (captured - 1))
                self.estimate_basis = "measured"
            else:
                per_graph = self.pool_first * ASSUMED_PER_GRAPH_POOL_FRACTION
                self.estimate_basis = "assumed"
            self.per_graph_bytes = int(per_graph)
            self.estimate_full_bytes = int(self.pool_first + per_graph * (usable - 1))

        warning = None
        if self.budget_bytes is not None and self.estimate_full_bytes is not None:
            total = self.estimate_full_bytes + self.kv_cache_bytes + self.weights_bytes
            if total > self.budget_bytes:
                warning = (
                    f"CUDA graphs for all {self.num_sizes} sizes are estimated to need "
                    f"{_mib(self.estimate_full_bytes)} of graph pool; with the KV cache "
                    f"({_mib(self.kv_cache_bytes)}) and weights ({_mib(self.weights_bytes)}) "
                    f"that is {_mib(total)}, over the {_mib(self.budget_bytes)} budget by "
                    f"{_mib(total - self.budget_bytes)}; lower --max-num-seqs, "
                    "--cuda-graph-sizes or --gpu-memory-utilization, or use --graph-capture off"
                )
        if warning is not None and self.warning is None:
            logger.warning("%s", warning)
        self.warning = warning

    def snapshot(self) -> dict[str, Any]:
        return {
            "estimate_full_bytes": self.estimate_full_bytes,
            "per_graph_bytes": self.per_graph_bytes,
            "estimate_basis": self.estimate_basis,
            "budget_bytes": self.budget_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "weights_bytes": self.weights_bytes,
            "warning": self.warning,
        }


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
