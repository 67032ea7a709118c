"""server/sampling.py: greedy rows, seeded draws that do not depend on the batch, the top-k /
top-p sets, the temperature-scaled distribution, the noise hash and `to_device` (CPU).

The sampler's randomness is a pure function of (key, step, token id), so every test here is
deterministic: a fixed set of keys always gives the same draws.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from server.sampling import (
    SamplingBatch,
    _filter_top_k_top_p,
    _fmix32,
    sample,
    to_device,
    uniform_noise,
)
from server.seeds import MASK32, fmix32, seed_to_key

CPU = torch.device("cpu")


def batch(rows: list[dict]) -> SamplingBatch:
    """Rows as dicts with defaults: temperature 1, top_p 1, top_k 0, key 0, step 0."""
    return SamplingBatch(
        temperatures=[r.get("temperature", 1.0) for r in rows],
        top_ps=[r.get("top_p", 1.0) for r in rows],
        top_ks=[r.get("top_k", 0) for r in rows],
        keys=[r.get("key", 0) for r in rows],
        steps=[r.get("step", 0) for r in rows],
    )


def random_logits(n: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * scale


# ------------------------------------------------------------------ greedy
def test_all_greedy_batch_is_the_argmax():
    logits = random_logits(16, 300, seed=1)
    b = batch([{"temperature": 0.0, "key": k} for k in range(16)])
    assert b.all_greedy
    out = sample(logits, b)
    assert out.dtype == torch.int64 and out.shape == (16,)
    assert torch.equal(out, logits.argmax(-1))


def test_greedy_rows_stay_the_argmax_in_a_mixed_batch():
    logits = random_logits(8, 300, seed=2)
    rows = [
        {"temperature": 0.0 if i % 2 == 0 else 1.5, "top_k": 5 if i < 4 else 0,
         "top_p": 0.5 if i % 3 == 0 else 1.0, "key": 100 + i, "step": i}
        for i in range(8)
    ]  # fmt: skip
    b = batch(rows)
    assert not b.all_greedy
    out = sample(logits, b)
    greedy = logits.argmax(-1)
    assert torch.equal(out[0::2], greedy[0::2])
    # bf16 logits (what the model returns on the GPU) are sampled in float32: same argmax.
    half = logits.bfloat16()
    assert torch.equal(sample(half, b)[0::2], half.float().argmax(-1)[0::2])


# ------------------------------------------------------------------ seeded determinism
ROW = {"temperature": 1.0, "top_p": 0.95, "top_k": 50}


@pytest.mark.parametrize("target", [ROW, {"temperature": 0.8}], ids=["top-k-p", "plain"])
def test_a_seeded_row_draws_the_same_token_whatever_shares_the_batch(target):
    vocab = 400
    rng = random.Random(7)
    for trial in range(25):
        row_logits = random_logits(1, vocab, seed=trial, scale=2.0)
        row = {**target, "key": seed_to_key(1234 + trial), "step": trial}
        alone = sample(row_logits, batch([row])).item()
        for companions in (1, 5, 12):
            others = [
                {"temperature": rng.choice([0.0, 0.7, 1.3]), "top_p": rng.choice([1.0, 0.6]),
                 "top_k": rng.choice([0, 3, 40]), "key": rng.getrandbits(32),
                 "step": rng.randrange(100)}
                for _ in range(companions)
            ]  # fmt: skip
            pos = rng.randrange(companions + 1)
            rows = others[:pos] + [row] + others[pos:]
            logits = random_logits(companions + 1, vocab, seed=1000 + trial)
            logits[pos] = row_logits[0]
            assert sample(logits, batch(rows))[pos].item() == alone, (trial, companions, pos)


def test_key_and_step_both_select_the_draw():
    logits = torch.zeros(1, 1000)  # uniform: every draw is decided by the noise alone
    key = seed_to_key(42)
    draw = {(k, s): sample(logits, batch([{"key": k, "step": s}])).item()
            for k in (key, seed_to_key(43)) for s in range(20)}  # fmt: skip
    assert draw == {ks: sample(logits, batch([{"key": ks[0], "step": ks[1]}])).item()
                    for ks in draw}  # fmt: skip  # reproducible
    by_step = [draw[(key, s)] for s in range(20)]
    assert len(set(by_step)) >= 15  # the step counter advances the stream
    assert sum(draw[(key, s)] != draw[(seed_to_key(43), s)] for s in range(20)) >= 15


# ------------------------------------------------------------------ top-k / top-p sets
def _kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in filtered]


def _nucleus(logits: list[float], top_k: int, top_p: float) -> set[int]:
    """Reference: the top_k largest, then the smallest prefix (by probability, renormalised
    over those) whose mass before each kept token is below top_p; the first always stays."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if top_k > 0:
        order = order[:top_k]
    top = max(logits[i] for i in order)
    weights = [math.exp(logits[i] - top) for i in order]
    total = sum(weights)
    kept, mass = set(), 0.0
    for i, w in zip(order, weights, strict=True):
        if kept and mass >= top_p:
            break
        kept.add(i)
        mass += w / total
    return kept


