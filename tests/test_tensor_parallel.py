"""Tensor parallelism on CPU over gloo: what CI can prove without GPUs.

* the sharded forward (two ranks in threads) computes the one-process logits, for every
  architecture and for the sharding corner cases (biases after the reduction, tied and padded
  vocabularies);
* each rank's weight pipeline reads only its slices of the checkpoint (no re-read, no tensor
  read whole that the rank takes a slice of), giving the tensors a whole read would;
* the engine at `--tensor-parallel-size 2` (a real worker process) gives the one-process greedy
  tokens for every supported architecture, with the decode-prefill cap splitting prompts over
  mixed steps too, and the one-process output for the OpenAI surface (n, penalties, logit_bias,
  min_tokens, logprobs and prompt logprobs, grammar-constrained rows); a host-side failure
  between a step's forward and its draw fails only that step's requests, the ranks stay in step;
* lazy capture under traffic (CPU-emulated graphs) is agreed by every rank: a capture that
  fails on a worker fails that size everywhere, no decode step runs without a graph;
* failures end in `failed` within a deadline, never a hang: a worker that cannot load, an
  agreement answered with an error, out of turn or not at all, a worker that dies (the HTTP
  server then exits non-zero and leaves no worker behind).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import os
import signal
import threading
import time

import httpx
import pytest
import torch

from server.config import EngineConfig
from server.distributed.launcher import TPLauncher
from server.distributed.protocol import Kind
from server.engine import AsyncEngine
from server.errors import FatalEngineError
from server.request import SamplingParams
from server.step_plan import StepPlan
from tests.helpers.server_process import ServerProcess, alive, descendants
from tests.helpers.tiny_models import ARCHITECTURES, build_checkpoint

_ids = itertools.count()
PROMPTS = [[5, 6, 7, 8], list(range(10, 47)), [3, 9] * 5]
MAX_TOKENS = [10, 7, 12]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny checkpoint per architecture (4 heads, 2 KV heads: two ranks split them),
    built on first use, and its one-process greedy tokens for PROMPTS."""
    built: dict = {}

    def get(arch: str):
        if arch not in built:
            path = build_checkpoint(tmp_path_factory.mktemp(arch), arch)
            built[arch] = (path, _one_process_tokens(path))
        return built[arch]

    return get


# -- step plans ------------------------------------------------------------------------------


def test_step_plans_round_trip_through_bytes():
    decode = StepPlan([5, 0, 7], [-1, 2, -1], [3, 9, 4], [0, 1, 2], num_decode=3, num_sampled=3,
                      graph=4, table_rows=[1, 1], table_cols=[0, 1], table_values=[6, 9])
    mixed = StepPlan([0, 11, 12, 13], [1, -1, -1, -1], [8, 0, 1, 2], [0, 2, 2, 2], num_decode=1,
                     num_sampled=2, logit_rows=[0, 3], seq_rows=[2], cu_seqlens=[0, 3],
                     k_lens=[3], max_q_len=3)  # fmt: skip
    empty_mixed = StepPlan([1, 2], [-1, -1], [0, 1], [0, 0], num_decode=0, num_sampled=0,
                           seq_rows=[0], cu_seqlens=[0, 2], k_lens=[2], max_q_len=2)
    for plan in (decode, mixed, empty_mixed):
        assert StepPlan.decode(plan.encode()) == plan
    assert decode.num_logits == 3 and mixed.num_logits == 2 and mixed.mixed
    with pytest.raises(ValueError):
        StepPlan.decode(mixed.encode()[:-8])


# -- agreements, with protocol-speaking stand-in workers ----------------------------------------


@pytest.fixture
def launch():
    started = []

    def start(behaviour: dict[int, str], timeout_s: float = 10.0, world: int = 3):
        failures: list[str] = []
        launcher = TPLauncher(world, timeout_s, on_failure=failures.append,
                              worker_module="tests.helpers.fake_tp_worker")
        started.append(launcher)
        launcher.start({"behaviour": {str(r): b for r, b in behaviour.items()}})
        assert [r["rank"] for r in launcher.collect(Kind.LOADED, 0)] == list(range(1, world))
        return launcher, failures

    yield start
    for launcher in started:
        launcher.kill()


