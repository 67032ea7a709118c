"""Load a local HuggingFace checkpoint (config, safetensors weights, tokenizer) without network.

Two loaders build the same `server.model.DecoderModel`. The fast one reads config.json
(`server.hf_config`), the safetensors files (`server.weight_pipeline`: parallel reads through
pinned staging into the final device tensors) and tokenizer.json (`server.tokenizer`) directly
and never imports transformers, whose import alone takes most of a small model's time to ready.

When the fast tokenizer declines a checkpoint (`--loader auto`: sentencepiece-only tokenizers,
model-specific tokenizer classes, ...), only the tokenizer comes from transformers'
AutoTokenizer: config.json was already read exactly (`hf_config` reproduces transformers'
defaults, tested) and the weights are the same safetensors bytes, so they still go through the
pipeline instead of `from_pretrained` (safe_open tensor by tensor, 4.3 GB/s on the H200 box).
`--loader transformers` keeps transformers' whole path (AutoConfig, AutoTokenizer,
`from_pretrained`): it is the independent reference the fast path is tested against, so it
shares none of the fast path's code; only the page-cache prefetch (`server.prefetch`), which
changes no byte, helps it.

`load_format="dummy"` replaces the weight files by random tensors (`weights.DummyWeights`), so a
directory with config.json and tokenizer files suffices.

Under tensor parallelism each rank builds only its shard (`shard=TPShard(rank, world)`), and
the pipeline reads only that rank's slice of each sharded tensor
(`server.distributed.sharding.planned_slice`); the workers, which need no tokenizer, load
through `load_shard`.

Everything that can be wrong with a model directory is reported as a
`ModelLoadError` whose message names the path and the problem, because it ends up on
`/health/ready` and in the pod log where an operator has to act on it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from server import prefetch
from server.config import LOAD_FORMATS, LOADERS
from server.errors import ModelLoadError

log = logging.getLogger("graphserve.loader")

SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# RoPE variants whose cos/sin depend only on the position (so one table serves all steps).
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


@dataclass
class LoadedCheckpoint:
    """What the engine needs from a checkpoint: the model with its weights, config, tokenizers."""

    path: Path
    name: str
    model: object  # server.model.DecoderModel, weights on the target device (rope not yet built)
    config: object  # server.hf_config.ModelConfig, or a transformers PretrainedConfig
    tokenizer: object  # for the engine thread (detokenisation)
    api_tokenizer: object  # for the prompt workers (tokenisation); the same object when fast
    eos_token_ids: frozenset[int]
    weight_bytes: int
    loader: str  # "fast", or "transformers" when transformers loaded the tokenizer (or all)
    fallback_reason: str | None = None  # why transformers loaded it, if it did
    import_s: float = 0.0  # time spent importing transformers inside the load (fallback only)
    weights: str = "pipeline"  # "pipeline", "transformers" (from_pretrained) or "dummy"
    load_stats: dict | None = None  # weight pipeline / prefetch counters, for logs and benches


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


def _check_directory(path: Path, load_format: str = "auto") -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (is this a HuggingFace model directory?)")
    if load_format != "dummy" and not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path}: no *.safetensors weight files found")
    has_tokenizer = any(
        (path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
    )
    if not has_tokenizer:
        raise ModelLoadError(f"{path}: no tokenizer files (tokenizer.json or tokenizer.model)")


def _eos_ids(config, tokenizer, generation_eos) -> frozenset[int]:
    ids: set[int] = set()
    for source in (generation_eos, getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    return frozenset(int(i) for i in ids)


def read_config(path: Path):
    """config.json (`server.hf_config`, no transformers) checked by `check_config`."""
    from server.hf_config import ConfigReadError, load_config

    try:
        config = load_config(path)
    except ConfigReadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    check_config(config, path)
    return config


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
    partial = rope.get("partial_rotary_factor", 1.0) if isinstance(rope, dict) else 1.0
    if partial != 1.0:
        raise ModelLoadError(
            f"{path}: partial_rotary_factor={partial} is not supported (full-width RoPE only)"
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


def _served_name(model: str | None, path: Path, served_name: str | None) -> str:
    if served_name:
        return served_name
    if model is None:
        from server.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return path.name


def load_checkpoint(
    model: str | None,
    device: str,
    dtype: str,
    served_name: str | None = None,
    loader: str = "auto",
    load_format: str = "auto",
    shard=None,
    on_tokenizer=None,
) -> LoadedCheckpoint:
    """Load config, tokenizers and weights of `model` onto `device`; raise ModelLoadError.

    `loader`: "fast" reads the files directly (no transformers import), "transformers" uses
    its Auto classes for everything, "auto" takes the fast path and uses transformers only for
    a tokenizer the fast one cannot reproduce (the reason is logged at INFO). `load_format`:
    "auto" reads the safetensors files, "dummy" draws random weights of the config's shapes.
    A `server.prefetch` warmer started on this thread for the same directory is taken over.
    `shard` (`server.distributed.sharding.TPShard`): build only that rank's slice.
    `on_tokenizer(tokenizer, eos_token_ids, vocab_size)`: called on this thread by the fast
    loader as soon as the tokenizer is loaded, while the weights still stream, so work that
    needs only the tokenizer overlaps the load (not called by the transformers loader).
    """
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got "
                         f"{load_format!r}")
    force_offline()
    path = resolve_model_path(model)
    warmer = prefetch.claim(path)
    try:
        _check_directory(path, load_format)
        name = _served_name(model, path, served_name)
        if loader == "transformers":
            return _load_with_transformers(path, name, device, dtype, "--loader transformers",
                                           load_format, shard)
        return _load_fast(path, name, device, dtype, loader, load_format, warmer, shard,
                          on_tokenizer)
    finally:
        if warmer is not None:
            warmer.stop()


def _load_fast(path: Path, name: str, device: str, dtype: str, loader: str, load_format: str,
               warmer, shard=None, on_tokenizer=None) -> LoadedCheckpoint:
    from server.hf_config import generation_eos_ids

    config = read_config(path)

    from server.weights import DummyWeights, unused_tensors

    torch_dtype = resolve_dtype(dtype, device)
    import_s = 0.0
    # The weight source starts reading before the tokenizer loads, so the two overlap.
    weights = _open_weights(path, config, device, torch_dtype, load_format, warmer, shard)
    try:
        # One instance for both threads (see FastTokenizer): a second from the same file was
        # another ~0.17 s of GIL-holding parse on the way to ready (H200 box, 128k vocab).
        tokenizer, fallback = _fast_tokenizer(path, config.model_type, loader)
        api_tokenizer = tokenizer
        if tokenizer is None:
            log.info("loading %s's tokenizer with transformers (weights and config.json still "
                     "read directly): %s", path, fallback)
            tokenizer, api_tokenizer, import_s = _transformers_tokenizers(path)
        eos_ids = _eos_ids(config, tokenizer, generation_eos_ids(path))
        if on_tokenizer is not None:
            on_tokenizer(tokenizer, eos_ids, config.vocab_size)
        model_obj = _build(path, config, weights, shard)
        # Device memory the weights hold outside torch's caching allocator (the early reader's
        # buffer): the KV planner counts it as in use.
        model_obj.external_weight_bytes = getattr(weights, "external_bytes", 0)
        unused = unused_tensors(weights, config)
        stats = _weight_stats(weights, warmer)
    finally:
        weights.close()
    _release_cached(device)
    if unused:
        # transformers warns about unexpected keys too; they may mean a mislabelled checkpoint.
        log.warning(
            "%s: %d tensor(s) not used by %s: %s",
            path,
            len(unused),
            config.model_type,
            ", ".join(sorted(unused)[:5]) + (", ..." if len(unused) > 5 else ""),
        )
    source = ("dummy" if isinstance(weights, DummyWeights)
              else "early" if hasattr(weights, "external_bytes") else "pipeline")
    log.info("loaded %s without transformers%s (%s weights%s)", path,
             "" if fallback is None else " except for the tokenizer", source,
             _describe(stats))
    return LoadedCheckpoint(
        path=path,
        name=name,
        model=model_obj,
        config=config,
        tokenizer=tokenizer,
        api_tokenizer=api_tokenizer,
        eos_token_ids=eos_ids,
        weight_bytes=model_obj.weight_bytes,
        loader="fast" if fallback is None else "transformers",
        fallback_reason=fallback,
        import_s=import_s,
        weights=source,
        load_stats=stats,
    )


def load_shard(model_path: str, device: str, dtype: str, load_format: str, shard):
    """A tensor-parallel worker's load: config.json and this rank's slice of the weights.

    No tokenizer (rank 0 owns text), no transformers import: the weights are the same
    safetensors bytes (or the same dummy draws) whichever loader rank 0's tokenizer needed.
    Returns `(DecoderModel, config)`; raises ModelLoadError.
    """
    force_offline()
    path = resolve_model_path(model_path)
    _check_directory(path, load_format)
    config = read_config(path)
    torch_dtype = resolve_dtype(dtype, device)
    weights = _open_weights(path, config, device, torch_dtype, load_format, None, shard)
    try:
        model_obj = _build(path, config, weights, shard)
    finally:
        weights.close()
    _release_cached(device)
    return model_obj, config


def _build(path: Path, config, weights, shard):
    import torch

    from server.model import DecoderModel

    try:
        return DecoderModel(config, weights, shard=shard)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(f"{path}: out of GPU memory while loading weights: {exc}") from exc


def _release_cached(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        # The fused layers' parts (and the pipeline's window) sit freed in the caching
        # allocator; the KV cache planner counts reserved memory as used, so give them back.
        torch.cuda.empty_cache()


def _open_weights(path: Path, config, device: str, torch_dtype, load_format: str, warmer,
                  shard=None):
    """The weight source: dummy draws, or the pipeline reading only `shard`'s slices."""
    import torch

    from server.weights import DummyWeights

    if load_format == "dummy":
        return DummyWeights(device, torch_dtype)
    from server import early_weights

    reader = early_weights.claim(path)
    if reader is not None:  # started before torch by the engine thread (one GPU only)
        if device == "cuda" and early_weights.raw_dtype(torch_dtype) == reader.raw_dtype:
            try:
                return early_weights.EarlyWeights(reader, torch_dtype)
            except ModelLoadError as exc:
                log.warning("%s: weights read through the pipeline instead: %s", path, exc)
        else:
            reader.stop(free=True)
    from server.distributed.sharding import planned_slice
    from server.weight_pipeline import PipelinedWeights

    tied = bool(getattr(config, "tie_word_embeddings", False))
    parts = None
    if shard is not None and shard.world > 1:
        def parts(name: str, shape: tuple[int, ...]):
            return planned_slice(shard, name, shape)
    try:
        return PipelinedWeights(path, device, torch_dtype,
                                exclude={"lm_head.weight"} if tied else (), prefetcher=warmer,
                                parts=parts)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(f"{path}: out of GPU memory while loading weights: {exc}") from exc


