"""Read a checkpoint's `config.json` without transformers.

`ModelConfig` exposes the attributes the engine reads from a transformers config
(`check_config`, `DecoderModel`, `plan_kv_cache`), with the values transformers' own config
classes would give for the supported model types, defaults for missing keys included: a wrong
default (say rms_norm_eps 1e-5 instead of 1e-6) would silently change every output.

RoPE parameters are normalised the way transformers 5 does it: the legacy `rope_theta` /
`rope_scaling` keys (Llama 3.1, Qwen2, Mistral files written by transformers 4) and the newer
`rope_parameters` dict end up as one `rope_parameters` dict holding `rope_type` and `rope_theta`
(plus `original_max_position_embeddings` for the scaled types).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Per model type: transformers' config-class defaults for every key the server reads. Read off
# LlamaConfig / MistralConfig / Qwen2Config / Qwen3Config (transformers 5). None means
# "derived" (head_dim, num_key_value_heads) and is filled in by `_derive`.
_COMMON = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "head_dim": None,
    "sliding_window": None,
    "use_sliding_window": None,  # only Qwen2/Qwen3 define it
    "max_window_layers": None,
    "layer_types": None,
    "pad_token_id": None,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "max_position_embeddings": 2048,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "sliding_window": 4096,
    },
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "bos_token_id": None,
        "eos_token_id": None,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
    "qwen3": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "bos_token_id": None,
        "eos_token_id": None,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
    },
}
SUPPORTED_MODEL_TYPES = tuple(_DEFAULTS)
_DEFAULT_ROPE_THETA = 10_000.0
# Sizes that must be positive integers; head_dim and num_key_value_heads may be null (derived).
_SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)
_OPTIONAL_SIZE_KEYS = ("num_key_value_heads", "head_dim")
# Keys each scaled RoPE type cannot do without (transformers' validation requires them too).
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "yarn": (),
}


class ConfigReadError(ValueError):
    """config.json is unreadable or holds a value of the wrong type; the message names it."""


class ModelConfig:
    """Attribute view of config.json with transformers' defaults for the supported types.

    Unknown keys are kept as attributes too (as transformers does), so code that probes an
    optional attribute with getattr sees the file's value.
    """

    def __init__(self, raw: dict[str, Any]):
        model_type = raw.get("model_type")
        if model_type not in _DEFAULTS:
            # Not ours to default: keep the raw keys so check_config can name the type.
            self.__dict__.update(raw)
            self.model_type = model_type
            self.architectures = raw.get("architectures")
            return
        values = {**_COMMON, **_DEFAULTS[model_type], **raw}
        # transformers moved `rope_theta` / `rope_scaling` into `rope_parameters`; drop the old
        # names so there is one place to read them from.
        values.pop("rope_scaling", None)
        values.pop("rope_theta", None)
        self.__dict__.update(values)
        for key in (*_SIZE_KEYS, *_OPTIONAL_SIZE_KEYS):
            value = getattr(self, key)
            if value is None and key in _OPTIONAL_SIZE_KEYS:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigReadError(
                    f"config.json: {key} must be a positive integer, got {value!r}"
                )
        if not isinstance(self.rms_norm_eps, (int, float)) or isinstance(self.rms_norm_eps, bool):
            raise ConfigReadError(
                f"config.json: rms_norm_eps must be a number, got {self.rms_norm_eps!r}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if model_type in ("qwen2", "qwen3"):
            # Qwen's configs ignore sliding_window unless use_sliding_window is set, and then
            # apply it only from layer max_window_layers on.
            if not self.use_sliding_window:
                self.sliding_window = None
            if self.layer_types is None:
                self.layer_types = [
                    "sliding_attention"
                    if self.sliding_window is not None and i >= self.max_window_layers
                    else "full_attention"
                    for i in range(self.num_hidden_layers)
                ]
        self.rope_parameters = _rope_parameters(raw, self.max_position_embeddings)
        self.dtype = raw.get("dtype", raw.get("torch_dtype"))

    def __repr__(self) -> str:
        return f"ModelConfig(model_type={self.model_type!r}, layers={self.num_hidden_layers})"


def _rope_parameters(raw: dict[str, Any], max_positions: int) -> dict[str, Any]:
    """The standardised RoPE dict, as transformers 5 derives it from either spelling."""
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(scaling, dict):
        raise ConfigReadError(f"config.json: rope_scaling must be an object, got {scaling!r}")
    params = dict(scaling)
    params.setdefault("rope_theta", raw.get("rope_theta", _DEFAULT_ROPE_THETA))
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings", max_positions)
    for key in _ROPE_REQUIRED.get(params["rope_type"], ()):
        if not isinstance(params.get(key), (int, float)) or isinstance(params.get(key), bool):
            raise ConfigReadError(
                f"config.json: rope type {params['rope_type']!r} needs a numeric {key}"
            )
    theta = params["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigReadError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    return params


def read_json(path: Path, error: type[Exception] = ConfigReadError) -> dict[str, Any]:
    """A JSON object from `path`; `error` naming the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path.name} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{path.name} must hold a JSON object, got {type(data).__name__}")
    return data


def load_config(model_dir: Path) -> ModelConfig:
    """`ModelConfig` of the checkpoint in `model_dir`; ConfigReadError on a malformed file."""
    return ModelConfig(read_json(model_dir / "config.json"))


def generation_eos_ids(model_dir: Path) -> int | list[int] | None:
    """`eos_token_id` of generation_config.json; None if the file is absent or unreadable.

    transformers treats an unreadable generation config as absent too, so both loaders agree.
    """
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return None
    try:
        return read_json(path).get("eos_token_id")
    except ConfigReadError:
        return None


# -- derived values, for this module's ModelConfig and transformers' configs alike -----------


def head_dim(config) -> int:
    """Per-head size: the config's `head_dim`, else hidden size over attention heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window(config) -> int | None:
    """The attention window in tokens, or None when every layer attends to the full context."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)
