"""server/engine_protocol.py: both engines satisfy `EngineProtocol`, and the one stream type.

The real engine (`AsyncEngine`), its front for an engine in its own process (`EngineProcess`)
and the API tests' fake are checked against the same protocol:
`isinstance` (every member present, attributes included) and call signatures (each method
accepts the protocol's arguments), so the fake cannot drift from what the API may call.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import typing

import pytest

from server.config import EngineConfig
from server.engine import AsyncEngine
from server.engine_protocol import EngineProtocol, RequestStream, deliver
from server.http.state import resolve
from server.request import RequestOutput, SamplingParams
from tests.helpers.fake_engine import (
    BOS,
    FAKE_ENGINE,
    FAKE_ENGINE_CLASS,
    PHRASE,
    FakeEngine,
    env_engine,
)

PROTOCOL_METHODS = sorted(
    name
    for name, value in vars(EngineProtocol).items()
    if callable(value) and not name.startswith("_")
)
PROTOCOL_ATTRIBUTES = sorted(typing.get_type_hints(EngineProtocol))


def signature_mismatches(engine: object) -> list[str]:
    """Protocol methods whose implementation on `engine` cannot be called as the protocol says.

    An implementation may add parameters with defaults (`AsyncEngine.shutdown(timeout=...)`);
    it may not rename, drop or require more of them.
    """
    problems = []
    for name in PROTOCOL_METHODS:
        wanted = inspect.signature(getattr(EngineProtocol, name))
        params = [p for p in wanted.parameters.values() if p.name != "self"]
        impl = getattr(engine, name, None)
        if not callable(impl):
            problems.append(f"{name}: missing")
            continue
        got = inspect.signature(impl)
        args = [object()] * len(params)
        kwargs = {p.name: object() for p in params}
        for call in ((args, {}), ([], kwargs)):
            try:
                got.bind(*call[0], **call[1])
            except TypeError as exc:
                problems.append(f"{name}{got}: {exc}")
                break
    return problems


def test_protocol_lists_what_the_api_uses():
    assert PROTOCOL_METHODS == [
        "abort", "add_request", "graph_report", "shutdown", "start", "stats", "stop_accepting",
    ]  # fmt: skip
    assert PROTOCOL_ATTRIBUTES == ["max_model_len", "model_name", "tokenizer", "vocab_size"]


def test_fake_engine_satisfies_the_protocol():
    fake = FakeEngine(EngineConfig())
    assert isinstance(fake, EngineProtocol)
    assert signature_mismatches(fake) == []
    hints = typing.get_type_hints(FakeEngine.add_request)
    assert hints["return"] is RequestStream


def test_async_engine_satisfies_the_protocol():
    engine = AsyncEngine(EngineConfig(device="cpu"))  # cheap: no thread, no torch until start()
    assert isinstance(engine, EngineProtocol)
    assert signature_mismatches(engine) == []
    hints = typing.get_type_hints(AsyncEngine.add_request)
    assert hints["return"] is RequestStream


def test_the_engine_process_front_satisfies_the_protocol():
    from server.engine_process import EngineProcess

    engine = EngineProcess(EngineConfig(device="cpu"))  # cheap: nothing spawned until spawn()
    assert isinstance(engine, EngineProtocol)
    assert signature_mismatches(engine) == []
    hints = typing.get_type_hints(EngineProcess.add_request)
    assert hints["return"] is RequestStream
    # The app's factory signature: factory(config, on_phase=cb) returns the engine itself.
    assert engine.attach(EngineConfig(device="cpu"), on_phase=lambda *_: None) is engine


def test_the_checks_catch_a_drifted_engine():
    class Drifted(FakeEngine):
        def abort(self, request_id: str, reason: str) -> None:  # one more required argument
            super().abort(request_id)

    class Incomplete:
        model_name = max_model_len = vocab_size = tokenizer = None

        def start(self) -> None: ...

    drifted = Drifted(EngineConfig())
    assert isinstance(drifted, EngineProtocol)  # isinstance alone only sees names
    (problem,) = signature_mismatches(drifted)
    assert problem.startswith("abort")
    assert not isinstance(Incomplete(), EngineProtocol)
    assert "add_request: missing" in signature_mismatches(Incomplete())


def test_engine_class_references_resolve_to_the_fake():
    assert resolve(FAKE_ENGINE) is env_engine
    assert resolve(FAKE_ENGINE_CLASS) is FakeEngine


async def test_fake_engine_hands_out_the_real_request_stream():
    phases = []
    fake = FakeEngine(EngineConfig(max_model_len=64), lambda phase, detail: phases.append(phase))
    fake.start()
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while "ready" not in phases:
            assert asyncio.get_running_loop().time() < deadline, phases
            await asyncio.sleep(0.005)
        stream = fake.add_request("r1", [BOS, *b"hi"], SamplingParams(max_tokens=5))
        assert type(stream) is RequestStream and stream.request_id == "r1"
        outs = [out async for out in stream]
    finally:
        fake.shutdown()
    assert [o.finished for o in outs] == [False] * 4 + [True]
    assert "".join(o.text for o in outs) == PHRASE[:5].decode()
    assert stream.finished
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


# ------------------------------------------------------------------ RequestStream and deliver
def _out(rid: str, text: str, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, text=text, finished=finished)


async def test_deliver_from_another_thread_wakes_each_loop_once_per_batch(monkeypatch):
    loop = asyncio.get_running_loop()
    a, b = RequestStream("a", loop), RequestStream("b", loop)
    calls = []
    original = loop.call_soon_threadsafe

    def counting(callback, *args):
        calls.append(threading.current_thread().name)
        return original(callback, *args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    batch = [(a, _out("a", "1")), (b, _out("b", "x")), (a, _out("a", "2", finished=True))]
    worker = threading.Thread(target=deliver, args=(batch,), name="producer")
    worker.start()
    worker.join()
    assert calls == ["producer"]  # one wake-up for three outputs
    assert [o.text async for o in a] == ["1", "2"]  # in order, ends after the finished one
    assert a.finished and not b.finished
    assert (await b.__anext__()).text == "x"


def test_deliver_drops_outputs_for_a_closed_loop():
    closed = asyncio.new_event_loop()
    stream = RequestStream("gone", closed)
    closed.close()
    deliver([(stream, _out("gone", "late", finished=True))])  # must not raise
    assert stream._queue.empty()
