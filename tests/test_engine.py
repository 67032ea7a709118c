"""The engine end to end on CPU: continuous batching vs HF greedy, and request lifecycle."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import torch

from server.config import EngineConfig
from server.engine import AsyncEngine
from server.errors import InvalidRequestError, QueueFullError
from server.request import SamplingParams
from tests.helpers.tiny_models import ARCHITECTURES, build_checkpoint, hf_greedy, hf_reference

_ids = itertools.count()


def _rid() -> str:
    return f"req-{next(_ids)}"


def start_engine(model_dir, **overrides) -> AsyncEngine:
    kwargs = dict(
        model=str(model_dir), device="cpu", max_num_seqs=3, max_model_len=128, max_queue=16
    )
    kwargs.update(overrides)
    engine = AsyncEngine(EngineConfig(**kwargs))
    engine.start()
    if not engine.ready.wait(120):
        raise RuntimeError(f"engine did not become ready: {engine.phase} {engine.error}")
    return engine


async def collect(engine, prompt, params, request_id=None):
    outs = []
    async for out in engine.generate(request_id or _rid(), prompt, params):
        outs.append(out)
    return outs


def tokens_of(outs) -> list[int]:
    return [t for o in outs for t in o.token_ids]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_engine(request, tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    engine = start_engine(path)
    yield path, engine
    engine.shutdown()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("llama-engine"), "llama")


@pytest.fixture(scope="module")
def engine(llama_dir):
    engine = start_engine(llama_dir)
    yield engine
    engine.shutdown()


async def test_continuous_batching_matches_hf_greedy(arch_engine):
    """Prompts of different lengths, joining at different steps, more than there are slots."""
    path, engine = arch_engine
    ref = hf_reference(path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 400, (n,), generator=g).tolist() for n in (5, 17, 2, 40, 9)]
    steps = [12, 7, 15, 10, 6]
    params = [SamplingParams(max_tokens=s, temperature=0.0, ignore_eos=True) for s in steps]

    async def late(i, delay_tokens_of):
        # Join once an earlier request has produced some tokens: a different step each time.
        stream = engine.add_request(_rid(), prompts[delay_tokens_of[0]], params[delay_tokens_of[0]])
        first = []
        async for out in stream:
            first.append(out)
            if len(first) == delay_tokens_of[1]:
                rest = asyncio.create_task(collect(engine, prompts[i], params[i]))
        remaining = await rest
        return first, remaining

    (o0, o1), (o2, o3), o4 = await asyncio.gather(
        late(1, (0, 3)), late(3, (2, 5)), collect(engine, prompts[4], params[4])
    )
    results = {0: o0, 1: o1, 2: o2, 3: o3, 4: o4}
    for i, outs in results.items():
        assert tokens_of(outs) == hf_greedy(ref, prompts[i], steps[i]), f"prompt {i}"
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert outs[-1].completion_tokens == steps[i]
        assert outs[-1].prompt_tokens == len(prompts[i])
    assert engine.stats()["running"] == 0


async def test_eos_stops_and_is_not_text(engine, llama_dir):
    ref = hf_reference(llama_dir)
    prompt = [5, 6, 7, 8]
    greedy = hf_greedy(ref, prompt, 8)
    # Declare the 4th greedy token a stop token: generation must end right there.
    stop_tok = greedy[3]
    first = greedy.index(stop_tok)
    outs = await collect(
        engine, prompt, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_tok])
    )
    assert tokens_of(outs) == greedy[: first + 1]
    assert outs[-1].finish_reason == "stop"


async def test_model_eos_token_stops(llama_dir, tmp_path):
    """The checkpoint's own EOS (generation_config.json) ends generation, without its text."""
    import json
    import shutil

    ref = hf_reference(llama_dir)
    prompt = [5, 6, 7, 8]
    greedy = hf_greedy(ref, prompt, 8)
    eos = greedy[2]
    model_dir = tmp_path / "eos-model"
    shutil.copytree(llama_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, eos]}))
    engine = start_engine(model_dir)
    try:
        params = SamplingParams(max_tokens=8, temperature=0.0)
        outs = await collect(engine, prompt, params)
        assert tokens_of(outs) == greedy[: greedy.index(eos) + 1]
        assert outs[-1].finish_reason == "stop"
        emitted = "".join(o.text for o in outs)
        expected = engine.tokenizer.decode(greedy[: greedy.index(eos)], skip_special_tokens=True)
        assert emitted == expected  # the EOS token itself is not text
        # ignore_eos runs through it to max_tokens.
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        outs = await collect(engine, prompt, params)
        assert tokens_of(outs) == greedy and outs[-1].finish_reason == "length"
    finally:
        engine.shutdown()


