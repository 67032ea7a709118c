"""Where each tensor of a safetensors checkpoint lies on disk, and the order the model takes them.

Torch-free on purpose: the page-cache prefetcher (`server.prefetch`) reads the same headers on
the engine thread before torch is imported, and the weight pipeline (`server.weight_pipeline`)
reuses them afterwards.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping each
tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the data
section, which starts at 8 + N), and the data. `read_header` validates what the readers rely
on: every tensor's byte range lies inside the file and matches its dtype and shape, so a read
can never run past the end or into a neighbour, and a truncated file is reported when it is
opened rather than as a short read later.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from server.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors itself refuses larger headers; a bigger length means a corrupt or foreign file.
_MAX_HEADER_BYTES = 100 * 2**20

# safetensors dtype -> (bytes per element, torch dtype attribute name or None if torch has none).
DTYPES: dict[str, tuple[int, str | None]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F32": (4, "float32"),
    "F64": (8, "float64"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's location: bytes `[start, end)` of `path` (absolute file offsets)."""

    name: str
    path: Path
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def file(self) -> str:
        return self.path.name


def checkpoint_files(model_dir: Path) -> list[str]:
    """File names of the checkpoint's safetensors files: the shards of the index, or the one file.

    Raises ModelLoadError naming the index or the directory when they cannot be used.
    """
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{index}: malformed shard index: {exc}") from exc
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise ModelLoadError(f"{index}: shard file(s) {', '.join(missing)} not found")
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise ModelLoadError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, validated; raises ModelLoadError naming the file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            raw = f.read(n)
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_start = 8 + n
        data_len = size - data_start
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entries[name] = _entry(path, name, info, data_start, data_len)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read safetensors file: {exc}") from exc
    return entries


def _entry(path: Path, name: str, info, data_start: int, data_len: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise ValueError(f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise ValueError(f"tensor {name!r}: dtype {dtype!r} is not a string")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r}: bad data_offsets {offsets!r}")
    begin, end = offsets
    if end > data_len:
        raise ValueError(
            f"tensor {name!r} ends at byte {end} of the data but the file holds {data_len} "
            "(truncated?)"
        )
    if dtype in DTYPES and end - begin != math.prod(shape) * DTYPES[dtype][0]:
        raise ValueError(
            f"tensor {name!r}: {end - begin} bytes do not hold shape {shape} of {dtype}"
        )
    return TensorEntry(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_checkpoint(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint in `model_dir`; a name in two files keeps its first file
    (in sorted file order, as the safetensors-based loader did)."""
    where: dict[str, TensorEntry] = {}
    for file in checkpoint_files(model_dir):
        for name, entry in read_header(model_dir / file).items():
            where.setdefault(name, entry)
    return where


# -- the order DecoderModel takes tensors in -----------------------------------------------------

# Within a layer, the order of `DecoderModel._take_layer` (server/model.py): reading in this
# order lets the model fuse and free each layer's parts while later layers are still arriving.
LAYER_TENSORS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.gate_proj.bias",
    "mlp.up_proj.bias",
    "input_layernorm.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "self_attn.o_proj.weight",
    "self_attn.o_proj.bias",
    "post_attention_layernorm.weight",
    "mlp.down_proj.weight",
    "mlp.down_proj.bias",
)
_LAYER_RANK = {suffix: i for i, suffix in enumerate(LAYER_TENSORS)}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
_TOP = {"model.embed_tokens.weight": 0, "model.norm.weight": 2, "lm_head.weight": 3}


def load_order_key(name: str) -> tuple[int, int, int, str]:
    """Sort key: the embedding, then layer by layer in the model's take order, the final norm,
    the LM head; names the model never takes sort last."""
    if name in _TOP:
        return (_TOP[name], 0, 0, name)
    m = _LAYER_NAME.fullmatch(name)
    if m is not None:
        return (1, int(m.group(1)), _LAYER_RANK.get(m.group(2), len(_LAYER_RANK)), name)
    return (4, 0, 0, name)


def is_model_tensor(name: str) -> bool:
    """True for names `DecoderModel` may take (whether a given config takes them or not)."""
    if name in _TOP:
        return True
    m = _LAYER_NAME.fullmatch(name)
    return m is not None and m.group(2) in _LAYER_RANK


def check_shape(entry: TensorEntry, shape: tuple[int, ...]) -> None:
    """ModelLoadError unless the checkpoint's tensor has the shape config.json implies (both
    weight sources check before reading into it)."""
    if tuple(entry.shape) != tuple(shape):
        raise ModelLoadError(
            f"{entry.path}: tensor {entry.name!r} has shape {list(entry.shape)}, expected "
            f"{list(shape)} from config.json"
        )


def load_plan(entries: dict[str, TensorEntry], exclude: frozenset[str] = frozenset()
              ) -> list[TensorEntry]:
    """The tensors worth reading ahead, in the order the model takes them.

    Names the model never takes (vision towers, `rotary_emb.inv_freq`, the `exclude` set such
    as a tied `lm_head.weight`) are left out: they would be read only to be freed. They can
    still be taken on demand.
    """
    names = [n for n in entries if is_model_tensor(n) and n not in exclude]
    return [entries[n] for n in sorted(names, key=load_order_key)]
