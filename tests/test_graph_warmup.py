"""server/graph_warmup.py, the capture policy: startup plans, dispatch, busy/idle capture
timing, failures, the report, and that the module stays free of torch and the kernels
(traffic simulations: tests/test_graph_warmup_simulation.py).

Everything runs on a fake clock with a fake runner (`tests.helpers.capture_policy`) that plays
the engine thread's part of the capture protocol, so the tests are fast and deterministic.
"""

from __future__ import annotations

import json

import pytest

from server.config import EngineConfig, default_capture_sizes
from server.graph_warmup import CapturePolicy, CaptureStateError, Dispatch
from tests.helpers.capture_policy import (
    MIB,
    SIZES,
    FakeRunner,
    make,
    ready_policy,
    run_startup,
    states,
)
from tests.helpers.imports import fresh_imports, static_imports

# ----------------------------------------------------------------------- startup


def test_startup_plans_for_the_three_modes():
    assert make("lazy")[0].startup_plan() == [32]
    assert make("eager")[0].startup_plan() == [32, 24, 16, 8, 4, 2, 1]
    off, _ = make("off")
    assert off.startup_plan() == []
    assert off.mode == "off" and "off" in off.reason
    assert not off.active and not off.complete


def test_cpu_reports_off_with_reason():
    policy, _ = make("lazy", disabled_reason="CUDA graphs need a CUDA device (running on cpu)")
    assert policy.mode == "off"
    assert policy.reason == "CUDA graphs need a CUDA device (running on cpu)"
    assert policy.startup_plan() == []
    policy.mark_ready()
    assert policy.next_capture(0, 0) is None
    assert policy.select(3) == Dispatch(None, "eager", 0)
    with pytest.raises(CaptureStateError, match="capture is off"):
        policy.begin(32)
    snap = policy.snapshot()
    assert snap["mode"] == "off" and snap["configured_mode"] == "lazy"
    assert snap["reason"].startswith("CUDA graphs need")


def test_lazy_startup_captures_only_the_largest():
    policy, clock, runner = ready_policy("lazy", runner_kwargs={"seconds": 0.3})
    assert [size for size, _, _ in runner.log] == [32]
    assert states(policy)[32] == "captured"
    assert sum(s == "pending" for s in states(policy).values()) == len(SIZES) - 1
    assert policy.snapshot()["timings"]["startup_capture_s"] == pytest.approx(0.3)
    assert policy.snapshot()["sizes"][-1]["captured_in"] == "startup"


def test_eager_startup_captures_everything_descending_and_is_complete():
    policy, clock, runner = ready_policy("eager")
    assert [size for size, _, _ in runner.log] == [32, 24, 16, 8, 4, 2, 1]
    assert policy.complete and not policy.active
    assert policy.next_capture(0, 0) is None
    assert policy.snapshot()["timings"]["complete_after_ready_s"] <= 0


def test_largest_failing_at_startup_falls_back_to_eager():
    policy, clock, runner = ready_policy("eager", runner_kwargs={"fail": (32,)})
    # The startup loop stopped after the failure: nothing else was attempted.
    assert [size for size, _, _ in runner.log] == [32]
    assert policy.mode == "off" and not policy.active and not policy.complete
    assert "largest batch size 32 failed" in policy.reason
    assert "simulated capture failure" in policy.reason
    assert policy.startup_plan() == []
    assert policy.select(32) == Dispatch(None, "eager", 0)
    clock.advance(10)
    assert policy.next_capture(0, 0) is None
    assert policy.next_capture(5, 0) is None
    with pytest.raises(CaptureStateError):
        policy.begin(16)
    snap = policy.snapshot()
    assert snap["mode"] == "off" and snap["sizes"][-1]["state"] == "failed"
    # No demand is collected for sizes that will never be captured.
    assert all(entry["demand"] == 0 for entry in snap["pending_demand"])


