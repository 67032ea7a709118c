"""The GPU benchmark scripts run end to end on CPU in `--smoke` mode and write sane JSON.

The three scripts start together (they are mostly waiting on server start-up and torch imports),
then each test checks one script's exit code, its final table and its JSON: the shapes the lead
reads after a GPU run, and numbers that must hold on any machine (token counts, orderings).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("cold_start", "serve", "peers")
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Run every script's smoke mode concurrently; {name: (returncode, output, json)}."""
    out_dir = tmp_path_factory.mktemp("bench-smoke")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    procs = {}
    for name in SCRIPTS:
        log = open(out_dir / f"{name}.txt", "wb")  # noqa: SIM115 - closed below
        cmd = [
            sys.executable,
            str(ROOT / "bench" / f"{name}.py"),
            "--smoke",
            "--out",
            str(out_dir / f"{name}.json"),
        ]
        if name != "peers":
            cmd += ["--log-dir", str(out_dir / "logs")]
        procs[name] = (
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
            log,
        )
    deadline = time.monotonic() + TIMEOUT_S
    results = {}
    for name, (proc, log) in procs.items():
        try:
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        text = (out_dir / f"{name}.txt").read_text(errors="replace")
        path = out_dir / f"{name}.json"
        data = json.loads(path.read_text()) if path.exists() else None
        results[name] = (proc.returncode, text, data)
    return results


def _get(smoke_runs, name):
    code, text, data = smoke_runs[name]
    assert code == 0, f"{name} exited {code}:\n{text[-3000:]}"
    assert data is not None, f"{name} wrote no JSON:\n{text[-3000:]}"
    assert data["script"] == name and data["smoke"] is True
    return text, data


def _check_targets(targets, expected: int):
    assert len(targets) == expected
    for t in targets:
        assert set(t) >= {"target", "value", "limit", "passed", "op"}
        assert t["passed"] in (True, False, None)
        if t["value"] is not None and t["limit"] is not None:
            want = t["value"] <= t["limit"] if t["op"] == "<=" else t["value"] >= t["limit"]
            assert t["passed"] is want


def _check_verdict_lines(text: str, expected: int):
    """The lead sees only the tail of the output: the verdicts must be printed there."""
    tail = text.splitlines()[-(expected + 2) :]
    verdicts = [line for line in tail if line.startswith(("PASS", "FAIL", "N/A"))]
    assert len(verdicts) == expected, tail


def test_cold_start_smoke(smoke_runs):
    text, data = _get(smoke_runs, "cold_start")
    assert data["warmup"] is None and data["truncated"] is False
    variant = data["variants"]["default"]
    assert "--max-model-len" in variant["server_args"]
    for mode in ("lazy", "eager", "off"):
        (run,) = variant["runs"][mode]
        assert run["error"] is None, run.get("log_tail")
        assert 0 < run["health_s"] <= run["ready_s"]
        assert run["stopped_by"] == "sigterm" and run["returncode"] == 0
        # No CUDA here: every policy runs eagerly, so coverage never completes.
        assert run["effective_mode"] == "off" and run["coverage_complete_s"] is None
        assert run["observed_phases"]["ready"] == pytest.approx(run["ready_s"], abs=1e-3)
        phases = [p["phase"] for p in run["server_phases"]]
        assert phases[0] == "starting" and phases[-1] == "ready"
        times = [p["since_exec_s"] for p in run["server_phases"]]
        assert times == sorted(times) and times[-1] <= run["ready_s"] + 0.5
        assert run["weights_s"] > 0 and run["load_total_s"] >= run["weights_s"]
        summary = variant["summary"][mode]
        assert summary["ready_s"]["values"] == [run["ready_s"]]
    _check_targets(data["targets"], 3)
    assert data["targets"][2]["passed"] is None  # lazy coverage: n/a without CUDA
    assert "policy" in text
    _check_verdict_lines(text, 3)


def test_serve_smoke(smoke_runs):
    text, data = _get(smoke_runs, "serve")
    fixed = data["parts"]["fixed"]
    assert [lvl["concurrency"] for lvl in fixed["levels"]] == [1, 2, 8]
    for lvl in fixed["levels"]:
        assert lvl["errors"] == 0, lvl["first_errors"]
        # ignore_eos: every request produces exactly output_len tokens.
        assert lvl["output_tokens"] == lvl["requests"] * fixed["output_len"]
        assert lvl["output_tok_s"] > 0 and lvl["ttft_ms"]["n"] == lvl["requests"]
        assert lvl["itl_ms"]["p50"] <= lvl["itl_ms"]["p99"]
        assert 0 < lvl["token_visibility"] <= 1
        steps = lvl["traffic"]
        assert steps["eager_steps"] > 0 and steps["exact_steps"] == 0  # CPU: no graphs
    sg = data["parts"]["sharegpt"]
    assert sg["errors"] == 0 and sg["requests"] == sg["mix"]["requests"] > 0
    assert len(sg["per_request"]["rows"]) == sg["requests"]
    ws = data["parts"]["warmstart"]
    assert ws["ready_after_exec_s"] > 0 and ws["warm"]["errors"] == 0
    assert ws["steady"]["requests"] == ws["mix"]["requests"]
    assert ws["timeline"]["rows"] and len(ws["timeline"]["rows"][0]) == 7
    assert ws["coverage_complete_after_ready_s"] is None  # graph capture off on CPU
    assert data["graph_modes"] == ["off"]
    _check_targets(data["targets"], 4)
    names = [t["target"] for t in data["targets"]]
    assert any("concurrency 8" in n for n in names)
    assert "conc" in text and "open loop" in text
    _check_verdict_lines(text, 4)


def test_peers_smoke(smoke_runs):
    text, data = _get(smoke_runs, "peers")
    steps = data["steps"]
    assert list(steps) == ["ours", "hf_eager", "hf_continuous_batching", "hf_static_compile"]
    ours = steps["ours"]
    assert "error" not in ours, ours.get("traceback")
    assert all(r["tokens"] == data["args"]["new_tokens"] for r in ours["b1_runs"])
    assert ours["b1_ms_per_token"] > 0
    assert ours["batch_rounds"][-1]["tokens"] == data["args"]["batch"] * data["args"]["new_tokens"]
    eager = steps["hf_eager"]
    assert "error" not in eager, eager.get("traceback")
    assert all(r["new_tokens"] == data["args"]["new_tokens"] for r in eager["b1_runs"])
    for name in ("hf_continuous_batching", "hf_static_compile"):
        rec = steps[name]
        # Guarded peers: either a measurement or a recorded error, never both or neither.
        measured = rec.get("b1_ms_per_token") is not None or rec.get("batch_tok_s") is not None
        assert measured != ("error" in rec), rec
    assert steps["hf_static_compile"].get("compiled") in (False, None)  # no auto-compile on CPU
    ratios = data["ratios"]["hf_eager"]
    assert ratios["b1_speedup"] == pytest.approx(eager["b1_ms_per_token"] / ours["b1_ms_per_token"])
    assert "ours b1 x" in text
