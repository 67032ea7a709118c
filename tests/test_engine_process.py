"""The engine in a process of its own (`server.engine_process`, `server.engine_host`).

Real servers on the embedded default model (CPU): the same answers as with the engine in the
HTTP process, the engine process under the server, a dead engine process failing its requests
and the server (exit 1), and an engine process that ends with a killed server.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import pytest

from server.config import EngineConfig
from server.engine_ipc import Channel, ChannelClosed, Kind
from server.request import RequestOutput, SamplingParams
from tests.helpers.api_cases import COMPL
from tests.helpers.server_process import ServerProcess, alive, descendants, sse_events

pytestmark = pytest.mark.slow

ENGINE = b"server.engine_host"
PROMPTS = ["The capital of", "1, 2, 3,", "Once upon a time"]


def _engine_pid(srv: ServerProcess) -> int:
    found = descendants(srv.proc.pid, ENGINE)
    assert len(found) == 1, (found, srv.log)
    assert re.search(rf"engine process started \(pid {found[0]}\)", srv.log), srv.log
    return found[0]


def _maps_torch(pid: int) -> bool:
    """Whether torch's library is loaded in process `pid`."""
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


def _answers(srv: ServerProcess) -> list:
    out = []
    for prompt in PROMPTS:
        greedy = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
        out.append(srv.client.post(COMPL, json=greedy).json()["choices"][0]["text"])
        seeded = {"prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 2,
                  "logprobs": 2}
        body = srv.client.post(COMPL, json=seeded).json()
        out.append([(c["text"], c["logprobs"]["tokens"]) for c in body["choices"]])
    return out


def test_the_engine_process_answers_as_the_in_process_engine_does():
    # Eager capture: on a GPU, two lazy servers may run a step on its own size's graph in one
    # and padded onto a larger one in the other, while the capture thread catches up; another
    # GEMM shape can round a near-tie of the tiny model's logits the other way. On a CPU it
    # changes nothing (no graphs).
    args = ("--max-num-seqs", "4", "--max-model-len", "512", "--graph-capture", "eager")
    with ServerProcess(*args) as split, ServerProcess(*args, "--no-engine-process") as single:
        split.wait_phase("ready")
        single.wait_phase("ready")
        engine_pid = _engine_pid(split)
        assert descendants(single.proc.pid, ENGINE) == []
        assert _answers(split) == _answers(single)
        # Both processes pause collection until ready, and both resume it.
        assert split.log.count("collection on again") == 2, split.log
        # Nothing that crossed (outputs with logprobs, reports) made the HTTP process load torch.
        assert not _maps_torch(split.proc.pid) and _maps_torch(engine_pid)
        assert _maps_torch(single.proc.pid)
        graphs = split.client.get("/health/graphs").json()
        assert graphs["available"] and graphs["phase"] == "ready", graphs
        metrics = split.client.get("/metrics").text
        assert re.search(r"^graphserve_requests_waiting 0", metrics, re.M), metrics
        assert not _maps_torch(split.proc.pid)
        split.signal(signal.SIGTERM)
        assert split.wait_exit(30) == 0, split.log
        deadline = time.monotonic() + 10
        while alive(engine_pid):
            assert time.monotonic() < deadline, "the engine process outlived a drained server"
            time.sleep(0.05)


def test_a_dead_engine_process_fails_its_streams_and_the_server_exits_1():
    with ServerProcess("--max-num-seqs", "2", "--max-model-len", "512",
                       "--startup-failure-grace", "1") as srv:
        srv.wait_phase("ready")
        engine_pid = _engine_pid(srv)
        events: list = []
        started = threading.Event()

        def stream() -> None:
            body = {"prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", srv.base_url + COMPL, json=body, timeout=60) as resp:
                for line in resp.iter_lines():
                    events.extend(sse_events([line]))
                    started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30), srv.log
        os.kill(engine_pid, signal.SIGKILL)
        reader.join(30)
        assert not reader.is_alive()
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert errors and "engine process exited" in errors[-1]["error"]["message"], events
        body = srv.wait_phase("failed", timeout=10)
        assert "engine process exited" in body["reason"], body
        assert srv.wait_exit(30) == 1, srv.log


def test_the_engine_process_goes_with_the_server_even_when_it_is_killed():
    with ServerProcess("--max-num-seqs", "2", "--max-model-len", "256") as srv:
        srv.wait_phase("ready")
        engine_pid = _engine_pid(srv)
        assert srv.client.post(COMPL, json={"prompt": "x", "max_tokens": 4}).status_code == 200
        srv.proc.kill()  # no drain, no SHUTDOWN: only the socket's end of file is left
        srv.proc.wait(10)
        deadline = time.monotonic() + 15
        while alive(engine_pid):
            assert time.monotonic() < deadline, "the engine process outlived its server"
            time.sleep(0.05)


# ------------------------------------------------------------------ the channel itself
def test_channel_frames_survive_many_senders_and_report_the_end():
    import socket

    a, b = socket.socketpair()
    left, right = Channel(a), Channel(b)
    params = SamplingParams(max_tokens=3, stop=["x"], logit_bias={5: 1.0})
    big = list(range(200_000))  # larger than the socket buffer: sent while read

    def send(i: int) -> None:
        for j in range(50):
            left.send(Kind.ADD, (f"r{i}-{j}", big if j == 0 else [1, 2], params, j))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    got = [right.recv() for _ in range(200)]
    for t in threads:
        t.join()
    assert all(kind is Kind.ADD for kind, _ in got)
    assert sorted(obj[0] for _, obj in got) == sorted(f"r{i}-{j}" for i in range(4)
                                                    for j in range(50))
    assert sum(obj[1] == big for _, obj in got) == 4
    assert all(obj[2] == params for _, obj in got)
    right.send(Kind.OUTPUTS, [RequestOutput("r", text="é", finished=True)])
    kind, outs = left.recv()
    assert kind is Kind.OUTPUTS and outs[0].text == "é"
    left.close()
    with pytest.raises(ChannelClosed):
        right.recv()


