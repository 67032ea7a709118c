"""bench.load_clients: open-loop load from several client processes, against a real server
process (the fake engine: no torch, starts in about a second)."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.load_clients import ClientProcesses, lag_summary, run_open_loop
from bench.traffic import Request
from tests.helpers.fake_engine import FAKE_ENGINE
from tests.helpers.server_process import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--engine-class", FAKE_ENGINE) as srv:
        srv.wait_phase("ready")
        yield srv


def test_requests_are_dealt_over_processes_and_filled_in(server):
    reqs = [Request([5, 6, 7], 3, arrival=0.05 * i) for i in range(6)]
    start, clients = asyncio.run(run_open_loop(server.base_url, reqs, processes=2))
    assert clients["client_processes"] == 2
    assert set(clients) >= {"client_loop_lag_p99_ms", "client_loop_lag_max_ms",
                            "client_loop_lags_over_5ms"}
    for req in reqs:
        assert req.error is None, req.error
        assert req.completion_tokens == 3 and req.chunks
        # Sent no earlier than its arrival after the shared start (one monotonic clock).
        assert req.sent >= start + req.arrival - 1e-3
        assert req.chunks[0] >= req.sent and req.done >= req.chunks[-1]
    assert time.perf_counter() >= start


def test_a_process_is_released_by_go_and_times_its_request_from_then(server):
    req = Request([5, 6, 7], 2, logprobs=0)

    async def run():
        sender = ClientProcesses(server.base_url, [[req]])
        await sender.ready()  # warmed: one request already made, waiting for the start
        t_go = time.perf_counter()
        sender.go(t_go)
        return t_go, await sender.collect()

    t_go, clients = asyncio.run(run())
    assert clients["client_processes"] == 1
    assert req.error is None and req.sent >= t_go
    # logprobs 0: every chunk carries its tokens, and the process counted them.
    assert req.chunk_tokens and sum(req.chunk_tokens) == req.completion_tokens == 2


def test_one_process_means_this_loop():
    async def nothing():
        return await run_open_loop("http://127.0.0.1:9", [], processes=1)

    start, clients = asyncio.run(nothing())
    assert clients["client_processes"] == 1 and start > 0


def test_lag_summary():
    assert lag_summary([]) == {"client_loop_lag_p99_ms": None, "client_loop_lag_max_ms": None,
                               "client_loop_lags_over_5ms": 0}
    summary = lag_summary([0.001, 0.002, 0.010])
    assert summary["client_loop_lag_max_ms"] == pytest.approx(10.0)
    assert summary["client_loop_lags_over_5ms"] == 1