def test_top_k_keeps_exactly_the_k_largest():
    logits = random_logits(5, 200, seed=3, scale=1.0)
    ks = [1, 2, 10, 199, 0]  # 0: off
    filtered = _filter_top_k_top_p(
        logits.clone(), torch.tensor(ks), torch.ones(5, dtype=torch.float32)
    )
    for row, k, kept in zip(logits, ks, _kept(filtered), strict=True):
        want = set(row.topk(k).indices.tolist()) if k else set(range(200))
        assert kept == want, k
    # Kept logits are untouched (only the rest becomes -inf).
    mask = torch.isfinite(filtered)
    assert torch.equal(filtered[mask], logits[mask])


def test_top_p_of_one_keeps_every_token_even_of_a_peaked_row():
    logits = random_logits(5, 200, seed=3)  # peaked: the smallest probabilities are ~1e-7
    filtered = _filter_top_k_top_p(
        logits.clone(), torch.full((5,), 199), torch.ones(5, dtype=torch.float32)
    )
    for row, kept in zip(logits, _kept(filtered), strict=True):
        assert kept == set(row.topk(199).indices.tolist())


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("top_k", [0, 7, 40])
def test_top_p_keeps_the_nucleus(top_p, top_k):
    logits = random_logits(6, 120, seed=int(top_p * 100) + top_k, scale=1.5)
    filtered = _filter_top_k_top_p(
        logits.clone(), torch.full((6,), top_k), torch.full((6,), top_p, dtype=torch.float32)
    )
    for row, kept in zip(logits.tolist(), _kept(filtered), strict=True):
        assert kept == _nucleus(row, top_k, top_p)


def test_sampled_tokens_come_from_the_kept_set_and_cover_it():
    vocab, n = 60, 3000
    row = random_logits(1, vocab, seed=4, scale=1.0)
    logits = row.expand(n, vocab).contiguous()
    for top_k, top_p in ((5, 1.0), (0, 0.5), (12, 0.7)):
        want = _nucleus(row[0].tolist(), top_k, top_p)
        rows = [{"temperature": 1.0, "top_k": top_k, "top_p": top_p, "key": seed_to_key(k)}
                for k in range(n)]  # fmt: skip
        drawn = set(sample(logits, batch(rows)).tolist())
        assert drawn == want, (top_k, top_p)


# ------------------------------------------------------------------ temperature
# Upper 0.1 % point of the chi-square distribution with 7 degrees of freedom (vocab 8).
CHI2_7_999 = 24.32


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_draws_follow_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.3, -1.0, -1.5, 0.8]])
    n = 6000
    rows = [{"temperature": temperature, "key": seed_to_key(s), "step": s % 7} for s in range(n)]
    tokens = sample(logits.expand(n, 8).contiguous(), batch(rows))
    counts = torch.bincount(tokens, minlength=8).double()
    probs = torch.softmax(logits[0].double() / temperature, -1)
    assert _chi2(counts, probs) < CHI2_7_999
    # The test has power: the same draws are far from the distribution at another temperature.
    other = torch.softmax(logits[0].double() / (temperature * 2), -1)
    assert _chi2(counts, other) > 10 * CHI2_7_999


# ------------------------------------------------------------------ the noise hash
def test_tensor_hash_is_the_twin_of_the_host_hash():
    rng = random.Random(5)
    values = [0, 1, MASK32, 0x80000000] + [rng.getrandbits(32) for _ in range(500)]
    got = _fmix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [fmix32(v) for v in values]


def test_uniform_noise_is_strictly_inside_0_1_and_flat():
    keys = torch.tensor([seed_to_key(s) for s in range(64)])
    steps = torch.arange(64)
    u = uniform_noise(keys, steps, 1000)
    assert u.shape == (64, 1000) and u.dtype == torch.float32
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    hist = torch.histc(u, bins=10, min=0.0, max=1.0)
    assert float(hist.min()) > 0.9 * u.numel() / 10
    # Deterministic, and the key and the step each change it.
    assert torch.equal(u, uniform_noise(keys, steps, 1000))
    assert not torch.equal(u[1], uniform_noise(keys[:1], steps[1:2], 1000)[0])
    assert not torch.equal(u[1], uniform_noise(keys[1:2], steps[:1], 1000)[0])


# ------------------------------------------------------------------ to_device
def test_to_device_on_cpu_keeps_values_dtype_and_shape():
    t = to_device([[1, 2, 3], [4, 5, 6]], torch.int64, CPU)
    assert t.dtype == torch.int64 and t.device == CPU and t.tolist() == [[1, 2, 3], [4, 5, 6]]
    f = to_device([0.5, 1.0], torch.float32, CPU)
    assert f.dtype == torch.float32 and f.tolist() == [0.5, 1.0]


@pytest.mark.gpu
def test_to_device_on_cuda_copies_through_pinned_memory():
    cuda = torch.device("cuda")
    t = to_device([[1, 2, 3], [4, 5, 6]], torch.int64, cuda)
    assert t.device.type == "cuda" and t.dtype == torch.int64
    assert t.tolist() == [[1, 2, 3], [4, 5, 6]]  # tolist() waits for the copy