def test_the_http_side_refuses_before_anything_is_queued():
    import asyncio

    from server.engine_process import EngineProcess
    from server.errors import EngineNotReadyError, InvalidRequestError, QueueFullError

    engine = EngineProcess(EngineConfig(max_queue=1))
    sent: list = []

    class FakeChannel:
        def send(self, kind, obj=None):
            sent.append((kind, obj))

    engine._channel = FakeChannel()

    async def run() -> None:
        params = SamplingParams(max_tokens=2)
        with pytest.raises(EngineNotReadyError):
            engine.add_request("a", [1, 2], params)
        engine._info_error = None
        engine.tokenizer, engine.vocab_size, engine.max_model_len = object(), 10, 8
        engine._accepting = True
        with pytest.raises(InvalidRequestError):
            engine.add_request("a", [10], params)  # outside the vocabulary
        with pytest.raises(InvalidRequestError):
            engine.add_request("a", list(range(8)), params)  # no room left in the context
        engine.add_request("a", [1, 2], params)
        with pytest.raises(InvalidRequestError):
            engine.add_request("a", [1, 2], params)  # the id is in use
        with pytest.raises(QueueFullError):
            engine.add_request("b", [1, 2], params)
        engine._admission.leave(1)  # what a LEFT from the engine process does: "a" was admitted
        engine.add_request("b", [1, 2], params)

    asyncio.run(run())
    assert [kind for kind, _ in sent] == [Kind.ADD, Kind.ADD]
    seeds = [obj[3] for _, obj in sent]
    assert all(isinstance(s, int) for s in seeds) and seeds[0] != seeds[1]


def test_the_strict_side_refuses_foreign_classes_and_the_stream_stays_whole():
    import decimal
    import pickle
    import socket

    a, b = socket.socketpair()
    strict, other = Channel(a, strict=True), Channel(b)
    other.send(Kind.REPLY, (1, True, {"value": decimal.Decimal("1.5")}))
    other.send(Kind.REPLY, (2, True, {"value": 1.5}))
    with pytest.raises(pickle.UnpicklingError, match="decimal.Decimal"):
        strict.recv()
    assert strict.recv() == (Kind.REPLY, (2, True, {"value": 1.5}))
    # Plain values of any builtin subclass cross once `engine_host.plain` made them builtins.
    from server.engine_host import plain

    class Version(str):
        pass

    assert type(plain({"torch": Version("2.11")})["torch"]) is str
    strict.close()
    other.close()


def test_the_reader_counts_queue_exits_reports_phases_in_order_and_fails_on_a_foreign_object():
    import decimal
    import socket

    from server.engine_process import EngineProcess

    engine = EngineProcess(EngineConfig(max_queue=4))
    a, b = socket.socketpair()
    engine._channel, child = Channel(a, strict=True), Channel(b)
    seen: list = []
    child.send(Kind.PHASE, ("loading_weights", None))  # before anyone listens: held
    engine._reader = threading.Thread(target=engine._read, daemon=True)
    engine._reader.start()
    deadline = time.monotonic() + 5
    while not engine._held:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    engine.attach(on_phase=lambda phase, detail: seen.append((phase, detail)))
    child.send(Kind.PHASE, ("allocating_kv_cache", None))
    assert engine._admission.try_enter() and engine._admission.try_enter()
    child.send(Kind.LEFT, 2)
    child.send(Kind.OUTPUTS, [decimal.Decimal(1)])  # a bug on the engine side
    engine._reader.join(5)
    assert not engine._reader.is_alive()
    assert engine._admission.waiting == 0
    assert [p for p, _ in seen] == ["loading_weights", "allocating_kv_cache", "failed"]
    assert "decimal.Decimal" in seen[-1][1]
    child.close()


def test_a_server_whose_engine_process_cannot_start_runs_the_engine_itself(monkeypatch, caplog):
    from server import launch
    from server.config import ServerConfig
    from server.engine_process import EngineProcess

    def refuse(self):
        raise OSError("Resource temporarily unavailable")

    monkeypatch.setattr(EngineProcess, "spawn", refuse)
    assert launch._spawn_engine(ServerConfig()) is None
    assert "running the engine in this process" in caplog.text


def test_a_gone_engine_process_ends_exactly_the_choices_still_open():
    import asyncio

    from server.engine_process import EngineProcess
    from server.engine_protocol import route

    engine = EngineProcess(EngineConfig())

    class FakeChannel:
        def send(self, kind, obj=None):
            pass

    engine._channel = FakeChannel()
    engine.tokenizer, engine.vocab_size, engine.max_model_len = object(), 10, 8
    engine._accepting, engine._closing = True, True

    async def run() -> list:
        stream = engine.add_request("a", [1, 2], SamplingParams(max_tokens=2, n=3))
        route([RequestOutput("a", text="x", finished=True, finish_reason="length", index=1)],
              engine._remotes)
        engine._gone(None)
        return [out async for out in stream]

    outs = asyncio.run(run())
    assert [(o.index, o.finish_reason) for o in outs] == [(1, "length"), (0, "error"),
                                                          (2, "error")]
    assert "engine process exited" in outs[-1].error and engine._remotes == {}
