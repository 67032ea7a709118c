"""The `graphserve` command line: flag mapping, errors, help, logging, and process behaviour
(liveness timing, SIGTERM drain, startup failure) with the fake engine, so no torch is loaded."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server.cli import config_from_args, main, parse_args
from server.config import ServerConfig
from server.launch import serve
from server.logging_setup import JsonFormatter, setup_logging
from tests.helpers import REPO
from tests.helpers.fake_engine import FAKE_ENGINE
from tests.helpers.server_process import ServerProcess, sse_events


def config(*argv: str) -> ServerConfig:
    return config_from_args(parse_args(["serve", *argv]))


# ------------------------------------------------------------------ flags -> config
def test_defaults_match_the_config_dataclasses():
    assert config() == ServerConfig()
    assert parse_args([]).command == "serve"  # plain `graphserve` is `graphserve serve`
    assert config_from_args(parse_args(["--port", "9"])).port == 9


def test_every_flag_maps_onto_the_config():
    cfg = config(
        "--model", "/models/x", "--served-model-name", "x", "--host", "0.0.0.0",
        "--port", "8123", "--dtype", "float16", "--device", "cpu", "--max-model-len", "512",
        "--max-num-seqs", "16", "--max-queue", "3", "--max-num-batched-tokens", "128",
        "--gpu-memory-utilization", "0.5", "--graph-capture", "eager",
        "--cuda-graph-sizes", "1,2", "4", "--capture-budget-ms", "20",
        "--capture-min-interval-ms", "100", "--idle-debounce-ms", "7", "--api-key", "k",
        "--drain-timeout", "12", "--startup-failure-grace", "1.5", "--log-format", "json",
        "--log-level", "debug", "--seed", "42", "--loader", "transformers", "--no-mixed-graphs",
        "--decode-prefill-tokens", "64", "--decode-prefill-depth", "0", "--no-early-weights",
    )
    e = cfg.engine
    assert (e.model, e.served_model_name, e.dtype, e.device) == ("/models/x", "x", "float16", "cpu")
    assert (e.max_model_len, e.max_num_seqs, e.max_queue, e.max_num_batched_tokens) == (
        512, 16, 3, 128)
    assert e.gpu_memory_utilization == 0.5 and e.graph_capture == "eager"
    assert e.mixed_graphs is False and config().engine.mixed_graphs is True
    assert (e.decode_prefill_tokens, e.decode_prefill_depth) == (64, 0)
    assert config().engine.decode_prefill_depth is None  # from the model's shape
    assert e.cuda_graph_sizes == [1, 2, 4]
    assert (e.capture_budget_ms, e.capture_min_interval_ms, e.idle_debounce_ms) == (20, 100, 7)
    assert e.seed == 42 and e.loader == "transformers"
    assert e.early_weights is False and config().engine.early_weights is True
    assert (cfg.host, cfg.port, cfg.api_key, cfg.drain_timeout) == ("0.0.0.0", 8123, "k", 12)
    assert cfg.startup_failure_grace == 1.5
    assert (cfg.log_format, cfg.log_level) == ("json", "debug")


@pytest.mark.parametrize("argv,sizes", [
    (["1,2,4"], [1, 2, 4]), (["1", "2", "4"], [1, 2, 4]), (["1, 2,4 8"], [1, 2, 4, 8]),
])
def test_cuda_graph_sizes_accept_commas_and_spaces(argv, sizes):
    assert config("--cuda-graph-sizes", *argv).engine.cuda_graph_sizes == sizes


def test_enforce_eager_means_graph_capture_off():
    assert config("--enforce-eager").engine.graph_capture == "off"
    assert config("--enforce-eager", "--graph-capture", "off").engine.graph_capture == "off"


def test_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("GRAPHSERVE_API_KEY", "from-env")
    assert config().api_key == "from-env"
    assert config("--api-key", "flag").api_key == "flag"


@pytest.mark.parametrize("argv,fragment", [
    (["--max-num-seqs", "0"], "--max-num-seqs must be >= 1"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["--port", "70000"], "--port"),
    (["--drain-timeout", "-1"], "--drain-timeout"),
    (["--enforce-eager", "--graph-capture", "lazy"], "conflicts"),
    (["--cuda-graph-sizes", "1,x"], "--cuda-graph-sizes"),
    (["--cuda-graph-sizes", "0"], "--cuda-graph-sizes"),
    (["--startup-failure-grace", "-2"], "--startup-failure-grace"),
    (["--decode-prefill-depth", "-1"], "--decode-prefill-depth must be >= 0"),
])
def test_invalid_values_exit_2_with_a_clear_message(argv, fragment, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("graphserve: error:") and fragment in err


@pytest.mark.parametrize("argv", [["--dtype", "int4"], ["--graph-capture", "sometimes"],
                                  ["--loader", "slow"],
                                  ["--max-queue", "many"], ["--no-such-flag"]])
def test_argparse_rejections_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", *argv])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_help_is_grouped_and_hides_the_test_seam():
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    for group in ("model:", "scheduling:", "CUDA graphs:", "server:"):
        assert group in out
    for flag in ("--model", "--served-model-name", "--host", "--port", "--dtype", "--device",
                 "--max-model-len", "--max-num-seqs", "--max-queue", "--max-num-batched-tokens",
                 "--gpu-memory-utilization", "--graph-capture", "--enforce-eager",
                 "--cuda-graph-sizes", "--capture-budget-ms", "--idle-debounce-ms", "--api-key",
                 "--drain-timeout", "--log-format", "--log-level", "--seed"):
        assert flag in out, flag
    assert "--engine-class" not in out
    top = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "serve" in top


# ------------------------------------------------------------------ logging
@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_json_logs_are_one_object_per_line_and_cover_uvicorn(restore_logging, capsys):
    setup_logging("json", "info")
    logging.getLogger("graphserve.test").info("hello %s", "world")
    logging.getLogger("uvicorn.error").warning("from uvicorn")
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("graphserve.test").exception("failed")
    lines = capsys.readouterr().err.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert records[0]["message"] == "hello world" and records[0]["level"] == "info"
    assert records[0]["logger"] == "graphserve.test" and records[0]["time"].endswith("Z")
    assert records[1]["logger"] == "uvicorn.error"
    assert "ValueError: bad" in records[2]["exception"]


def test_json_formatter_keeps_non_ascii():
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "héllo", None, None)
    assert json.loads(JsonFormatter().format(rec))["message"] == "héllo"


def test_text_log_level_filters(restore_logging, capsys):
    setup_logging("text", "warning")
    logging.getLogger("graphserve.test").info("quiet")
    logging.getLogger("graphserve.test").warning("loud")
    err = capsys.readouterr().err
    assert "quiet" not in err and "WARNING graphserve.test: loud" in err


def test_a_port_in_use_exits_1_without_serving(caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level(logging.ERROR):
            code = serve(ServerConfig(port=port), engine_class=FAKE_ENGINE)
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text


# ------------------------------------------------------------------ the process (fake engine)
def test_liveness_answers_fast_and_exit_on_sigint_is_clean():
    with ServerProcess("--engine-class", FAKE_ENGINE) as srv:
        took = srv.wait_live()
        print(f"exec -> first /health 200: {took:.3f}s (fake engine)")
        assert took < 3.0, srv.log
        srv.wait_phase("ready")
        assert srv.client.get("/v1/models").status_code == 200
        srv.signal(signal.SIGINT)
        assert srv.wait_exit() == 0
        assert "exiting with code 0" in srv.log


def test_sigterm_drains_in_flight_streams_then_exits_0():
    env = {"FAKE_ENGINE_TOKEN_DELAY": "0.02"}
    with ServerProcess("--engine-class", FAKE_ENGINE, "--drain-timeout", "20",
                       "--log-format", "json", env=env) as srv:
        srv.wait_phase("ready")
        events: list = []
        started = threading.Event()

        def stream() -> None:
            body = {"prompt": "x", "max_tokens": 60, "stream": True}
            with httpx.stream("POST", srv.base_url + "/v1/completions", json=body,
                              timeout=30) as resp:
                lines = resp.iter_lines()
                for line in lines:
                    if line.startswith("data: "):
                        started.set()
                        events.extend(sse_events([line]))
                        break
                events.extend(sse_events(lines))

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(10)
        srv.signal(signal.SIGTERM)
        time.sleep(0.2)
        ready = srv.client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["phase"] == "draining"
        resp = srv.client.post("/v1/completions", json={"prompt": "x"})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "draining"
        t.join(30)
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert "".join(e["choices"][0]["text"] for e in events[:-1]).startswith("The quick")
        assert srv.wait_exit() == 0
        for line in srv.log.splitlines():
            json.loads(line)  # --log-format json: every line, uvicorn's included


def test_sigterm_past_the_drain_timeout_aborts_and_still_exits_0():
    env = {"FAKE_ENGINE_TOKEN_DELAY": "0.05"}
    with ServerProcess("--engine-class", FAKE_ENGINE, "--drain-timeout", "0.3",
                       env=env) as srv:
        srv.wait_phase("ready")
        result: dict = {}

        def request() -> None:
            result["resp"] = httpx.post(srv.base_url + "/v1/completions",
                                        json={"prompt": "x", "max_tokens": 200}, timeout=30)

        t = threading.Thread(target=request)
        t.start()
        deadline = time.monotonic() + 10
        while "graphserve_requests_running 1.0" not in srv.client.get("/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        srv.signal(signal.SIGTERM)
        t.join(30)
        assert result["resp"].status_code == 503
        assert srv.wait_exit() == 0
        assert "drain timeout" in srv.log


def test_startup_failure_is_readable_then_exits_1():
    with ServerProcess("--engine-class", FAKE_ENGINE, "--model", "/no/such/model",
                       "--startup-failure-grace", "1.0") as srv:
        body = srv.wait_phase("failed", timeout=10)
        assert "model directory not found: /no/such/model" in body["reason"]
        assert srv.client.get("/health").status_code == 503
        assert srv.wait_exit(timeout=15) == 1
        assert "/no/such/model" in srv.log  # the reason is logged for humans too


def test_precompile_kernels_help_names_every_preset(capsys):
    from server.kernel_precompile import PRESETS

    with pytest.raises(SystemExit):
        main(["precompile-kernels", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in PRESETS)


def test_precompile_kernels_refuses_unknown_presets_and_no_shape(capsys, tmp_path):
    assert main(["precompile-kernels", "--out", str(tmp_path), "--preset", "gpt-5"]) == 2
    assert "unknown preset 'gpt-5'" in capsys.readouterr().err
    assert main(["precompile-kernels", "--out", str(tmp_path)]) == 2
    assert "at least one --preset or --model" in capsys.readouterr().err
