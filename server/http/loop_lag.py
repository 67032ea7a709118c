"""How late the HTTP event loop runs what is due: its share of a stream's gaps.

Every stream's next token leaves through the event loop, so anything that holds the loop —
parsing and validating a large request body, writing many SSE chunks at once, a wait for the
GIL while another thread holds it — delays every stream by as much. A timer due every
`PERIOD_S` measures it: how much later than due it ran is the loop's lag, observed into
`graphserve_event_loop_lag_seconds`. Next to `graphserve_step_interval_seconds` (the engine's
side) it tells where a tail of the inter-token latency comes from. A stall of `s` shows as a
lag of at least `s - PERIOD_S`: at 10 ms every stall over 15 ms is counted above 5 ms (at the
former 20 ms a 23 ms stall could show as 3 ms). It costs the loop 100 wakeups a second.

Event-loop thread only.
"""

from __future__ import annotations

import asyncio

PERIOD_S = 0.01


async def watch_loop_lag(observe, period_s: float = PERIOD_S) -> None:
    """Until cancelled: sleep `period_s`, then `observe(seconds late)`."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period_s
        await asyncio.sleep(period_s)
        observe(max(0.0, loop.time() - due))
