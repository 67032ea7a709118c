"""The scheduler alone (torch-free): step composition under the token budgets, preemption."""

from __future__ import annotations

from server.block_manager import BlockManager
from server.request import SamplingParams
from server.scheduler import MIN_DEEP_CHUNK, Admission, ChunkCost, NewRequest, Scheduler, StepResult
from tests.helpers.fake_engine import FakeTokenizer


def _scheduler(**overrides) -> Scheduler:
    kwargs = dict(max_num_seqs=4, max_model_len=512, max_batched_tokens=64,
                  decode_prefill_tokens=8, eos_ids=frozenset(), tokenizer=FakeTokenizer(),
                  admission=Admission(16), block_manager=BlockManager(128, 16))
    kwargs.update(overrides)
    sched = Scheduler(**kwargs)
    return sched


def _add(sched: Scheduler, rid: str, n: int, max_tokens: int = 50) -> None:
    sched._admission.try_enter()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    sched.add(NewRequest(rid, list(range(10, 10 + n)), params, seed=0))


def _run(sched: Scheduler, step) -> None:
    """Launch the step and read its tokens at once (token 65 for every sampled row)."""
    sampled = step.sampled
    sched.launched(step)
    sched.complete(sampled, StepResult(tokens=[65] * len(sampled)))


def test_prompt_chunks_use_the_full_budget_when_nothing_decodes():
    sched = _scheduler()
    _add(sched, "a", 100)
    step = sched.schedule()
    assert step.decode == [] and [i.length for i in step.prefill] == [64]


def test_prompt_chunks_shrink_to_the_decode_cap_beside_running_streams():
    sched = _scheduler()
    _add(sched, "a", 5)
    _run(sched, sched.schedule())  # a's prompt done: it decodes from now on
    _add(sched, "b", 100)
    seen = []
    for _ in range(4):
        step = sched.schedule()
        assert [s.request_id for s in step.decode] == ["a"]
        seen += [item.length for item in step.prefill]
        _run(sched, step)
    assert seen == [8, 8, 8, 8]  # never the 63 the budget would allow


def test_chunk_cost_counts_depth_and_inverts_exactly():
    flat = ChunkCost()
    assert flat.cost(10_000, 64) == 64 and flat.affordable(10_000, 64.0) == 64
    cost = ChunkCost(depth_unit=4096)
    assert cost.cost(0, 256) == 256 * (1 + 128 / 4096)
    assert cost.cost(4096 - 128, 256) == 512  # mean depth = the unit: each token counts twice
    for start in (0, 100, 2048, 8000, 60_000):
        take = cost.affordable(start, 256.0)
        assert cost.cost(start, take) <= 256 < cost.cost(start, take + 1)
    assert cost.affordable(8000, 256.0) < cost.affordable(2048, 256.0) < 256
    windowed = ChunkCost(depth_unit=4096, window=1024)  # attention never reads more keys
    assert windowed.affordable(50_000, 256.0) == windowed.affordable(1024, 256.0) == int(
        256 / (1 + 1024 / 4096))
    assert windowed.cost(50_000, 100) == 100 * 1.25


def _decode_beside(sched: Scheduler, prompt: int, steps: int) -> list[tuple[int, int]]:
    """a decodes; b's prompt of `prompt` tokens arrives: (start, length) of b's chunks."""
    _add(sched, "a", 5, max_tokens=500)
    _run(sched, sched.schedule())
    _add(sched, "b", prompt)
    chunks = []
    for _ in range(steps):
        step = sched.schedule()
        assert [s.request_id for s in step.decode] == ["a"]
        chunks += [(item.start, item.length) for item in step.prefill]
        _run(sched, step)
    return chunks


def test_deep_chunks_beside_running_streams_shrink_by_their_cost():
    cost = ChunkCost(depth_unit=256)
    sched = _scheduler(max_model_len=4096, max_batched_tokens=512, decode_prefill_tokens=128,
                       chunk_cost=cost, block_manager=BlockManager(300, 16))
    chunks = _decode_beside(sched, 3000, 80)
    lengths = [n for _, n in chunks]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] < 128  # shrink with depth
    assert all(start + n == nxt for (start, n), (nxt, _) in zip(chunks, chunks[1:], strict=False))
    for start, n in chunks:
        assert n == max(cost.affordable(start, 128.0), MIN_DEEP_CHUNK)
    assert lengths[-1] == MIN_DEEP_CHUNK  # deep enough that the floor keeps it moving


def test_depth_does_not_limit_chunks_when_nothing_decodes():
    sched = _scheduler(max_model_len=4096, max_batched_tokens=256, decode_prefill_tokens=64,
                       chunk_cost=ChunkCost(depth_unit=16), block_manager=BlockManager(300, 16))
    _add(sched, "b", 1000)
    seen = []
    while (step := sched.schedule()) and step.prefill:
        seen.append(step.prefill[0].length)
        _run(sched, step)
        if sum(seen) >= 1000:
            break
    assert seen == [256, 256, 256, 232]


def test_the_newest_sequence_is_preempted_when_blocks_run_out_and_resumes_first():
    # 5 usable blocks of 16 tokens; two sequences of 30 prompt tokens (2 blocks each) decode
    # until one needs a fifth... sixth block.
    sched = _scheduler(block_manager=BlockManager(6, 16), decode_prefill_tokens=64)
    _add(sched, "old", 30)
    _add(sched, "new", 30)
    for _ in range(40):
        step = sched.schedule()
        if step is None:
            break
        _run(sched, step)
        if sched.preemptions:
            break
    assert sched.preemptions == 1
    assert [s.request_id for s in sched.waiting] == ["new"]  # back at the front of the queue
    assert [s.request_id for s in sched.running] == ["old"]
    resumed = sched.waiting[0]
    assert resumed.blocks == [] and resumed.row == -1 and resumed.output_ids  # tokens kept

