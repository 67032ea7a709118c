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


def _wait_in_driver(release: threading.Event) -> None:
    release.wait(5)  # like a device call: no GIL held, Python runs on elsewhere


@pytest.mark.parametrize("serving,level", [(True, logging.WARNING), (False, logging.INFO)])
def test_a_heartbeat_unit_running_long_is_logged_once_while_it_runs(caplog, serving, level):
    """A thread stuck without holding the GIL (no process stall) is named while still stuck,
    once per unit of work; short units and idle waits log nothing."""
    watch = stall_watch.StallWatch(period_s=0.01, threshold_s=0.1, serving=lambda: serving,
                                   beat_interval_s=0.0)
    release = threading.Event()
    units: list[str] = []

    def engine_like() -> None:
        hb = stall_watch.heartbeat("test loop")
        try:
            hb.begin()
            time.sleep(0.02)  # a short unit
            hb.idle()
            time.sleep(0.3)  # waiting for work: not a unit
            hb.begin()
            units.append("long")
            _wait_in_driver(release)  # the long unit: still running when logged
            hb.idle()
        finally:
            stall_watch.forget(hb)

    with caplog.at_level(logging.INFO, logger="graphserve.stall"):
        watch.start()
        worker = threading.Thread(target=engine_like, name="test-engine")
        worker.start()
        deadline = time.monotonic() + 5
        while not watch.slow_units and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # still stuck: must not be logged again
        release.set()
        worker.join(5)
        watch.stop()
        watch.join(5)
    assert units == ["long"] and len(watch.slow_units) == 1, watch.slow_units
    name, running_s, where = watch.slow_units[0]
    assert name == "test loop" and 0.1 <= running_s < 1.0
    assert "test-engine at " in where and "_wait_in_driver" in where
    lines = [r for r in caplog.records if "one unit of work running" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == level and "test loop" in lines[0].getMessage()
    assert watch.stalls == []  # no thread held the GIL: not a process stall
    assert all(hb.name != "test loop" for hb in stall_watch._heartbeats)  # forgotten


def test_a_heartbeat_counts_slow_against_its_own_recent_units():
    """Units that are always long (a CPU server's steps) are not news; one ten times the recent
    ones, past the threshold, is."""
    hb = stall_watch.Heartbeat("test")
    watch = stall_watch.StallWatch(threshold_s=0.1, beat_interval_s=0.0)
    hb.average = 0.05  # recent units of 50 ms: slow means past 0.5 s
    hb.since = time.perf_counter() - 0.3
    stall_watch._heartbeats.append(hb)
    try:
        watch._check_heartbeats(time.perf_counter())
        assert watch.slow_units == []  # 0.3 s: past the threshold, not past 10x its units
        hb.since = time.perf_counter() - 0.6
        watch._check_heartbeats(time.perf_counter())
        assert [u[0] for u in watch.slow_units] == ["test"]
    finally:
        stall_watch.forget(hb)
    hb.average = 0.0
    hb.since = time.perf_counter() - 0.2
    hb.begin()  # the 0.2 s unit ends as the next begins: it enters the average
    assert 0.015 < hb.average < 0.03
    hb.idle()
    assert hb.since is None
