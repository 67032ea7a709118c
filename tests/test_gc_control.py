"""The garbage collector around captures and serving (server.gc_control)."""

from __future__ import annotations

import asyncio
import gc
import time

from server.gc_control import no_collection
from server.request import SamplingParams
from tests.helpers.tiny_models import build_checkpoint
from tests.test_engine import collect, start_engine


def test_no_collection_pauses_automatic_collection_and_restores_it():
    assert gc.isenabled()
    with no_collection():
        assert not gc.isenabled()
        with no_collection():  # nested: the inner exit does not switch it back on
            pass
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with no_collection():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


async def test_the_startup_heap_stays_frozen_through_idle_captures_and_serving(
        tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.setenv("GRAPHSERVE_EMULATE_GRAPHS", "1")
    gc.unfreeze()  # earlier tests' engines froze theirs: start from none
    path = build_checkpoint(tmp_path / "llama", "llama")
    engine = start_engine(path, graph_capture="lazy", idle_debounce_ms=10)
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 50_000  # torch, the model, the tokenizer: everything alive at ready
        deadline = time.monotonic() + 30
        while not engine.graph_report()["complete"]:  # idle captures, each without collection
            assert time.monotonic() < deadline, engine.graph_report()
            await asyncio.sleep(0.01)
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        outs = await asyncio.gather(*(collect(engine, [5, 6, 7 + i], params) for i in range(3)))
        assert all(o[-1].finished for o in outs)
        # No capture unfroze it (a few frozen objects are freed by reference counting).
        assert gc.get_freeze_count() > 0.9 * frozen
        assert gc.isenabled()  # serving's own garbage is still collected
    finally:
        engine.shutdown()
        gc.unfreeze()