def test_an_agreement_collects_every_rank_in_order_and_close_stops_them(launch):
    launcher, failures = launch({})
    seq = launcher.send_json(Kind.CAPTURE, {"size": 4})
    assert launcher.collect(Kind.CAPTURED, seq) == [
        {"size": 4, "ok": True}, {"size": 4, "ok": True}
    ]
    launcher.close()
    assert [w["returncode"] for w in launcher.describe()] == [0, 0]
    assert failures == []  # an orderly stop is no failure


@pytest.mark.parametrize(
    "behaviour, message",
    [
        ({2: "error"}, r"rank 2: injected failure"),
        ({1: "wrong_seq"}, r"rank 1 answered CAPTURED to order \d+ where CAPTURED to order \d+ "
                           r"was due: the ranks are out of step"),
        ({1: "die"}, r"rank 1 \(pid \d+\) exited with code 7"),
    ],
)
def test_an_agreement_fails_on_a_bad_answer_or_a_dead_rank(launch, behaviour, message):
    launcher, _ = launch(behaviour)
    seq = launcher.send_json(Kind.CAPTURE, {"size": 2})
    with pytest.raises(FatalEngineError, match=message):
        launcher.collect(Kind.CAPTURED, seq)


def test_a_silent_rank_fails_the_agreement_at_its_deadline(launch):
    launcher, _ = launch({1: "silent"}, timeout_s=0.5)
    seq = launcher.send_json(Kind.CAPTURE, {"size": 2})
    t0 = time.monotonic()
    with pytest.raises(FatalEngineError, match=r"rank\(s\) 1 did not answer CAPTURED .* 0.5 s"):
        launcher.collect(Kind.CAPTURED, seq)
    assert 0.4 < time.monotonic() - t0 < 5


def test_a_dying_worker_is_reported_at_once_and_the_next_order_fails(launch):
    launcher, failures = launch({1: "die"})
    launcher.send_json(Kind.CAPTURE, {"size": 2})  # rank 1 exits on it
    deadline = time.monotonic() + 10
    while not failures and time.monotonic() < deadline:
        time.sleep(0.01)
    assert failures and "tensor-parallel rank 1" in failures[0] and "code 7" in failures[0]
    assert launcher.failure == failures[0]
    with pytest.raises(FatalEngineError, match="rank 1"):
        launcher.send(Kind.STEP, b"")


def test_workers_exit_when_rank_0_is_gone(launch):
    launcher, failures = launch({}, world=2)
    (worker,) = launcher._workers
    os.close(worker.lifeline)  # what rank 0's exit does to the pipe, whatever kills it
    worker.lifeline = -1
    assert worker.proc.wait(10) == 3  # worker.EXIT_RANK0_GONE
    deadline = time.monotonic() + 5
    while not failures and time.monotonic() < deadline:
        time.sleep(0.01)
    assert failures  # rank 0, were it alive, would have been told


# -- the sharded forward equals one process ------------------------------------------------------

SHARD_CASES = {
    **{arch: (arch, {}) for arch in ARCHITECTURES},
    # o_proj and down biases are added after the reduction: by rank 0 alone, exactly once.
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    # A vocabulary the ranks cannot split evenly (the last slice is padded), tied to the LM head.
    "qwen2-tied-odd-vocab": ("qwen2", {"tie_word_embeddings": True, "vocab_size": 401}),
}


def _run_rank(path, shard, comm, out: dict) -> None:
    from server.hf_config import load_config
    from server.kv_cache import allocate_kv_cache
    from server.model import DecoderModel, StepBatch
    from server.weights import SafetensorsWeights

    config = load_config(path)
    model = DecoderModel(config, SafetensorsWeights(path, "cpu", torch.float32), 64, shard)
    if comm is not None:
        model.attach_comm(comm)
    kv = allocate_kv_cache(model.shape, 8, 16, torch.float32, "cpu")
    tables = torch.arange(8, dtype=torch.int32).view(2, 4)
    ids = torch.tensor([7, 21, 300, 4, 399, 12, 9], dtype=torch.int64)
    batch = StepBatch(  # a prompt of 5 tokens on row 0 and one of 2 on row 1
        input_ids=ids, positions=torch.tensor([0, 1, 2, 3, 4, 0, 1]),
        rows=torch.tensor([0, 0, 0, 0, 0, 1, 1]), logit_rows=torch.tensor([4, 6]),
        num_decode=0, seq_rows=torch.tensor([0, 1]), cu_seqlens_q=torch.tensor(
            [0, 5, 7], dtype=torch.int32), k_lens=torch.tensor([5, 2], dtype=torch.int32),
        max_q_len=5,
    )  # fmt: skip
    prefill = model.forward(batch, kv, tables)
    decode = torch.empty(2, model.logits_width)
    model.decode(torch.tensor([33, 250]), torch.tensor([5, 2]), torch.tensor([0, 1]), kv, tables,
                 decode)  # fmt: skip
    out[shard.rank] = (prefill, decode[:, : model.shape.vocab_size])