def test_from_config_uses_defaults_and_always_covers_max_num_seqs():
    cfg = EngineConfig(capture_budget_ms=20, capture_min_interval_ms=500, idle_debounce_ms=30)
    policy = CapturePolicy.from_config(cfg, 40)
    assert list(policy.sizes) == default_capture_sizes(40)
    settings = policy.snapshot()["settings"]
    assert settings == {
        "capture_budget_ms": 20.0,
        "min_interval_ms": 500.0,
        "idle_debounce_ms": 30.0,
        "busy_capture": "inline",  # until the runner says it has a capture thread
    }

    custom = CapturePolicy.from_config(EngineConfig(cuda_graph_sizes=[4, 1, 64, 8]), 16)
    assert custom.sizes == (1, 4, 8, 16)
    assert custom.max_size == 16


def test_constructor_validation():
    with pytest.raises(ValueError):
        CapturePolicy([], "lazy")
    with pytest.raises(ValueError):
        CapturePolicy([0, 4], "lazy")
    with pytest.raises(ValueError):
        CapturePolicy([4], "sometimes")
    with pytest.raises(ValueError):
        CapturePolicy([4], "lazy", capture_budget_s=-1)
    assert CapturePolicy([8, 2, 8, 4]).sizes == (2, 4, 8)


# ------------------------------------------------------------------------ dispatch


def test_select_before_any_capture_is_eager_and_collects_demand():
    policy, _ = make("lazy")
    assert policy.select(5) == Dispatch(None, "eager", 0)
    snap = policy.snapshot()
    assert snap["traffic"]["eager_steps"] == 1
    assert {e["size"]: e["demand"] for e in snap["pending_demand"]}[8] == 1


def test_select_padding_and_counters():
    policy, clock, runner = ready_policy("lazy")
    clock.advance(1)
    # Capture 8 through idle time so both 8 and 32 exist.
    for _ in range(2):
        size = policy.next_capture(0, 0)
        if size is None:
            clock.advance(policy.idle_wait_s())
            size = policy.next_capture(0, 0)
        if size != 8:
            runner.capture(size)
    assert states(policy)[24] == "captured" and states(policy)[16] == "captured"
    # Now captured: 32, 24, 16. Pending: 8, 4, 2, 1.
    assert policy.select(16) == Dispatch(16, "exact", 0)
    assert policy.select(20) == Dispatch(24, "exact", 4)  # exact size 24, padded by its grid
    assert policy.select(3) == Dispatch(16, "padded", 13)  # exact size 4 pending
    assert policy.select(3) == Dispatch(16, "padded", 13)
    assert policy.select(8) == Dispatch(16, "padded", 8)
    assert policy.select(32) == Dispatch(32, "exact", 0)

    snap = policy.snapshot()
    by_size = {entry["size"]: entry for entry in snap["sizes"]}
    assert by_size[16]["replays"] == 4
    assert by_size[16]["padded_tokens_wasted"] == 13 + 13 + 8
    assert by_size[24]["replays"] == 1 and by_size[24]["padded_tokens_wasted"] == 4
    assert by_size[32]["replays"] == 1 and by_size[32]["padded_tokens_wasted"] == 0
    assert by_size[4]["demand"] == 2 and by_size[8]["demand"] == 1
    assert by_size[16]["demand"] == 0  # demand only accrues to pending sizes
    assert snap["traffic"] == {
        "exact_steps": 3,
        "padded_steps": 3,
        "eager_steps": 0,
        "hit_rate": pytest.approx(0.5),
    }


@pytest.mark.parametrize("n", [0, -1, 33, 2.0, True])
def test_select_rejects_batch_sizes_outside_the_configured_range(n):
    policy, _ = make("lazy")
    with pytest.raises(ValueError, match="1..32"):
        policy.select(n)


# -------------------------------------------------------------------- busy capture


