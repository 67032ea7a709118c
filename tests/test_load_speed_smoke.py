"""bench/load_speed.py end to end on the CPU with a tiny checkpoint: sections run, JSON adds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.tiny_models import build_checkpoint

REPO = Path(__file__).resolve().parent.parent


def test_load_speed_smoke(tmp_path):
    ckpt = build_checkpoint(tmp_path / "tiny", "llama", seed=1)
    out = tmp_path / "load.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.load_speed", "--ckpt", str(ckpt),
         "--device", "cpu", "--out", str(out), "--grid", "2x1,1x1", "--sections",
         "overlap,loads,memory", "--cold", "--cold-read", "--cold-repeats", "1",
         "--time-budget-s", "240"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["checkpoint"]["bytes"] > 0
    sources = [(x["source"], x["threads"], x["model"]) for x in data["loads"]]
    assert sources == [("safetensors", None, True)] + [("pipeline", 2, True)] * 2 + [
        ("pipeline", 1, True)] * 2 + [("pipeline", 2, False)]
    weight_bytes = {x["weight_bytes"] for x in data["loads"] if x["model"]}
    assert len(weight_bytes) == 1  # every source built the same model
    assert all(x["GBps"] > 0 for x in data["loads"])
    assert data["from_memory"]["weight_bytes"] in weight_bytes
    assert [o["mode"] for o in data["import_overlap"]] == ["plain", "warmer", "anon", "plain"]
    assert all(o.get("import_torch_s", 0) > 0 for o in data["import_overlap"])
    assert data["limits"] is None  # not asked for
    assert len(data["load_checkpoint"]) == 2
    if "cold:plain" not in data["skipped"]:  # eviction works on this filesystem
        assert all(c.get("read_s", 0) > 0 for c in data["cold"])
    assert "loads (GB/s" in r.stdout
