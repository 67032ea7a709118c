"""server/graph_warmup.py under simulated traffic: the capture policy driven the way the engine
thread drives it, through spells of busy decoding (batch sizes random-walking) and idle time,
on the fake clock and runner of `tests.helpers.capture_policy`."""

from __future__ import annotations

import math
import random

from server.config import default_capture_sizes
from tests.helpers.capture_policy import FakeRunner, make, run_startup


def simulate(policy, clock, runner, schedule, *, step_s=0.015, seed=0):
    """Drive the policy like the engine thread does through a list of (kind, seconds) spells.

    Busy spells decode batches whose size random-walks over 1..max; idle spells wait on the
    (fake) request queue with the timeout the policy asks for. Returns the capture events (one
    dict each) and the number of decode steps.
    """
    rng = random.Random(seed)
    events = []
    n = rng.randint(1, policy.max_size)
    steps = 0
    for spell, (kind, seconds) in enumerate(schedule):
        spell_start = clock()
        end = spell_start + seconds
        if kind == "busy":
            policy.on_arrival()
            while clock() < end:
                n = min(policy.max_size, max(1, n + rng.randint(-3, 3)))
                policy.select(n)
                steps += 1
                clock.advance(step_s)
                size = policy.next_capture(running=n, waiting=rng.randint(0, 2))
                if size is not None:
                    predicted = policy.predicted_capture_s()
                    start = clock()
                    runner.capture(size)
                    # At most one capture per gap between two decode steps.
                    assert policy.next_capture(running=n, waiting=0) is None
                    events.append(
                        {
                            "size": size,
                            "phase": "busy",
                            "spell": spell,
                            "start": start,
                            "end": clock(),
                            "predicted": predicted,
                        }
                    )
        else:
            while clock() < end:
                size = policy.next_capture(0, 0)
                if size is not None:
                    start = clock()
                    runner.capture(size)
                    events.append(
                        {
                            "size": size,
                            "phase": "idle",
                            "spell": spell,
                            "start": start,
                            "end": clock(),
                            "spell_start": spell_start,
                        }
                    )
                    continue
                wait = policy.idle_wait_s()
                clock.advance(end - clock() if wait is None else min(wait, end - clock()))
    return events, steps


def test_simulation_under_sustained_load_converges_with_spaced_stalls():
    sizes = default_capture_sizes(64)
    policy, clock = make("lazy", sizes, capture_budget_s=0.05, min_interval_s=0.25)
    runner = FakeRunner(policy, clock, seconds=0.03)
    run_startup(policy, runner)
    events, steps = simulate(policy, clock, runner, [("busy", 120.0)], seed=7)

    # Every size got captured while serving, without a single idle moment.
    assert policy.complete
    assert [e["phase"] for e in events] == ["busy"] * (len(sizes) - 1)
    previous_end = runner.log[0][2]  # the startup capture
    for event in events:
        assert event["start"] - previous_end >= 0.25 - 1e-9
        assert event["predicted"] is not None and event["predicted"] <= 0.05
        previous_end = event["end"]
    # The interval rule in rate form: never more than 1 / min_interval busy captures a second.
    starts = [e["start"] for e in events]
    for i, t in enumerate(starts):
        assert sum(t <= s < t + 1.0 for s in starts[i:]) <= math.ceil(1 / 0.25)
    traffic = policy.snapshot()["traffic"]
    assert traffic["exact_steps"] + traffic["padded_steps"] + traffic["eager_steps"] == steps
    assert traffic["eager_steps"] == 0  # the largest graph was ready before serving


def test_simulation_with_bursts_and_idle_gaps_reaches_full_coverage():
    sizes = default_capture_sizes(128)
    policy, clock = make("lazy", sizes, idle_debounce_s=0.1, min_interval_s=0.25)
    # Some captures are slow (over budget), one size fails.
    durations = {s: (0.12 if s in (64, 96) else 0.02) for s in sizes}
    runner = FakeRunner(policy, clock, durations=durations, fail=(48,))
    run_startup(policy, runner)
    rng = random.Random(3)
    schedule = []
    for _ in range(40):
        schedule.append(("busy", rng.uniform(0.5, 3.0)))
        # Mostly gaps shorter than the debounce; some long enough for idle captures.
        schedule.append(("idle", rng.choice([0.02, 0.05, 0.08, 0.08, 0.2])))
    events, _ = simulate(policy, clock, runner, schedule, seed=11)

    assert policy.complete
    snap = policy.snapshot()
    assert snap["coverage"]["captured"] == len(sizes) - 1
    assert {e["size"]: e["state"] for e in snap["sizes"]}[48] == "failed"
    assert [e["size"] for e in events].count(48) == 1  # never retried
    assert {e["phase"] for e in events} == {"busy", "idle"}
    captures = [(start, end) for _, start, end in runner.log]
    for event in events:
        if event["phase"] == "busy":
            # Within budget and spaced from the previous capture of any kind.
            assert event["predicted"] <= 0.05
            previous_end = max(end for _, end in captures if end <= event["start"])
            assert event["start"] - previous_end >= 0.25 - 1e-9
        else:
            assert event["start"] - event["spell_start"] >= 0.1 - 1e-9
    # Within one idle spell, captures go largest first.
    for spell in {e["spell"] for e in events if e["phase"] == "idle"}:
        spell_sizes = [e["size"] for e in events if e["spell"] == spell]
        assert spell_sizes == sorted(spell_sizes, reverse=True)
    assert snap["timings"]["complete_after_ready_s"] is not None
