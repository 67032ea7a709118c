"""Busy-time captures on the capture thread (`server.background_capture`): the hand-over
protocol with a fake runner, and engines on CPU-emulated graphs whose busy captures run off
the engine thread and still give HF's greedy tokens.

The real CUDA path (thread-local capture beside running replays, an injected failure on the
capture thread) is exercised by `tests/test_gpu.py`."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest

from server.background_capture import SWITCH_INTERVAL_S, BackgroundCapture, CaptureJob
from server.graph_runner import CaptureResult
from server.request import SamplingParams
from tests.helpers.tiny_models import hf_greedy, hf_reference
from tests.test_engine import collect, start_engine, tokens_of
from tests.test_mixed_graphs import llama_dir  # noqa: F401  (fixture)


class FakeGraphs:
    """`capture_detached` blocks until the test releases it; records where things ran."""

    def __init__(self, fail: bool = False):
        self.release = threading.Event()
        self.fail = fail
        self.installed: dict[int, object] = {}
        self.threads: list[str] = []
        self.intervals: list[float] = []
        self.prepared_on: str | None = None

    def prepare_capture_thread(self):
        self.prepared_on = threading.current_thread().name

    def capture_detached(self, size, background):
        assert background
        self.threads.append(threading.current_thread().name)
        self.intervals.append(sys.getswitchinterval())
        self.release.wait(10)
        if self.fail:
            raise RuntimeError("boom")
        return f"graph-{size}", CaptureResult(size, True, 0.02, 1 << 20)

    def install(self, size, graph):
        self.installed[size] = (graph, threading.current_thread().name)

    def job(self, size):
        return CaptureJob(size, False, lambda: self.capture_detached(size, background=True),
                          lambda graph: self.install(size, graph))


def test_capture_runs_on_its_thread_and_installs_on_poll():
    graphs = FakeGraphs()
    bg = BackgroundCapture(graphs.prepare_capture_thread)
    before = sys.getswitchinterval()
    try:
        bg.start(graphs.job(8))
        assert bg.in_flight.size == 8
        with pytest.raises(RuntimeError, match="still in flight"):
            bg.start(graphs.job(4))
        assert bg.poll() is None and bg.poll(0.05) is None  # not done: nothing installed
        assert graphs.installed == {}
        graphs.release.set()
        done = bg.poll(5)
        assert done is not None and done[0].size == 8 and done[1].ok
        assert graphs.installed == {8: ("graph-8", threading.current_thread().name)}
        assert bg.in_flight is None and bg.poll() is None
    finally:
        bg.close(5)
    assert graphs.prepared_on == "graph-capture" and graphs.threads == ["graph-capture"]
    assert graphs.intervals == [SWITCH_INTERVAL_S]  # lowered while capturing ...
    assert sys.getswitchinterval() == before  # ... and restored


def test_the_worker_is_prepared_before_the_constructor_returns():
    """An idle capture on the engine thread (global capture mode) must never overlap the
    worker's preparation (a GEMM and a stream sync): the constructor waits for it."""
    done = threading.Event()

    def slow_prepare():
        time.sleep(0.2)
        done.set()

    bg = BackgroundCapture(slow_prepare)
    try:
        assert done.is_set() and bg.usable
    finally:
        bg.close(5)


@pytest.mark.parametrize("how", ["raises", "overruns"])
def test_a_worker_that_cannot_prepare_is_not_used(how):
    """A preparation that fails, or outlasts the constructor's wait, leaves the worker unusable:
    `start` raises (the runner then captures inline) instead of queueing a capture."""
    release = threading.Event()

    def prepare():
        if how == "raises":
            raise RuntimeError("no device")
        release.wait(5)

    bg = BackgroundCapture(prepare, prepare_timeout_s=0.1)
    try:
        assert not bg.usable
        with pytest.raises(RuntimeError, match="stopped"):
            bg.start(FakeGraphs().job(8))
        assert bg.in_flight is None
    finally:
        release.set()
        bg.close(5)
    assert not bg.usable


def test_an_unexpected_error_is_a_failed_result_and_close_waits_for_the_capture():
    graphs = FakeGraphs(fail=True)
    bg = BackgroundCapture(graphs.prepare_capture_thread)
    bg.start(graphs.job(2))
    threading.Timer(0.05, graphs.release.set).start()
    job, result = bg.close(5)  # lets the capture end, hands it back, stops the thread
    assert job.size == 2 and not result.ok and "RuntimeError: boom" in result.error
    assert graphs.installed == {}
    assert not bg._thread.is_alive()
    with pytest.raises(RuntimeError, match="stopped"):
        bg.start(graphs.job(1))


@pytest.fixture(scope="module")
def reference(llama_dir):  # noqa: F811
    return hf_reference(llama_dir)


async def _three_streams(engine) -> list[list[int]]:
    """Three greedy streams that join one after another: batch sizes 1, 2 and 3 in turn."""
    prompts = [[5, 6, 7], [9, 10, 11, 12], [20, 21]]
    tasks = []
    for prompt in prompts:
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        tasks.append(asyncio.ensure_future(collect(engine, prompt, params)))
        await asyncio.sleep(0.05)
    return [tokens_of(out) for out in await asyncio.gather(*tasks)]


