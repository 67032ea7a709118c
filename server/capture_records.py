"""The books the capture policy keeps per decode batch size (`server.graph_warmup`).

Pure Python (the HTTP layer reads them through the policy's `snapshot`); owned by
`CapturePolicy` and changed only under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

SizeState = Literal["pending", "capturing", "captured", "failed"]
CapturePhase = Literal["startup", "busy", "idle", "unscheduled"]


@dataclass
class SizeRecord:
    """One decode batch size's books: its state, capture time and pool reading, and how
    traffic used it; `to_json` is its row in `GET /health/graphs`."""

    size: int
    state: SizeState = "pending"
    capture_s: float | None = None
    pool_bytes_after: int | None = None
    replays: int = 0
    padded_tokens_wasted: int = 0
    demand: int = 0
    wanted: int = 0  # decode steps whose exact size this is, whatever its state (saved plan)
    error: str | None = None
    captured_in: CapturePhase | None = None
    off_thread_s: float | None = None  # a background capture's own time (it stalled nothing)

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "state": self.state,
            "capture_ms": None if self.capture_s is None else round(self.capture_s * 1e3, 3),
            "pool_bytes_after": self.pool_bytes_after,
            "replays": self.replays,
            "padded_tokens_wasted": self.padded_tokens_wasted,
            "demand": self.demand,
            "wanted": self.wanted,
            "error": self.error,
            "captured_in": self.captured_in,
            "off_thread_ms": None if self.off_thread_s is None else round(
                self.off_thread_s * 1e3, 3),
        }