def test_busy_capture_follows_demand():
    policy, clock, runner = ready_policy("lazy", min_interval_s=0.25)
    for _ in range(3):
        policy.select(16)
    for _ in range(5):
        policy.select(4)
    policy.select(2)
    clock.advance(0.3)
    assert policy.next_capture(running=4, waiting=0) == 4
    runner.capture(4)
    assert policy.snapshot()["sizes"][2]["captured_in"] == "busy"
    policy.select(16)
    clock.advance(0.3)
    assert policy.next_capture(running=16, waiting=0) == 16
    runner.capture(16)
    policy.select(2)
    clock.advance(0.3)
    assert policy.next_capture(running=2, waiting=0) == 2
    runner.capture(2)
    policy.select(2)
    clock.advance(0.3)
    # 1, 8 and 24 were never needed: they wait for idle time.
    assert policy.next_capture(running=2, waiting=0) is None
    pending = [e["size"] for e in policy.snapshot()["pending_demand"]]
    assert pending == [24, 8, 1]


def test_busy_demand_ties_go_to_the_larger_size():
    policy, clock, _ = ready_policy("lazy")
    policy.select(3)
    policy.select(12)
    clock.advance(1)
    assert policy.next_capture(running=1, waiting=0) == 16


def test_busy_capture_respects_the_time_budget_and_idle_does_not():
    # The startup capture took 200 ms: over the 50 ms budget, so nothing is captured while busy.
    policy, clock, runner = ready_policy(
        "lazy", runner_kwargs={"durations": {32: 0.2}, "seconds": 0.01}, capture_budget_s=0.05
    )
    assert policy.predicted_capture_s() == pytest.approx(0.2)
    for _ in range(100):
        policy.select(1)
        clock.advance(0.02)
        assert policy.next_capture(running=1, waiting=1) is None
    # Idle time ignores the budget.
    assert policy.next_capture(0, 0) is None  # debounce starts
    clock.advance(0.1)
    assert policy.next_capture(0, 0) == 24
    runner.capture(24)
    # The median of the measurements outvotes the slow startup capture, so busy capture
    # resumes for the size traffic demanded.
    assert policy.predicted_capture_s() == pytest.approx(0.01)
    policy.on_arrival()
    policy.select(1)
    clock.advance(0.3)
    assert policy.next_capture(running=1, waiting=0) == 1


def test_one_slow_capture_does_not_stop_busy_capture():
    policy, clock, runner = ready_policy(
        "lazy", runner_kwargs={"durations": {16: 0.5}, "seconds": 0.01}, min_interval_s=0.25
    )
    captured = []
    for _ in range(200):
        policy.select(12)
        policy.select(3)
        clock.advance(0.05)
        size = policy.next_capture(running=12, waiting=0)
        if size is not None:
            runner.capture(size)
            captured.append(size)
    # Demand ties go to the larger size; 16 took 500 ms, yet capture goes on for 4 and the
    # prediction stays at the typical capture time.
    assert captured == [16, 4]
    assert policy.predicted_capture_s() == pytest.approx(0.01)
    # With a majority of slow captures the prediction does go over budget, and busy capture
    # stops.
    slow, clock = make("lazy", capture_budget_s=0.05)
    slow_runner = FakeRunner(slow, clock, durations={32: 0.1, 24: 0.1, 16: 0.1}, seconds=0.01)
    run_startup(slow, slow_runner)
    clock.advance(1)
    slow.next_capture(0, 0)
    clock.advance(1)
    slow_runner.capture(slow.next_capture(0, 0))  # 24
    slow_runner.capture(slow.next_capture(0, 0))  # 16
    slow_runner.capture(slow.next_capture(0, 0))  # 8, fast
    assert slow.predicted_capture_s() == pytest.approx(0.1)
    slow.on_arrival()
    slow.select(1)
    clock.advance(1)
    assert slow.next_capture(running=1, waiting=0) is None


