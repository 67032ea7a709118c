"""CUDA tests: bf16 correctness vs HF, graph replay vs eager, capture policies, and the paged KV
cache (block sizes, preemption, prefix caching, chunked prefill) on a real GPU.

Run on the GPU machine (`pytest -m gpu`); they skip without CUDA.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import torch

from server.request import RequestOutput, SamplingParams
from tests.helpers.gpu_engine import GPU_SHAPE, mixed_prompts, run_batch, start
from tests.helpers.tiny_models import build_checkpoint

pytestmark = pytest.mark.gpu

_ids = itertools.count()


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory):
    return build_checkpoint(
        tmp_path_factory.mktemp("gpu-llama"), "llama", seed=7, init_std=0.05, **GPU_SHAPE
    )


@pytest.fixture(scope="module")
def separated_model_dir(tmp_path_factory):
    """Larger weights: logits with wide top-2 gaps, so parity tests compare scheduling paths,
    not which side of a bf16 near-tie a differently shaped GEMM happens to round to."""
    return build_checkpoint(tmp_path_factory.mktemp("gpu-llama-wide"), "llama", seed=7, **GPU_SHAPE)


# -- correctness vs HF in bf16 -----------------------------------------------------------------


def _hf(model_dir, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    return model.cuda().eval()


def _full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids], device="cuda"), use_cache=False).logits[0].float()


async def test_bf16_greedy_matches_hf_forward(gpu_model_dir):
    """Greedy tokens vs HF's full-sequence forward, teacher-forced on our output.

    bf16 rounds differently in an incremental, batched decode than in one full-sequence pass,
    so where the top two logits are closer than bf16 noise either token is a correct greedy
    choice. The noise is measured, not guessed: HF's own bf16 forward against its fp32 forward
    on the same tokens. Every token we emit must be the fp32 argmax or within 2x that noise of
    it, and nearly all must be HF bf16's exact argmax.
    """
    engine = start(gpu_model_dir)
    try:
        prompts = mixed_prompts()
        outs = await run_batch(engine, prompts, max_tokens=32)
    finally:
        engine.shutdown()
    ref32, ref16 = _hf(gpu_model_dir, torch.float32), _hf(gpu_model_dir, torch.bfloat16)
    exact = total = 0
    for prompt, toks in zip(prompts, outs, strict=True):
        span = slice(len(prompt) - 1, len(prompt) - 1 + len(toks))
        l32 = _full_logits(ref32, prompt + toks)[span]
        l16 = _full_logits(ref16, prompt + toks)[span]
        noise = (l16 - l32).abs().max(dim=-1).values
        ours = torch.tensor(toks, device="cuda")[:, None]
        gap = l32.max(dim=-1).values - l32.gather(1, ours)[:, 0]
        assert bool((gap <= 2 * noise + 1e-3).all()), f"gaps {gap.tolist()} noise {noise.tolist()}"
        exact += int((l16.argmax(-1) == ours[:, 0]).sum())
        total += len(toks)
    assert exact >= 0.9 * total, f"only {exact}/{total} tokens are HF bf16's exact argmax"


def _scattered_table(rows: int, width: int, num_blocks: int, seed: int) -> torch.Tensor:
    """A `[rows + 1, width]` int32 block table on the GPU: each row lists its own blocks in
    scattered order (no block in two rows); the last row is the scratch row (block 0)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.zeros(rows + 1, width, dtype=torch.int32)
    perm = torch.randperm(num_blocks - 1, generator=g)[: rows * width] + 1
    table[:rows] = perm.view(rows, width).to(torch.int32)
    return table.cuda()


