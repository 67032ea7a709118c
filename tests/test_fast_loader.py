"""The transformers-free loader against transformers itself (CPU, float32).

Config defaults and RoPE tables, fused weights and logits, tokenizer behaviour and chat templates
must equal what transformers produces from the same files; the fallback decisions and the errors
for broken files are checked here too, and that the fast path never imports transformers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.errors import ModelLoadError
from server.hf_config import ModelConfig, load_config
from server.hf_config import sliding_window as _sliding_window
from server.model import rope_tables
from server.model_loader import load_checkpoint
from server.tokenizer import FastTokenizer, TokenizerDeclined
from server.weights import SafetensorsWeights
from tests.helpers import REPO
from tests.helpers.model_steps import prompt_logits
from tests.helpers.tiny_models import (
    TOKENIZER_STYLES,
    build_checkpoint,
    build_tokenizer,
    build_tokenizer_variant,
)

# -- config.json -----------------------------------------------------------------------------------

_LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
CONFIG_CASES = {
    # Only model_type: every other value is a config-class default.
    "llama-defaults": {"model_type": "llama"},
    "mistral-defaults": {"model_type": "mistral"},
    "qwen2-defaults": {"model_type": "qwen2"},
    "qwen3-defaults": {"model_type": "qwen3"},
    # Shapes of real config.json files (transformers 4 spelling: rope_theta + rope_scaling).
    "llama-3.1-8b": {
        "model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_SCALING, "max_position_embeddings": 131072,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16", "vocab_size": 128256, "mlp_bias": False,
    },
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "head_dim": 64, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 16, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_SCALING, "factor": 32.0},
        "tie_word_embeddings": True, "max_position_embeddings": 131072,
    },
    "llama-transformers5": {
        "model_type": "llama", "hidden_size": 256, "num_attention_heads": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "dtype": "bfloat16",
    },
    "llama-linear": {
        "model_type": "llama", "hidden_size": 256, "num_attention_heads": 4,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    },
    "mistral-7b-v0.1": {
        "model_type": "mistral", "rope_theta": 10000.0, "sliding_window": 4096,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    },
    "mistral-7b-v0.3": {
        "model_type": "mistral", "rope_theta": 1000000.0, "sliding_window": None,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "vocab_size": 32768,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2", "hidden_size": 3584, "num_attention_heads": 28,
        "num_key_value_heads": 4, "num_hidden_layers": 28, "rope_theta": 1000000.0,
        "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28,
        "rope_scaling": None, "tie_word_embeddings": False, "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "qwen2-sliding": {
        "model_type": "qwen2", "num_hidden_layers": 4, "use_sliding_window": True,
        "sliding_window": 1024, "max_window_layers": 2,
    },
    "qwen2-yarn": {
        "model_type": "qwen2", "hidden_size": 512, "num_attention_heads": 8,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    },
    "qwen3-yarn-mscale": {
        "model_type": "qwen3", "head_dim": 64, "rope_theta": 1000000.0,
        "rope_scaling": {
            "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
            "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False, "beta_fast": 16,
        },
    },
    "qwen3-8b": {
        "model_type": "qwen3", "hidden_size": 4096, "head_dim": 128, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 36, "rope_theta": 1000000.0,
        "rope_scaling": None, "attention_bias": False, "tie_word_embeddings": False,
        "max_position_embeddings": 40960, "use_sliding_window": False, "sliding_window": None,
    },
}
_SAME_ATTRIBUTES = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id",
)


def _configs(tmp_path: Path, raw: dict):
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(raw))
    return load_config(tmp_path), AutoConfig.from_pretrained(tmp_path, local_files_only=True)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _hf_rope(hf_config, max_len: int):
    import importlib

    module = importlib.import_module(f"transformers.models.{hf_config.model_type}.modeling_"
                                     f"{hf_config.model_type}")
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    rotary = getattr(module, f"{prefix[hf_config.model_type]}RotaryEmbedding")(hf_config)
    probe = torch.empty(1, dtype=torch.float32)
    cos, sin = rotary(probe, torch.arange(max_len)[None, :])
    return cos[0], sin[0]


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_matches_transformers(tmp_path, case):
    fast, hf = _configs(tmp_path, CONFIG_CASES[case])
    for name in _SAME_ATTRIBUTES:
        assert getattr(fast, name) == getattr(hf, name), name
    assert _head_dim(fast) == _head_dim(hf)
    assert _sliding_window(fast) == _sliding_window(hf)
    if fast.model_type in ("llama", "qwen3"):
        assert fast.attention_bias == hf.attention_bias
    if fast.model_type == "llama":
        assert fast.mlp_bias == hf.mlp_bias
    rope_keys = set(fast.rope_parameters) | set(hf.rope_parameters) - {"type"}
    for key in rope_keys - {"type"}:
        assert fast.rope_parameters.get(key) == hf.rope_parameters.get(key), key


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_rope_tables_are_bit_identical_to_hf_rotary_embedding(tmp_path, case):
    fast, hf = _configs(tmp_path, CONFIG_CASES[case])
    hf_cos, hf_sin = _hf_rope(hf, 300)
    for config in (fast, hf):  # both loaders build their tables with rope_tables
        cos, sin = rope_tables(config, 300, torch.float32, "cpu")
        assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        ModelConfig({"model_type": "llama", "hidden_size": "big"})
    with pytest.raises(ValueError, match="num_attention_heads must be a positive integer"):
        ModelConfig({"model_type": "qwen3", "num_attention_heads": 0})
    with pytest.raises(ValueError, match="'llama3' needs a numeric low_freq_factor"):
        ModelConfig({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8}})
    with pytest.raises(ValueError, match="rope_theta must be a positive number"):
        ModelConfig({"model_type": "llama", "rope_theta": "fast"})


# -- weights ---------------------------------------------------------------------------------------

WEIGHT_CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3-tied": ("qwen3", {"tie_word_embeddings": True}),
}


@pytest.fixture(scope="module", params=WEIGHT_CASES)
def weight_case(request, tmp_path_factory):
    arch, overrides = WEIGHT_CASES[request.param]
    return build_checkpoint(tmp_path_factory.mktemp(request.param), arch, seed=3, **overrides)


def _fast_model(path: Path, max_len: int = 64):
    from server.model import DecoderModel

    model = DecoderModel(load_config(path), SafetensorsWeights(path, "cpu", torch.float32))
    model.init_rope(max_len)
    return model


def _tensors(model) -> dict[str, torch.Tensor]:
    out = {"embed": model.embed, "lm_head": model.lm_head, "norm": model.final_norm,
           "cos": model.cos, "sin": model.sin}
    for i, layer in enumerate(model.layers):
        for key, value in vars(layer).items():
            out[f"{i}.{key}"] = value
    return out


def test_fast_weights_are_bit_identical_to_transformers(weight_case):
    fast = _fast_model(weight_case)
    ref = load_checkpoint(str(weight_case), "cpu", "float32", loader="transformers")
    assert ref.loader == "transformers"
    ref.model.init_rope(64)
    ours, theirs = _tensors(fast), _tensors(ref.model)
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        if tensor is None or theirs[key] is None:
            assert tensor is None and theirs[key] is None, key
        else:
            assert torch.equal(tensor, theirs[key]), key
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, fast.shape.vocab_size, (23,), generator=gen).tolist()
    assert torch.equal(prompt_logits(fast, ids), prompt_logits(ref.model, ids))
    assert fast.weight_bytes == ref.weight_bytes
    if ref.config.tie_word_embeddings:
        assert fast.lm_head.data_ptr() == fast.embed.data_ptr()


def test_sharded_checkpoint_loads_like_the_single_file(weight_case, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    hf = AutoModelForCausalLM.from_pretrained(weight_case, dtype=torch.float32)
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a, b = _tensors(_fast_model(weight_case)), _tensors(_fast_model(sharded))
    assert all(torch.equal(a[k], b[k]) for k in a if a[k] is not None)


def test_end_to_end_fast_load_matches_transformers_on_the_default_model():
    fast = load_checkpoint(None, "cpu", "float32", loader="fast")
    ref = load_checkpoint(None, "cpu", "float32", loader="transformers")
    assert fast.loader == "fast" and ref.loader == "transformers"
    assert fast.eos_token_ids == ref.eos_token_ids
    assert fast.weight_bytes == ref.weight_bytes and fast.name == ref.name
    for ckpt in (fast, ref):
        ckpt.model.init_rope(64)
    ids = fast.tokenizer.encode("The engine thread owns every torch call.")
    assert ids == ref.tokenizer.encode("The engine thread owns every torch call.")
    assert torch.equal(prompt_logits(fast.model, ids), prompt_logits(ref.model, ids))


def test_on_tokenizer_runs_before_the_weights_are_built(monkeypatch):
    # The engine starts the grammar tokenizer's build (GIL-bound) from this hook so it
    # overlaps the weight load instead of freezing the server right after ready.
    import server.model_loader as loader

    events = []
    build = loader._build

    def tracked_build(*args, **kwargs):
        events.append("build")
        return build(*args, **kwargs)

    def on_tokenizer(tokenizer, eos_ids, vocab_size):
        events.append(("tokenizer", tokenizer, list(eos_ids), vocab_size))

    monkeypatch.setattr(loader, "_build", tracked_build)
    ckpt = load_checkpoint(None, "cpu", "float32", loader="fast", on_tokenizer=on_tokenizer)
    assert events[0] == ("tokenizer", ckpt.tokenizer, list(ckpt.eos_token_ids),
                         ckpt.model.shape.vocab_size)
    assert events[1:] == ["build"]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_fast_checkpoint_eos_ids_equal_transformers(tmp_path, arch):
    path = build_checkpoint(tmp_path / arch, arch)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    fast = load_checkpoint(str(path), "cpu", "float32", loader="fast")
    ref = load_checkpoint(str(path), "cpu", "float32", loader="transformers")
    assert fast.eos_token_ids == ref.eos_token_ids == frozenset({1, 3})


# -- broken files ----------------------------------------------------------------------------------


@pytest.fixture
def llama_copy(tmp_path_factory, tmp_path):
    base = tmp_path_factory.getbasetemp() / "broken-base"
    if not base.exists():
        build_checkpoint(base, "llama")
    return Path(shutil.copytree(base, tmp_path / "m"))


def _rewrite_weights(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_truncated_safetensors_is_named(llama_copy):
    file = llama_copy / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_checkpoint(str(llama_copy), "cpu", "float32", loader="fast")


def test_missing_tensor_is_named_with_its_file(llama_copy):
    _rewrite_weights(llama_copy, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"model.layers.1.mlp.down_proj.weight.*missing from "
                                             r"model.safetensors"):
        load_checkpoint(str(llama_copy), "cpu", "float32", loader="fast")


def test_misshaped_tensor_is_named(llama_copy):
    def shrink(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"][:10].clone()

    _rewrite_weights(llama_copy, shrink)
    with pytest.raises(ModelLoadError, match=r"model.norm.weight.*shape \[10\], expected \[64\]"):
        load_checkpoint(str(llama_copy), "cpu", "float32", loader="fast")


def test_untied_checkpoint_without_lm_head_is_an_error(llama_copy):
    _rewrite_weights(llama_copy, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ModelLoadError, match="lm_head.weight"):
        load_checkpoint(str(llama_copy), "cpu", "float32", loader="fast")


def test_unused_tensors_are_reported(llama_copy, caplog):
    def add_extra(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        tensors["model.vision_tower.weight"] = torch.ones(2, 2)

    _rewrite_weights(llama_copy, add_extra)
    with caplog.at_level(logging.WARNING, logger="graphserve.loader"):
        load_checkpoint(str(llama_copy), "cpu", "float32", loader="fast")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 tensor(s) not used" in warnings[0]
    assert "model.vision_tower.weight" in warnings[0] and "inv_freq" not in warnings[0]


def test_bad_config_json_is_named(llama_copy):
    (llama_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json cannot be read"):
        load_checkpoint(str(llama_copy), "cpu", "float32")
    (llama_copy / "config.json").write_text(json.dumps({"model_type": "llama",
                                                        "num_hidden_layers": "2"}))
    with pytest.raises(ModelLoadError, match="num_hidden_layers must be a positive integer"):
        load_checkpoint(str(llama_copy), "cpu", "float32")


def test_shard_index_naming_a_missing_file(llama_copy):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors not found"):
        load_checkpoint(str(llama_copy), "cpu", "float32", loader="fast")


# -- tokenizer -------------------------------------------------------------------------------------

TEXTS = [
    "",
    "Hello world",
    "  leading spaces and trailing ",
    "Ünïcödé, 日本語のテキスト, emoji 🙂\n\ttabs",
    "special tokens inline: <s> </s> <|im_start|> [INST] <|begin_of_text|> <tool_call>",
    "ﬁ ligature and combining e\u0301 (NFC changes both)",
    "def add(a, b):\n    return a + b\n",
]
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": " Hello <b>&</b> 🙂 "},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "again", "name": "bob"},
    ],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
    [{"role": "assistant", "content": "first"}],  # the Mistral template rejects this one
]


@pytest.fixture(scope="module", params=[*TOKENIZER_STYLES, "tiny", "default"])
def tokenizer_pair(request, tmp_path_factory):
    from transformers import AutoTokenizer

    style = request.param
    if style == "default":
        path = load_checkpoint(None, "cpu", "float32", loader="fast").path
        model_type = "llama"
    else:
        path = tmp_path_factory.mktemp(f"tok-{style}")
        if style == "tiny":
            build_tokenizer(path)
            (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
            model_type = "llama"
        else:
            build_tokenizer_variant(path, style)
            model_type = TOKENIZER_STYLES[style][0]
    fast = FastTokenizer.load(path, model_type)
    return fast, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _outcome(fn):
    try:
        return fn()
    except Exception as exc:  # errors must match in kind, messages may be worded differently
        return type(exc).__name__


def test_token_ids_and_length_match(tokenizer_pair):
    fast, hf = tokenizer_pair
    assert len(fast) == len(hf)
    assert (fast.bos_token_id, fast.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert (fast.bos_token, fast.eos_token) == (hf.bos_token, hf.eos_token)


def test_the_grammar_json_is_the_tokenizer_it_was_loaded_from(tokenizer_pair):
    # `to_json` hands the file's own text to the grammar process (no re-serialising): it must
    # describe exactly the tokenizer in use, and HF's fast tokenizer agrees with it.
    from tokenizers import Tokenizer

    fast, hf = tokenizer_pair
    assert Tokenizer.from_str(fast.to_json()).to_str() == fast._tok.to_str()
    assert Tokenizer.from_str(fast.to_json()).get_vocab() == hf.backend_tokenizer.get_vocab()


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match(tokenizer_pair, text):
    fast, hf = tokenizer_pair
    for special in (True, False):
        assert fast.encode(text, add_special_tokens=special) == hf.encode(
            text, add_special_tokens=special
        )
    ids = hf.encode(text, add_special_tokens=True)
    for skip in (True, False):
        assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_matches(tokenizer_pair, conversation):
    fast, hf = tokenizer_pair
    messages = CONVERSATIONS[conversation]
    for prompt in (True, False):
        kwargs = {"add_generation_prompt": prompt, "tokenize": False}
        ours = _outcome(lambda kw=kwargs: fast.apply_chat_template(messages, **kw))
        theirs = _outcome(lambda kw=kwargs: hf.apply_chat_template(messages, **kw))
        assert ours == theirs


def test_template_variables_and_filters(tmp_path):
    path = build_tokenizer_variant(tmp_path / "t", "chatml")
    fast = FastTokenizer.load(path, "qwen3")
    tools = [{"name": "f", "description": "<a & b>"}]
    text = fast.apply_chat_template(CONVERSATIONS[0], tools=tools, tokenize=False)
    assert '{"name": "f", "description": "<a & b>"}' in text  # tojson does not HTML-escape
    fast.chat_template = "{% set ns = namespace(_x=1) %}"
    fast._template = None
    with pytest.raises(Exception, match="underscore"):
        fast.apply_chat_template(CONVERSATIONS[0])


# -- fallback decisions ----------------------------------------------------------------------------


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change, reason",
    [
        ("no_tokenizer_json", "no tokenizer.json"),
        ("llama_class", "LlamaTokenizerFast"),
        ("unknown_key", "add_prefix_space"),
        ("bos_disagrees", "add_bos_token=True disagrees"),
        ("added_token_differs", "differs from tokenizer.json in lstrip"),
        ("template_list", "several named chat templates"),
        ("missing_special", "not a special added token"),
        ("tekken", "tekken.json"),
        ("no_class", "tokenizer_class None"),
    ],
)
def test_tokenizer_declines_what_it_cannot_reproduce(tmp_path, change, reason):
    path = build_tokenizer_variant(tmp_path / "t", "no_bos")
    cfg = path / "tokenizer_config.json"
    if change == "no_tokenizer_json":
        (path / "tokenizer.json").unlink()
    elif change == "llama_class":
        _edit_json(cfg, tokenizer_class="LlamaTokenizerFast")
    elif change == "unknown_key":
        _edit_json(cfg, add_prefix_space=True)
    elif change == "bos_disagrees":
        _edit_json(cfg, add_bos_token=True)
    elif change == "added_token_differs":
        added = json.loads(cfg.read_text())["added_tokens_decoder"]
        added["0"]["lstrip"] = True
        _edit_json(cfg, added_tokens_decoder=added)
    elif change == "template_list":
        (path / "chat_template.jinja").unlink()
        _edit_json(cfg, chat_template=[{"name": "default", "template": "x"}])
    elif change == "missing_special":
        _edit_json(cfg, pad_token="<pad>")
    elif change == "tekken":
        (path / "tekken.json").write_text("{}")
    elif change == "no_class":
        cfg.unlink()
    with pytest.raises(TokenizerDeclined, match=reason):
        FastTokenizer.load(path, "llama")


def test_qwen2_tokenizer_is_checked_against_its_rebuilt_pipeline(tmp_path):
    # transformers rebuilds Qwen2's tokenizer in code (for model_type qwen2 whatever the class
    # says): the same plain byte-level files load fast as qwen3 but are declined as qwen2.
    plain = build_tokenizer_variant(tmp_path / "plain", "chatml")
    FastTokenizer.load(plain, "qwen3")
    with pytest.raises(TokenizerDeclined, match="differs from Qwen2Tokenizer's"):
        FastTokenizer.load(plain, "qwen2")
    qwen = build_tokenizer_variant(tmp_path / "qwen", "qwen2")
    FastTokenizer.load(qwen, "qwen2")
    data = json.loads((qwen / "tokenizer.json").read_text())
    data["normalizer"] = None
    (qwen / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerDeclined, match="normalizer differs"):
        FastTokenizer.load(qwen, "qwen2")


def test_qwen2_checkpoint_with_qwen_tokenizer_loads_fast(tmp_path):
    path = build_checkpoint(tmp_path / "q", "qwen2")
    tok = build_tokenizer_variant(tmp_path / "tok", "qwen2")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, path / name)
    (path / "special_tokens_map.json").unlink(missing_ok=True)
    fast = load_checkpoint(str(path), "cpu", "float32", loader="fast")
    ref = load_checkpoint(str(path), "cpu", "float32", loader="transformers")
    assert fast.loader == "fast" and fast.eos_token_ids == ref.eos_token_ids
    text = ref.api_tokenizer.apply_chat_template(CONVERSATIONS[1], tokenize=False)
    assert fast.api_tokenizer.apply_chat_template(CONVERSATIONS[1], tokenize=False) == text
    assert fast.api_tokenizer.encode(text) == ref.api_tokenizer.encode(text)


def test_auto_falls_back_with_a_logged_reason(tmp_path, caplog):
    path = build_checkpoint(tmp_path / "q", "qwen2")
    with caplog.at_level(logging.INFO, logger="graphserve.loader"):
        ckpt = load_checkpoint(str(path), "cpu", "float32")
    assert ckpt.loader == "transformers"
    assert "Qwen2Tokenizer" in ckpt.fallback_reason
    assert any(
        "with transformers" in r.getMessage() and "Qwen2Tokenizer" in r.getMessage()
        for r in caplog.records
    )
    with pytest.raises(ModelLoadError, match="--loader fast cannot reproduce"):
        load_checkpoint(str(path), "cpu", "float32", loader="fast")


def test_the_api_tokenizer_is_chosen_as_the_load_chooses(tmp_path):
    from server.model_loader import load_api_tokenizer

    llama = build_checkpoint(tmp_path / "l", "llama")
    qwen = build_checkpoint(tmp_path / "q", "qwen2")  # declined by the fast tokenizer
    assert isinstance(load_api_tokenizer(llama), FastTokenizer)
    assert not isinstance(load_api_tokenizer(llama, "transformers"), FastTokenizer)
    fallback = load_api_tokenizer(qwen)
    ref = load_checkpoint(str(qwen), "cpu", "float32").api_tokenizer
    assert not isinstance(fallback, FastTokenizer)
    assert fallback.encode("hello world") == ref.encode("hello world")
    with pytest.raises(ModelLoadError, match="--loader fast cannot reproduce"):
        load_api_tokenizer(qwen, "fast")


def test_forced_transformers_loader_is_honoured(tmp_path):
    path = build_checkpoint(tmp_path / "l", "llama")
    assert load_checkpoint(str(path), "cpu", "float32").loader == "fast"
    ckpt = load_checkpoint(str(path), "cpu", "float32", loader="transformers")
    assert ckpt.loader == "transformers" and ckpt.fallback_reason == "--loader transformers"


# -- no transformers import ------------------------------------------------------------------------

_ENGINE_LOAD = """
import json, sys
from server.config import EngineConfig
from server.model_runner import ModelRunner
core = ModelRunner(EngineConfig(model=sys.argv[1] or None, device="cpu", loader=sys.argv[2],
                                max_num_seqs=2, max_model_len=64), lambda *a: None)
