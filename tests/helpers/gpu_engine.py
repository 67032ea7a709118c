"""Engines on the GPU for the `gpu`-marked tests: start one, run a greedy batch, make prompts."""

from __future__ import annotations

import asyncio
import itertools
import time

import torch

from server.config import EngineConfig
from server.engine import AsyncEngine
from server.kv_cache import full_pool_blocks
from server.request import SamplingParams

_ids = itertools.count()
# A model big enough to run real kernels (head_dim 64, GQA 4, splits over 2 ranks) yet quick
# to build: the checkpoint shape of the GPU tests.
GPU_SHAPE = dict(
    hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=1024, vocab_size=400,
)  # fmt: skip


def start(model_dir, **overrides) -> AsyncEngine:
    """A CUDA engine on `model_dir` (16 rows, 512 tokens, sizes 1..16), ready; a startup
    failure fails the test at once with the engine's reason (`ready` is never set then).

    The KV pool holds every row at full length (`num_kv_blocks`) rather than filling the GPU:
    tests then start in a second, and run beside other processes on the same device.
    """
    kwargs = dict(model=str(model_dir), device="cuda", max_num_seqs=16, max_model_len=512,
                  cuda_graph_sizes=[1, 2, 4, 8, 16])  # fmt: skip
    kwargs.update(overrides)
    if "num_kv_blocks" not in kwargs:
        kwargs["num_kv_blocks"] = full_pool_blocks(
            kwargs["max_num_seqs"], kwargs["max_model_len"],
            kwargs.get("block_size", EngineConfig.block_size))
    engine = AsyncEngine(EngineConfig(**kwargs))
    engine.start()
    deadline = time.monotonic() + 300
    while not engine.ready.wait(0.05):
        assert engine.phase != "failed", f"engine failed to start: {engine.error}"
        assert time.monotonic() < deadline, f"engine not ready after 300 s: {engine.phase}"
    return engine


async def run_batch(engine, prompts, max_tokens=24) -> list[list[int]]:
    """Greedy tokens of every prompt, all submitted at once."""

    async def one(p):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [t async for out in engine.generate(f"g{next(_ids)}", p, params)
                for t in out.token_ids]  # fmt: skip

    return await asyncio.gather(*(one(p) for p in prompts))


def mixed_prompts(n=11, seed=5) -> list[list[int]]:
    """`n` prompts of 3..89 token ids in 2..399 (a seeded mix of lengths)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 400, (int(length),), generator=g).tolist()
            for length in torch.randint(3, 90, (n,), generator=g)]  # fmt: skip