def test_no_busy_capture_without_a_measurement():
    # A policy whose startup was skipped (no measurement yet) must not guess while busy.
    policy, clock = make("lazy")
    runner = FakeRunner(policy, clock)
    policy.mark_ready()
    assert policy.predicted_capture_s() is None
    policy.select(32)
    clock.advance(1)
    assert policy.next_capture(running=32, waiting=0) is None
    clock.advance(1)
    assert policy.next_capture(0, 0) is None
    clock.advance(0.1)
    assert policy.next_capture(0, 0) == 32
    runner.capture(32)
    assert policy.snapshot()["sizes"][-1]["captured_in"] == "idle"


def test_min_interval_between_busy_captures():
    policy, clock, runner = ready_policy("lazy", min_interval_s=0.25)
    for n in (1, 2, 3, 5):
        policy.select(n)
    # The startup capture just ended: too soon.
    clock.advance(0.1)
    assert policy.next_capture(running=5, waiting=0) is None
    clock.advance(0.15)
    first = policy.next_capture(running=5, waiting=0)
    assert first is not None
    runner.capture(first)
    end = clock()
    policy.select(5)
    clock.advance(0.249)
    assert policy.next_capture(running=5, waiting=0) is None
    clock.advance(0.001)
    assert clock() - end == pytest.approx(0.25)
    assert policy.next_capture(running=5, waiting=0) is not None


def test_at_most_one_capture_per_gap_between_steps():
    policy, clock, runner = ready_policy("lazy", min_interval_s=0.0)
    for n in (1, 2, 3):
        policy.select(n)
    size = policy.next_capture(running=3, waiting=0)
    runner.capture(size)
    assert policy.next_capture(running=3, waiting=0) is None  # same gap: no second capture
    policy.select(3)
    assert policy.next_capture(running=3, waiting=0) is not None


def test_waiting_requests_count_as_busy():
    policy, clock, _ = ready_policy("lazy")
    policy.select(3)
    clock.advance(5)
    # Only waiting work: still busy rules (demand only), never idle order.
    assert policy.next_capture(running=0, waiting=2) == 4


# -------------------------------------------------------------------- idle capture


def test_idle_captures_remaining_sizes_descending_after_debounce():
    policy, clock, runner = ready_policy("lazy", idle_debounce_s=0.1)
    for _ in range(10):
        policy.select(1)  # demand does not change the idle order
    assert policy.next_capture(0, 0) is None
    assert policy.idle_wait_s() == pytest.approx(0.1)
    clock.advance(0.06)
    assert policy.next_capture(0, 0) is None
    assert policy.idle_wait_s() == pytest.approx(0.04)
    clock.advance(0.039)
    assert policy.next_capture(0, 0) is None
    clock.advance(0.002)
    order = []
    while (size := policy.next_capture(0, 0)) is not None:
        order.append(size)
        runner.capture(size)
    assert order == [24, 16, 8, 4, 2, 1]
    assert policy.complete
    assert all(e["captured_in"] in ("startup", "idle") for e in policy.snapshot()["sizes"])


def test_idle_debounce_starts_at_ready():
    policy, clock, runner = ready_policy("lazy", idle_debounce_s=0.1)
    clock.advance(0.06)
    assert policy.idle_wait_s() == pytest.approx(0.04)
    clock.advance(0.041)
    # The engine's first call after its first idle wait already gets a size.
    assert policy.next_capture(0, 0) == 24


def test_arrival_stops_idle_capture_at_once():
    policy, clock, runner = ready_policy("lazy", idle_debounce_s=0.1, min_interval_s=0.25)
    policy.next_capture(0, 0)
    clock.advance(0.1)
    size = policy.next_capture(0, 0)
    assert size == 24
    runner.capture(size)
    policy.on_arrival()  # a request was submitted during the capture
    # The engine has not admitted it yet: the debounce restarts, nothing more is captured.
    assert policy.next_capture(0, 0) is None
    assert policy.idle_wait_s() == pytest.approx(0.1)
    # Once admitted, busy rules apply: size 16 has no demand, so it is not captured.
    policy.select(1)
    clock.advance(1.0)
    assert policy.next_capture(running=1, waiting=0) == 1
    # A busy spell also resets the idle debounce.
    assert policy.next_capture(0, 0) is None
    clock.advance(0.1)
    assert policy.next_capture(0, 0) == 16


