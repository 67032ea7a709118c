"""The engine's step cadence histogram (server.step_timing) and its /metrics family."""

from __future__ import annotations

import asyncio
import time

from server import metrics
from server.http.loop_lag import watch_loop_lag
from server.request import SamplingParams
from server.step_timing import (
    BUCKETS_S,
    TRACE_ENV,
    StepClock,
    StepIntervals,
    trace_threshold_s,
)
from tests.helpers.tiny_models import build_checkpoint
from tests.test_engine import collect, start_engine


def test_intervals_land_in_prometheus_buckets():
    h = StepIntervals()
    for s in (0.0005, 0.001, 0.0011, 0.007, 3.0):  # 0.001 is "le 0.001"; 3.0 only in +Inf
        h.observe("decode", s)
    h.observe("mixed", 0.012)
    snap = h.snapshot()
    decode = dict(snap["decode"]["buckets"])
    assert decode[0.001] == 2 and decode[0.002] == 3 and decode[0.008] == 4
    assert decode[BUCKETS_S[-1]] == 4 and decode[float("inf")] == 5 == snap["decode"]["count"]
    assert abs(snap["decode"]["sum"] - 3.0096) < 1e-9
    assert snap["mixed"]["count"] == 1 and dict(snap["mixed"]["buckets"])[0.010] == 0


def test_the_clock_counts_only_inside_a_busy_stretch():
    now = [0.0]
    h = StepIntervals()
    clock = StepClock(h, lambda: now[0])
    for t, kind, more in ((1.0, "decode", True), (1.005, "decode", True), (1.02, "mixed", False),
                          (9.0, "decode", True), (9.004, "decode", True)):
        now[0] = t
        clock.read(kind, more_in_flight=more)
    snap = h.snapshot()
    # 1.0 starts a stretch; 1.005 and 1.02 are intervals; 1.02 ends it (nothing in flight),
    # so the idle 8 s before 9.0 is not one; 9.004 is.
    assert snap["decode"]["count"] == 2 and snap["mixed"]["count"] == 1
    assert abs(snap["decode"]["sum"] - 0.009) < 1e-9
    clock.reset()
    now[0] = 20.0
    clock.read("decode", more_in_flight=True)
    assert h.snapshot()["decode"]["count"] == 2  # a reset starts a new stretch


def test_a_traced_clock_logs_long_intervals_with_their_phases(caplog):
    now = [0.0]
    clock = StepClock(StepIntervals(), lambda: now[0], trace_above_s=0.006)
    caplog.set_level("INFO", logger="graphserve.engine")
    for t, started, launched in ((1.0, None, None), (1.005, 1.0006, 1.001),
                                 (1.0141, 1.0095, 1.0102)):
        now[0] = t
        clock.read("decode", more_in_flight=True, started=started, launched=launched,
                   context=lambda: "capturing bucket 256 on the capture thread")
    (record,) = caplog.records  # the 5 ms interval is under the threshold, the 9.1 ms one not
    assert record.getMessage() == (
        "step interval 9.10 ms (decode): to the step's start 4.50, launching the next 0.70, "
        "waiting and reading 3.90 ms; capturing bucket 256 on the capture thread")


def test_the_trace_threshold_comes_from_the_environment(caplog):
    assert trace_threshold_s({}) is None and trace_threshold_s({TRACE_ENV: " "}) is None
    assert trace_threshold_s({TRACE_ENV: "6.5"}) == 0.0065
    for bad in ("fast", "0", "-3", "inf", "nan"):
        assert trace_threshold_s({TRACE_ENV: bad}) is None
    assert "not a positive number" in caplog.text


def test_malformed_snapshots_drop_the_family_not_the_scrape():
    assert metrics._step_intervals(None) is None
    assert metrics._step_intervals({"decode": {"buckets": "x"}}) is None


async def test_a_serving_engine_reports_its_cadence(tmp_path):
    engine = start_engine(build_checkpoint(tmp_path / "llama", "llama"))
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        await asyncio.gather(*(collect(engine, [5, 6, 7 + i], params) for i in range(3)))
        snap = engine.stats()["step_intervals"]
    finally:
        engine.shutdown()
    assert snap["decode"]["count"] >= 10 and snap["decode"]["sum"] > 0
    family = metrics._step_intervals(snap)
    samples = {(s.name, s.labels.get("kind"), s.labels.get("le")): s.value
               for s in family.samples}
    assert samples[("graphserve_step_interval_seconds_bucket", "decode", "+Inf")] == (
        snap["decode"]["count"])
    assert samples[("graphserve_step_interval_seconds_count", "decode", None)] == (
        snap["decode"]["count"])


async def test_the_event_loop_lag_is_measured_and_a_blocked_loop_shows():
    seen = []
    task = asyncio.create_task(watch_loop_lag(seen.append, period_s=0.005))
    await asyncio.sleep(0.03)
    time.sleep(0.05)  # the loop held for 50 ms, as a large body parse or a GIL wait would
    await asyncio.sleep(0.03)
    task.cancel()
    assert len(seen) >= 3 and all(lag >= 0 for lag in seen)
    assert max(seen) >= 0.04


async def test_a_traced_engine_logs_its_step_intervals(tmp_path, monkeypatch, caplog):
    """With `$GRAPHSERVE_TRACE_STEPS_MS` set, the engine's intervals above it are logged with
    their phases (here every one: the threshold is a microsecond)."""
    monkeypatch.setenv(TRACE_ENV, "0.001")
    caplog.set_level("INFO", logger="graphserve.engine")
    engine = start_engine(build_checkpoint(tmp_path / "llama", "llama"))
    try:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        await collect(engine, [5, 6, 7], params)
    finally:
        engine.shutdown()
    lines = [r.getMessage() for r in caplog.records if "step interval" in r.getMessage()]
    assert len(lines) >= 4
    assert all("to the step's start" in line and "waiting and reading" in line for line in lines)
