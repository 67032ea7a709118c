"""A fake clock and a fake runner for the capture policy's tests (`server/graph_warmup.py`):
the runner plays the engine thread's part of the capture protocol (begin, then succeeded or
failed) and stalls the fake clock for each capture, so the tests are fast and deterministic."""

from __future__ import annotations

from server.graph_warmup import CapturePolicy

MIB = 2**20
SIZES = [1, 2, 4, 8, 16, 24, 32]


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRunner:
    """Stands in for the CUDA runner: each capture stalls the fake clock for its duration.

    The first (largest) graph creates a pool of `largest_pool` bytes; each later graph grows it
    by `growth` bytes. Sizes in `fail` fail with a recognisable reason.
    """

    def __init__(
        self,
        policy: CapturePolicy,
        clock: FakeClock,
        *,
        seconds: float = 0.02,
        durations: dict[int, float] | None = None,
        fail: tuple[int, ...] = (),
        largest_pool: int = 64 * MIB,
        growth: int = MIB,
    ):
        self.policy = policy
        self.clock = clock
        self.seconds = seconds
        self.durations = durations or {}
        self.fail = set(fail)
        self.largest_pool = largest_pool
        self.growth = growth
        self.pool = 0
        self.log: list[tuple[int, float, float]] = []  # (size, start, end)

    def capture(self, size: int) -> None:
        start = self.clock()
        self.policy.begin(size)
        duration = self.durations.get(size, self.seconds)
        self.clock.advance(duration)
        if size in self.fail:
            self.policy.failed(size, f"simulated capture failure for size {size}")
        else:
            self.pool += self.largest_pool if self.pool == 0 else self.growth
            self.policy.succeeded(size, duration, self.pool)
        self.log.append((size, start, self.clock()))


def run_startup(policy: CapturePolicy, runner: FakeRunner) -> None:
    """What the engine does before reporting ready."""
    for size in policy.startup_plan():
        if not policy.active:
            break
        runner.capture(size)
    policy.mark_ready()


def make(mode: str = "lazy", sizes=SIZES, **kwargs) -> tuple[CapturePolicy, FakeClock]:
    clock = FakeClock()
    return CapturePolicy(sizes, mode, clock=clock, **kwargs), clock


def ready_policy(mode: str = "lazy", sizes=SIZES, runner_kwargs=None, **kwargs):
    policy, clock = make(mode, sizes, **kwargs)
    runner = FakeRunner(policy, clock, **(runner_kwargs or {}))
    run_startup(policy, runner)
    return policy, clock, runner


def states(policy: CapturePolicy) -> dict[int, str]:
    return {s: policy.state(s) for s in policy.sizes}
