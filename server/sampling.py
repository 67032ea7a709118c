"""Batched token sampling: greedy, temperature, top-k, top-p, with per-request seeds.

Randomness comes from a counter-based hash of (request key, output step, token id) rather than
a stateful generator: each request draws from its own stream, the same seed gives the same
tokens whatever else shares the batch, and there is no generator object to keep per request.
Sampling uses the Gumbel-max trick — `argmax(logits / T + Gumbel noise)` is an exact draw from
`softmax(logits / T)` — so a batch needs one argmax, no multinomial and no host round-trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.seeds import MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit values (the tensor twin
    of `server.seeds.fmix32`, which folds request seeds to keys on the host).

    Products may wrap the int64 range; two's-complement wrapping keeps the low 32 bits right.
    """
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def uniform_noise(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """`[n, vocab]` uniforms in (0, 1) from per-row keys and step counters (int64 `[n]`)."""
    idx = torch.arange(vocab, device=keys.device, dtype=torch.int64)[None, :]
    row = _fmix32((keys ^ ((steps * 0x9E3779B1) & MASK32)) & MASK32)[:, None]
    bits = _fmix32(row ^ ((idx * 0x85EBCA77) & MASK32))
    # 24 random bits → a float32 strictly inside (0, 1).
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list (or a list of equal-length rows) as a device tensor, without waiting.

    `torch.tensor(values, device="cuda")` copies from pageable memory and synchronises the
    stream, which would stall the engine until the previous decode step has finished; a pinned
    staging tensor and a non-blocking copy keep the host ahead of the device.

    Rows of a 2-D result start on 16-byte boundaries (each padded to a multiple of 16 bytes and
    sliced back): Triton specialises kernels on pointer alignment, so a row view at an odd
    offset would compile a second variant of every kernel it reaches, in the middle of serving.
    """
    if values and isinstance(values[0], list):
        width = len(values[0])
        per_16 = 16 // torch.empty((), dtype=dtype).element_size()
        padded = -(-width // per_16) * per_16
        if padded != width:
            fill = [0] * (padded - width)
            values = [row + fill for row in values]
        return _stage(values, dtype, device)[:, :width]
    return _stage(values, dtype, device)


def _stage(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


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
    floats = to_device([batch.temperatures, batch.top_ps], torch.float32, device)
    temps = floats[0]
    greedy_rows = temps == 0.0
    scaled = logits / torch.where(greedy_rows, 1.0, temps)[:, None]

    top_ks = [k if 0 < k < vocab else 0 for k in batch.top_ks]
    ints = to_device([batch.keys, batch.steps, top_ks], torch.int64, device)
    keys, steps = ints[0], ints[1]
    if any(k > 0 for k in top_ks) or any(p < 1.0 for p in batch.top_ps):
        scaled = _filter_top_k_top_p(scaled, ints[2], floats[1])

    gumbel = -torch.log(-torch.log(uniform_noise(keys, steps, vocab)))
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(greedy_rows, greedy_tokens, sampled)


def _filter_top_k_top_p(
    scaled: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor
) -> torch.Tensor:
    """Set logits outside each row's top-k (0: off) and top-p (nucleus) set to -inf."""
    device = scaled.device
    vocab = scaled.shape[1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    ks = torch.where(top_ks > 0, top_ks, vocab)[:, None]
    remove = ranks >= ks
    ps = top_ps[:, None]
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    # Drop a token when the mass strictly before it already reaches top_p; the first token
    # always stays, so every row keeps at least one candidate.
    mass_before = probs.cumsum(dim=-1) - probs
    # top_p == 1 is "off": in fp32 the mass before a tail token of a peaked row can round up
    # to 1.0, which would drop it and make the row's draws depend on its batch neighbours.
    remove |= (mass_before >= ps) & (ps < 1.0)
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)
