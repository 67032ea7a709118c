"""Lifecycle phases, liveness/readiness answers, /health/graphs, the metrics collector, and the
torch-free import chain of the HTTP layer."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.health import Lifecycle, graphs_body, jsonable, process_uptime
from server.metrics import ServerMetrics
from tests.helpers.app import assert_error, serve_app, wait_for_phase, wait_until

ENGINE_ORDER = ["loading_weights", "allocating_kv_cache", "capturing_graphs", "ready"]


# ------------------------------------------------------------------ Lifecycle unit tests
def test_lifecycle_records_transitions_and_answers():
    lc = Lifecycle()
    assert lc.phase == "starting"
    status, body = lc.readiness()
    assert status == 503 and body["phase"] == "starting" and body["ready"] is False
    assert lc.liveness()[0] == 200
    for phase in ENGINE_ORDER:
        assert lc.set_phase(phase, "size 8" if phase == "capturing_graphs" else None)
    status, body = lc.readiness()
    assert status == 200 and body["ready"] is True
    assert [p["phase"] for p in body["phases"]] == ["starting", *ENGINE_ORDER]
    times = [p["at_s"] for p in body["phases"]]
    assert times == sorted(times)


def test_same_phase_updates_detail_without_a_new_transition():
    lc = Lifecycle()
    lc.set_phase("capturing_graphs", "size 64")
    lc.set_phase("capturing_graphs", "size 32")
    assert lc.detail == "size 32"
    assert [r.phase for r in lc.history()] == ["starting", "capturing_graphs"]
    assert lc.readiness()[1]["detail"] == "size 32"


def test_failed_is_sticky_and_turns_liveness_503():
    lc = Lifecycle()
    lc.set_phase("loading_weights")
    assert lc.fail("no such directory: /nope")
    assert not lc.set_phase("ready")
    assert not lc.fail("second reason")
    status, body = lc.liveness()
    assert status == 503 and body["status"] == "failed"
    assert body["reason"] == "no such directory: /nope"
    status, body = lc.readiness()
    assert status == 503 and body["phase"] == "failed" and body["reason"].startswith("no such")


def test_draining_is_sticky_except_for_failure():
    lc = Lifecycle()
    lc.set_phase("capturing_graphs")
    lc.set_phase("draining")
    assert not lc.set_phase("ready")  # a late 'ready' from the engine thread must not reopen
    assert lc.phase == "draining" and lc.liveness()[0] == 200
    assert lc.set_phase("failed", "engine died while draining")
    assert lc.phase == "failed"


def test_unknown_phase_is_ignored():
    lc = Lifecycle()
    assert not lc.set_phase("warming_up")
    assert lc.phase == "starting"


async def test_listeners_run_on_the_loop_even_when_the_phase_comes_from_another_thread():
    lc = Lifecycle()
    loop = asyncio.get_running_loop()
    lc.bind_loop(loop)
    seen: list[tuple[str, str | None, bool]] = []
    main = threading.get_ident()
    lc.add_listener(lambda p, d: seen.append((p, d, threading.get_ident() == main)))
    t = threading.Thread(target=lambda: lc.set_phase("failed", "boom"))
    t.start()
    t.join()
    await wait_until(lambda: seen)
    assert seen == [("failed", "boom", True)]


def test_process_uptime_is_plausible():
    up = process_uptime()
    if up is None:
        pytest.skip("no /proc on this platform")
    assert 0 < up < 24 * 3600


def test_jsonable_makes_reports_strict_json():
    value = {"a": float("nan"), "b": (1, float("inf")), 3: {"c": object.__name__}, "d": {1, 2}}
    out = jsonable(value)
    json.dumps(out, allow_nan=False)
    assert out["a"] is None and out["b"] == [1, None] and out["3"] == {"c": "object"}


# ------------------------------------------------------------------ /health/graphs
class _ReportEngine:
    def __init__(self, report=None, exc=None, stats=None):
        self._report, self._exc, self._stats = report, exc, stats

    def graph_report(self):
        if self._exc:
            raise self._exc
        return self._report

    def stats(self):
        if self._exc:
            raise self._exc
        return self._stats


def test_graphs_body_before_the_engine_exists_is_valid():
    body = graphs_body(Lifecycle(), None)
    assert body == {"phase": "starting", "available": False,
                    "message": "the engine has not been created yet"}


def test_graphs_body_survives_a_broken_report():
    lc = Lifecycle()
    body = graphs_body(lc, _ReportEngine(exc=RuntimeError("not loaded")))
    assert body["available"] is False and "not loaded" in body["message"]
    body = graphs_body(lc, _ReportEngine(report=["not", "a", "dict"]))
    assert body["available"] is False
    body = graphs_body(lc, _ReportEngine(report={"mode": "lazy", "hit": float("nan"),
                                                 "phase": "engine-phase"}))
    assert body["available"] is True and body["hit"] is None and body["mode"] == "lazy"
    assert body["phase"] == "starting"  # the server's phase (it knows about draining) wins


# ------------------------------------------------------------------ metrics collector
def _scrape(metrics: ServerMetrics) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        out[fam.name] = fam.samples
    return out


def test_collector_without_engine_exports_readiness_only():
    fams = _scrape(ServerMetrics(Lifecycle(), lambda: None))
    assert fams["graphserve_ready"][0].value == 0
    assert "graphserve_requests_running" not in fams
    phase = {s.labels["phase"]: s.value for s in fams["graphserve_phase"]}
    assert phase["starting"] == 1 and sum(phase.values()) == 1


@pytest.mark.parametrize("engine", [
    _ReportEngine(exc=RuntimeError("boom")),
    _ReportEngine(report=None, stats=None),
    _ReportEngine(report={"coverage": "x", "traffic": None, "sizes": [1, {"size": "a"}],
                          "pool_bytes_total": "big"}, stats={"running": "3"}),
    _ReportEngine(report={"sizes": [{"size": True, "state": "captured"}]}, stats={}),
])
def test_collector_omits_what_the_engine_does_not_report(engine):
    fams = _scrape(ServerMetrics(Lifecycle(), lambda: engine))
    assert "graphserve_ready" in fams
    for name in ("graphserve_requests_running", "graphserve_graph_coverage_ratio",
                 "graphserve_graph_pool_bytes", "graphserve_decode_steps",
                 "graphserve_graph_capture_seconds"):
        assert name not in fams


def test_collector_reads_the_documented_report_keys():
    report = {
        "mode": "lazy", "complete": False, "pending_demand": 3, "pool_bytes_total": 4096,
        "coverage": {"captured": 2, "total": 4, "ratio": 0.5},
        "traffic": {"exact_steps": 10, "padded_steps": 5, "eager_steps": 1, "hit_rate": 0.6},
        "sizes": [
            {"size": 64, "state": "captured", "capture_ms": 120.0, "replays": 7,
             "padded_tokens_wasted": 30},
            {"size": 32, "state": "captured", "capture_ms": 80.0, "replays": 0,
             "padded_tokens_wasted": 0},
            {"size": 16, "state": "failed", "capture_ms": None, "error": "oom"},
            {"size": 8, "state": "pending"},
        ],
        "mixed": {"traffic": {"graph_steps": 12, "eager_steps": 3,
                              "eager_by_reason": {"not_captured": 3}}},
    }
    lc = Lifecycle()
    lc.set_phase("ready")
    fams = _scrape(ServerMetrics(lc, lambda: _ReportEngine(report, stats={"running": 2,
                                                                          "waiting": 5})))

    samples = [s for fam in fams.values() for s in fam]

    def value(name, **labels):
        (s,) = [s for s in samples if s.name == name and s.labels == labels]
        return s.value

    assert value("graphserve_ready") == 1
    assert value("graphserve_requests_running") == 2
    assert value("graphserve_requests_waiting") == 5
    assert value("graphserve_graph_coverage_ratio") == 0.5
    assert value("graphserve_graph_pool_bytes") == 4096
    assert value("graphserve_graph_capture_complete") == 0
    assert value("graphserve_graph_pending_demand") == 3
    assert value("graphserve_decode_steps_total", kind="exact") == 10
    assert value("graphserve_decode_steps_total", kind="padded") == 5
    assert value("graphserve_decode_steps_total", kind="eager") == 1
    assert value("graphserve_graph_captures_total", result="captured") == 2
    assert value("graphserve_graph_captures_total", result="failed") == 1
    assert value("graphserve_graph_capture_seconds", size="64") == pytest.approx(0.12)
    assert {s.labels["size"] for s in fams["graphserve_graph_capture_seconds"]} == {"64", "32"}
    assert value("graphserve_graph_replays_total", size="64") == 7
    assert value("graphserve_graph_padded_tokens_wasted_total", size="64") == 30
    assert value("graphserve_mixed_steps_total", dispatch="graph") == 12
    assert value("graphserve_mixed_steps_total", dispatch="eager") == 3


def test_pending_demand_may_be_a_per_size_list():
    report = {"pending_demand": [{"size": 4, "demand": 3}, {"size": 2, "demand": 2}, "junk"]}
    fams = _scrape(ServerMetrics(Lifecycle(), lambda: _ReportEngine(report, stats={})))
    assert fams["graphserve_graph_pending_demand"][0].value == 5


def test_latency_histograms_cover_1ms_to_10s():
    fams = _scrape(ServerMetrics(Lifecycle(), lambda: None))
    for name in ("graphserve_time_to_first_token_seconds",
                 "graphserve_inter_token_latency_seconds"):
        bounds = [float(s.labels["le"]) for s in fams[name] if s.name.endswith("_bucket")]
        assert bounds[0] == 0.001 and 10.0 in bounds and bounds[-1] == float("inf")


# ------------------------------------------------------------------ the app's readiness
async def test_readiness_walks_through_the_startup_phases():
    async with serve_app(wait_ready=False, gated=True) as h:
        c = h.client
        r = await c.get("/health/ready")
        assert r.status_code == 503 and r.json()["phase"] in ("starting", "loading_weights")
        graphs = (await c.get("/health/graphs")).json()
        assert graphs["phase"] in ("starting", "loading_weights")
        for phase in ENGINE_ORDER[:-1]:
            body = await wait_for_phase(c, phase)
            assert body["ready"] is False
            assert (await c.get("/health/ready")).status_code == 503
            assert (await c.get("/health")).status_code == 200
            assert_error(await c.get("/v1/models"), 503)
            h.engine.release_phase()
        body = await wait_for_phase(c, "ready")
        assert [p["phase"] for p in body["phases"]] == ["starting", *ENGINE_ORDER]
        assert (await c.get("/health/ready")).status_code == 200
        graphs = (await c.get("/health/graphs")).json()
        assert graphs["available"] and graphs["phase"] == "ready"
        assert {"mode", "sizes", "coverage", "traffic", "pool_bytes_total", "memory",
                "device"} <= set(graphs)
        metrics = (await c.get("/metrics")).text
        assert "graphserve_ready 1.0" in metrics


@pytest.mark.parametrize("fail_in", ["loading_weights", "capturing_graphs"])
async def test_startup_failure_reports_the_reason_then_asks_to_exit(fail_in):
    async with serve_app(wait_ready=False, fail_in=fail_in, fail_reason="CUDA out of memory",
                         startup_failure_grace=0.2) as h:
        body = await wait_for_phase(h.client, "failed")
        assert "CUDA out of memory" in body["reason"] and fail_in in body["reason"]
        live = await h.client.get("/health")
        assert live.status_code == 503 and live.json()["status"] == "failed"
        err = assert_error(await h.client.get("/v1/models"), 503)
        assert "CUDA out of memory" in err["message"] and err["code"] == "failed"
        assert h.exits == []  # the reason stays readable for the grace period
        await wait_until(lambda: h.exits, timeout=3)
        assert h.exits == [1]


async def test_engine_that_cannot_be_imported_fails_startup():
    from server.api import create_app
    from server.config import ServerConfig

    exits: list[int] = []
    app = create_app(ServerConfig(startup_failure_grace=0.05),
                     engine_class="server.no_such_module:Engine", on_exit=exits.append)
    import httpx

    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            body = await wait_for_phase(c, "failed")
            assert "no_such_module" in body["reason"]
            await wait_until(lambda: exits)
    assert exits == [1]


async def test_shutdown_stops_the_engine():
    async with serve_app() as h:
        engine = h.engine
    assert engine.shut_down


# ------------------------------------------------------------------ import chain
def test_http_layer_imports_no_torch_transformers_or_numpy():
    code = (
        "import sys, server.cli, server.api, server.health, server.metrics, server.__main__; "
        "from server.api import create_app; create_app(); "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'numpy', 'server.engine') or m == 'server.engine'); "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout.strip()}"
