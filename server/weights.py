"""Named checkpoint tensors for `DecoderModel`: the weight sources and their shared interface.

Every source hands the model the same interface: `take(name, shape)` returns the tensor called
`name` (HF naming, e.g. `model.layers.0.self_attn.q_proj.weight`) on the target device in the
target dtype, checks its shape, and forgets it, so a tensor the model fuses (q/k/v, gate/up) is
freed as soon as the fused copy exists and peak memory stays near one copy of the weights;
`names()` lists what was not taken (reported as unused), `close()` releases the source.

* `server.weight_pipeline.PipelinedWeights`: the fast loader's source, parallel reads through
  pinned staging into the final tensors.
* `SafetensorsWeights`: the `safetensors` package's `safe_open`, tensor by tensor straight onto
  the device (4.3 GB/s on the H200 box). Kept as the independent reference the pipeline is
  tested against, and as the baseline of `bench/load_speed.py`.
* `StateDictWeights`: `hf_model.state_dict()` of the transformers loader.
* `DummyWeights`: random tensors for `--load-format dummy`, no file read.

A source may also offer `take_part(name, shape, dim, start, stop)`: the slice `[start, stop)`
along `dim` of the tensor of full shape `shape`, reading only that slice. Tensor-parallel ranks
load their shard through it (`server.distributed.sharding.take_sharded` falls back to `take`
and a copy of the slice for sources without it).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from pathlib import Path

import torch

from server.errors import ModelLoadError
from server.safetensors_index import checkpoint_files


class StateDictWeights:
    """Tensors from a loaded transformers model (already on the device, in the dtype)."""

    def __init__(self, tensors: dict[str, torch.Tensor], origin: str):
        self._tensors = dict(tensors)
        self._origin = origin

    def has(self, name: str) -> bool:
        return name in self._tensors

    def names(self) -> Iterable[str]:
        return list(self._tensors)

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = self._tensors.pop(name, None)
        if tensor is None:
            raise ModelLoadError(f"{self._origin}: tensor {name!r} is missing")
        _check_shape(tensor, name, shape, self._origin)
        return tensor

    def close(self) -> None:
        self._tensors.clear()


class SafetensorsWeights:
    """Tensors read lazily from a checkpoint's safetensors file(s) onto `device` as `dtype`."""

    def __init__(self, model_dir: Path, device: str, dtype: torch.dtype):
        from safetensors import SafetensorError, safe_open

        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        device = str(target)
        self._device = device
        self._dtype = dtype
        self._dir = model_dir
        files = checkpoint_files(model_dir)
        self._handles = {}
        self._where: dict[str, str] = {}  # tensor name -> file name
        for file in files:
            try:
                # safetensors materialises each tensor directly on the device it is opened for.
                handle = safe_open(str(model_dir / file), framework="pt", device=device)
                keys = list(handle.keys())
            except (OSError, SafetensorError, RuntimeError, ValueError) as exc:
                raise ModelLoadError(
                    f"{model_dir / file}: cannot read safetensors file: {exc}"
                ) from exc
            self._handles[file] = handle
            for key in keys:
                self._where.setdefault(key, file)

    def has(self, name: str) -> bool:
        return name in self._where

    def names(self) -> Iterable[str]:
        return list(self._where)

    def _consume(self, name: str) -> str:
        """The file holding `name`, which is forgotten from now on (ModelLoadError if none)."""
        file = self._where.pop(name, None)
        if file is None:
            raise ModelLoadError(
                f"{self._dir}: tensor {name!r} is missing from "
                f"{', '.join(sorted(self._handles)) or 'the safetensors files'}"
            )
        return file

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        file = self._consume(name)
        origin = str(self._dir / file)
        try:
            tensor = self._handles[file].get_tensor(name)
        except torch.OutOfMemoryError as exc:
            raise ModelLoadError(f"{origin}: out of GPU memory loading {name}: {exc}") from exc
        except Exception as exc:  # safetensors raises its own types for truncated data
            raise ModelLoadError(f"{origin}: cannot read tensor {name!r}: {exc}") from exc
        _check_shape(tensor, name, shape, origin)
        if not tensor.is_floating_point():
            raise ModelLoadError(f"{origin}: tensor {name!r} has dtype {tensor.dtype}, not float")
        return tensor.to(self._dtype)

    def take_part(
        self, name: str, shape: tuple[int, ...], dim: int, start: int, stop: int
    ) -> torch.Tensor:
        """Rows (`dim` 0) or columns (`dim` 1) `[start, stop)` of the tensor `name` of full
        shape `shape`, read without the rest of it; consumed like `take`."""
        file = self._consume(name)
        origin = str(self._dir / file)
        try:
            part = self._handles[file].get_slice(name)
            full = tuple(part.get_shape())
            if full != tuple(shape):
                raise ModelLoadError(
                    f"{origin}: tensor {name!r} has shape {list(full)}, expected {list(shape)} "
                    "from config.json"
                )
            index = tuple(slice(start, stop) if d == dim else slice(None) for d in range(len(full)))
            tensor = part[index]
        except ModelLoadError:
            raise
        except torch.OutOfMemoryError as exc:
            raise ModelLoadError(f"{origin}: out of GPU memory loading {name}: {exc}") from exc
        except Exception as exc:  # safetensors raises its own types for truncated data
            raise ModelLoadError(f"{origin}: cannot read tensor {name!r}: {exc}") from exc
        if not tensor.is_floating_point():
            raise ModelLoadError(f"{origin}: tensor {name!r} has dtype {tensor.dtype}, not float")
        # A column slice comes back as a strided view; the model wants dense matrices.
        return tensor.to(device=self._device, dtype=self._dtype).contiguous()

    def close(self) -> None:
        self._handles.clear()


class DummyWeights:
    """Random weights of whatever shape the model asks for (`--load-format dummy`).

    Nothing is read: large shapes can be served and measured from a directory holding only
    config.json and tokenizer files. Each tensor is drawn on the target device from its own
    generator, seeded from `seed` and the tensor's name, so the values do not depend on the
    order of the takes (nor on which other tensors a model variant takes), and a
    tensor-parallel rank's slice of a tensor is the same slice of what one process draws.
    Matrices and embeddings are N(0, `std`) (0.02, as HF initialises Llama), norm weights 1
    and biases 0: with RMSNorm before every projection, activations stay O(1) through any depth.
    """

    def __init__(self, device: str | torch.device, dtype: torch.dtype, seed: int = 0,
                 std: float = 0.02):
        self._device = torch.device(device)
        self._dtype = dtype
        self._seed = seed
        self._std = std
        self._taken: set[str] = set()

    def has(self, name: str) -> bool:
        return name not in self._taken

    def names(self) -> Iterable[str]:
        return []  # nothing is left over: tensors exist only when taken

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        self._taken.add(name)
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self._dtype, device=self._device)
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=self._dtype, device=self._device)
        gen = torch.Generator(device=self._device)
        gen.manual_seed((self._seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        tensor = torch.empty(shape, dtype=self._dtype, device=self._device)
        return tensor.normal_(0.0, self._std, generator=gen)

    def close(self) -> None:
        pass


def unused_tensors(weights, config) -> list[str]:
    """Tensors the model did not take, less those transformers also drops without a word."""
    tied = getattr(config, "tie_word_embeddings", False)
    return [
        name
        for name in weights.names()
        if not name.endswith("rotary_emb.inv_freq") and not (tied and name == "lm_head.weight")
    ]


def _check_shape(tensor: torch.Tensor, name: str, shape: tuple[int, ...], origin: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ModelLoadError(
            f"{origin}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)} "
            "from config.json"
        )