async def test_stop_strings_are_never_emitted(engine):
    base = await collect(
        engine, [9, 10, 11], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    )
    text = "".join(o.text for o in base)
    assert len(text) > 6, text
    # A stop string that starts mid-text and is likely split across tokens.
    stop = text[3:7]
    outs = await collect(
        engine,
        [9, 10, 11],
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop, "never-there"]),
    )
    got = "".join(o.text for o in outs)
    assert got == text[: text.index(stop)]
    assert outs[-1].finish_reason == "stop"


async def test_same_seed_same_output_different_seed_differs(engine):
    params = dict(max_tokens=24, temperature=1.0, top_p=0.95, top_k=50, ignore_eos=True)
    a, b, c = await asyncio.gather(
        collect(engine, [20, 21, 22], SamplingParams(seed=1234, **params)),
        collect(engine, [20, 21, 22], SamplingParams(seed=1234, **params)),
        collect(engine, [20, 21, 22], SamplingParams(seed=99, **params)),
    )
    assert tokens_of(a) == tokens_of(b)
    assert tokens_of(a) != tokens_of(c)
    # And the same seed alone (different batch company) still reproduces it.
    d = await collect(engine, [20, 21, 22], SamplingParams(seed=1234, **params))
    assert tokens_of(d) == tokens_of(a)


async def test_abort_frees_the_slot(engine):
    stream = engine.add_request(
        "abort-me", [1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True)
    )
    got = 0
    async for out in stream:
        got += 1
        if got == 2:
            engine.abort("abort-me")
        if out.finished:
            assert out.finish_reason == "abort"
    assert got < 100
    for _ in range(100):
        if engine.stats()["running"] == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats()["running"] == 0
    assert engine.stats()["free_slots"] == 3


async def test_consumer_leaving_early_aborts(engine):
    agen = engine.generate("leaver", [4, 5], SamplingParams(max_tokens=100, ignore_eos=True))
    async for _ in agen:
        break
    await agen.aclose()
    for _ in range(200):
        if engine.stats()["running"] == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats()["running"] == 0


async def test_queue_overflow_is_rejected(llama_dir):
    engine = start_engine(llama_dir, max_num_seqs=1, max_queue=2)
    try:
        long = SamplingParams(max_tokens=60, ignore_eos=True)
        streams = [engine.add_request(_rid(), [1, 2], long)]
        await asyncio.sleep(0.2)  # the first one has a slot now; the next two wait
        streams += [engine.add_request(_rid(), [1, 2], long) for _ in range(2)]
        with pytest.raises(QueueFullError):
            engine.add_request(_rid(), [1, 2], long)
        for s in streams:
            async for _ in s:
                pass
        # Capacity is back once the queue drained.
        outs = await collect(engine, [1, 2], SamplingParams(max_tokens=2, ignore_eos=True))
        assert outs[-1].finished
    finally:
        engine.shutdown()


async def test_max_model_len_overflow(engine):
    with pytest.raises(InvalidRequestError, match="maximum context is 128"):
        engine.add_request(_rid(), list(range(2, 130)), SamplingParams())
    # A prompt that fits but would run past the context ends with "length" at exactly 128.
    outs = await collect(engine, [3] * 120, SamplingParams(max_tokens=50, ignore_eos=True))
    assert outs[-1].finish_reason == "length"
    assert outs[-1].prompt_tokens + outs[-1].completion_tokens == 128


