"""`--state-dir`: the capture plan that survives restarts, and the policy's use of it."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from server import state_dir as sd
from server.cli import config_from_args, parse_args
from server.config import ConfigError, EngineConfig
from server.graph_warmup import CapturePolicy

SIZES = [1, 2, 4, 8, 16, 24, 32]
FP = {"model": "/m", "max_num_seqs": 32, "capture_sizes": SIZES, "dtype": "torch.bfloat16"}
REPO = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _ready_policy(clock: Clock, mode: str = "lazy") -> CapturePolicy:
    policy = CapturePolicy(SIZES, mode, idle_debounce_s=0.0, clock=clock)
    for size in policy.startup_plan():
        policy.begin(size)
        policy.succeeded(size, 0.01, 1 << 20)
    policy.mark_ready()
    return policy


def _idle_captures(policy: CapturePolicy) -> list[int]:
    order = []
    while (size := policy.next_capture(0, 0)) is not None:
        policy.begin(size)
        policy.succeeded(size, 0.01, 1 << 20)
        order.append(size)
    return order


# -- the policy (pure) ---------------------------------------------------------------------------


def test_idle_captures_follow_the_saved_demand():
    clock = Clock()
    plain = _ready_policy(clock)
    assert _idle_captures(plain) == [24, 16, 8, 4, 2, 1]  # no plan: largest first
    policy = _ready_policy(clock)
    policy.apply_saved_plan({4: 100.0, 1: 50.0, 16: 10.0, 999: 5.0, 2: 0.0},
                            {"status": "loaded"})
    assert _idle_captures(policy) == [4, 1, 16, 24, 8, 2]
    snap = policy.snapshot()["saved_plan"]
    assert snap["status"] == "loaded"
    assert snap["demand"] == {"1": 50.0, "4": 100.0, "16": 10.0}  # unknown/zero sizes dropped
    assert snap["idle_order"] == [32, 4, 1, 16, 24, 8, 2]  # the largest always first
    json.dumps(policy.snapshot())


def test_saved_plan_is_reported_even_when_empty_and_absent_when_never_applied():
    policy = _ready_policy(Clock())
    assert policy.snapshot()["saved_plan"] is None
    policy.apply_saved_plan({}, {"status": "missing", "path": "/x"})
    snap = policy.snapshot()["saved_plan"]
    assert snap["status"] == "missing" and snap["demand"] == {}


def test_demand_histogram_counts_every_step_by_its_exact_size():
    policy = _ready_policy(Clock())
    for n in (1, 1, 3, 3, 3, 30, 32):
        policy.select(n)
    assert policy.demand_histogram() == {1: 2, 4: 3, 32: 2}
    _idle_captures(policy)
    policy.select(3)  # counted after the plan completed too
    assert policy.demand_histogram()[4] == 4
    sizes = {s["size"]: s for s in policy.snapshot()["sizes"]}
    assert sizes[4]["wanted"] == 4


def test_busy_capture_breaks_demand_ties_with_the_saved_plan():
    clock = Clock()
    policy = CapturePolicy(SIZES, "lazy", min_interval_s=0.0, clock=clock)
    policy.begin(32)
    policy.succeeded(32, 0.01, 1 << 20)
    policy.mark_ready()
    policy.apply_saved_plan({2: 9.0}, {"status": "loaded"})
    policy.select(1)
    policy.select(2)  # sizes 1 and 2 now have one unit of live demand each
    assert policy.next_capture(running=2, waiting=0) == 2


# -- the file ------------------------------------------------------------------------------------


def test_default_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sd.default_state_dir() == tmp_path / "xdg" / "graphserve"
    assert sd.resolve_state_dir(None) == tmp_path / "xdg" / "graphserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sd.default_state_dir() == tmp_path / "home" / ".cache" / "graphserve"
    assert sd.resolve_state_dir("") is None
    assert sd.resolve_state_dir("~/s") == tmp_path / "home" / "s"


def test_round_trip_and_one_file_per_model(tmp_path):
    store = sd.CapturePlanStore(tmp_path, "/m", FP)
    store.save({1: 3.0, 8: 0.0}, 2, [{"run_id": "a"}])
    plan = store.load()
    assert plan.status == "loaded" and plan.demand == {1: 3.0} and plan.runs == 2
    assert plan.startup_timings == [{"run_id": "a"}] and plan.saved_at is not None
    assert plan.report()["previous_startup"] == {"run_id": "a"}
    other = sd.CapturePlanStore(tmp_path, "/other", FP)
    assert other.path != store.path and other.load().status == "missing"
    assert sorted(p.name for p in tmp_path.iterdir()) == [store.path.name]


def _one_warning(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("content,status,why", [
    ("{not json", "corrupt", "Expecting property name"),
    (json.dumps({"version": 99}), "corrupt", "not a version-1"),
    (json.dumps({"version": 1, "fingerprint": FP, "demand": {"x": 1}, "runs": 1}), "corrupt",
     "bad demand entry"),
    (json.dumps({"version": 1, "fingerprint": FP, "demand": {"1": -2}, "runs": 1}), "corrupt",
     "bad demand entry"),
    (json.dumps({"version": 1, "fingerprint": FP, "demand": {}, "runs": "many"}), "corrupt",
     "runs must be a count"),
    (json.dumps({"version": 1, "fingerprint": {**FP, "max_num_seqs": 64}, "demand": {},
                 "runs": 1}), "stale", "max_num_seqs differ"),
    (json.dumps({"version": 1, "fingerprint": {**FP, "dtype": "torch.float16", "torch": "2"},
                 "demand": {}, "runs": 1}), "stale", "dtype, torch differ"),
])
def test_stale_or_corrupt_files_are_ignored_with_one_line(tmp_path, caplog, content, status,
                                                          why):
    store = sd.CapturePlanStore(tmp_path, "/m", FP)
    store.path.write_text(content)
    with caplog.at_level(logging.INFO, logger="graphserve.state"):
        plan = store.load()
    assert plan.status == status and plan.demand == {}
    line = _one_warning(caplog)
    assert why in line and str(store.path) in line
    assert why in plan.report()["reason"]


def test_missing_file_is_one_info_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="graphserve.state"):
        plan = sd.CapturePlanStore(tmp_path / "nowhere", "/m", FP).load()
    assert plan.status == "missing"
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.INFO


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    store = sd.CapturePlanStore(tmp_path, "/m", FP)
    store.save({1: 1.0}, 1, [])
    before = store.path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(sd.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.save({1: 2.0}, 2, [])
    assert store.path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [store.path.name]


# -- the keeper between policy and file -----------------------------------------------------------


def _keeper(tmp_path, policy, clock, period_s=60.0):
    store = sd.CapturePlanStore(tmp_path, "/m", FP)
    keeper = sd.PlanKeeper(store, policy, lambda: {"timings_s": {"weights_s": 1.0}},
                           clock=clock, period_s=period_s)
    keeper.start()
    return keeper


def test_demand_accumulates_over_restarts_with_decay(tmp_path):
    clock = Clock()
    run1 = _ready_policy(clock)
    keeper = _keeper(tmp_path, run1, clock)
    for n in [1] * 10 + [8] * 4:
        run1.select(n)
    assert keeper.close()
    run2 = _ready_policy(clock)
    keeper2 = _keeper(tmp_path, run2, clock)
    assert run2.snapshot()["saved_plan"]["demand"] == {"1": 10.0, "8": 4.0}
    for _ in range(2):
        run2.select(1)
    keeper2.close()
    data = json.loads(keeper2.store.path.read_text())
    assert data["demand"] == {"1": 7.0, "8": 2.0} and data["runs"] == 2
    assert [t["timings_s"] for t in data["startup_timings"]] == [{"weights_s": 1.0}] * 2
    assert _idle_captures(run2)[:2] == [1, 8]


def test_saves_only_when_idle_due_or_complete_and_something_changed(tmp_path):
    clock = Clock()
    policy = _ready_policy(clock)
    keeper = _keeper(tmp_path, policy, clock, period_s=60.0)
    assert keeper.maybe_save(idle=False) is False  # busy: never
    assert keeper.maybe_save(idle=True) is True  # first idle moment: this run's timings
    assert keeper.maybe_save(idle=True) is False  # nothing changed
    policy.select(3)
    clock.now += 10
    assert keeper.maybe_save(idle=True) is False  # changed, but not due
    _idle_captures(policy)
    assert keeper.maybe_save(idle=False) is False
    assert keeper.maybe_save(idle=True) is True  # the plan completed: save at once
    policy.select(3)
    clock.now += 61
    assert keeper.maybe_save(idle=True) is True
    assert keeper.flush(5)
    runs = json.loads(keeper.store.path.read_text())["startup_timings"]
    assert len(runs) == 1  # one run, saved three times: one entry
    assert keeper.close() is False  # nothing new since


def test_timings_keep_the_last_runs(tmp_path):
    clock = Clock()
    for _ in range(sd.MAX_RUNS + 3):
        _keeper(tmp_path, _ready_policy(clock), clock).close()
    data = json.loads(sd.CapturePlanStore(tmp_path, "/m", FP).path.read_text())
    assert len(data["startup_timings"]) == sd.MAX_RUNS
    assert data["runs"] == sd.MAX_RUNS + 3


def test_unwritable_directory_warns_once_and_serving_goes_on(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    clock = Clock()
    policy = _ready_policy(clock)
    keeper = sd.PlanKeeper(sd.CapturePlanStore(blocker / "sub", "/m", FP), policy, dict,
                           clock=clock)
    with caplog.at_level(logging.INFO, logger="graphserve.state"):
        keeper.start()
        assert keeper.maybe_save(idle=True) is True  # queued; it fails on the writer thread
        assert keeper.flush(5)
        policy.select(1)
        clock.now += 1000
        assert keeper.maybe_save(idle=True) is False and keeper.close() is False
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "ignoring the saved capture plan" in lines[0]  # the unreadable path, at start
    assert sum("cannot save the capture plan" in line for line in lines) == 1
    assert len(lines) == 2


def _runner(tmp_path, mode="lazy"):
    model = tmp_path / "model"
    if not model.exists():
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "llama"}')
    policy = _ready_policy(Clock(), mode)
    return SimpleNamespace(
        checkpoint=SimpleNamespace(path=model), max_num_seqs=32, policy=policy,
        model=SimpleNamespace(dtype="torch.bfloat16"), timings={"weights_s": 0.5},
        graphs=SimpleNamespace(device_info=lambda: {"name": "NVIDIA H200"}),
    )


def test_engine_glue_fingerprints_the_setup(tmp_path):
    runner = _runner(tmp_path)
    config = EngineConfig(state_dir=str(tmp_path / "state"))
    keeper = sd.open_plan_keeper(config, runner)
    fp = keeper.store.fingerprint
    assert fp["model"] == str((tmp_path / "model").resolve())
    assert fp["capture_sizes"] == SIZES and fp["max_num_seqs"] == 32
    assert fp["device"] == "NVIDIA H200" and fp["dtype"] == "torch.bfloat16"
    assert fp["config_sha256"] and fp["graph_capture"] == "lazy"
    assert fp["tensor_parallel_size"] == 1
    assert runner.policy.snapshot()["saved_plan"]["status"] == "missing"
    runner.policy.select(5)
    assert keeper.close()
    saved = json.loads(keeper.store.path.read_text())
    assert saved["demand"] == {"8": 1.0}
    assert saved["startup_timings"][0]["timings_s"] == {"weights_s": 0.5}
    # A changed config.json makes the plan stale.
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama", "x": 1}')
    runner2 = _runner(tmp_path)
    sd.open_plan_keeper(config, runner2)
    assert runner2.policy.snapshot()["saved_plan"]["status"] == "stale"


def test_no_keeper_without_a_state_dir_or_graphs(tmp_path):
    assert sd.open_plan_keeper(EngineConfig(state_dir=""), _runner(tmp_path)) is None
    off = EngineConfig(state_dir=str(tmp_path / "s"), graph_capture="off")
    assert sd.open_plan_keeper(off, _runner(tmp_path, mode="off")) is None
    assert not (tmp_path / "s").exists()


def test_flags():
    assert config_from_args(parse_args([])).engine.state_dir is None
    assert config_from_args(parse_args(["--state-dir", "/s"])).engine.state_dir == "/s"
    assert config_from_args(parse_args(["--no-state-dir"])).engine.state_dir == ""
    with pytest.raises(ConfigError, match="conflicts"):
        config_from_args(parse_args(["--no-state-dir", "--state-dir", "/s"]))


def test_the_deployment_keeps_the_state_on_a_persistent_writable_volume():
    docs = [d for d in yaml.safe_load_all((REPO / "docker/k8s/deployment.yaml").read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    state = args[args.index("--state-dir") + 1]
    mounts = [m for m in container["volumeMounts"] if state.startswith(m["mountPath"])]
    assert mounts and not mounts[-1].get("readOnly")
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[-1]["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]  # survives pod restarts, not emptyDir
    claims = [d for d in yaml.safe_load_all((REPO / "docker/k8s/pvc.yaml").read_text()) if d]
    assert claim in {c["metadata"]["name"] for c in claims}


def test_engine_loop_saves_after_idle_captures_and_at_shutdown(tmp_path):
    """The engine thread's hooks: a save once idle capture completes, and one at shutdown."""
    import queue
    import threading

    from server.block_manager import BlockManager
    from server.engine import EngineCore
    from server.scheduler import Admission, Scheduler

    policy = _ready_policy(Clock())
    captured = []

    def capture(size, mixed=False, background=False):
        policy.begin(size)
        policy.succeeded(size, 0.01, 1 << 20)
        captured.append(size)

    from server.mixed_graph_policy import MixedGraphPolicy

    mixed = MixedGraphPolicy([16], "lazy", disabled_reason="not under test", max_seqs=4)
    runner = SimpleNamespace(policy=policy, capture=capture, mixed_policy=mixed,
                             next_mixed_capture=lambda idle, speculative=False: None,
                             background=None,
                             poll_capture=lambda: False)  # fmt: skip
    scheduler = Scheduler(max_num_seqs=4, max_model_len=64, max_batched_tokens=64,
                          eos_ids=frozenset(), tokenizer=None, admission=Admission(4),
                          block_manager=BlockManager(64, 16))
    keeper = _keeper(tmp_path, policy, Clock())
    saves = []
    real_save = keeper._save
    keeper._save = lambda state: saves.append(policy.complete) or real_save(state)
    core = EngineCore(runner, scheduler, keeper)
    commands = queue.SimpleQueue()
    thread = threading.Thread(target=core.serve, args=(commands, lambda outs: None))
    thread.start()
    for _ in range(200):
        if saves:
            break
        threading.Event().wait(0.01)
    policy.select(2)  # demand recorded after the last save: the shutdown save carries it
    commands.put(("shutdown", None))
    thread.join(10)
    assert not thread.is_alive()
    assert captured == [24, 16, 8, 4, 2, 1]
    assert saves == [True, True]  # after the plan completed (idle), then at shutdown
    assert json.loads(keeper.store.path.read_text())["demand"] == {"2": 1.0}


