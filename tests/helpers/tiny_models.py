"""Tiny random checkpoints of each supported architecture, written as real HF directories.

Weights are drawn with a larger spread than HF's init so logits are far from uniform: greedy
decoding then has clear winners, and a mismatch against the reference shows as a token change.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. "
    "Graph capture makes decoding fast; readiness comes first. "
    "def add(a, b):\n    return a + b\n"
    "Ünïcödé, 日本語のテキスト, emoji 🙂 and numbers 12345. "
) * 20


def build_tokenizer(path: Path) -> None:
    """A small byte-level BPE tokenizer with bos/eos and a ChatML-like chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(path)


def build_checkpoint(
    path: Path,
    arch: str = "llama",
    seed: int = 0,
    vocab_size: int = 400,
    init_std: float = 0.15,
    **overrides,
) -> Path:
    """Write a random-weight checkpoint of `arch` (fp32 safetensors) plus tokenizer to `path`."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    cfg_cls, model_cls = classes[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        # Llama 3 style RoPE scaling, so the scaled-frequency path is exercised.
        kwargs["rope_parameters"] = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        }
    if arch == "qwen3":
        kwargs["head_dim"] = 32  # Qwen3 decouples head_dim from hidden/heads
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    config = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, init_std)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer(path)
    gen = {"bos_token_id": 0, "eos_token_id": 1}
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Reference greedy decoding: full-sequence forward, argmax of the last position, repeat."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            ids.append(tok)
    return out


def hf_reference(path):
    """The checkpoint at `path` loaded by transformers in float32, in eval mode: the reference
    the engine's greedy tokens and logits are compared with (`hf_greedy`)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, local_files_only=True
    ).eval()


# -- tokenizer variants for the fast-tokenizer parity tests ---------------------------------------

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if strftime_now is defined %}{%- set date = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Today Date: ' + date + '\\n\\n' + system + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
CHATML_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- for tool in tools %}"
    "{{- tool | tojson }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if loop.first and message.role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content }}"
    "{%- if message.name is defined %}{{- ' (' ~ message.name ~ ')' }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

# style -> (model_type, special tokens, bos, eos, post-processor adds (bos, eos), template)
TOKENIZER_STYLES = {
    "llama3": (
        "llama",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        (True, False),
        LLAMA3_TEMPLATE,
    ),
    "chatml": (
        "qwen3",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        (False, False),
        CHATML_TEMPLATE,
    ),
    "mistral": (
        "mistral",
        ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        "<s>",
        "</s>",
        (True, False),
        MISTRAL_TEMPLATE,
    ),
    "qwen2": (
        "qwen2",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        "<|im_end|>",
        (False, False),
        CHATML_TEMPLATE,
    ),
    "no_bos": ("llama", ["<s>", "</s>"], "<s>", "</s>", (False, False), CHATML_TEMPLATE),
    "bos_eos": ("llama", ["<s>", "</s>"], "<s>", "</s>", (True, True), None),
}


def build_tokenizer_variant(path: Path, style: str) -> Path:
    """A tokenizer directory written the way hub checkpoints of `style` ship theirs.

    Files are written by hand (not by save_pretrained) so each variant carries exactly the
    tokenizer_config.json keys of its style: add_bos_token / add_eos_token stated or not, the
    template in tokenizer_config.json or in chat_template.jinja, added_tokens_decoder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if style == "qwen2":
        return _build_qwen2_tokenizer(path)
    model_type, specials, bos, eos, (adds_bos, adds_eos), template = TOKENIZER_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer)
    if adds_bos or adds_eos:
        single = " ".join(([f"{bos}:0"] if adds_bos else []) + ["$A:0"]
                          + ([f"{eos}:0"] if adds_eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if adds_bos else []) + ["$B:1"]
                                       + ([f"{eos}:1"] if adds_eos else []))
        used = [t for t, on in ((bos, adds_bos), (eos, adds_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in used]
        )
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in specials
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast" if style != "chatml" else "TokenizersBackend",
        "added_tokens_decoder": added,
        "bos_token": bos,
        "eos_token": eos,
        "model_max_length": 131072,
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": style == "llama3",
    }
    if style == "chatml":
        config["pad_token"] = "<|endoftext|>"
        config["errors"] = "replace"
        config["split_special_tokens"] = False
    if style == "mistral":
        config.update(add_bos_token=True, add_eos_token=False, unk_token="<unk>", legacy=False)
    if style in ("no_bos", "bos_eos"):
        config.update(add_bos_token=adds_bos, add_eos_token=adds_eos)
    if style == "no_bos":
        (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (path / "config.json").write_text(json.dumps({"model_type": model_type}), encoding="utf-8")
    return path


QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _build_qwen2_tokenizer(path: Path) -> Path:
    """Files shaped like Qwen2.5's: NFC + split regex + byte level, tokens added past the vocab."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([_CORPUS], trainer)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    added = {
        str(token_id): {
            "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
            "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special,
        }
        for token_id, t in sorted(tok.get_added_tokens_decoder().items())
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2"}), encoding="utf-8")
    return path