# ---------------------------------------------------------------- completion, failure


def test_capture_switches_off_for_good_when_complete():
    policy, clock, runner = ready_policy("lazy")
    clock.advance(1)
    policy.next_capture(0, 0)
    clock.advance(1)
    while (size := policy.next_capture(0, 0)) is not None:
        runner.capture(size)
    assert policy.complete and not policy.active
    clock.advance(100)
    for running, waiting in ((0, 0), (8, 0), (0, 3)):
        assert policy.next_capture(running, waiting) is None
    assert policy.idle_wait_s() is None
    with pytest.raises(CaptureStateError, match="already captured"):
        policy.begin(4)
    snap = policy.snapshot()
    assert snap["complete"] is True
    assert snap["coverage"] == {"captured": 7, "total": 7, "ratio": 1.0}
    assert snap["timings"]["complete_after_ready_s"] == pytest.approx(1 + 1 + 6 * 0.02)
    assert policy.select(3) == Dispatch(4, "exact", 1)


def test_failure_is_isolated():
    policy, clock, runner = ready_policy("lazy", runner_kwargs={"fail": (16,)})
    clock.advance(1)
    policy.next_capture(0, 0)
    clock.advance(1)
    assert policy.next_capture(0, 0) == 24
    runner.capture(24)
    assert policy.next_capture(0, 0) == 16
    runner.capture(16)  # fails
    assert policy.state(16) == "failed"
    assert policy.mode == "lazy" and policy.active  # other sizes continue
    assert policy.next_capture(0, 0) == 8
    runner.capture(8)

    # A batch whose exact size failed pads past it and adds no demand for it.
    assert policy.select(12) == Dispatch(24, "padded", 12)
    assert policy.select(16) == Dispatch(24, "padded", 8)
    entry16 = policy.snapshot()["sizes"][4]
    assert entry16["size"] == 16 and entry16["demand"] == 0
    assert "simulated capture failure" in entry16["error"]

    order = []
    while (size := policy.next_capture(0, 0)) is not None:
        order.append(size)
        runner.capture(size)
    assert 16 not in order and order == [4, 2, 1]
    assert policy.complete
    snap = policy.snapshot()
    assert snap["coverage"] == {"captured": 6, "total": 7, "ratio": pytest.approx(6 / 7)}
    with pytest.raises(CaptureStateError, match="already failed"):
        policy.begin(16)


def test_a_smaller_failure_at_eager_startup_does_not_stop_startup():
    policy, clock, runner = ready_policy("eager", runner_kwargs={"fail": (8,)})
    assert [s for s, _, _ in runner.log] == [32, 24, 16, 8, 4, 2, 1]
    assert policy.mode == "eager" and policy.complete
    assert policy.select(5) == Dispatch(16, "padded", 11)


def test_disable_turns_dispatch_eager_and_keeps_first_reason():
    policy, clock, runner = ready_policy("lazy")
    assert policy.select(32).kind == "exact"
    policy.disable("graph replay failed: device-side assert")
    policy.disable("second reason")
    assert policy.reason == "graph replay failed: device-side assert"
    assert policy.select(32) == Dispatch(None, "eager", 0)
    assert policy.next_capture(0, 0) is None


