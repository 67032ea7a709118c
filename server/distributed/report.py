"""The `tensor_parallel` section of /health/graphs: each rank's process, device and captures.

Pure Python (no torch): `ModelRunner.graph_report` hands it what rank 0 keeps, each size's
capture results from every rank (`CaptureResult.to_json()`, in rank order) and each rank's
process and device descriptions.
"""

from __future__ import annotations

from typing import Any


def tensor_parallel_report(sizes: list[dict], captures: dict[int, list[dict]],
                           procs: list[dict], devices: list[dict], world: int,
                           failure: str | None, allreduce: str | None = None) -> dict[str, Any]:
    """Adds each size's per-rank results to its entry of `sizes` (in place) and returns the
    section. `captures` must be a copy the caller will not mutate (it is read on the event
    loop while the engine thread may record a capture)."""
    for record in sizes:
        results = captures.get(record["size"])
        if results is not None:
            record["ranks"] = [
                {"rank": r, "ok": res["ok"], "capture_ms": round(res["seconds"] * 1e3, 3),
                 "pool_bytes": res["pool_bytes"], "error": res["error"]}
                for r, res in enumerate(results)
            ]  # fmt: skip
    ranks = []
    for r, proc in enumerate(procs):
        done = {s: res[r] for s, res in captures.items() if r < len(res)}
        ranks.append({
            **proc,
            "device": devices[r] if r < len(devices) else None,
            "captured": sorted(s for s, res in done.items() if res["ok"]),
            "failed": {str(s): res["error"] for s, res in sorted(done.items()) if not res["ok"]},
            "pool_bytes": max((res["pool_bytes"] for res in done.values()), default=0),
        })  # fmt: skip
    return {"world_size": world, "allreduce": allreduce, "failure": failure, "ranks": ranks}
