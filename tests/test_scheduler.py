"""The scheduler alone (torch-free): step composition under the token budgets, preemption."""

from __future__ import annotations

from server.block_manager import BlockManager
from server.request import SamplingParams
from server.scheduler import Admission, NewRequest, Scheduler, StepResult
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