def _weight_stats(weights, warmer) -> dict | None:
    stats = getattr(weights, "stats", None)
    if stats is None:
        return None
    out = dict(vars(stats))
    if warmer is not None:
        out["prefetch"] = dict(vars(warmer.stats))
    return out


def _describe(stats: dict | None) -> str:
    if not stats:
        return ""
    text = (f", {stats['threads']} readers, {stats['bytes_read'] / 1e9:.2f} GB read, "
            f"{stats['wait_s']:.2f} s waited")
    pre = stats.get("prefetch")
    if pre and pre.get("planned_bytes"):
        text += (f"; page cache at engine start: {pre['resident_bytes'] / 1e9:.2f} of "
                 f"{pre['planned_bytes'] / 1e9:.2f} GB, the prefetch pulled "
                 f"{pre['read_bytes'] / 1e9:.2f} GB more")
    return text


def _fast_tokenizer(path: Path, model_type: str | None, loader: str):
    """(`FastTokenizer`, None), or (None, why) when it declines this tokenizer and `loader`
    lets transformers load it instead; ModelLoadError when it cannot be loaded at all or
    `loader` is "fast"."""
    from server.tokenizer import FastTokenizer, TokenizerDeclined, TokenizerLoadError

    try:
        return FastTokenizer.load(path, model_type), None
    except TokenizerLoadError as exc:
        raise ModelLoadError(f"{path}: tokenizer cannot be loaded: {exc}") from exc
    except TokenizerDeclined as exc:
        if loader == "fast":
            raise ModelLoadError(
                f"{path}: --loader fast cannot reproduce this tokenizer ({exc}); "
                "use --loader auto or transformers"
            ) from exc
        return None, str(exc)