@pytest.mark.parametrize("case", sorted(SHARD_CASES))
def test_two_shards_compute_the_one_process_logits(tmp_path, case):
    from server.distributed.comm import TPComm
    from server.distributed.sharding import TPShard

    arch, overrides = SHARD_CASES[case]
    path = build_checkpoint(tmp_path / case, arch, **overrides)
    whole: dict = {}
    _run_rank(path, TPShard(), None, whole)
    store = torch.distributed.HashStore()
    timeout = datetime.timedelta(seconds=60)
    ranks: dict = {}
    errors: list[BaseException] = []

    def rank(r):
        try:
            group = torch.distributed.ProcessGroupGloo(store, r, 2, timeout)
            _run_rank(path, TPShard(r, 2), TPComm(group, r, 2), ranks)
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for got in (ranks[0], ranks[1]):  # every rank ends with the full logits
        for sharded, reference in zip(got, whole[0], strict=True):
            torch.testing.assert_close(sharded, reference, rtol=1e-5, atol=1e-5)
            assert torch.equal(sharded.argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("case", sorted(SHARD_CASES))
def test_each_rank_pipeline_reads_only_its_slices(tmp_path, case):
    from server.distributed.sharding import TPShard, planned_slice
    from server.hf_config import load_config
    from server.model import DecoderModel
    from server.safetensors_index import load_plan, read_checkpoint
    from server.weight_pipeline import PipelinedWeights
    from server.weights import SafetensorsWeights

    arch, overrides = SHARD_CASES[case]
    path = build_checkpoint(tmp_path / case, arch, **overrides)
    config = load_config(path)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    read = 0
    for r in range(2):
        shard = TPShard(r, 2)
        # Small pieces: the strided slices (o_proj, down) span several pieces of several runs.
        weights = PipelinedWeights(path, "cpu", torch.float32, chunk_bytes=4096, exclude=tied,
                                   parts=lambda n, s, shard=shard: planned_slice(shard, n, s))
        try:
            got = DecoderModel(config, weights, 64, shard)
        finally:
            weights.close()
        assert weights.stats.part_misses == 0
        read += weights.stats.bytes_read
        ref = DecoderModel(config, SafetensorsWeights(path, "cpu", torch.float32), 64, shard)
        for a, b in zip(got._tensors(), ref._tensors(), strict=True):
            assert a.is_contiguous() and torch.equal(a, b)
    # Together the ranks read each sharded tensor once and each replicated one twice.
    plan = load_plan(read_checkpoint(path), frozenset(tied))
    assert read == sum(e.nbytes * (2 if planned_slice(TPShard(0, 2), e.name, e.shape) is None
                                   else 1) for e in plan)  # fmt: skip


@pytest.mark.parametrize("overrides, message", [
    ({"tensor_parallel_size": 4},
     "--tensor-parallel-size 4 does not divide the model's 2 KV heads"),
    ({"tensor_parallel_size": 2, "tp_allreduce": "symm-mem"},
     "--tp-allreduce symm-mem needs CUDA GPUs"),
])  # fmt: skip
def test_a_group_that_cannot_work_is_a_clear_startup_error(checkpoints, overrides, message):
    path, _ = checkpoints("llama")  # 4 heads, 2 KV heads
    engine = AsyncEngine(EngineConfig(model=str(path), device="cpu", **overrides))
    engine.start()
    _wait_phase(engine, "failed", 60)
    assert message in engine.error


def test_auto_all_reduce_takes_symmetric_memory_only_where_every_gpu_pair_has_peer_access(
    monkeypatch,
):
    from server.distributed import comm

    peers = {(0, 1), (1, 0), (0, 2), (2, 0)}  # GPUs 1 and 2 cannot reach each other
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda i, j: (i, j) in peers)
    assert comm.choose_allreduce("auto", "cuda", 2) == "symm-mem"
    assert comm.choose_allreduce("auto", "cuda", 3) == "nccl"
    assert comm.choose_allreduce("auto", "cpu", 2) == "nccl"
    assert comm.choose_allreduce("nccl", "cuda", 2) == "nccl"  # asked for: not second-guessed
    assert comm.choose_allreduce("symm-mem", "cuda", 3) == "symm-mem"
    # A second symmetric-memory group in one process is not supported: auto takes NCCL, an
    # explicit symm-mem is refused with the reason.
    monkeypatch.setattr(comm, "_symm_groups", 1)
    assert comm.choose_allreduce("auto", "cuda", 2) == "nccl"
    assert comm.choose_allreduce("nccl", "cuda", 2) == "nccl"
    with pytest.raises(RuntimeError, match="already formed a symmetric-memory group"):
        comm.choose_allreduce("symm-mem", "cuda", 2)


