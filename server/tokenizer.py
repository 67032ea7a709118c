"""The server's tokenizer without transformers: `tokenizer.json` through the `tokenizers` library.

`FastTokenizer` offers exactly what the server uses from a transformers tokenizer: `encode`,
`decode`, `len()`, `bos_token_id` / `eos_token_id` and `apply_chat_template(..., tokenize=False)`.
It reproduces what transformers 5's `TokenizersBackend` does with the same files, and
`FastTokenizer.load` declines (raises `TokenizerDeclined` with the reason) whenever a file asks for
something it cannot reproduce faithfully, e.g. a model-specific tokenizer class that transformers
rebuilds from the vocabulary (Qwen2Tokenizer is accepted when tokenizer.json already holds the
exact pipeline transformers rebuilds), or a tokenizer_config.json key it does not know. The loader
then falls back to transformers, so a declined checkpoint still tokenizes exactly as before.

Chat templates render in a sandboxed jinja2 environment set up the way transformers sets up its
own: trim_blocks and lstrip_blocks, loop controls, a `tojson` that does not HTML-escape,
`raise_exception`, `strftime_now`, namespaces that refuse underscore names, the
`{% generation %}` block tag, and the special tokens (bos_token, eos_token, ...) as variables.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from server.hf_config import read_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# Classes transformers loads straight from tokenizer.json; model-specific classes (LlamaTokenizer,
# Qwen2Tokenizer, ...) rebuild normaliser and pre-tokeniser in code instead.
_PLAIN_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# Qwen2Tokenizer (also used for Qwen3) is rebuilt in code, but its pipeline is fixed: when
# tokenizer.json holds exactly that pipeline, loading the file gives the same tokenizer.
_QWEN2_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
# Model types whose tokenizer transformers rebuilds as Qwen2Tokenizer whatever the file says.
_QWEN2_MODEL_TYPES = ("qwen2",)
# Qwen2Tokenizer's pre-tokenisation regex (the one Qwen's own tokenizer.json files carry).
_QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2Tokenizer's defaults for special tokens the config does not name.
_QWEN2_SPECIAL_DEFAULTS = {
    "unk_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")
_EXTRA_SPECIAL = ("additional_special_tokens", "extra_special_tokens")
# tokenizer_config.json keys that are either reproduced here or do not change encode, decode,
# len or chat rendering of a TokenizersBackend. Any other key declines the fast path.
_KNOWN_KEYS = frozenset(
    {
        "tokenizer_class",
        "backend",
        "added_tokens_decoder",
        "chat_template",
        "clean_up_tokenization_spaces",
        "model_max_length",
        "model_input_names",
        "padding_side",
        "truncation_side",
        "add_bos_token",
        "add_eos_token",
        "split_special_tokens",
        "legacy",  # only read by the sentencepiece-based classes
        "errors",  # only read by the python BPE classes
        "name_or_path",
        "use_default_system_prompt",
        "is_local",
        "add_prefix_space",  # accepted only when false, and only for Qwen2Tokenizer
        *_NAMED_SPECIAL,
        *_EXTRA_SPECIAL,
    }
)


class TokenizerDeclined(Exception):
    """The checkpoint's tokenizer needs transformers to be reproduced; the message says why."""


class TokenizerLoadError(ValueError):
    """A tokenizer file is present but broken; the message names it."""