def load_api_tokenizer(path: Path, loader: str = "auto"):
    """The tokenizer the HTTP process's prompt workers use, chosen as `load` chooses (the fast
    tokenizer, else transformers' unless `loader` is "fast"); no weights, no torch for the
    fast one."""
    config = read_config(path)
    if loader != "transformers":
        tokenizer, _ = _fast_tokenizer(path, config.model_type, loader)
        if tokenizer is not None:
            return tokenizer
    return _auto_tokenizer(path)


def _auto_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path}: tokenizer cannot be loaded: {exc}") from exc


def _transformers_tokenizers(path: Path):
    """Two AutoTokenizer instances (engine thread, event loop) and transformers' import time."""
    t0 = time.perf_counter()
    from transformers import AutoTokenizer  # noqa: F401  (timed here: the first import)

    import_s = time.perf_counter() - t0
    return _auto_tokenizer(path), _auto_tokenizer(path), import_s


def _load_with_transformers(path: Path, name: str, device: str, dtype: str, why: str,
                            load_format: str = "auto", shard=None):
    t0 = time.perf_counter()
    import torch
    from transformers import AutoConfig, GenerationConfig

    import_s = time.perf_counter() - t0
    from server.model import DecoderModel
    from server.weights import DummyWeights, StateDictWeights

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}: config.json cannot be read: {exc}") from exc
    check_config(config, path)
    tokenizer, api_tokenizer, tok_import_s = _transformers_tokenizers(path)
    import_s += tok_import_s

    torch_dtype = resolve_dtype(dtype, device)
    try:
        if load_format == "dummy":
            weights = DummyWeights(device, torch_dtype)
        else:
            weights = StateDictWeights(_hf_state_dict(path, device, torch_dtype),
                                       f"{path} (transformers)")
        model_obj = DecoderModel(config, weights, shard=shard)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(f"{path}: out of GPU memory while loading weights: {exc}") from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"{path}: weights cannot be loaded: {exc}") from exc
    try:
        generation_eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
    except (OSError, ValueError):
        generation_eos = None
    return LoadedCheckpoint(
        path=path,
        name=name,
        model=model_obj,
        config=config,
        tokenizer=tokenizer,
        api_tokenizer=api_tokenizer,
        eos_token_ids=_eos_ids(config, tokenizer, generation_eos),
        weight_bytes=model_obj.weight_bytes,
        loader="transformers",
        fallback_reason=why,
        import_s=import_s,
        weights="dummy" if load_format == "dummy" else "transformers",
    )


def _hf_state_dict(path: Path, device: str, torch_dtype) -> dict:
    """transformers' own load of the weights (the reference path; see the module docstring)."""
    from transformers import AutoModelForCausalLM

    # With accelerate installed, transformers writes weights straight into device memory;
    # without it, load on the CPU and move (slower, twice the host memory, but it works).
    direct = device != "cpu" and importlib.util.find_spec("accelerate") is not None
    hf_model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch_dtype,
        local_files_only=True,
        **({"device_map": device} if direct else {}),
    )
    if device != "cpu" and not direct:
        hf_model.to(device)
    # Only the state dict holds the tensors once the model is gone (transformers models hold
    # no reference cycles, so no gc pass is needed), and fusing frees each part as it goes.
    return hf_model.state_dict()
