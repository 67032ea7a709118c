"""Per-request seeds folded to the 32-bit keys of the sampler's noise hash (pure Python).

The scheduler computes a sequence's key once, when the request is admitted; the sampler
(`server.sampling`) hashes it with the step counter on the device. Kept apart from the sampler
so the scheduler stays free of torch.
"""

from __future__ import annotations

MASK32 = 0xFFFFFFFF


def fmix32(x: int) -> int:
    """MurmurHash3's 32-bit finaliser (`server.sampling._fmix32` is its tensor twin)."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def seed_to_key(seed: int) -> int:
    """Fold a 64-bit seed (any int) to the 32-bit key the noise hash takes."""
    seed &= (1 << 64) - 1
    key = 0
    for part in (seed & MASK32, seed >> 32):
        key = fmix32(key ^ part ^ 0x9E3779B9)
    return key


def choice_key(seed: int, index: int) -> int:
    """The noise key of choice `index` of a request seeded `seed`: choice 0 draws exactly what
    a single-choice request would, the others from keys mixed with their index, so each
    choice's tokens depend only on (seed, index), never on what else is batched."""
    key = seed_to_key(seed)
    if index == 0:
        return key
    return fmix32(key ^ fmix32((index * 0x9E3779B1) & MASK32))
