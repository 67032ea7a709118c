"""Load a local HuggingFace checkpoint (config, safetensors weights, tokenizer) without network.

The checkpoint is read with transformers' Auto classes; `server.model.DecoderModel` then takes
over its weights. Everything that can be wrong with a model directory is reported as a
`ModelLoadError` whose message names the path and the problem, because it ends up on
`/health/ready` and in the pod log where an operator has to act on it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("graphserve.loader")

SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# RoPE variants whose cos/sin depend only on the position (so one table serves all steps).
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


class ModelLoadError(RuntimeError):
    """The model directory cannot be served; the message says why."""


@dataclass
class LoadedCheckpoint:
    """What the engine needs from a checkpoint: the HF model, its config and tokenizers."""

    path: Path
    name: str
    hf_model: object  # transformers PreTrainedModel, weights on the target device
    config: object  # transformers PretrainedConfig
    tokenizer: object  # for the engine thread (detokenisation)
    api_tokenizer: object  # a separate instance for the event-loop thread (tokenisation)
    eos_token_ids: frozenset[int]
    weight_bytes: int


def force_offline() -> None:
    """Never touch the network: there may be none, and a hub lookup would stall startup."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_model_path(model: str | None) -> Path:
    """A local directory, or the embedded default model (built on first use) when None."""
    if model is None:
        from server.default_model import ensure_default_model

        return Path(ensure_default_model())
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {str(path)!r} does not exist (graphserve loads local directories only; "
            "it never downloads)"
        )
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is not a directory")
    return path


def _check_directory(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (is this a HuggingFace model directory?)")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path}: no *.safetensors weight files found")
    has_tokenizer = any(
        (path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )
    if not has_tokenizer:
        raise ModelLoadError(f"{path}: no tokenizer files (tokenizer.json or tokenizer.model)")


def _eos_ids(config, tokenizer, path: Path) -> frozenset[int]:
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(path, local_files_only=True)
        eos = gen.eos_token_id
    except (OSError, ValueError):
        eos = None
    for source in (eos, getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    return frozenset(int(i) for i in ids)


def check_config(config, path: Path) -> None:
    """Reject architectures and options the decoder forward does not implement."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise ModelLoadError(
            f"{path}: unsupported architecture model_type={model_type!r} "
            f"(architectures={getattr(config, 'architectures', None)}); supported: {supported}"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = (
        rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    )
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{path}: rope type {rope_type!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_ROPE_TYPES))})"
        )
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise ModelLoadError(
            f"{path}: hidden_act={config.hidden_act!r} is not supported (silu only)"
        )


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def load_checkpoint(model: str | None, device: str, dtype: str, served_name: str | None = None):
    """Load config, tokenizers and weights of `model` onto `device`; raise ModelLoadError."""
    force_offline()
    path = resolve_model_path(model)
    _check_directory(path)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: config.json cannot be read: {exc}") from exc
    check_config(config, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        api_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path}: tokenizer cannot be loaded: {exc}") from exc

    torch_dtype = resolve_dtype(dtype, device)
    # With accelerate installed, transformers writes weights straight into device memory;
    # without it, load on the CPU and move (slower, twice the host memory, but it works).
    direct = device != "cpu" and importlib.util.find_spec("accelerate") is not None
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            local_files_only=True,
            **({"device_map": device} if direct else {}),
        )
        if device != "cpu" and not direct:
            hf_model.to(device)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(f"{path}: out of GPU memory while loading weights: {exc}") from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: weights cannot be loaded: {exc}") from exc
    hf_model.eval()
    hf_model.requires_grad_(False)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    if served_name:
        name = served_name
    elif model is None:
        from server.default_model import DEFAULT_MODEL_NAME

        name = DEFAULT_MODEL_NAME
    else:
        name = path.name
    return LoadedCheckpoint(
        path=path,
        name=name,
        hf_model=hf_model,
        config=config,
        tokenizer=tokenizer,
        api_tokenizer=api_tokenizer,
        eos_token_ids=_eos_ids(config, tokenizer, path),
        weight_bytes=weight_bytes,
    )
