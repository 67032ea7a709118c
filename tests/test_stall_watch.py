"""server.stall_watch: a thread holding the GIL in one long C call is caught and named."""

from __future__ import annotations

import logging
import random
import threading
import time

import pytest

from server import stall_watch


def _hog(data: list[float]) -> None:
    sorted(data)  # timsort in C: holds the GIL for the whole sort
    for _ in range(10_000):  # the GIL is handed over at this loop's first check, still in here
        pass


@pytest.mark.parametrize("serving,level", [(True, logging.WARNING), (False, logging.INFO)])
def test_a_gil_holding_call_is_logged_with_the_thread_that_made_it(caplog, serving, level):
    data = [random.random() for _ in range(2_000_000)]
    t0 = time.perf_counter()
    sorted(data)
    hog_s = time.perf_counter() - t0
    watch = stall_watch.StallWatch(period_s=0.01, threshold_s=max(0.05, hog_s / 3),
                                   min_interval_s=0.0, serving=lambda: serving)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="graphserve.stall"):
        watch.start()
        time.sleep(0.05)
        hog = threading.Thread(target=_hog, args=(data,), name="test-hog")
        hog.start()
        hog.join()
        deadline = time.monotonic() + 5
        while not watch.stalls and time.monotonic() < deadline:
            time.sleep(0.01)
        watch.stop()
        watch.join(5)
    assert watch.stalls, f"no stall seen (the sort took {hog_s:.2f} s alone)"
    late, where = watch.stalls[0]
    assert late >= watch.threshold_s
    assert "test-hog at " in where and "_hog" in where
    # Before ready a stall only delays readiness (INFO); while serving it stalls streams.
    assert any("process stalled" in r.getMessage() and "test-hog" in r.getMessage()
               and r.levelno == level for r in caplog.records)


def test_a_quiet_process_logs_nothing(caplog):
    watch = stall_watch.StallWatch(period_s=0.01, threshold_s=0.5)
    with caplog.at_level(logging.WARNING, logger="graphserve.stall"):
        watch.start()
        time.sleep(0.3)
        watch.stop()
        watch.join(5)
    assert watch.stalls == [] and not caplog.records


def test_describe_threads_prefers_the_servers_frames():
    started, release = threading.Event(), threading.Event()

    def park():
        started.set()
        release.wait(5)

    t = threading.Thread(target=park, name="parked")
    t.start()
    started.wait(5)
    try:
        import sys

        text = stall_watch.describe_threads(sys._current_frames(), threading.get_ident())
    finally:
        release.set()
        t.join()
    assert "parked at " in text and "(park)" in text
    assert "MainThread" not in text  # the caller's own thread is skipped