def test_model_logits_match_hf_in_bf16(gpu_model_dir):
    """Our bf16 logits are as close to the fp32 truth as HF's own bf16 forward is: a prompt
    prefilled in two chunks through forward(StepBatch) over scattered blocks (the second chunk
    reads the first one's keys through the table), then decoded in a batch padded with the
    scratch row."""
    from server import ops
    from server.kv_cache import allocate_kv_cache
    from server.model import StepBatch
    from server.model_loader import load_checkpoint

    ops.use_triton(True)
    ckpt = load_checkpoint(str(gpu_model_dir), "cuda", "bfloat16")
    model = ckpt.model
    model.init_rope(256)
    block_size, num_blocks = 16, 40
    kv = allocate_kv_cache(model.shape, num_blocks, block_size, torch.bfloat16, "cuda")
    table = _scattered_table(2, 256 // block_size, num_blocks, seed=3)
    row, scratch = 1, 2
    ids = torch.randint(2, 400, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    l32 = _full_logits(_hf(gpu_model_dir, torch.float32), ids)
    l16 = _full_logits(_hf(gpu_model_dir, torch.bfloat16), ids)

    def check(logits, t):
        ours = (logits.float() - l32[t]).norm() / l32[t].norm()
        hf = (l16[t] - l32[t]).norm() / l32[t].norm()
        assert ours <= 2 * hf + 2e-3, f"position {t}: ours {ours:.3g} vs HF bf16 {hf:.3g}"

    def cuda(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device="cuda")

    for first, length in ((0, 25), (25, 15)):  # chunk edges inside blocks
        batch = StepBatch(
            input_ids=cuda(ids[first : first + length]),
            positions=torch.arange(first, first + length, device="cuda"),
            rows=torch.full((length,), row, dtype=torch.int64, device="cuda"),
            logit_rows=cuda([length - 1]),
            num_decode=0,
            seq_rows=cuda([row]),
            cu_seqlens_q=cuda([0, length], torch.int32),
            k_lens=cuda([first + length], torch.int32),
            max_q_len=length,
        )
        logits = model.forward(batch, kv, table)
        assert logits.shape == (1, 400)
        check(logits[0], first + length - 1)
    out = torch.empty(2, 400, dtype=torch.bfloat16, device="cuda")
    for t in range(40, 60):
        model.decode(cuda([ids[t], 0]), cuda([t, 0]), cuda([row, scratch]), kv, table, out)
        check(out[0], t)


# -- graphs ------------------------------------------------------------------------------------

RUNNER_MAX_LEN = 512  # table width * block size


def _runner(model_dir, sizes, mode="eager", block_size=16):
    """A DecodeGraphRunner over a paged cache of random K/V and a table of scattered blocks
    (one row per batch slot, then the scratch row)."""
    from server import ops
    from server.graph_runner import DecodeGraphRunner
    from server.graph_warmup import CapturePolicy
    from server.kv_cache import allocate_kv_cache
    from server.model_loader import load_checkpoint

    ops.use_triton(True)
    ckpt = load_checkpoint(str(model_dir), "cuda", "bfloat16")
    model = ckpt.model
    model.init_rope(RUNNER_MAX_LEN)
    max_n = max(sizes)
    width = RUNNER_MAX_LEN // block_size
    num_blocks = 1 + max_n * width + 7  # a few blocks no row lists
    kv = allocate_kv_cache(model.shape, num_blocks, block_size, torch.bfloat16, "cuda")
    for k, v in kv:
        k.normal_()
        v.normal_()
    table = _scattered_table(max_n, width, num_blocks, seed=0)
    policy = CapturePolicy(sizes, mode)
    runner = DecodeGraphRunner(model, kv, table, max_n, scratch_row=max_n)
    runner.throwaways = True  # as a lazy server on one GPU: the first graph is kept, then
    # instantiated after throwaway executables (graph_runner.throwaway_instantiations)
    # As ModelRunner does: warm at the largest size and at 1, then capture the policy's plan.
    for n in sorted({max_n, 1}, reverse=True):
        runner.warm(n)
    torch.cuda.synchronize()
    for size in policy.startup_plan():
        policy.begin(size)
        result = runner.capture(size)
        assert result.ok, result.error
        policy.succeeded(size, result.seconds, result.pool_bytes)
    policy.mark_ready()
    return runner, policy


def test_graph_replay_equals_eager_for_every_size(gpu_model_dir):
    sizes = [1, 2, 4, 8, 16, 24, 32]
    runner, policy = _runner(gpu_model_dir, sizes)
    assert policy.complete and sorted(runner.graphs) == sizes
    g = torch.Generator().manual_seed(0)
    for n in list(range(1, 33)):
        ids = torch.randint(2, 400, (n,), generator=g).tolist()
        positions = torch.randint(0, RUNNER_MAX_LEN, (n,), generator=g).tolist()
        rows = torch.randperm(32, generator=g)[:n].tolist()  # distinct rows: distinct blocks
        graph_logits = runner.run(ids, positions, rows, size=policy.select(n).size).clone()
        runner.inputs[0, :n] = torch.tensor(ids)
        runner.inputs[1, :n] = torch.tensor(positions)
        runner.inputs[2, :n] = torch.tensor(rows)
        runner._decode_static(n)  # the same step, eagerly, exact size
        eager_logits = runner.logits[:n].clone()
        assert not torch.isnan(graph_logits).any()
        if n in sizes:
            assert torch.equal(graph_logits, eager_logits), f"size {n}: replay differs from eager"
        else:  # padded: other GEMM shapes may round differently; same greedy token
            torch.testing.assert_close(
                graph_logits.float(), eager_logits.float(), rtol=2e-2, atol=2e-2
            )
            assert torch.equal(graph_logits.argmax(-1), eager_logits.argmax(-1))


def test_pdl_changes_no_bit_of_a_graph_step(gpu_model_dir):
    """Programmatic dependent launch (`server.pdl`) only moves when a kernel's blocks start:
    graphs captured with it replay to the logits the same graphs captured without it give, bit
    for bit, at every captured size and padded into them, over many replays (a kernel touching
    memory before its wait, or a release that let a kernel overtake its predecessor, would race
    and show here)."""
    from server import pdl

    if not pdl.enabled():
        pytest.skip("PDL needs compute capability 9.0+ and Triton's griddepcontrol")
    sizes = [1, 8, 32]
    runners = {}
    try:
        for on in (False, True):
            pdl.set_enabled(on)
            torch.manual_seed(0)  # the same random K/V in both caches
            runners[on] = _runner(gpu_model_dir, sizes)[0]
    finally:
        pdl.set_enabled(None)
    g = torch.Generator().manual_seed(1)
    for n in (1, 3, 8, 17, 32):
        ids = torch.randint(2, 400, (n,), generator=g).tolist()
        positions = torch.randint(0, RUNNER_MAX_LEN, (n,), generator=g).tolist()
        rows = torch.randperm(32, generator=g)[:n].tolist()
        size = min(s for s in sizes if s >= n)
        off = runners[False].run(ids, positions, rows, size=size).clone()
        for _ in range(20):
            on = runners[True].run(ids, positions, rows, size=size)
            assert torch.equal(on, off), f"batch {n} (graph {size}): PDL changed the logits"


def test_graph_pool_reading_ignores_eager_memory_and_stays_within_the_estimate(gpu_model_dir):
    """The pool reading is the graph pool's own segments: memory eager steps leave cached
    outside it between captures (busy-time captures under traffic) does not count. The
    `/health/graphs` estimate made when only the largest graph exists bounds the pool once
    every size is captured that way, and the pool stays within 1.2x its first size."""
    from server.graph_runner import segment_bytes_of_pool

    sizes = [1, 2, 4, 8, 16, 24, 32]
    runner, policy = _runner(gpu_model_dir, sizes, mode="lazy")
    assert sorted(runner.graphs) == [32]
    first = runner.pool_bytes()
    estimate = policy.snapshot()["memory"]["estimate_full_bytes"]
    assert first > 0 and estimate >= first
    for size in sorted(set(sizes) - {32}, reverse=True):
        cached = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        del cached  # stays reserved by the allocator, outside the graph pool
        runner.warm(size)  # an eager step between two captures, as serving runs them
        torch.cuda.synchronize()
        policy.begin(size)
        result = runner.capture(size)
        assert result.ok, result.error
        policy.succeeded(size, result.seconds, result.pool_bytes)
    final = runner.pool_bytes()
    grown = torch.cuda.memory_reserved() - runner._reserved_before
    assert grown >= final + 64 * 2**20  # the old reading would have counted the cached block
    assert final == segment_bytes_of_pool(runner._pool, torch.device("cuda"))
    assert final <= estimate, (final, estimate)
    assert final <= 1.2 * first, (final, first)
    assert policy.snapshot()["pool_bytes_total"] == final


async def test_lazy_eager_off_give_identical_greedy_output(separated_model_dir):
    prompts = mixed_prompts(13, seed=11)
    results = {}
    for mode in ("off", "eager", "lazy"):
        engine = start(separated_model_dir, graph_capture=mode, idle_debounce_ms=10_000)
        try:
            results[mode] = await run_batch(engine, prompts)
            report = engine.graph_report()
        finally:
            engine.shutdown()
        if mode == "eager":
            assert report["coverage"]["ratio"] == 1.0
        if mode == "off":
            assert report["traffic"]["exact_steps"] + report["traffic"]["padded_steps"] == 0
    assert results["lazy"] == results["off"]
    assert results["eager"] == results["off"]


async def test_capture_failure_mid_serving_keeps_serving(separated_model_dir):
    """A capture that fails while serving marks its size failed; steps of that size run on the
    next larger graph and the output does not change. In float32: the reference runs batch 4
    eagerly, the failed run pads it to graph 8, and cuBLAS rounds an M=4 and an M=8 GEMM
    differently; in bf16 that flips near-tied greedy picks of these random weights."""
    reference_engine = start(separated_model_dir, graph_capture="off", dtype="float32")
    prompts = mixed_prompts(4, seed=21)  # a batch of 4: exact size 4 gets demand
    try:
        expected = await run_batch(reference_engine, prompts, max_tokens=40)
    finally:
        reference_engine.shutdown()

    engine = start(
        separated_model_dir,
        dtype="float32",
        graph_capture="lazy",
        capture_min_interval_ms=0,
        capture_budget_ms=10_000,
        idle_debounce_ms=60_000,
    )
    failures = []

    def inject(size):
        if size == 4:
            failures.append(size)
            raise RuntimeError("injected capture fault")

    engine._core.runner.graphs.fault_injector = inject
    try:
        got = await run_batch(engine, prompts, max_tokens=40)
        report = engine.graph_report()
        again = await run_batch(engine, prompts, max_tokens=40)
    finally:
        engine.shutdown()
    states = {s["size"]: s for s in report["sizes"]}
    assert failures == [4]
    assert states[4]["state"] == "failed" and "injected" in states[4]["error"]
    assert states[16]["state"] == "captured"
    assert not torch.cuda.is_current_stream_capturing()
    assert got == expected and again == expected


async def test_idle_time_captures_everything_without_requests(gpu_model_dir):
    # The default pool (it fills the memory budget), as a server starts.
    engine = start(gpu_model_dir, graph_capture="lazy", idle_debounce_ms=50, num_kv_blocks=None)
    try:
        report = engine.graph_report()
        assert report["coverage"]["captured"] == 1  # only the largest before ready
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not engine.graph_report()["complete"]:
            await asyncio.sleep(0.05)
        report = engine.graph_report()
        assert report["complete"] and report["coverage"]["ratio"] == 1.0
        assert {s["state"] for s in report["sizes"]} == {"captured"}
        # Then the mixed-step buckets, in idle time too.
        while time.monotonic() < deadline and engine.graph_report()["mixed"]["coverage"][
                "captured"] < len(report["mixed"]["sizes"]):  # fmt: skip
            await asyncio.sleep(0.05)
        mixed = engine.graph_report()["mixed"]
        assert {s["state"] for s in mixed["sizes"]} == {"captured"}, mixed
        # Serving afterwards runs on exact graphs only.
        await run_batch(engine, mixed_prompts(3), max_tokens=8)
        traffic = engine.graph_report()["traffic"]
        assert traffic["eager_steps"] == 0
    finally:
        engine.shutdown()


async def test_mixed_step_graphs_give_the_same_tokens(separated_model_dir):
    """Prompts chunked beside running streams (a 64-token step budget: mixed steps in buckets
    16/32/48/64). Replayed mixed-step graphs (eager capture) and the same packed steps run eagerly
    (capture off) compute the same numbers: equal tokens in bf16. The unpacked forward
    (`mixed_graphs=False`: decode kernel for the decode rows) sums in another order: equal
    greedy tokens in float32."""
    prompts = mixed_prompts(13, seed=17)
    results, reports = {}, {}
    runs = {
        "graphs": dict(graph_capture="eager"),
        "packed_eager": dict(graph_capture="off"),
        "graphs_fp32": dict(graph_capture="eager", dtype="float32"),
        "unpacked_fp32": dict(graph_capture="eager", dtype="float32", mixed_graphs=False),
    }
    for name, overrides in runs.items():
        engine = start(separated_model_dir, max_num_batched_tokens=64, **overrides)
        try:
            results[name] = await run_batch(engine, prompts, max_tokens=32)
            reports[name] = engine.graph_report()["mixed"]
        finally:
            engine.shutdown()
    assert [s["tokens"] for s in reports["graphs"]["sizes"]] == [16, 32, 48, 64]
    assert reports["graphs"]["coverage"]["captured"] == 4
    assert reports["graphs"]["traffic"]["graph_steps"] >= 5, reports["graphs"]
    assert reports["packed_eager"]["traffic"]["graph_steps"] == 0
    assert reports["packed_eager"]["traffic"]["eager_by_reason"]["not_captured"] >= 5
    assert reports["unpacked_fp32"]["packing"] is False
    assert results["graphs"] == results["packed_eager"]
    assert results["graphs_fp32"] == results["unpacked_fp32"]


# -- paged KV cache at engine level ------------------------------------------------------------


@pytest.fixture(scope="module")
def long_context_model_dir(tmp_path_factory):
    """separated_model_dir's weights with a 4096-token context (the others stop at 1024)."""
    shape = dict(GPU_SHAPE, max_position_embeddings=4096)
    return build_checkpoint(tmp_path_factory.mktemp("gpu-llama-4k"), "llama", seed=7, **shape)


async def generate(engine, prompt, max_tokens) -> tuple[list[int], RequestOutput]:
    """Greedy tokens of one request, and its final output."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    toks, last = [], None
    async for out in engine.generate(f"g{next(_ids)}", prompt, params):
        toks += out.token_ids
        last = out
    assert last is not None and last.finished and last.finish_reason == "length", last
    return toks, last


async def test_block_size_and_preemption_keep_greedy_output(separated_model_dir):
    """Blocks of 16 or 128 tokens give the same greedy tokens (the kernels walk the context in
    the same tiles whatever the block size), and so does a pool so small that sequences are
    preempted and recomputed. One max_model_len throughout: the table width times the block
    size sets the decode split count; every graph is captured up front, so both runs pick the
    same graph for every step. Float32: a recomputed sequence is prefilled in other chunk
    shapes than its first pass (other kernels and tiles), a legitimate bf16 rounding change
    that flips the near-tied picks of random weights; the scheduling is what is under test."""
    prompts = mixed_prompts(12, seed=31)
    configs = {
        "bs16": dict(block_size=16, num_kv_blocks=1 + 16 * 16),  # every sequence at full length
        "bs128": dict(block_size=128, num_kv_blocks=1 + 16 * 2),
        # 19 blocks of 16 tokens for 12 sequences of up to 89 + 40 tokens (9 blocks) each.
        "preempt": dict(block_size=16, num_kv_blocks=20),
    }
    results, stats = {}, {}
    for name, overrides in configs.items():
        engine = start(separated_model_dir, max_model_len=256, graph_capture="eager",
                       dtype="float32", **overrides)
        try:
            results[name] = await run_batch(engine, prompts, max_tokens=40)
            stats[name] = engine.stats()
            report = engine.graph_report()
        finally:
            engine.shutdown()
        assert report["kv_cache"]["block_size"] == overrides["block_size"], name
        assert stats[name]["kv_blocks_used"] == 0 and stats[name]["running"] == 0, name
    assert stats["bs16"]["preemptions"] == 0 and stats["bs128"]["preemptions"] == 0
    assert stats["preempt"]["preemptions"] >= 1
    assert all(len(toks) == 40 for toks in results["bs16"])
    assert results["bs128"] == results["bs16"]
    assert results["preempt"] == results["bs16"]


async def test_prefix_cache_hit_gives_the_same_output(separated_model_dir):
    """A request served from the prefix cache (only its last tokens prefilled, reading the
    cached blocks) gives the tokens its cold run gave, and reports the cached tokens in its
    final output. One request at a time, so both runs decode alike. Float32: the hit's short
    chunk runs the per-query-head prefill kernel and the cold run the GQA-packed one; in bf16
    their different summation order flipped the first token of the 300-token prompt, whose
    top-2 logits are 0.25 apart in bf16 (HF in float32 picks the per-head side, 17)."""
    g = torch.Generator().manual_seed(41)
    prompts = [torch.randint(2, 400, (n,), generator=g).tolist() for n in (100, 300)]
    engine = start(separated_model_dir, block_size=16, num_kv_blocks=1 + 16 * 32,
                   graph_capture="eager", dtype="float32")  # fmt: skip
    try:
        misses = [await generate(engine, p, 24) for p in prompts]
        before = engine.stats()["prefix_hit_tokens"]
        hits = [await generate(engine, p, 24) for p in prompts]
        hit_tokens = engine.stats()["prefix_hit_tokens"] - before
    finally:
        engine.shutdown()
    for prompt, (miss, miss_out), (hit, hit_out) in zip(prompts, misses, hits, strict=True):
        assert miss_out.cached_tokens == 0
        # Every full block but the one holding the last prompt token (its logits are needed).
        assert hit_out.cached_tokens == (len(prompt) - 1) // 16 * 16
        assert hit == miss, f"prompt of {len(prompt)} tokens: cache hit {hit} != miss {miss}"
    assert hit_tokens == 96 + 288


async def test_chunked_prefill_gives_the_same_tokens(long_context_model_dir):
    """A 3000-token prompt prefilled in chunks of 512 (each chunk attending to the earlier ones
    through the cache) gives the greedy tokens of one 3000-token chunk. Float32: a 512-token
    chunk's deep query blocks split their keys (split-KV, merged by log-sum-exp) where the one
    3000-token chunk's do not, a legitimate rounding change that flipped a bf16 near-tie a few
    tokens in (H200, 2026-11-30); the chunking and the cache reads are what is under test."""
    prompt = torch.randint(2, 400, (3000,), generator=torch.Generator().manual_seed(51)).tolist()
    results, mixed = {}, {}
    for budget in (512, 4096):
        engine = start(long_context_model_dir, max_model_len=4096, block_size=16,
                       num_kv_blocks=1 + 2 * 4096 // 16, max_num_batched_tokens=budget,
                       graph_capture="eager", dtype="float32")
        try:
            before = engine.stats()["mixed_steps"]
            results[budget], _ = await generate(engine, prompt, 16)
            mixed[budget] = engine.stats()["mixed_steps"] - before
        finally:
            engine.shutdown()
    assert mixed == {512: 6, 4096: 1}  # ceil(3000 / 512) chunks, or one
    assert results[512] == results[4096]


# -- weights read before torch (server.early_weights) -----------------------------------------


def _bf16_copy(src, dst):
    """`src`'s checkpoint with its safetensors rewritten in bf16 (the early path's case)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f),
                  metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_early_weights_equal_the_pipelines(tmp_path, arch):
    """Every tensor the model holds (fused q/k/v with biases, gate/up, norms, embedding, head)
    is bit-identical whether the driver-API reader or the pipeline read it; the fused parts are
    views of the reader's buffer, which the KV planner is told about."""
    from server import early_weights
    from server.model_loader import load_checkpoint

    model_dir = _bf16_copy(build_checkpoint(tmp_path / "fp32", arch, seed=3, **GPU_SHAPE),
                           tmp_path / "bf16")  # fmt: skip
    piped = load_checkpoint(str(model_dir), "cuda", "bfloat16").model
    assert piped.external_weight_bytes == 0
    reader = early_weights.start(str(model_dir), "bfloat16")
    assert reader is not None
    early = load_checkpoint(str(model_dir), "cuda", "bfloat16").model
    assert early.external_weight_bytes == reader.nbytes > 0
    assert reader.stats.bytes_read == reader.stats.bytes_planned
    a, b = list(piped._tensors()), list(early._tensors())
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    qkv = early.layers[1].qkv
    assert reader.base <= qkv.data_ptr() < reader.base + reader.nbytes  # a view, not a copy


async def test_engine_on_early_weights_gives_the_pipelines_tokens(separated_model_dir, tmp_path):
    """The server path: a bf16 checkpoint is read by the engine thread before torch is imported
    (one GPU); its greedy tokens equal those of the same weights through the pipeline (the fp32
    checkpoint served in bf16 rounds to the same values)."""
    bf16_dir = _bf16_copy(separated_model_dir, tmp_path / "bf16")
    prompts = mixed_prompts(6, seed=11)
    piped = start(separated_model_dir, dtype="bfloat16")
    try:
        assert piped._core.runner.model.external_weight_bytes == 0
        want = await run_batch(piped, prompts)
    finally:
        piped.shutdown()
    early = start(bf16_dir)
    try:
        assert early._core.runner.model.external_weight_bytes > 0
        assert await run_batch(early, prompts) == want
    finally:
        early.shutdown()