async def test_invalid_requests(engine):
    with pytest.raises(InvalidRequestError):
        engine.add_request(_rid(), [], SamplingParams())
    with pytest.raises(InvalidRequestError):
        engine.add_request(_rid(), [1, 10**6], SamplingParams())
    with pytest.raises(InvalidRequestError):
        engine.add_request(_rid(), [1], SamplingParams(max_tokens=0))
    with pytest.raises(InvalidRequestError):
        engine.add_request(_rid(), [1], SamplingParams(top_p=0.0))
    # The engine keeps serving.
    outs = await collect(engine, [1, 2], SamplingParams(max_tokens=3, ignore_eos=True))
    assert outs[-1].completion_tokens == 3


async def test_long_prompt_is_prefilled_in_chunks(llama_dir):
    engine = start_engine(llama_dir, max_num_batched_tokens=16)
    try:
        ref = hf_reference(llama_dir)
        prompt = [(7 * i) % 390 + 2 for i in range(70)]
        outs = await collect(
            engine, prompt, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
        )
        assert tokens_of(outs) == hf_greedy(ref, prompt, 5)
        assert engine.stats()["mixed_steps"] >= 5
    finally:
        engine.shutdown()


def test_startup_failure_reports_reason(tmp_path):
    phases = []
    engine = AsyncEngine(
        EngineConfig(model=str(tmp_path / "nope"), device="cpu"),
        on_phase=lambda p, d: phases.append((p, d)),
    )
    engine.start()
    engine._thread.join(60)
    assert phases[-1][0] == "failed"
    assert "does not exist" in phases[-1][1]
    assert not engine.ready.is_set()


def test_ready_waits_for_the_grammar_tokenizer(llama_dir, monkeypatch, caplog):
    """The grammar tokenizer builds in the grammar process, beside the load; readiness checks
    that the build has ended, so a grammar request right after ready never waits for it. Here
    the build is held back past the rest of the startup."""
    monkeypatch.setenv("GRAPHSERVE_GRAMMAR_TEST_FAULT", "build_delay:3.0")
    phases = []
    engine = AsyncEngine(
        EngineConfig(model=str(llama_dir), device="cpu", max_num_seqs=3, max_model_len=128),
        on_phase=lambda phase, detail: phases.append((phase, time.monotonic())),
    )
    t0 = time.monotonic()
    with caplog.at_level("INFO", logger="graphserve.grammar"):
        engine.start()
        try:
            assert engine.ready.wait(120), (engine.phase, engine.error)
            ready_at = next(t for phase, t in phases if phase == "ready")
            assert ready_at - t0 >= 3.0
            assert "ready waited" in caplog.text and "grammar tokenizer built" in caplog.text
        finally:
            engine.shutdown()


# -- one step ahead: the host reads step N's tokens after launching step N+1 -----------------


async def test_length_limits_cost_no_extra_step(engine):
    """A sequence that its in-flight token surely ends (max_tokens) is left out of the next
    step: N tokens take exactly N - 1 decode steps (the first comes from prefill)."""
    before = engine.stats()
    outs = await collect(engine, [4, 5, 6], SamplingParams(max_tokens=7, ignore_eos=True))
    after = engine.stats()
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 7
    assert after["decode_steps"] - before["decode_steps"] == 6
    assert after["discarded_tokens"] == before["discarded_tokens"]


