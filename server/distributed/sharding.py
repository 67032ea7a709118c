"""Which slice of each weight a tensor-parallel rank holds, and how it is read.

Megatron-style: q/k/v and gate/up are split by output rows (whole heads, whole intermediate
columns), o_proj and down by input columns, so each rank's attention and MLP run on its own
heads and intermediate slice and a single all-reduce per projection pair restores the full
hidden state. The embedding and the LM head are split by vocabulary rows: the embedding
lookup masks ids outside the rank's rows and all-reduces, the LM head's slices are gathered.
Norms are replicated; biases follow their matrix's rows, and a bias added after a reduction
(o_proj, down) is held by rank 0 only, so it is added once.

Each rank reads only its slice when the weight source can (`take_part`: the weight pipeline,
told each tensor's slice up front by `planned_slice`, or safetensors' own slices); otherwise
(dummy draws, a transformers state dict) the whole tensor is taken and the slice copied out,
one tensor at a time.

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


# The layer tensors split by output rows (dim 0) and by input columns (dim 1), as
# `server.model.DecoderModel._take_layer` takes them; everything else is replicated.
_ROW_PARALLEL = frozenset(
    f"{part}.{kind}"
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                 "mlp.up_proj")
    for kind in ("weight", "bias")
)
_COL_PARALLEL = frozenset({"self_attn.o_proj.weight", "mlp.down_proj.weight"})
_VOCAB_PARALLEL = frozenset({"model.embed_tokens.weight", "lm_head.weight"})


def planned_slice(shard: TPShard, name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """`(dim, start, stop)` of tensor `name` (full shape `shape`) that `shard` takes, or None
    when it takes the whole tensor (one rank, norms, biases added after a reduction).

    The same split `DecoderModel` asks for through `take_sharded`, known before the model is
    built, so a weight source can read just these bytes ahead of the takes
    (`server.weight_pipeline.PipelinedWeights(parts=...)`); a mismatch costs a re-read, never
    a wrong tensor (tests check there is none).
    """
    if shard.world == 1 or not shape:
        return None
    if name in _VOCAB_PARALLEL:
        start, stop, _ = shard.vocab_rows(shape[0])
        dim = 0
    else:
        prefix, _, suffix = name.partition(".layers.")
        _, _, suffix = suffix.partition(".")
        if prefix != "model" or not suffix:
            return None
        if suffix in _ROW_PARALLEL:
            dim = 0
        elif suffix in _COL_PARALLEL and len(shape) == 2:
            dim = 1
        else:
            return None
        start, stop = shard.part(shape[dim])
    if start == 0 and stop == shape[dim]:
        return None
    return dim, start, stop


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
