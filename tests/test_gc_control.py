"""The garbage collector around captures and serving (server.gc_control)."""

from __future__ import annotations

import asyncio
import gc
import time

import server.gc_control as gc_control
from server.gc_control import (
    end_startup_pause,
    freeze_startup_heap,
    no_collection,
    pause_until_ready,
)
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


def test_the_startup_pause_lasts_until_the_ready_freeze():
    assert gc.isenabled()
    pause_until_ready()
    try:
        assert not gc.isenabled()
        with no_collection():  # a capture before ready
            assert not gc.isenabled()
        assert not gc.isenabled()  # still paused after it
        assert freeze_startup_heap() > 0
        assert gc.isenabled()
        end_startup_pause()  # the server returning later: nothing left to do
        assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
        gc_control._paused = False


def test_a_failed_start_ends_the_pause():
    pause_until_ready()
    try:
        assert not gc.isenabled()
        end_startup_pause()
        assert gc.isenabled()
    finally:
        gc.enable()
        gc_control._paused = False


def test_collection_switched_off_elsewhere_stays_off():
    gc.disable()
    try:
        pause_until_ready()  # not its pause: neither the freeze nor the end turns it on
        freeze_startup_heap()
        end_startup_pause()
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
        gc_control._paused = False


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