async def test_stop_token_discards_the_step_ahead_and_reuses_the_slot(llama_dir):
    """A stop token is only seen after the next step was launched: its token is dropped, never
    streamed, and the slot it wrote into serves the next request correctly."""
    ref = hf_reference(llama_dir)
    engine = start_engine(llama_dir, max_num_seqs=1)  # one slot: B must reuse A's
    try:
        prompt_a, prompt_b = [5, 6, 7, 8], [9, 3, 11]
        greedy_a = hf_greedy(ref, prompt_a, 12)
        stop = next(t for t in greedy_a[2:] if t not in greedy_a[:2])
        cut = greedy_a.index(stop)
        outs_a, outs_b = await asyncio.gather(
            collect(
                engine,
                prompt_a,
                SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop]),
            ),
            collect(
                engine, prompt_b, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
            ),
        )
        assert tokens_of(outs_a) == greedy_a[: cut + 1]
        assert outs_a[-1].finish_reason == "stop"
        assert tokens_of(outs_b) == hf_greedy(ref, prompt_b, 10)
        assert engine.stats()["discarded_tokens"] == 1
    finally:
        engine.shutdown()


async def test_a_failing_decode_step_fails_its_requests_and_the_engine_serves_on(llama_dir):
    """A step that raises (here: the first decode launch carrying both requests) ends the
    requests it carried with an error, drops the step in flight, and leaves slots and state
    clean for the next ones."""
    ref = hf_reference(llama_dir)
    engine = start_engine(llama_dir, max_num_seqs=2)
    try:
        runner = engine._core.runner.graphs
        real_run, failures = runner.run, []

        def flaky_run(ids, *args, **kwargs):
            if len(ids) == 2 and not failures:
                failures.append(1)
                raise RuntimeError("injected decode failure")
            return real_run(ids, *args, **kwargs)

        runner.run = flaky_run
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        failed = await asyncio.gather(
            collect(engine, [5, 6, 7], params), collect(engine, [8, 9], params)
        )
        for outs in failed:
            assert outs[-1].finish_reason == "error"
            assert "injected decode failure" in outs[-1].error
        stats = engine.stats()
        assert stats["step_errors"] == 1 and stats["free_slots"] == 2 and stats["running"] == 0
        # Both slots serve correct output afterwards.
        again = await asyncio.gather(
            collect(engine, [5, 6, 7], params), collect(engine, [8, 9], params)
        )
        assert tokens_of(again[0]) == hf_greedy(ref, [5, 6, 7], 6)
        assert tokens_of(again[1]) == hf_greedy(ref, [8, 9], 6)
    finally:
        engine.shutdown()


async def test_a_failing_mixed_step_fails_its_requests_and_later_ones_are_served(llama_dir):
    """A step that raises while a prompt chunk rides with a decoding request fails both (the
    step carried both, and the token in flight is lost), frees their blocks and rows, and the
    next requests get exact greedy tokens."""
    ref = hf_reference(llama_dir)
    engine = start_engine(llama_dir, max_num_seqs=2)
    try:
        core = engine._core
        real_forward, calls = core.runner.model.forward, []

        def flaky_forward(batch, *args, **kwargs):
            calls.append(batch.num_decode)
            if batch.num_decode:  # the second request's chunk beside the first one's decode
                raise RuntimeError("injected mixed-step failure")
            return real_forward(batch, *args, **kwargs)

        core.runner.model.forward = flaky_forward
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        first = asyncio.ensure_future(collect(engine, [5, 6, 7], params))
        while core.scheduler.steps["decode"] < 2:
            await asyncio.sleep(0.001)
        second = await asyncio.wait_for(collect(engine, [8, 9], params), 60)
        assert second[-1].finish_reason == "error"
        assert "injected mixed-step failure" in second[-1].error
        first = await asyncio.wait_for(first, 60)
        assert first[-1].finish_reason == "error"
        stats = engine.stats()
        assert stats["step_errors"] == 1 and stats["running"] == 0
        assert stats["kv_blocks_used"] == 0 and stats["free_slots"] == 2
        core.runner.model.forward = real_forward
        short = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        again = await asyncio.gather(
            collect(engine, [5, 6, 7], short), collect(engine, [8, 9], short)
        )
        assert tokens_of(again[0]) == hf_greedy(ref, [5, 6, 7], 6)
        assert tokens_of(again[1]) == hf_greedy(ref, [8, 9], 6)
    finally:
        engine.shutdown()


