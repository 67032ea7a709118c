"""`server.gil_pacing`: the capture thread records while the engine thread waits on the device."""

from __future__ import annotations

import threading
import time

from server import gil_pacing


def test_pace_is_free_on_unpaced_threads():
    t0 = time.perf_counter()
    for _ in range(1000):
        gil_pacing.pace()
    assert time.perf_counter() - t0 < 0.5  # no waiting (1000 waits would take 2 s)


def test_a_paced_thread_waits_for_the_device_wait_or_the_bound():
    # Nobody in a device wait: each pace waits out MAX_WAIT_S, never longer than a bound.
    with gil_pacing.paced():
        t0 = time.perf_counter()
        gil_pacing.pace()
        waited = time.perf_counter() - t0
    assert gil_pacing.MAX_WAIT_S * 0.5 <= waited < 1.0
    # While another thread is in its device wait, pace returns at once.
    inside, leave = threading.Event(), threading.Event()

    def engine():
        with gil_pacing.device_wait():
            inside.set()
            leave.wait(5)

    t = threading.Thread(target=engine)
    t.start()
    try:
        assert inside.wait(5)
        with gil_pacing.paced():
            t0 = time.perf_counter()
            for _ in range(50):
                gil_pacing.pace()
            assert time.perf_counter() - t0 < 50 * gil_pacing.MAX_WAIT_S * 0.5
    finally:
        leave.set()
        t.join(5)
    # The wait is over and the flag cleared; `paced` is per thread and undone on exit.
    assert not gil_pacing._engine_waiting.is_set()
    assert not getattr(gil_pacing._local, "paced", False)
