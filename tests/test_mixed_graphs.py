"""Mixed-step graphs on CPU: the bucket policy, the packed form against the unpacked forward,
and engines whose mixed steps replay (CPU-emulated) graphs giving HF's greedy tokens.

The real CUDA graphs are exercised by `tests/test_gpu.py` (`gpu` marker)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch

from server.config import EngineConfig
from server.mixed_graph_policy import EAGER_REASONS, MixedGraphPolicy, mixed_graph_sizes
from server.model import DecoderModel
from server.model_loader import load_checkpoint
from server.request import SamplingParams
from server.scheduler import prefill_depth_unit
from server.step_executor import StepExecutor
from server.step_plan import StepPlan
from tests.helpers.tiny_models import ARCHITECTURES, build_checkpoint, hf_greedy, hf_reference
from tests.test_engine import collect, start_engine, tokens_of

# -- the policy (pure Python) -------------------------------------------------------------------


def test_bucket_sizes():
    # CUDA defaults: 64 rows + 256 prompt tokens within a 2048-token step.
    assert mixed_graph_sizes(64, 256, 2048) == [16, 32, 48, 64, *range(96, 321, 32)]
    assert mixed_graph_sizes(64, 600, 2048) == [16, 32, 48, 64, *range(96, 513, 32), 576,
                                                640, 672]  # fmt: skip
    assert mixed_graph_sizes(3, 256, 12) == [16]  # rounded up to 16
    assert mixed_graph_sizes(64, 512, 100) == [16, 32, 48, 64, 96, 112]


def _policy(mode="lazy", clock=None, **kw) -> MixedGraphPolicy:
    return MixedGraphPolicy([16, 64, 256], mode, max_seqs=8, idle_debounce_s=0.5,
                            clock=clock or time.monotonic, **kw)  # fmt: skip


def _eager_counts(policy) -> dict:
    return policy.snapshot()["traffic"]["eager_by_reason"]


def test_select_picks_the_smallest_bucket_captured_or_not():
    p = _policy()
    assert p.select(10, 3, False, 100) == -16  # not captured: packed, eagerly
    assert p.select(17, 2, False, 0) == -64
    p.begin(64)
    p.succeeded(64, 0.01, 1 << 20)
    assert p.select(17, 2, False, 0) == 64  # replayed
    traffic = p.snapshot()["traffic"]
    assert traffic["graph_steps"] == 1 and traffic["eager_by_reason"]["not_captured"] == 2


@pytest.mark.parametrize("args, reason", [
    ((257, 3, False, 10), "too_many_tokens"),
    ((100, 9, False, 10), "too_many_tokens"),  # more sequences than a bucket holds
    ((100, 3, True, 10), "prompt_logprobs"),
    ((100, 3, False, 16385), "long_context"),
])  # fmt: skip
def test_steps_that_keep_the_unpacked_forward(args, reason):
    p = _policy()
    assert p.select(*args) == 0
    assert _eager_counts(p)[reason] == 1 and set(_eager_counts(p)) == set(EAGER_REASONS)


def test_no_packing_without_cuda_or_under_tensor_parallelism():
    p = _policy(disabled_reason="tensor parallelism: mixed steps run eagerly")
    assert not p.packing and p.select(10, 2, False, 5) == 0
    assert _eager_counts(p)["off"] == 1
    assert p.startup_plan() == [] and p.next_capture(True, True) is None
    assert p.idle_wait_s() is None


def test_capture_off_still_packs():
    """`--graph-capture off`: nothing is captured, steps still run packed (same numbers as a
    server that captures)."""
    p = _policy(mode="off")
    assert p.packing and not p.capturing_allowed
    assert p.select(10, 2, False, 5) == -16
    assert p.startup_plan() == [] and p.next_capture(True, True) is None


def test_eager_mode_captures_every_bucket_before_ready_largest_first():
    assert _policy(mode="eager").startup_plan() == [256, 64, 16]
    assert _policy(mode="lazy").startup_plan() == []


def test_lazy_capture_waits_for_idle_time_and_the_decode_sizes():
    now = [100.0]
    p = _policy(clock=lambda: now[0])
    assert p.next_capture(idle=True, decode_settled=False) is None  # decode sizes first
    assert p.next_capture(idle=True, decode_settled=True) is None  # the debounce starts
    assert p.idle_wait_s() == pytest.approx(0.5)
    now[0] += 0.6
    assert p.next_capture(idle=True, decode_settled=True) == 256  # largest first
    p.begin(256)
    p.failed(256, "RuntimeError: injected")
    assert p.next_capture(idle=True, decode_settled=True) == 64
    p.begin(64)
    p.succeeded(64, 0.02, 1 << 20)
    p.on_arrival()  # a request: idle capture stops, the debounce restarts
    assert p.next_capture(idle=True, decode_settled=True) is None
    assert p.next_capture(idle=False, decode_settled=True) is None
    now[0] += 0.6
    assert p.next_capture(idle=True, decode_settled=True) is None  # idle again: restarted
    now[0] += 0.6
    assert p.next_capture(idle=True, decode_settled=True) == 16
    p.begin(16)
    p.succeeded(16, 0.02, 1 << 20)
    assert p.next_capture(idle=True, decode_settled=True) is None and p.idle_wait_s() is None
    # The failed bucket is never retried; its steps run packed, eagerly.
    assert p.select(200, 4, False, 10) == -256
    snap = p.snapshot()
    assert [s["state"] for s in snap["sizes"]] == ["captured", "captured", "failed"]
    assert "injected" in snap["sizes"][2]["error"]
    assert snap["coverage"] == {"captured": 2, "total": 3}
    with pytest.raises(RuntimeError):
        p.begin(256)


def test_disable_stops_capture_and_keeps_packing():
    p = _policy()
    p.disable("the largest decode capture failed")
    assert p.next_capture(True, True) is None and p.packing
    assert p.snapshot()["capture"] == "off"
    assert p.select(10, 2, False, 5) == -16


# -- the packed form against the unpacked forward ---------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_step_equals_the_unpacked_forward(arch, tmp_path):
    """One mixed plan (two decode rows, two prompt chunks, one of them a continuation) run
    unpacked and packed at a wider bucket (padding tokens and sequences): the same logits."""
    path = build_checkpoint(tmp_path, arch)
    model = load_checkpoint(str(path), "cpu", "float32").model
    model.init_rope(256)
    ex = StepExecutor.build(model, 64, 16, 256, 4, emulate=True, tensor_parallel=False,
                            mixed_tokens=64)  # fmt: skip
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(2, 300, (n,), generator=g).tolist()

    # Rows 0..3 own blocks 1-8, 9-16, ...; fill rows 0, 1 (decode later) and 3's first chunk.
    ex.block_tables[:4, :8] = torch.arange(1, 33, dtype=torch.int32).view(4, 8)
    setup = StepPlan(
        ids=ids(20) + ids(9) + ids(30), src=[-1] * 59,
        positions=[*range(20), *range(9), *range(30)], rows=[0] * 20 + [1] * 9 + [3] * 30,
        num_decode=0, num_sampled=0, logit_rows=[19, 28, 58], seq_rows=[0, 1, 3],
        cu_seqlens=[0, 20, 29, 59], k_lens=[20, 9, 30], max_q_len=30,
    )  # fmt: skip
    ex.execute(setup, None)
    step = StepPlan(
        ids=ids(2) + ids(7) + ids(12), src=[-1] * 21,
        positions=[20, 9, *range(7), *range(30, 42)], rows=[0, 1] + [2] * 7 + [3] * 12,
        num_decode=2, num_sampled=4, logit_rows=[0, 1, 8, 20], seq_rows=[2, 3],
        cu_seqlens=[0, 7, 19], k_lens=[7, 42], max_q_len=12,
    )  # fmt: skip
    unpacked = ex.execute(step, None).clone()
    for bucket in (-32, -64):  # packed, eagerly
        packed = ex.execute(StepPlan(**{**step.__dict__, "graph": bucket}), None)
        torch.testing.assert_close(packed, unpacked, rtol=1e-4, atol=1e-4)
        assert torch.equal(packed.argmax(-1), unpacked.argmax(-1))


# -- engines with CPU-emulated graphs ----------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("llama-mixed"), "llama")


@pytest.fixture(scope="module")
def reference(llama_dir):
    return hf_reference(llama_dir)


async def _stream_beside_long_prompt(engine):
    """A stream decoding while a 60-token prompt is prefilled in chunks beside it."""
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    first = asyncio.ensure_future(collect(engine, [5, 6, 7], params))
    while engine._core.scheduler.steps["decode"] < 2:
        await asyncio.sleep(0.001)
    long_prompt = [(3 * i) % 390 + 2 for i in range(60)]
    second = await collect(engine, long_prompt,
                           SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    return tokens_of(await first), tokens_of(second), long_prompt


@pytest.mark.parametrize("mode", ["eager", "lazy", "off"])
async def test_mixed_steps_give_hf_greedy_tokens_in_every_capture_mode(
        llama_dir, reference, monkeypatch, mode):  # fmt: skip
    monkeypatch.setenv("GRAPHSERVE_EMULATE_GRAPHS", "1")
    engine = start_engine(llama_dir, max_num_batched_tokens=40, decode_prefill_tokens=11,
                          graph_capture=mode, idle_debounce_ms=10)  # fmt: skip
    try:
        mixed = engine.graph_report()["mixed"]
        assert mixed["packing"] and [s["tokens"] for s in mixed["sizes"]] == [16]
        assert mixed["sizes"][0]["state"] == ("captured" if mode == "eager" else "pending")
        if mode == "lazy":  # idle time after the decode sizes captures the bucket
            deadline = time.monotonic() + 30
            while engine.graph_report()["mixed"]["coverage"]["captured"] < 1:
                assert time.monotonic() < deadline, engine.graph_report()["mixed"]
                await asyncio.sleep(0.01)
            assert engine.graph_report()["complete"]  # the decode sizes came first
        first, second, long_prompt = await _stream_beside_long_prompt(engine)
        traffic = engine.graph_report()["mixed"]["traffic"]
    finally:
        engine.shutdown()
    assert first == hf_greedy(reference, [5, 6, 7], 30)
    assert second == hf_greedy(reference, long_prompt, 4)
    # Beside the decode row, the 60-token prompt goes in chunks of at most 11: bucket 16.
    packed = traffic["graph_steps"] + traffic["eager_by_reason"]["not_captured"]
    assert packed >= 60 // 11
    assert traffic["graph_steps"] == (0 if mode == "off" else packed), traffic


async def test_prompt_logprobs_keep_the_unpacked_forward(llama_dir, reference, monkeypatch):
    monkeypatch.setenv("GRAPHSERVE_EMULATE_GRAPHS", "1")
    engine = start_engine(llama_dir, graph_capture="eager")
    try:
        params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
        outs = await collect(engine, [4, 8, 15, 16, 23, 42], params)
        plain = await collect(engine, [4, 8, 15, 16, 23, 41],
                              SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        traffic = engine.graph_report()["mixed"]["traffic"]
    finally:
        engine.shutdown()
    assert tokens_of(outs) == hf_greedy(reference, [4, 8, 15, 16, 23, 42], 5)
    assert tokens_of(plain) == hf_greedy(reference, [4, 8, 15, 16, 23, 41], 5)
    assert traffic["eager_by_reason"]["prompt_logprobs"] == 1 and traffic["graph_steps"] == 1


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_startup_warms_the_gemms_of_every_row_count_a_graph_runs(llama_dir, monkeypatch, mode):
    """cuBLAS's first call at a row count holds every thread for ~2 steps (docs/benchmarks.md
    8n); recorded first on the capture thread while serving, it delayed running streams.
    Startup makes that call, before ready, at each decode size and mixed-step bucket."""
    monkeypatch.setenv("GRAPHSERVE_EMULATE_GRAPHS", "1")
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(DecoderModel, "warm_gemms",
                        lambda self, rows, logits_rows: calls.append((rows, logits_rows)))
    engine = start_engine(llama_dir, max_num_batched_tokens=40, decode_prefill_tokens=11,
                          graph_capture=mode)  # fmt: skip
    try:
        report = engine.graph_report()
        max_seqs = engine._core.runner.max_num_seqs
    finally:
        engine.shutdown()
    decode = {s["size"] for s in report["sizes"]}
    buckets = {s["tokens"] for s in report["mixed"]["sizes"]}
    assert buckets and decode
    assert [rows for rows, _ in calls] == sorted(decode | buckets)  # once each
    assert {logits for _, logits in calls} == {max_seqs}


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_only_a_lazy_server_instantiates_its_first_graph_ahead(llama_dir, monkeypatch, mode):
    """Under lazy capture the graphs after the first are instantiated while serving; one of
    them once took 7-10 ms of the driver, holding every launch (docs/benchmarks.md, 8o), so a
    lazy server instantiates its first graph more times before ready. An eager server
    instantiates all of them before ready anyway. Without a CUDA driver it does nothing."""
    from server.graph_runner import throwaway_instantiations

    monkeypatch.setenv("GRAPHSERVE_EMULATE_GRAPHS", "1")
    engine = start_engine(llama_dir, graph_capture=mode)
    try:
        assert engine._core.runner.graphs.throwaways is (mode == "lazy")
    finally:
        engine.shutdown()
    monkeypatch.setattr("server.graph_runner.load_driver", lambda: None)
    assert throwaway_instantiations(object(), 14) == []


@pytest.mark.parametrize("fail_at", [None, 3])
def test_throwaway_executables_all_live_until_the_last_then_all_destroyed(monkeypatch, fail_at):
    """What 8o measured: every executable alive at once, then each destroyed; a driver error
    stops early (a warning, never a failed capture) and still destroys what was made."""
    from server import graph_runner

    events: list[tuple[str, int]] = []

    class FakeDriver:
        made = 0

        def cuGraphInstantiateWithFlags(self, ref, raw, flags):
            assert raw.value == 0xABC and flags.value == 1
            if self.made == fail_at:
                return 700  # CUDA_ERROR_ILLEGAL_ADDRESS
            self.made += 1
            ref._obj.value = 1000 + self.made
            events.append(("make", ref._obj.value))
            return 0

        def cuGraphExecDestroy(self, handle):
            events.append(("destroy", handle.value))

    class Graph:
        def raw_cuda_graph(self):
            return 0xABC

    monkeypatch.setattr(graph_runner, "load_driver", FakeDriver)
    times = graph_runner.throwaway_instantiations(Graph(), 5)
    made = 5 if fail_at is None else fail_at
    assert len(times) == made
    handles = [1001 + i for i in range(made)]
    assert events == [("make", h) for h in handles] + [("destroy", h) for h in handles]


@pytest.mark.parametrize("mode", ["eager", "off"])
def test_cpu_without_emulation_never_packs(llama_dir, mode):
    """No CUDA device: mixed steps stay unpacked (padding to a bucket would cost real compute
    on a CPU), whatever the capture mode."""
    engine = start_engine(llama_dir, graph_capture=mode)
    try:
        mixed = engine.graph_report()["mixed"]
        assert mixed["packing"] is False and "no CUDA device" in mixed["reason"]
    finally:
        engine.shutdown()


def test_no_mixed_graphs_flag(llama_dir, monkeypatch):
    monkeypatch.setenv("GRAPHSERVE_EMULATE_GRAPHS", "1")
    assert EngineConfig().mixed_graphs is True
    engine = start_engine(llama_dir, graph_capture="eager", mixed_graphs=False)
    try:
        mixed = engine.graph_report()["mixed"]
        assert mixed["packing"] is False and "--no-mixed-graphs" in mixed["reason"]
    finally:
        engine.shutdown()


def test_the_kv_plan_reserves_the_mixed_graph_pool(monkeypatch):
    """On CUDA the KV pool fills the budget less a reserve; with mixed-step graphs the reserve
    holds their private pool (3x the largest bucket's activations) and logits buffer too."""
    from server import kv_cache
    from server.hf_config import ModelConfig

    hf = ModelConfig(dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                          num_key_value_heads=8, num_hidden_layers=32, vocab_size=128256,
                          max_position_embeddings=8192))  # fmt: skip
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (80 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 16 * 2**30)

    def blocks(tokens):
        plan = kv_cache.plan_kv_cache(EngineConfig(), hf, torch.bfloat16, torch.device("cuda"),
                                      64, 2048, 16 * 10**9, mixed_graph_tokens=tokens)
        return plan.num_blocks

    per_block = 2 * 32 * 8 * 128 * 2 * 16
    reserved = 3 * 320 * (5 * 4096 + 6144 + 3 * 14336) * 2 + 64 * 128256 * 2
    assert blocks(0) - blocks(320) == pytest.approx(reserved / per_block, abs=1)


def test_the_depth_unit_follows_the_model_shape():
    """Linear FLOPs per token over attention FLOPs per key, over the H200-fitted slowdown: the
    8B's unit is what bench.decode's depth grid fitted (~6,400); a wider model's is larger; a
    rank's shard (heads and MLP divided alike) keeps the whole model's unit."""

    def shape(h, heads, kv, d, inter):
        return SimpleNamespace(hidden_size=h, num_heads=heads, num_kv_heads=kv, head_dim=d,
                               intermediate_size=inter)

    llama8b = prefill_depth_unit(shape(4096, 32, 8, 128, 14336))
    assert 6200 <= llama8b <= 6500
    assert prefill_depth_unit(shape(8192, 64, 8, 128, 28672)) > llama8b > prefill_depth_unit(
        shape(2048, 32, 8, 64, 8192))
    assert prefill_depth_unit(shape(4096, 16, 4, 128, 7168)) == llama8b  # TP=2 rank