# -- paged KV: preemption, prefix caching, mixed steps ----------------------------------------


async def test_preemption_under_a_small_block_pool_keeps_greedy_output(llama_dir):
    """Four sequences that together need more KV blocks than the pool has: the newest ones
    are preempted and recomputed, nobody fails, and every output is HF's greedy output."""
    ref = hf_reference(llama_dir)
    # 12 usable blocks of 8 tokens = 96 tokens for 4 sequences of up to 16 + 24 tokens each.
    engine = start_engine(llama_dir, max_num_seqs=4, block_size=8, num_kv_blocks=13,
                          max_model_len=64)
    try:
        g = torch.Generator().manual_seed(11)
        prompts = [torch.randint(2, 400, (n,), generator=g).tolist() for n in (16, 9, 14, 11)]
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        outs = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
        for prompt, out in zip(prompts, outs, strict=True):
            assert out[-1].finish_reason == "length"
            assert tokens_of(out) == hf_greedy(ref, prompt, 24)
        stats = engine.stats()
        assert stats["preemptions"] >= 1
        assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
    finally:
        engine.shutdown()


async def test_prefix_cache_hit_gives_the_same_output_and_reports_cached_tokens(llama_dir):
    """A second request sharing a long prefix reuses its full blocks (reported as cached
    tokens) and produces exactly the tokens a cold run produces."""
    ref = hf_reference(llama_dir)
    engine = start_engine(llama_dir, block_size=8)
    try:
        system = [(5 * i) % 390 + 2 for i in range(50)]
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        first = await collect(engine, system + [7, 8, 9], params)
        second = await collect(engine, system + [10, 11], params)
        assert first[-1].cached_tokens == 0
        assert second[-1].cached_tokens == 48  # the 6 full blocks of the shared 50 tokens
        assert tokens_of(first) == hf_greedy(ref, system + [7, 8, 9], 8)
        assert tokens_of(second) == hf_greedy(ref, system + [10, 11], 8)
        # The whole prompt repeated: all but its last token could come from the cache.
        third = await collect(engine, system + [7, 8, 9], params)
        assert third[-1].cached_tokens == 48
        assert tokens_of(third) == tokens_of(first)
        assert engine.stats()["prefix_hit_tokens"] >= 96
    finally:
        engine.shutdown()


async def test_prefix_caching_off_caches_nothing(llama_dir):
    engine = start_engine(llama_dir, block_size=8, enable_prefix_caching=False)
    try:
        prompt = list(range(2, 40))
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        await collect(engine, prompt, params)
        again = await collect(engine, prompt, params)
        assert again[-1].cached_tokens == 0
        assert engine.stats()["kv_blocks_cached"] == 0
    finally:
        engine.shutdown()


async def test_a_long_prompt_rides_with_running_streams_in_mixed_steps(llama_dir):
    """While a long prompt is prefilled chunk by chunk, a running stream keeps getting one
    token per step (mixed steps), and both outputs are exact."""
    ref = hf_reference(llama_dir)
    engine = start_engine(llama_dir, max_num_batched_tokens=12)
    try:
        params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
        first = asyncio.ensure_future(collect(engine, [5, 6, 7], params))
        while engine._core.scheduler.steps["decode"] < 2:
            await asyncio.sleep(0.001)
        before = engine.stats()
        long_prompt = [(3 * i) % 390 + 2 for i in range(60)]
        second = await collect(engine, long_prompt, SamplingParams(max_tokens=4, temperature=0.0,
                                                                   ignore_eos=True))
        mixed = engine.stats()["mixed_steps"] - before["mixed_steps"]
        assert mixed >= 60 // 11  # chunks of at most 12 - 1 tokens beside the decode row
        assert tokens_of(await first) == hf_greedy(ref, [5, 6, 7], 30)
        assert tokens_of(second) == hf_greedy(ref, long_prompt, 4)
    finally:
        engine.shutdown()