core.load()
print(json.dumps({"loader": core.checkpoint.loader, "timings": core.timings,
                  "transformers": "transformers" in sys.modules,
                  "dynamo": "torch._dynamo" in sys.modules}))
"""


def _load_in_subprocess(model: str, loader: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _ENGINE_LOAD, model, loader],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fast_engine_load_never_imports_transformers(tmp_path):
    load_checkpoint(None, "cpu", "float32", loader="fast")  # the default model exists now
    fast = _load_in_subprocess("", "auto")
    assert fast["loader"] == "fast" and fast["transformers"] is False
    # torch._dynamo (sympy, fx, ...) cost 5.4 s of startup on the H100 box when an innocent
    # import (torch.nn.attention.bias) pulled it in; nothing on the load path may.
    assert fast["dynamo"] is False
    llama = build_checkpoint(tmp_path / "l", "llama")
    assert _load_in_subprocess(str(llama), "fast")["transformers"] is False
    # The control: the transformers loader does import it, and counts it as import time.
    slow = _load_in_subprocess("", "transformers")
    assert slow["loader"] == "transformers" and slow["transformers"] is True
    assert slow["timings"]["import_s"] > fast["timings"]["import_s"]


# -- the API's prompt handling on the fast tokenizer -----------------------------------------------


@pytest.mark.parametrize("style", ["llama3", "bos_eos"])
def test_api_prompts_are_the_same_on_both_tokenizers(tmp_path, style):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from server.http.errors import ApiError
    from server.http.prompts import chat_prompt as _chat_prompt
    from server.http.prompts import completion_prompt as _completion_prompt
    from server.http.schemas import ChatMessage

    path = build_tokenizer_variant(tmp_path / style, style)
    fast = FastTokenizer.load(path, TOKENIZER_STYLES[style][0])
    engines = [SimpleNamespace(tokenizer=t, vocab_size=None)
               for t in (fast, AutoTokenizer.from_pretrained(path, local_files_only=True))]
    messages = [ChatMessage(role="developer", content="Be brief."),
                ChatMessage(role="user", content="Hi <|eot_id|> there", name="ann")]
    outcomes = []
    for engine in engines:
        completion = _completion_prompt(engine, "The quick brown fox")
        try:
            chat = _chat_prompt(engine, messages)
        except ApiError as exc:  # no chat template: the API's own 400
            chat = (exc.status, "chat template rejected" in exc.message)
        outcomes.append((completion, chat, _completion_prompt(engine, "")))
    assert outcomes[0] == outcomes[1]
    if style == "bos_eos":
        assert outcomes[0][1] == (400, True)


def test_fast_loader_shares_one_tokenizer_across_threads(tmp_path):
    """The fast loader parses tokenizer.json once: the engine thread and the prompt workers
    use the same object, and concurrent encode/decode from several threads give what one
    thread alone gives."""
    import threading

    path = build_checkpoint(tmp_path / "m", "llama")
    ckpt = load_checkpoint(str(path), "cpu", "float32", loader="fast")
    assert ckpt.tokenizer is ckpt.api_tokenizer
    tok = ckpt.tokenizer
    texts = [f"request {i}: the quick brown fox {'jumps ' * (i % 7)}over {i * 31} dogs"
             for i in range(40)]
    expected = [(tok.encode(t), tok.decode(tok.encode(t))) for t in texts]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            results[k] = [(tok.encode(t), tok.decode(tok.encode(t))) for t in texts * 5][:40]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(results[k] == expected for k in range(6))