def _token_content(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerDeclined(f"special token entry {value!r} has an unknown form")


class FastTokenizer:
    """A `tokenizers.Tokenizer` plus the special-token and chat-template behaviour of transformers.

    One instance serves every thread (the engine thread's detokenisation, the prompt workers'
    tokenisation and chat rendering): the `tokenizers` methods called here all take the Rust
    tokenizer by shared reference, so concurrent calls never conflict, and nothing mutates it
    after `load`. The one lazily built attribute, the compiled chat template, is at worst
    compiled twice by two threads at once, either result being the same.
    """

    def __init__(self, backend, special: dict[str, str], chat_template: str | None,
                 source_json: str | None = None):
        self._tok = backend
        # The tokenizer.json text it was built from (never changed after): `to_json` hands it
        # to the grammar process instead of re-serialising MBs on the engine thread.
        self._source_json = source_json
        self._special = special  # named special tokens that are set, e.g. {"bos_token": "<s>"}
        self.chat_template = chat_template
        self.bos_token = special.get("bos_token")
        self.eos_token = special.get("eos_token")
        self.bos_token_id = self._id(self.bos_token)
        self.eos_token_id = self._id(self.eos_token)
        self.pad_token_id = self._id(special.get("pad_token"))
        self._template = None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, model_dir: Path, model_type: str | None) -> FastTokenizer:
        """The tokenizer of `model_dir`, or TokenizerDeclined / TokenizerLoadError."""
        from tokenizers import Tokenizer

        tok_file = model_dir / TOKENIZER_FILE
        if not tok_file.is_file():
            raise TokenizerDeclined("no tokenizer.json (sentencepiece or vocab files only)")
        cfg_file = model_dir / TOKENIZER_CONFIG_FILE
        config = read_json(cfg_file, TokenizerLoadError) if cfg_file.is_file() else {}
        unknown = sorted(set(config) - _KNOWN_KEYS)
        if unknown:
            raise TokenizerDeclined(f"tokenizer_config.json sets {', '.join(unknown)}")
        tok_class = config.get("tokenizer_class")
        qwen2 = tok_class in _QWEN2_CLASSES or (
            model_type in _QWEN2_MODEL_TYPES and tok_class in _PLAIN_CLASSES
        )
        if tok_class not in _PLAIN_CLASSES and not qwen2:
            raise TokenizerDeclined(
                f"tokenizer_class {tok_class!r} is not one transformers loads from tokenizer.json "
                "as it is"
            )
        if (model_dir / "tekken.json").is_file():
            # With mistral-common installed transformers tokenizes with it instead.
            raise TokenizerDeclined("tekken.json present (Mistral's own tokenizer format)")
        if config.get("add_prefix_space"):
            raise TokenizerDeclined("add_prefix_space is set")
        if config.get("split_special_tokens"):
            raise TokenizerDeclined("split_special_tokens is set")
        if (model_dir / CHAT_TEMPLATE_DIR).is_dir():
            raise TokenizerDeclined("several named chat templates (additional_chat_templates/)")

        try:
            text = tok_file.read_text(encoding="utf-8")
            backend = Tokenizer.from_str(text)
        except Exception as exc:  # the Rust parser raises plain Exception subclasses
            raise TokenizerLoadError(f"tokenizer.json cannot be loaded: {exc}") from exc
        if qwen2:
            cls._check_qwen2_pipeline(json.loads(text), config)
        if backend.truncation is not None or backend.padding is not None:
            raise TokenizerDeclined("tokenizer.json enables truncation or padding")
        model_kind = type(backend.model).__name__
        if config.get("clean_up_tokenization_spaces") and model_kind != "BPE":
            # transformers skips the clean-up for BPE models only.
            raise TokenizerDeclined(f"clean_up_tokenization_spaces on a {model_kind} tokenizer")

        special, extra = cls._special_tokens(model_dir, config, qwen2)
        added = backend.get_added_tokens_decoder()
        added_special = {t.content for t in added.values() if t.special}
        for token in [*special.values(), *extra]:
            # transformers would add a missing one to the vocabulary (changing ids and len).
            if token not in added_special:
                raise TokenizerDeclined(f"special token {token!r} is not a special added token")
        cls._check_added_tokens(config.get("added_tokens_decoder") or {}, added)
        cls._check_post_processor(backend, config, special)
        chat_template = cls._chat_template(model_dir, config)
        return cls(backend, special, chat_template, source_json=text)

    @staticmethod
    def _check_qwen2_pipeline(data: dict, config: dict) -> None:
        """Decline unless tokenizer.json holds exactly the pipeline Qwen2Tokenizer rebuilds.

        transformers keeps only the vocabulary, merges, post-processor and the added tokens of
        tokenizer_config.json; everything compared here is what it builds in code instead.
        """

        def decline(what: str):
            raise TokenizerDeclined(f"tokenizer.json's {what} differs from Qwen2Tokenizer's")

        model = data.get("model") or {}
        expected_model = {
            "type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False,
            "byte_fallback": False, "ignore_merges": False,
        }
        for key, value in expected_model.items():
            if model.get(key, False if key == "ignore_merges" else None) != value:
                decline(f"model.{key}")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key) not in (None, ""):
                decline(f"model.{key}")
        if data.get("normalizer") != {"type": "NFC"}:
            decline("normalizer")
        pre = data.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
        if not steps or len(steps) != 2:
            decline("pre_tokenizer")
        split, byte_level = steps
        if split != {
            "type": "Split", "pattern": {"Regex": _QWEN2_SPLIT_REGEX}, "behavior": "Isolated",
            "invert": False,
        }:
            decline("pre_tokenizer split")
        # trim_offsets only changes character offsets, which the server never reads.
        if (byte_level.get("type"), byte_level.get("add_prefix_space"),
                byte_level.get("use_regex")) != ("ByteLevel", False, False):
            decline("pre_tokenizer byte level")
        if (data.get("decoder") or {}).get("type") != "ByteLevel":
            decline("decoder")
        # The rebuilt tokenizer starts with no added tokens: it gets exactly the config's, and
        # those outside the BPE vocabulary take the next free ids in order.
        declared = config.get("added_tokens_decoder") or {}
        added = data.get("added_tokens") or []
        if {str(t.get("id")) for t in added} != set(declared):
            raise TokenizerDeclined(
                "tokenizer.json's added tokens differ from tokenizer_config.json's"
            )
        vocab = model.get("vocab") or {}
        extra_ids = sorted(t["id"] for t in added if t.get("content") not in vocab)
        if extra_ids != list(range(len(vocab), len(vocab) + len(extra_ids))):
            raise TokenizerDeclined("added token ids do not follow the vocabulary contiguously")

    @staticmethod
    def _special_tokens(
        model_dir: Path, config: dict, qwen2: bool = False
    ) -> tuple[dict[str, str], list[str]]:
        values = {key: config[key] for key in (*_NAMED_SPECIAL, *_EXTRA_SPECIAL) if key in config}
        if qwen2:
            values = {**_QWEN2_SPECIAL_DEFAULTS, **values}
        map_file = model_dir / SPECIAL_TOKENS_MAP_FILE
        if "added_tokens_decoder" not in config and map_file.is_file():
            # transformers reads this legacy file only then, and lets it override the config.
            values.update(read_json(map_file, TokenizerLoadError))
        special = {}
        for key in _NAMED_SPECIAL:
            content = _token_content(values.get(key))
            if content is not None:
                special[key] = content
        extra: list[str] = []
        for key in _EXTRA_SPECIAL:
            tokens = values.get(key) or []
            if isinstance(tokens, dict):
                tokens = list(tokens.values())
            if not isinstance(tokens, list):
                raise TokenizerDeclined(f"{key} is not a list")
            extra += [t for t in (_token_content(v) for v in tokens) if t is not None]
        unknown = set(values) - set(_NAMED_SPECIAL) - set(_EXTRA_SPECIAL)
        if unknown:
            raise TokenizerDeclined(f"special_tokens_map.json sets {', '.join(sorted(unknown))}")
        return special, extra

    @staticmethod
    def _check_added_tokens(declared: dict, added: dict) -> None:
        """The config's added_tokens_decoder must describe tokens tokenizer.json already has."""
        fields = ("content", "lstrip", "rstrip", "normalized", "single_word", "special")
        for index, entry in declared.items():
            have = added.get(int(index)) if str(index).isdigit() else None
            if not isinstance(entry, dict) or have is None:
                raise TokenizerDeclined(f"added token {index} is not in tokenizer.json")
            for field in fields:
                if field in entry and entry[field] != getattr(have, field):
                    raise TokenizerDeclined(
                        f"added token {index} differs from tokenizer.json in {field}"
                    )

    @staticmethod
    def _check_post_processor(backend, config: dict, special: dict[str, str]) -> None:
        """add_bos_token / add_eos_token must agree with what tokenizer.json's post-processor does.

        Recent transformers ignore the flags when tokenizer.json exists, older ones rebuilt the
        post-processor from them: only when both agree is the behaviour version-independent.
        """
        plain = backend.encode("a", add_special_tokens=False).ids
        full = backend.encode("a", add_special_tokens=True).ids
        bos = backend.token_to_id(special["bos_token"]) if "bos_token" in special else None
        eos = backend.token_to_id(special["eos_token"]) if "eos_token" in special else None
        adds_bos = bos is not None and len(full) > len(plain) and full[0] == bos
        adds_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
        for key, does in (("add_bos_token", adds_bos), ("add_eos_token", adds_eos)):
            if key in config and bool(config[key]) != does:
                raise TokenizerDeclined(
                    f"{key}={config[key]} disagrees with tokenizer.json's post-processor"
                )

    @staticmethod
    def _chat_template(model_dir: Path, config: dict) -> str | None:
        file = model_dir / CHAT_TEMPLATE_FILE
        if file.is_file():  # transformers gives the separate file priority over the config
            try:
                return file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenizerLoadError(f"{CHAT_TEMPLATE_FILE} cannot be read: {exc}") from exc
        template = config.get("chat_template")
        if template is None or isinstance(template, str):
            return template
        raise TokenizerDeclined("tokenizer_config.json holds several named chat templates")

    # -- what the server calls ----------------------------------------------------------------

    @property
    def backend_tokenizer(self):
        """The `tokenizers.Tokenizer` underneath (transformers' name for it), for read-only use:
        the HTTP layer derives a bound on characters per token from it."""
        return self._tok

    def __len__(self) -> int:
        """Vocabulary size including added tokens (as transformers' len(tokenizer))."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def to_json(self) -> str:
        """The tokenizers-library JSON of this tokenizer (grammar engines build from it)."""
        if self._source_json is not None:
            return self._source_json
        return self._tok.to_str()

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        """Vocabulary strings of `ids` (byte-level BPE: bytes mapped to printable characters)."""
        return [self._tok.id_to_token(i) for i in ids]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `conversation` with the model's chat template (ValueError if it has none)."""
        if self.chat_template is None:
            raise ValueError(
                "Cannot use chat template functions because tokenizer.chat_template is not set "
                "and no template argument was passed!"
            )
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation.")
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        # Deep copies: a template that mutates what it is given must not touch the caller's data.
        variables = {**self._special, **copy.deepcopy(kwargs)}
        text = self._template.render(
            messages=copy.deepcopy([dict(m) for m in conversation]),
            tools=copy.deepcopy(tools),
            documents=copy.deepcopy(documents),
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text


def compile_chat_template(source: str):
    """A jinja2 template in a sandbox configured as transformers configures its own."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text; rendered as-is here."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class SafeNamespace(jinja2.utils.Namespace):
        """Namespaces that refuse underscore attributes, closing a sandbox escape route."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                SafeNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore attributes on a namespace ({name!r})"
                )

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson HTML-escapes (<, >, &, '), which would change the prompt text.
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationBlock, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = SafeNamespace
    return env.from_string(source)