def test_a_slow_step_is_logged_once_per_interval(caplog, monkeypatch):
    """A step that held the engine thread past SLOW_STEP_S is a warning with what it carried;
    a run of slow steps is one warning per interval, not one per step."""
    import logging
    from types import SimpleNamespace

    from server import engine as engine_mod

    core = engine_mod.EngineCore.__new__(engine_mod.EngineCore)
    core._slow_logged_at = -engine_mod.SLOW_STEP_LOG_EVERY_S
    core._step_avg = 0.0
    clock = iter([100.0, 101.0, 111.5])
    monkeypatch.setattr(engine_mod, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    step = SimpleNamespace(decode=[1, 2], prefill=[SimpleNamespace(length=512)])
    with caplog.at_level(logging.WARNING, logger="graphserve.engine"):
        core._log_if_slow(0.01, step)  # fast: not even the clock is read
        core._log_if_slow(1.3, step)  # t = 100: logged
        core._log_if_slow(2.0, None)  # t = 101: within the interval
        core._log_if_slow(0.3, None)  # long, but under 10x the average (0.32 s) by now
        core._log_if_slow(4.0, None)  # t = 111.5: logged again
    assert [r.getMessage() for r in caplog.records if r.name == "graphserve.engine"] == [
        "engine step took 1.30 s (launching 2 decode rows and 512 prompt tokens, reading the "
        "previous step)",
        "engine step took 4.00 s (launching no new step, reading the previous step)",
    ]


def test_steps_that_are_all_long_do_not_warn(caplog):
    """A model whose every step is long (a big model on a CPU) warns at most while the average
    catches up, not at every step."""
    import logging

    from server import engine as engine_mod

    core = engine_mod.EngineCore.__new__(engine_mod.EngineCore)
    core._slow_logged_at = -engine_mod.SLOW_STEP_LOG_EVERY_S
    core._step_avg = 0.0
    with caplog.at_level(logging.WARNING, logger="graphserve.engine"):
        for _ in range(200):
            core._log_if_slow(0.6, None)
    warned = [r for r in caplog.records if r.name == "graphserve.engine"]
    assert len(warned) == 1  # the first: no average yet
    assert core._step_avg == pytest.approx(0.6, rel=1e-3)


async def test_engine_loop_heartbeat_names_a_stuck_step(llama_dir):
    """The engine loop's heartbeat is idle while the engine waits for work, and a step stuck
    outside Python's view (here: a decode launch that waits) is named by the stall watch
    while it is stuck."""
    from server import stall_watch

    engine = start_engine(llama_dir, max_num_seqs=2)
    watch = stall_watch.StallWatch(period_s=0.01, threshold_s=0.15, beat_interval_s=0.0)
    try:
        mine = engine._thread.ident  # other tests' engines may be alive: this one's only
        beats = [hb for hb in stall_watch._heartbeats if hb.ident == mine]
        assert len(beats) == 1 and beats[0].name == "engine loop"
        deadline = time.monotonic() + 5
        while beats[0].since is not None and time.monotonic() < deadline:
            time.sleep(0.01)  # idle captures (none on CPU) end, then it waits for requests
        assert beats[0].since is None
        runner = engine._core.runner.graphs
        real_run, held = runner.run, []

        def held_run(ids, *args, **kwargs):
            if not held:
                held.append(1)
                time.sleep(0.5)  # like a launch waiting in the driver
            return real_run(ids, *args, **kwargs)

        runner.run = held_run
        watch.start()
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        outs = await collect(engine, [5, 6, 7], params)
        assert len(tokens_of(outs)) == 3
        assert watch.slow_units and watch.slow_units[0][0] == "engine loop"
        assert "held_run" in watch.slow_units[0][2]
    finally:
        watch.stop()
        engine.shutdown()
    engine._thread.join(10)
    assert not [hb for hb in stall_watch._heartbeats if hb.ident == mine]