# -- the engine at --tensor-parallel-size 2 ------------------------------------------------------


def _wait_phase(engine: AsyncEngine, phase: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while engine.phase != phase and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.phase == phase, (engine.phase, engine.error)


def _start(path, **overrides) -> AsyncEngine:
    kwargs = dict(model=str(path), device="cpu", max_num_seqs=4, max_model_len=128,
                  max_num_batched_tokens=32)  # fmt: skip
    kwargs.update(overrides)
    engine = AsyncEngine(EngineConfig(**kwargs))
    engine.start()
    assert engine.ready.wait(120), f"not ready: {engine.phase} {engine.error}"
    return engine


async def _greedy(engine, prompts=PROMPTS, max_tokens=MAX_TOKENS) -> list[list[int]]:
    """The prompts at once (mixed steps, prompt chunks, then a shrinking decode batch)."""

    async def one(prompt, n):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return [t async for out in engine.generate(f"tp-{next(_ids)}", prompt, params)
                for t in out.token_ids]  # fmt: skip

    return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, max_tokens, strict=True)))


def _one_process_tokens(path) -> list[list[int]]:
    engine = _start(path)
    try:
        return asyncio.run(_greedy(engine))
    finally:
        engine.shutdown()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_two_ranks_give_the_one_process_greedy_tokens(checkpoints, arch):
    path, expected = checkpoints(arch)
    engine = _start(path, tensor_parallel_size=2)
    launcher = engine._core.runner.tp
    try:
        assert asyncio.run(_greedy(engine)) == expected
        report = engine.graph_report()["tensor_parallel"]
        assert report["world_size"] == 2 and [r["alive"] for r in report["ranks"]] == [True] * 2
        assert report["allreduce"] == "nccl"  # auto, off CUDA
    finally:
        engine.shutdown()
    assert [w["returncode"] for w in launcher.describe()] == [0]  # stopped in order