def test_invalid_transitions_raise():
    policy, clock = make("lazy")
    runner = FakeRunner(policy, clock)
    with pytest.raises(CaptureStateError, match="without begin"):
        policy.succeeded(32, 0.01, MIB)
    with pytest.raises(CaptureStateError, match="without begin"):
        policy.failed(32, "boom")
    with pytest.raises(CaptureStateError, match="largest size 32 must be captured first"):
        policy.begin(8)
    with pytest.raises(ValueError, match="not a configured capture size"):
        policy.begin(5)
    with pytest.raises(CaptureStateError, match="before mark_ready"):
        policy.next_capture(0, 0)
    policy.begin(32)
    with pytest.raises(CaptureStateError, match="still in progress"):
        policy.begin(32)
    with pytest.raises(CaptureStateError, match="in progress is size 32"):
        policy.succeeded(24, 0.01, MIB)
    with pytest.raises(CaptureStateError, match="in progress"):
        policy.mark_ready()
    with pytest.raises(ValueError, match="seconds"):
        policy.succeeded(32, -1.0, MIB)
    with pytest.raises(ValueError, match="pool_bytes"):
        policy.succeeded(32, 0.01, -5)
    policy.succeeded(32, 0.01, MIB)
    with pytest.raises(CaptureStateError, match="without begin"):
        policy.succeeded(32, 0.01, MIB)
    policy.mark_ready()
    policy.select(3)
    clock.advance(1)
    size = policy.next_capture(3, 0)
    runner.policy.begin(size)
    with pytest.raises(CaptureStateError, match="has not been reported"):
        policy.next_capture(3, 0)
    policy.failed(size, "boom")
    with pytest.raises(CaptureStateError, match="without begin"):
        policy.failed(size, "boom")
    with pytest.raises(ValueError):
        policy.next_capture(-1, 0)


# ------------------------------------------------------------------ memory, report


def test_memory_estimate_and_budget_warning():
    policy, clock = make("lazy")
    runner = FakeRunner(policy, clock, largest_pool=100 * MIB, growth=4 * MIB)
    policy.set_memory(budget_bytes=1000 * MIB, kv_cache_bytes=700 * MIB, weights_bytes=150 * MIB)
    assert policy.snapshot()["memory"]["estimate_full_bytes"] is None
    run_startup(policy, runner)
    mem = policy.snapshot()["memory"]
    # Only the largest measured: assumed growth of 2% of its pool per other graph.
    assert mem["estimate_basis"] == "assumed"
    assert mem["estimate_full_bytes"] == int(100 * MIB * (1 + 0.02 * 6))
    assert mem["warning"] is None  # 112 + 700 + 150 < 1000

    clock.advance(1)
    policy.next_capture(0, 0)
    clock.advance(1)
    runner.capture(policy.next_capture(0, 0))
    mem = policy.snapshot()["memory"]
    assert mem["estimate_basis"] == "measured"
    assert mem["per_graph_bytes"] == 4 * MIB
    assert mem["estimate_full_bytes"] == 100 * MIB + 6 * 4 * MIB
    assert policy.memory_warning is None

    # A tighter budget (e.g. a bigger KV cache) now overflows: 124 + 740 + 150 > 1000.
    policy.set_memory(budget_bytes=1000 * MIB, kv_cache_bytes=740 * MIB, weights_bytes=150 * MIB)
    assert "over the 1000.0 MiB budget by 14.0 MiB" in policy.memory_warning
    assert policy.snapshot()["memory"]["warning"] == policy.memory_warning

    # Once everything is captured the estimate is the measured pool.
    while (size := policy.next_capture(0, 0)) is not None:
        runner.capture(size)
    snap = policy.snapshot()
    assert snap["memory"]["estimate_full_bytes"] == snap["pool_bytes_total"] == runner.pool
    policy.set_memory(None, 740 * MIB, 150 * MIB)
    assert policy.memory_warning is None
    with pytest.raises(ValueError):
        policy.set_memory(10, -1, 0)