class _SlowStore(sd.CapturePlanStore):
    """A store whose writes wait for `release`, like an fsync behind a busy disk."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.writing = threading.Event()
        self.runs_written: list[int] = []

    def save(self, demand, runs, startup_timings):
        self.writing.set()
        assert self.release.wait(10)
        super().save(demand, runs, startup_timings)
        self.runs_written.append(len(demand))


def test_a_slow_write_never_holds_the_engine_thread(tmp_path):
    """The save the first idle moment after ready makes returns at once even when the disk
    takes its time (the write and fsync run on the writer thread); a plan queued meanwhile
    replaces the waiting one, and close() waits for the last write."""
    clock = Clock()
    policy = _ready_policy(clock)
    store = _SlowStore(tmp_path, "/m", FP)
    keeper = sd.PlanKeeper(store, policy, lambda: {"timings_s": {}}, clock=clock, period_s=1.0)
    keeper.start()
    t0 = time.perf_counter()
    assert keeper.maybe_save(idle=True) is True
    assert time.perf_counter() - t0 < 0.5  # did not wait for the write
    assert store.writing.wait(5) and not keeper.flush(0.05)  # still writing
    for size in (1, 8):  # two more saves queue while the first write waits: the last wins
        policy.select(size)
        clock.now += 2
        assert keeper.maybe_save(idle=True) is True
    store.release.set()
    assert keeper.close() is False  # nothing new since the last save; all written
    assert store.runs_written == [0, 2]  # the first plan, then only the newest of the other two
    assert json.loads(store.path.read_text())["demand"] == {"1": 1.0, "8": 1.0}
    deadline = time.monotonic() + 5
    while keeper._writer._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert keeper._writer._thread is None  # the writer thread ended with close()
