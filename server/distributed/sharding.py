"""Which slice of each weight a tensor-parallel rank holds, and how it is read.

Megatron-style: q/k/v and gate/up are split by output rows (whole heads, whole intermediate
columns), o_proj and down by input columns, so each rank's attention and MLP run on its own
heads and intermediate slice and a single all-reduce per projection pair restores the full
hidden state. The embedding and the LM head are split by vocabulary rows: the embedding
lookup masks ids outside the rank's rows and all-reduces, the LM head's slices are gathered.
Norms are replicated; biases follow their matrix's rows, and a bias added after a reduction
(o_proj, down) is held by rank 0 only, so it is added once.

Each rank reads only its slice when the weight source can (`take_part`, safetensors slices);
otherwise the whole tensor is taken and the slice copied out, one tensor at a time.

Torch-free at import (tensors come in and go out): rank 0 checks that a model splits before it
has imported torch (`check_divisible`), while the workers start.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import StartupError


@dataclass(frozen=True)
class TPShard:
    """Rank `rank` of `world` tensor-parallel ranks (`TPShard(0, 1)`: the whole model)."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world - 1}")

    def part(self, total: int) -> tuple[int, int]:
        """This rank's `[start, stop)` of `total` items split evenly (the caller checked that
        `world` divides `total`)."""
        size = total // self.world
        return self.rank * size, (self.rank + 1) * size

    def vocab_rows(self, vocab: int) -> tuple[int, int, int]:
        """`(start, stop, rows)` of the vocabulary this rank holds: `rows` = ceil(vocab /
        world) on every rank, the last rank's slice padded with zero rows beyond `stop`."""
        rows = -(-vocab // self.world)
        start = min(self.rank * rows, vocab)
        return start, min(start + rows, vocab), rows


def check_divisible(config, world: int) -> None:
    """Raise StartupError unless `world` ranks can split this model's heads and MLP evenly."""
    if world == 1:
        return
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    inter = config.intermediate_size
    flag = f"--tensor-parallel-size {world}"
    if kv_heads % world:
        raise StartupError(
            f"{flag} does not divide the model's {kv_heads} KV heads (each rank holds whole KV "
            f"heads); use a size that divides {kv_heads}"
        )
    if heads % world:
        raise StartupError(f"{flag} does not divide the model's {heads} attention heads")
    if inter % world:
        raise StartupError(f"{flag} does not divide the model's intermediate size {inter}")


def take_sharded(weights, name: str, shape: tuple[int, ...], dim: int, start: int, stop: int):
    """The slice `[start, stop)` along `dim` of tensor `name` (full shape `shape`), dense.

    Reads only the slice when the source offers `take_part`; otherwise takes the whole tensor
    and copies the slice out, so the full tensor is freed when this returns.
    """
    if start == 0 and stop == shape[dim]:
        return weights.take(name, shape)
    take_part = getattr(weights, "take_part", None)
    if take_part is not None:
        return take_part(name, shape, dim, start, stop)
    part = weights.take(name, shape).narrow(dim, start, stop - start)
    # A copy either way, so the full tensor's storage is freed on return.
    return part.clone() if part.is_contiguous() else part.contiguous()


def pad_rows(tensor, rows: int):
    """`tensor` with zero rows appended up to `rows` (the last rank's vocabulary slice)."""
    if tensor.shape[0] == rows:
        return tensor
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return padded