def test_snapshot_shape_and_json():
    policy, clock, runner = ready_policy("lazy", runner_kwargs={"fail": (24,)})
    snap = policy.snapshot()
    assert snap["traffic"]["hit_rate"] is None
    assert snap["timings"]["complete_after_s"] is None
    policy.select(7)
    policy.select(32)
    clock.advance(1)
    policy.next_capture(0, 0)
    clock.advance(1)
    runner.capture(policy.next_capture(0, 0))  # 24 fails
    snap = policy.snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert set(snap) >= {
        "mode",
        "reason",
        "complete",
        "sizes",
        "coverage",
        "traffic",
        "pending_demand",
        "pool_bytes_total",
        "memory",
        "timings",
    }
    assert snap["mode"] == "lazy" and snap["reason"] is None and snap["complete"] is False
    assert [e["size"] for e in snap["sizes"]] == SIZES
    for entry in snap["sizes"]:
        assert set(entry) >= {
            "size",
            "state",
            "capture_ms",
            "pool_bytes_after",
            "replays",
            "padded_tokens_wasted",
            "demand",
            "error",
        }
        assert entry["state"] in ("pending", "capturing", "captured", "failed")
    by_size = {e["size"]: e for e in snap["sizes"]}
    assert by_size[32]["capture_ms"] == pytest.approx(20.0)
    assert by_size[32]["pool_bytes_after"] == 64 * MIB
    assert by_size[24]["state"] == "failed" and by_size[24]["error"]
    assert snap["coverage"] == {"captured": 1, "total": 7, "ratio": pytest.approx(1 / 7)}
    assert snap["traffic"]["hit_rate"] == pytest.approx(0.5)
    # Pending sizes in priority order: demanded first, then descending (the idle order).
    assert snap["pending_demand"][0] == {"size": 8, "demand": 1}
    assert [e["size"] for e in snap["pending_demand"]] == [8, 16, 4, 2, 1]
    assert set(snap["memory"]) >= {"estimate_full_bytes", "budget_bytes", "warning"}
    assert snap["timings"]["startup_capture_s"] == pytest.approx(0.02)
    assert snap["timings"]["ready_after_s"] == pytest.approx(0.02)


def test_snapshot_is_consistent_while_another_thread_mutates():
    import threading

    policy, clock, runner = ready_policy("lazy")
    stop = threading.Event()
    errors = []

    def reader():
        while not stop.is_set():
            snap = policy.snapshot()
            t = snap["traffic"]
            replays = sum(e["replays"] for e in snap["sizes"])
            if replays != t["exact_steps"] + t["padded_steps"]:
                errors.append(snap)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(20000):
            policy.select(1 + i % 32)
    finally:
        stop.set()
        thread.join()
    assert errors == []


# ------------------------------------------------------------------ no torch at any level
# What the policy module must never load: the HTTP layer reads `snapshot()` without the model
# stack, and the engine front builds the policy's config before torch is imported.
KERNEL_STACK = ("server.ops", "server.triton_ops", "server.graph_runner", "server.model")


def _kernel_modules(names) -> list[str]:
    return sorted(
        n for n in names if n.split(".")[0] in ("torch", "triton") or n in KERNEL_STACK
    )


def test_policy_module_imports_no_torch_triton_or_kernel_module():
    added = fresh_imports("server.graph_warmup", "server.graph_runner")
    assert "server.graph_warmup" in added["server.graph_warmup"]
    assert _kernel_modules(added["server.graph_warmup"]) == []
    # The control, in the same interpreter: the runner beside the policy does load them.
    assert {"torch", "server.ops", "server.graph_runner"} <= set(
        _kernel_modules(added["server.graph_runner"])
    )


def test_policy_source_names_no_torch_triton_or_kernel_module_even_inside_functions():
    found = static_imports("server.graph_warmup")
    assert {"server.graph_warmup", "server.config", "server.graph_memory"} <= set(found)
    assert {module: _kernel_modules(names) for module, names in found.items()} == {
        module: [] for module in found
    }
    # The control: the same reading finds the runner's imports.
    assert "torch" in _kernel_modules(static_imports("server.graph_runner")["server.graph_runner"])