async def _staggered(engine) -> list[list[int]]:
    """A long decode first; the other prompts arrive once it is decoding, so they are
    prefilled beside its decode row, a few tokens per mixed step."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    stream = engine.generate(f"tp-{next(_ids)}", PROMPTS[0], params)
    first = await stream.__anext__()
    later = asyncio.gather(*(
        _collect(engine, p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        for p, n in zip(PROMPTS[1:], MAX_TOKENS[1:], strict=True)
    ))  # fmt: skip
    tokens = first.token_ids + [t async for out in stream for t in out.token_ids]
    return [tokens] + [[t for out in outs for t in out.token_ids] for outs in await later]


def test_two_ranks_match_one_process_with_the_decode_prefill_cap(checkpoints):
    """`--decode-prefill-tokens 4`: prompts trickle in over many mixed steps beside a running
    decode row (carried on the device), on both ranks alike."""
    path, _ = checkpoints("qwen3")
    results = []
    for world in (1, 2):
        engine = _start(path, tensor_parallel_size=world, decode_prefill_tokens=4)
        try:
            results.append(asyncio.run(_staggered(engine)))
            steps = engine._core.scheduler.steps
        finally:
            engine.shutdown()
        assert steps["mixed"] >= 10
    assert results[0] == results[1]
    assert [len(t) for t in results[0]] == [24, *MAX_TOKENS[1:]]


SURFACE_SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                   "b": {"enum": ["x", "y"]}},
    "required": ["a", "b"], "additionalProperties": False,
}  # fmt: skip


def _surface_params() -> list[SamplingParams]:
    from server.structured.grammar import json_schema_grammar

    return [
        SamplingParams(n=2, temperature=0.9, seed=11, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, repetition_penalty=1.3,
                       frequency_penalty=0.5, presence_penalty=0.4,
                       logit_bias={17: 5.0, 23: -100.0}),
        SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, prompt_logprobs=2,
                       min_tokens=4),
        SamplingParams(temperature=0.7, seed=5, max_tokens=40,
                       grammar=json_schema_grammar(SURFACE_SCHEMA)),
    ]  # fmt: skip


async def _surface(engine) -> list[dict]:
    """Every choice's tokens, finish reason and logprobs, for requests that use the whole
    sampling surface at once (the constrained row splits its steps into forward and draw)."""

    async def one(prompt, params):
        choices: dict[int, dict] = {}
        async for out in engine.generate(f"tp-{next(_ids)}", prompt, params):
            c = choices.setdefault(out.index, {"tokens": [], "lps": [], "prompt": None})
            c["tokens"] += out.token_ids
            c["lps"] += [(lp.logprob, lp.top) for lp in out.logprobs or []]
            if out.prompt_logprobs is not None:
                c["prompt"] = [None if e is None else (e.logprob, e.top)
                               for e in out.prompt_logprobs]
            if out.finished:
                c["reason"] = out.finish_reason
        return choices

    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1][:20], PROMPTS[2]]
    return await asyncio.gather(*(one(p, sp) for p, sp in
                                  zip(prompts, _surface_params(), strict=True)))  # fmt: skip


def _same_logprobs(a, b) -> None:
    assert (a is None) == (b is None)
    for x, y in zip(a or [], b or [], strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert x[0] == pytest.approx(y[0], abs=1e-4)
            assert [t for t, _ in x[1]] == [t for t, _ in y[1]]


def test_two_ranks_match_one_process_on_the_openai_surface(checkpoints):
    path, _ = checkpoints("llama")
    runs = []
    for world in (1, 2):
        engine = _start(path, tensor_parallel_size=world)
        try:
            runs.append(asyncio.run(_surface(engine)))
        finally:
            engine.shutdown()
    one, two = runs
    assert [sorted(r) for r in one] == [[0, 1], [0], [0], [0]]
    assert one[3][0]["reason"] in ("stop", "length") and one[2][0]["prompt"][0] is None
    for ra, rb in zip(one, two, strict=True):
        for j in ra:
            a, b = ra[j], rb[j]
            assert a["tokens"] == b["tokens"] and a["reason"] == b["reason"]
            _same_logprobs(a["lps"], b["lps"])
            _same_logprobs(a["prompt"], b["prompt"])


def test_a_host_failure_between_forward_and_draw_keeps_the_ranks_in_step(checkpoints,
                                                                          monkeypatch):
    """The draw raises on rank 0 after the worker ran the step's forward: the worker still
    gets the step's token broadcast (`ModelRunner.settle`), only that step's requests fail,
    and the next requests get the one-process tokens."""
    import server.model_runner as model_runner

    path, expected = checkpoints("llama")
    engine = _start(path, tensor_parallel_size=2)
    real = model_runner.process_and_sample
    calls = itertools.count()

    def flaky(*args, **kwargs):
        if next(calls) == 3:
            raise RuntimeError("injected draw failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(model_runner, "process_and_sample", flaky)
    try:
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        outs = asyncio.run(_collect(engine, PROMPTS[0], params))
        assert outs[-1].finish_reason == "error" and "injected draw failure" in outs[-1].error
        assert engine.phase == "ready" and engine._core.step_errors == 1
        assert asyncio.run(_greedy(engine)) == expected
    finally:
        engine.shutdown()


def test_lazy_capture_under_traffic_is_agreed_by_every_rank(checkpoints, monkeypatch):
    """CPU-emulated graphs, traffic from the first step: the busy-time captures happen on both
    ranks at the same step boundaries; the worker's injected failure of size 2 fails it for
    both, and the output is the one-process output throughout."""
    path, expected = checkpoints("llama")
    monkeypatch.setenv("GRAPHSERVE_EMULATE_GRAPHS", "1")
    monkeypatch.setenv("GRAPHSERVE_TP_TEST_FAULT", "capture:2")
    engine = _start(path, tensor_parallel_size=2, graph_capture="lazy", capture_min_interval_ms=0,
                    capture_budget_ms=10_000, idle_debounce_ms=60_000)  # fmt: skip
    try:
        assert engine.graph_report()["coverage"]["captured"] == 1  # the largest, before ready
        assert asyncio.run(_greedy(engine)) == expected
        report = engine.graph_report()
    finally:
        engine.shutdown()
    states = {s["size"]: s for s in report["sizes"]}
    assert states[4]["state"] == "captured" and states[4]["captured_in"] == "startup"
    # The batch shrinks 3 -> 2 -> 1 as requests finish: sizes 2 and 1 are demanded while busy.
    assert states[1]["state"] == "captured" and states[1]["captured_in"] == "busy"
    assert states[2]["state"] == "failed"
    assert "rank 1: RuntimeError: injected capture fault for size 2" in states[2]["error"]
    assert [(r["rank"], r["ok"]) for r in states[2]["ranks"]] == [(0, True), (1, False)]
    assert report["traffic"]["eager_steps"] == 0
    ranks = report["tensor_parallel"]["ranks"]
    assert ranks[0]["captured"] == [1, 2, 4] and ranks[1]["captured"] == [1, 4]
    assert list(ranks[1]["failed"]) == ["2"]


def test_mixed_step_graphs_are_agreed_by_every_rank(checkpoints, monkeypatch):
    """CPU-emulated graphs, `eager` capture: both mixed-step buckets (16 and 32 tokens) are
    ordered on both ranks before ready; the worker's injected failure of bucket 16 fails it
    for both, so its steps run packed and eagerly on every rank while bucket 32 replays; the
    output is the one-process output throughout."""
    path, expected = checkpoints("llama")
    monkeypatch.setenv("GRAPHSERVE_EMULATE_GRAPHS", "1")
    monkeypatch.setenv("GRAPHSERVE_TP_TEST_FAULT", "capture:-16")  # negative: a mixed bucket
    engine = _start(path, tensor_parallel_size=2, graph_capture="eager")
    try:
        mixed = engine.graph_report()["mixed"]
        assert mixed["packing"] and [s["tokens"] for s in mixed["sizes"]] == [16, 32]
        states = {s["tokens"]: s for s in mixed["sizes"]}
        assert states[32]["state"] == "captured" and states[16]["state"] == "failed"
        assert "rank 1: RuntimeError: injected capture fault for size -16" in states[16]["error"]
        assert asyncio.run(_greedy(engine)) == expected
        # Two short prompts at once: a 6-token step, bucket 16 (failed: packed, eagerly).
        short = asyncio.run(_greedy(engine, SHORT, [8, 8]))
        traffic = engine.graph_report()["mixed"]["traffic"]
    finally:
        engine.shutdown()
    assert traffic["graph_steps"] >= 1 and traffic["eager_by_reason"]["not_captured"] >= 1
    one = _start(path)
    try:
        assert short == asyncio.run(_greedy(one, SHORT, [8, 8]))
    finally:
        one.shutdown()


SHORT = [[5, 6, 7, 8], [9, 10]]


def test_a_worker_that_cannot_load_fails_the_start(checkpoints, monkeypatch):
    path, _ = checkpoints("llama")
    monkeypatch.setenv("GRAPHSERVE_TP_TEST_FAULT", "load")
    engine = AsyncEngine(EngineConfig(model=str(path), device="cpu", tensor_parallel_size=2))
    engine.start()
    _wait_phase(engine, "failed", 120)
    assert "tensor-parallel rank 1" in engine.error
    assert "injected load fault" in engine.error
    engine._thread.join(30)
    assert not engine._thread.is_alive()


def test_a_worker_dying_mid_step_fails_the_requests_and_the_engine(checkpoints, monkeypatch):
    """Rank 1 exits while decoding: rank 0's next collective or message to it fails, every
    request ends with an error naming the rank, the engine reports `failed` and its thread
    ends, within the deadline, not a hang."""
    path, _ = checkpoints("llama")
    monkeypatch.setenv("GRAPHSERVE_TP_TEST_FAULT", "exit_at_step:6")
    engine = _start(path, tensor_parallel_size=2, tp_timeout_s=20)
    t0 = time.monotonic()

    async def run():
        params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
        return await asyncio.gather(*(
            _collect(engine, prompt, params) for prompt in PROMPTS[:2]
        ))  # fmt: skip

    for outs in asyncio.run(run()):
        assert outs[-1].finished and outs[-1].finish_reason == "error"
        assert "tensor-parallel rank 1" in outs[-1].error
    _wait_phase(engine, "failed", 30)
    assert "tensor-parallel rank 1" in engine.error and "exited with code 9" in engine.error
    engine._thread.join(30)
    assert not engine._thread.is_alive() and time.monotonic() - t0 < 60


async def _collect(engine, prompt, params):
    return [out async for out in engine.generate(f"tp-{next(_ids)}", prompt, params)]


# -- the server process ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_server_serves_with_two_ranks_and_exits_nonzero_when_one_dies(checkpoints):
    path, _ = checkpoints("llama")
    with ServerProcess("--model", str(path), "--device", "cpu", "--tensor-parallel-size", "2",
                       "--max-num-seqs", "2", "--max-model-len", "128",
                       "--startup-failure-grace", "0.5") as server:  # fmt: skip
        server.wait_phase("ready", timeout=120)
        r = server.client.post("/v1/completions", json={
            "model": path.name, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0,
        })  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        tp = server.client.get("/health/graphs").json()["tensor_parallel"]
        assert [r["rank"] for r in tp["ranks"]] == [0, 1]
        # Rank 0 is the engine process, under the HTTP process (server.engine_process).
        assert descendants(server.proc.pid, b"server.engine_host") == [tp["ranks"][0]["pid"]]
        # Each process paused collection from its start to its ready freeze (server.gc_control):
        # the HTTP process and both ranks.
        assert server.log.count("collection on again") == 3, server.log
        worker = tp["ranks"][1]["pid"]
        os.kill(worker, signal.SIGKILL)
        body = server.wait_phase("failed", timeout=30)
        assert f"tensor-parallel rank 1 (pid {worker}) was killed by signal 9" in body["reason"]
        assert server.wait_exit(60) == 1
        with pytest.raises(httpx.TransportError):
            httpx.get(server.base_url + "/health", timeout=1)
    assert not alive(worker)


def test_a_new_group_waits_for_the_previous_groups_teardown(monkeypatch):
    """NCCL's orderly teardown took 10-20 s on the H200 pair, past the 10 s a shutdown waits:
    a second engine in the process must wait for it rather than fail with "default process
    group initialized twice", and a teardown that never ends is an error, not a hang."""
    from server.distributed import comm

    up = {"group": True}
    monkeypatch.setattr(comm.dist, "is_initialized", lambda: up["group"])
    finish = threading.Event()

    def slow_destroy(abort=False):
        finish.wait(5)
        up["group"] = False

    monkeypatch.setattr(comm, "destroy_group", slow_destroy)
    assert comm.leave_group(False, wait_s=0.05) is False  # still tearing down
    threading.Timer(0.2, finish.set).start()
    t0 = time.monotonic()
    comm._wait_for_previous_group(5.0)
    assert not up["group"] and 0.1 < time.monotonic() - t0 < 4

    up["group"] = True
    stuck = threading.Event()
    monkeypatch.setattr(comm, "destroy_group", lambda abort=False: stuck.wait(5))
    assert comm.leave_group(False, wait_s=0.01) is False
    with pytest.raises(RuntimeError, match="has not shut down yet"):
        comm._wait_for_previous_group(0.1)
    stuck.set()
