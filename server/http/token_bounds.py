"""A provable lower bound on a text's token count from its length alone, per tokenizer.

A prompt whose *fewest possible* tokens already exceed the context is refused before it is
tokenised: `ceil(len(text) / max_chars_per_token)` tokens at least, for every text, where
`max_chars_per_token` is derived here from the tokenizer's own definition. The bound must hold
for every input, including adversarial ones, so the derivation is conservative and gives up
(returns None: no early refusal, the text is tokenised in the prompt workers) whenever a part
of the pipeline could make characters vanish:

* The model must turn every character into at least one token per `L` characters, where `L` is
  the longest token string (vocabulary and added tokens). Byte-level vocabularies (GPT-2,
  Llama 3, Qwen) write one byte as one character, so a token of `L` characters covers at most
  `L` bytes, hence at most `L` characters of text; this needs the full byte alphabet in the
  vocabulary. Otherwise BPE must have `byte_fallback` with all 256 `<0xNN>` tokens (Llama 2,
  Mistral, Gemma) or an unknown token that is not fused over runs of unknown characters: a BPE
  without either silently drops characters it does not know (tested), and a fused unknown
  token covers any number of them.
* The normaliser may shrink the text by a bounded factor only: NFC/NFKC compose at most 4 code
  points into one (the longest canonical decomposition, U+1F82, checked against `unicodedata`
  by the tests); a literal `Replace` by `len(pattern) / len(content)`. Stripping, accent
  removal, regex replacement, BERT's clean-up and sentencepiece's precompiled maps can delete
  characters: no bound.
* The pre-tokeniser must not remove text (BERT's whitespace splitting does; `Split` and
  `Punctuation` with behaviour `Removed` do).
* No added token may have `lstrip`/`rstrip` (those swallow any amount of whitespace), and the
  tokenizer must not truncate.

Special tokens added around the text only add tokens. A tokenizer may also state the bound
itself as an int attribute `max_chars_per_token` (the test suite's byte-level fake: 1).

Thread-safe: `max_chars_per_token` only reads the tokenizer; results are cached per tokenizer
object under a lock. The first call for a large vocabulary takes tens of milliseconds, so it is
made on a prompt worker, never on the event loop.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from typing import Any

logger = logging.getLogger("graphserve.api")

MAX_CANONICAL_DECOMPOSITION = 4  # code points in the longest NFD of one character (U+1F82)

_cache: weakref.WeakKeyDictionary[Any, int | None] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def min_tokens(text: str, chars_per_token: int | None) -> int:
    """The fewest tokens `text` can encode to (0 when no bound is known)."""
    if not chars_per_token:
        return 0
    return -(-len(text) // chars_per_token)


def max_chars_per_token(tokenizer: Any) -> int | None:
    """The most characters of input one token of `tokenizer` can stand for, or None if unknown."""
    declared = getattr(tokenizer, "max_chars_per_token", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
    try:
        with _cache_lock:
            if tokenizer in _cache:
                return _cache[tokenizer]
    except TypeError:  # not weak-referenceable: analyse every time (only fakes are like that)
        return _analyse_safely(tokenizer)
    bound = _analyse_safely(tokenizer)
    with _cache_lock:
        _cache[tokenizer] = bound
    return bound


def _analyse_safely(tokenizer: Any) -> int | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # e.g. a sentencepiece "slow" tokenizer: nothing to inspect
        return None
    try:
        bound = analyse_backend(backend)
    except Exception:  # an unexpected tokenizer layout: no early refusal, never an error
        logger.warning("cannot derive a token bound for this tokenizer; long prompts are "
                       "tokenised before they are refused", exc_info=True)
        return None
    if bound is None:
        logger.info("this tokenizer allows no character bound on tokens; long prompts are "
                    "tokenised before they are refused")
    else:
        logger.info("prompts longer than %d characters per token of context are refused "
                    "before tokenisation", bound)
    return bound


def analyse_backend(backend: Any) -> int | None:
    """`max_chars_per_token` of a `tokenizers.Tokenizer` (see the module docstring)."""
    if backend.truncation is not None:
        return None
    normalizer = _state(backend.normalizer)
    pre_tokenizer = _state(backend.pre_tokenizer)
    shrink = normalizer_shrink(normalizer)
    if shrink is None or not pre_tokenizer_keeps_text(pre_tokenizer):
        return None
    added = backend.get_added_tokens_decoder().values()
    if any(token.lstrip or token.rstrip for token in added):
        return None
    model_vocab = backend.get_vocab(with_added_tokens=False)  # what the model falls back on
    if not _model_covers_every_character(backend.model, model_vocab, normalizer, pre_tokenizer):
        return None
    vocab = backend.get_vocab(with_added_tokens=True)  # added tokens match literal text too
    return max(len(token) for token in vocab) * shrink


def _state(component: Any) -> dict[str, Any] | None:
    return None if component is None else json.loads(component.__getstate__())


def normalizer_shrink(spec: dict[str, Any] | None) -> int | None:
    """By how much a normaliser can shorten a text at most (its length divided by this is a
    lower bound on the normalised length), or None when it can delete characters."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        total = 1
        for part in spec.get("normalizers", []):
            factor = normalizer_shrink(part)
            if factor is None:
                return None
            total *= factor
        return total
    if kind in ("NFD", "NFKD", "Lowercase", "Prepend", "ByteLevel"):
        return 1  # decompose, map one to one or more, or add: never shorter
    if kind in ("NFC", "NFKC"):
        return MAX_CANONICAL_DECOMPOSITION
    if kind == "Replace":
        pattern = (spec.get("pattern") or {}).get("String")
        content = spec.get("content")
        if not isinstance(pattern, str) or not isinstance(content, str) or not content:
            return None  # a regex can match any length; an empty content deletes
        return max(1, -(-len(pattern) // len(content)))
    return None


def pre_tokenizer_keeps_text(spec: dict[str, Any] | None) -> bool:
    """Whether a pre-tokeniser passes every character on (splitting is fine, removing is not)."""
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(pre_tokenizer_keeps_text(p) for p in spec.get("pretokenizers", []))
    if kind in ("ByteLevel", "Metaspace", "Digits", "UnicodeScripts"):
        return True
    if kind in ("Split", "Punctuation"):
        return spec.get("behavior") != "Removed"
    return False  # Whitespace, WhitespaceSplit, BertPreTokenizer, CharDelimiterSplit, unknown


def _has_type(spec: dict[str, Any] | None, kind: str) -> bool:
    if spec is None:
        return False
    if spec.get("type") == kind:
        return True
    parts = spec.get("pretokenizers") or spec.get("normalizers") or []
    return any(_has_type(p, kind) for p in parts)


def _model_covers_every_character(model: Any, vocab: dict[str, int],
                                  normalizer: dict[str, Any] | None,
                                  pre_tokenizer: dict[str, Any] | None) -> bool:
    if type(model).__name__ != "BPE":
        return False  # WordPiece/WordLevel map whole words to one unknown token; Unigram fuses
    # Each fallback below works only if its tokens exist: a BPE whose byte_fallback finds no
    # <0xNN> token silently drops the character instead (seen with a vocabulary without them).
    if getattr(model, "byte_fallback", False) and all(f"<0x{b:02X}>" in vocab
                                                       for b in range(256)):
        return True
    if _has_type(pre_tokenizer, "ByteLevel") or _has_type(normalizer, "ByteLevel"):
        from tokenizers.pre_tokenizers import ByteLevel

        if all(ch in vocab for ch in ByteLevel.alphabet()):
            return True
    unk = getattr(model, "unk_token", None)
    return unk is not None and unk in vocab and not getattr(model, "fuse_unk", True)
