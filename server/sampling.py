"""Batched token sampling: greedy, temperature, top-k, top-p, with per-request seeds.

Randomness comes from a counter-based hash of (request seed, output step, token id) rather than
a stateful generator: each request draws from its own stream, the same seed gives the same
tokens whatever else shares the batch, and there is no generator object to keep per request.
Sampling uses the Gumbel-max trick — `argmax(logits / T + Gumbel noise)` is an exact draw from
`softmax(logits / T)` — so a batch needs one argmax, no multinomial and no host round-trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit values.

    Products may wrap the int64 range; two's-complement wrapping keeps the low 32 bits right.
    """
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def seed_to_key(seed: int) -> int:
    """Fold a 64-bit seed (any int) to the 32-bit key the noise hash takes."""
    seed &= (1 << 64) - 1
    key = 0
    for part in (seed & _MASK32, seed >> 32):
        key = _fmix32_int(key ^ part ^ 0x9E3779B9)
    return key


def _fmix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """`[n, vocab]` uniforms in (0, 1) from per-row keys and step counters (int64 `[n]`)."""
    idx = torch.arange(vocab, device=keys.device, dtype=torch.int64)[None, :]
    row = _fmix32((keys ^ ((steps * 0x9E3779B1) & _MASK32)) & _MASK32)[:, None]
    bits = _fmix32(row ^ ((idx * 0x85EBCA77) & _MASK32))
    # 24 random bits → a float32 strictly inside (0, 1).
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step, as host lists (rows in batch order)."""

    temperatures: list[float]
    top_ps: list[float]
    top_ks: list[int]
    keys: list[int]  # seed_to_key(request seed)
    steps: list[int]  # number of tokens the request has generated so far

    @property
    def all_greedy(self) -> bool:
        return all(t == 0.0 for t in self.temperatures)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Choose one token per row of `logits` `[n, vocab]`; returns int64 `[n]` on the device."""
    logits = logits.float()
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_tokens
    device = logits.device
    n, vocab = logits.shape
    temps = torch.tensor(batch.temperatures, device=device, dtype=torch.float32)
    greedy_rows = temps == 0.0
    scaled = logits / torch.where(greedy_rows, 1.0, temps)[:, None]

    top_ks = [k if 0 < k < vocab else 0 for k in batch.top_ks]
    if any(k > 0 for k in top_ks) or any(p < 1.0 for p in batch.top_ps):
        scaled = _filter_top_k_top_p(scaled, top_ks, batch.top_ps)

    keys = torch.tensor(batch.keys, device=device, dtype=torch.int64)
    steps = torch.tensor(batch.steps, device=device, dtype=torch.int64)
    gumbel = -torch.log(-torch.log(uniform_noise(keys, steps, vocab)))
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(greedy_rows, greedy_tokens, sampled)


def _filter_top_k_top_p(
    scaled: torch.Tensor, top_ks: list[int], top_ps: list[float]
) -> torch.Tensor:
    """Set logits outside each row's top-k and top-p (nucleus) set to -inf."""
    device = scaled.device
    vocab = scaled.shape[1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    ks = torch.tensor([k if k > 0 else vocab for k in top_ks], device=device)[:, None]
    remove = ranks >= ks
    ps = torch.tensor(top_ps, device=device, dtype=torch.float32)[:, None]
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    # Drop a token when the mass strictly before it already reaches top_p; the first token
    # always stays, so every row keeps at least one candidate.
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= ps
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)