@pytest.mark.parametrize("mode", ["background", "inline"])
async def test_busy_captures_run_where_configured_and_keep_greedy_tokens(
        llama_dir, reference, monkeypatch, mode):  # noqa: F811  # fmt: skip
    monkeypatch.setenv("GRAPHSERVE_EMULATE_GRAPHS", "1")
    engine = start_engine(llama_dir, graph_capture="lazy", busy_capture=mode,
                          capture_min_interval_ms=0, idle_debounce_ms=60_000)  # fmt: skip
    where: dict[int, str] = {}

    def note(size):
        where[size] = threading.current_thread().name

    engine._core.runner.graphs.fault_injector = note
    try:
        got = await _three_streams(engine)
        deadline = time.monotonic() + 10
        while engine.graph_report()["capturing"] is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        report = engine.graph_report()
    finally:
        engine.shutdown()
    prompts = [[5, 6, 7], [9, 10, 11, 12], [20, 21]]
    assert got == [hf_greedy(reference, p, 40) for p in prompts]
    assert report["settings"]["busy_capture"] == mode
    busy = [s for s in report["sizes"] if s["captured_in"] == "busy"]
    assert busy, report["sizes"]  # the test's traffic asked for sizes below the largest
    assert report["traffic"]["eager_steps"] == 0
    for entry in busy:
        assert entry["state"] == "captured"
        if mode == "background":
            assert where[entry["size"]] == "graph-capture"
            assert entry["capture_ms"] == 0 and entry["off_thread_ms"] > 0
        else:
            assert where[entry["size"]] != "graph-capture"
            assert entry["capture_ms"] > 0 and entry["off_thread_ms"] is None


@pytest.mark.parametrize("mode", ["background", "inline"])
async def test_mixed_buckets_are_captured_while_busy_only_with_the_capture_thread(
        llama_dir, reference, monkeypatch, mode):  # noqa: F811  # fmt: skip
    """A lazy server under traffic from the start (idle capture held off): a prompt chunked
    beside a stream runs its steps in bucket 16, eagerly until the bucket is captured. With
    the capture thread the bucket is captured while busy, off the engine thread; inline, it
    waits for idle time. The tokens are HF's either way."""
    from tests.test_mixed_graphs import _stream_beside_long_prompt

    monkeypatch.setenv("GRAPHSERVE_EMULATE_GRAPHS", "1")
    engine = start_engine(llama_dir, max_num_batched_tokens=40, decode_prefill_tokens=11,
                          graph_capture="lazy", busy_capture=mode, idle_debounce_ms=60_000,
                          capture_min_interval_ms=0)  # fmt: skip
    where: dict[int, str] = {}

    def note(size):
        where[size] = threading.current_thread().name

    engine._core.runner.graphs.fault_injector = note
    try:
        first, second, long_prompt = await _stream_beside_long_prompt(engine)
        deadline = time.monotonic() + 10
        while engine.graph_report()["mixed"]["capturing"] is not None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        mixed = engine.graph_report()["mixed"]
    finally:
        engine.shutdown()
    assert first == hf_greedy(reference, [5, 6, 7], 30)
    assert second == hf_greedy(reference, long_prompt, 4)
    (bucket,) = mixed["sizes"]
    assert bucket["tokens"] == 16 and bucket["demand"] >= 1
    if mode == "background":
        assert bucket["state"] == "captured" and bucket["off_thread"], bucket
        assert where[-16] == "graph-capture"  # the injector sees a mixed bucket as negative
    else:
        assert bucket["state"] == "pending" and -16 not in where


def test_mixed_policy_offers_wanted_buckets_then_the_rest_while_busy_with_a_capture_thread():
    from server.mixed_graph_policy import MixedGraphPolicy

    p = MixedGraphPolicy([16, 64, 256], "lazy", max_seqs=8, idle_debounce_s=0.5)
    assert p.next_capture(False, False, background=True) is None  # nothing wanted yet
    for tokens in (10, 50, 12):
        assert p.select(tokens, 2, False, 5) < 0  # not captured: packed, eagerly
    assert p.next_capture(False, False) is None  # no capture thread: idle time only
    assert p.next_capture(False, False, background=True) == 16  # wanted twice
    p.begin(16)
    p.succeeded(16, 0.0, 1 << 20, off_thread_s=0.03)
    assert p.next_capture(False, False, background=True) == 64
    p.begin(64)
    p.succeeded(64, 0.0, 1 << 20, off_thread_s=0.03)
    # Nothing wanted is left: only a speculative ask gets the largest pending bucket.
    assert p.next_capture(False, False, background=True) is None
    assert p.next_capture(False, False, background=True, speculative=True) == 256
    assert p.next_capture(True, False, background=True, speculative=True) is None  # idle path
    sizes = p.snapshot()["sizes"]
    assert sizes[0]["off_thread"] and sizes[0]["demand"] == 2
    assert sizes[1]["off_thread"] and sizes[1]["demand"] == 1
    assert not sizes[2]["off_thread"] and sizes[2]["state"] == "pending"


async def test_a_capture_thread_that_is_gone_fails_one_capture_and_the_rest_go_inline(
        llama_dir, reference, monkeypatch):  # noqa: F811  # fmt: skip
    monkeypatch.setenv("GRAPHSERVE_EMULATE_GRAPHS", "1")
    engine = start_engine(llama_dir, graph_capture="lazy", capture_min_interval_ms=0,
                          idle_debounce_ms=60_000)  # fmt: skip
    engine._core.runner.background.close(5)  # idle, nothing in flight: the thread just ends
    try:
        got = await _three_streams(engine)
        report = engine.graph_report()
    finally:
        engine.shutdown()
    prompts = [[5, 6, 7], [9, 10, 11, 12], [20, 21]]
    assert got == [hf_greedy(reference, p, 40) for p in prompts]
    assert report["settings"]["busy_capture"] == "inline"
    failed = [s for s in report["sizes"] + report["mixed"]["sizes"] if s["state"] == "failed"]
    assert len(failed) == 1 and "capture thread unavailable" in failed[0]["error"]
    assert any(s["captured_in"] == "busy" and s["state"] == "captured" for s in report["sizes"])
