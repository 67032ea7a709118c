"""Grammars for constrained decoding, with llguidance.

Why llguidance (measured on the 2-core CI box, docs/benchmarks.md section "Structured outputs"):
per-token mask 3-30 us at a 63k-128k vocabulary against 27-66 us for xgrammar and 80-150 us
for outlines-core, grammar compile under 1 ms (xgrammar 2.5-15 ms, outlines-core 30 ms to 7 s),
and a 3 MB abi3 wheel with no dependencies (xgrammar needs torch, transformers, triton and
tvm-ffi). It compiles lazily (Earley parser + lexer over the token trie), so a new schema costs
about as much as its first mask.

Two sides:

* Event loop: `json_schema_grammar`, `json_object_grammar` (and `tool_calls.tool_grammar`)
  build grammar strings; `check_grammar` validates one (cached by the grammar text) and
  raises `GrammarError` with llguidance's message, which the HTTP layer turns into a 400.
* Engine thread: `GrammarBackend` owns the llguidance tokenizer (built on a background thread
  at startup: 0.3-0.7 s for a 128k vocabulary, holding the GIL, so readiness waits for it:
  `wait_built`) and hands out one
  `SequenceGrammar` per constrained sequence, copied from a cached prototype matcher per
  grammar. Masks are int32 bitmasks, bit `t % 32` of word `t // 32` set when token t is
  allowed, the layout `server.logits_processors.apply_bitmask` unpacks on the device.

Whitespace is not flexible (compact JSON: `{"a":1}`): a model (or a random one) cannot stall
in whitespace, and the output is what OpenAI's strict mode produces.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import threading
import time
from typing import Any

from server.errors import GrammarError

log = logging.getLogger("graphserve.grammar")

__all__ = ["GrammarError", "GrammarBackend", "SequenceGrammar", "check_grammar",
           "json_object_grammar", "json_schema_grammar", "tokenizer_json"]

COMPACT = {"whitespace_flexible": False}
_PROTOTYPES = 64  # compiled grammars kept per engine (least recently used dropped)


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """A grammar for JSON documents valid against `schema` (compact whitespace)."""
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT)
    except Exception as exc:  # the binding raises ValueError, or TypeError on odd input
        raise GrammarError(str(exc)) from None


def json_object_grammar() -> str:
    """Any JSON object (`response_format: {"type": "json_object"}`)."""
    return json_schema_grammar({"type": "object"})


@functools.lru_cache(maxsize=256)
def _validate(grammar: str) -> str:
    import llguidance

    return llguidance.LLMatcher.validate_grammar(grammar)


def check_grammar(grammar: str) -> str:
    """Return `grammar` if llguidance accepts it, else raise GrammarError (cached)."""
    message = _validate(grammar)
    if message and not message.startswith("WARNING"):
        raise GrammarError(message.strip().splitlines()[0])
    return grammar


class SequenceGrammar:
    """One constrained sequence's matcher. Engine thread only.

    Invariant: it has consumed exactly the tokens of its sequence that the host has read (the
    engine advances it right after reading a step, before filling the next step's mask).
    """

    __slots__ = ("_m",)

    def __init__(self, matcher):
        self._m = matcher

    def consume(self, token: int) -> bool:
        """Advance on a sampled token; False if the grammar did not allow it (error state)."""
        if self._m.is_stopped():
            return True  # past the end (EOS was consumed): the token is being discarded
        return bool(self._m.consume_token(token))

    def fill(self, mask, row: int) -> None:
        """Write the allowed-token bitmask into `mask[row]` (numpy int32, C-contiguous)."""
        if self._m.is_error():
            return  # the sequence is being failed; its row is discarded
        # A finished grammar (stopped) yields a mask of the EOS tokens alone: that is how a
        # complete document ends the sequence.
        view = mask[row]
        self._m.unsafe_compute_mask_ptr(view.ctypes.data, view.nbytes)

    @property
    def accepting(self) -> bool:
        return bool(self._m.is_accepting())

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


class GrammarBackend:
    """The engine's llguidance tokenizer and compiled-grammar cache. Engine thread only
    (apart from the builder thread started here, which only writes `_tokenizer`)."""

    def __init__(self, tokenizer_json: str | None, vocab_size: int, eos_ids):
        self.vocab_size = vocab_size
        self.mask_words = (vocab_size + 31) // 32
        self._eos = sorted(eos_ids)
        self._tokenizer = None
        self._error: str | None = None
        self._built = threading.Event()
        self._prototypes: collections.OrderedDict[str, Any] = collections.OrderedDict()
        if tokenizer_json is None:
            self._error = "this model's tokenizer has no tokenizer.json for grammars"
            self._built.set()
            return
        threading.Thread(
            target=self._build, args=(tokenizer_json,), name="graphserve-grammar-tokenizer",
            daemon=True,
        ).start()

    def _build(self, tokenizer_json: str) -> None:
        # Logged with its span: the build holds the GIL (0.3-0.6 s for a 128k vocabulary), so
        # one that outlasts the weight load stalls whatever runs right after ready.
        t0 = time.perf_counter()
        try:
            import llguidance

            try:
                self._tokenizer = llguidance.LLTokenizer(
                    tokenizer_json, n_vocab=self.vocab_size, eos_token=self._eos
                )
            except TypeError:  # llguidance < 1.7 takes one EOS id (the GPU image's 1.6.1)
                self._tokenizer = llguidance.LLTokenizer(
                    tokenizer_json, n_vocab=self.vocab_size, eos_token=self._eos[0]
                )
        except Exception as exc:  # reported to the requests that need it
            self._error = f"grammar tokenizer could not be built: {exc}"
        finally:
            self._built.set()
        log.info("grammar tokenizer %s in %.2f s", "built" if self._error is None else "failed",
                 time.perf_counter() - t0)

    def wait_built(self, timeout_s: float) -> float:
        """Wait up to `timeout_s` for the tokenizer build to end (built or failed); returns the
        seconds waited. The engine calls it before it reports ready: the build holds the GIL,
        so one still running at ready would stall the first requests for the rest of it (8e:
        a 512-token prompt sent at ready answered in 560-712 ms). It normally ends long before
        (it starts while the weights load). Past the timeout readiness goes ahead and the
        build goes on."""
        t0 = time.perf_counter()
        if not self._built.wait(timeout_s):
            log.warning("grammar tokenizer still building after %.1f s; ready without it "
                        "(constrained requests wait for it)", timeout_s)
        waited = time.perf_counter() - t0
        if waited >= 0.01:
            log.info("ready waited %.2f s for the grammar tokenizer", waited)
        return waited

    def matcher(self, grammar: str) -> SequenceGrammar:
        """A fresh matcher for `grammar` (waits for the tokenizer the first time; raises
        GrammarError if the grammar or the tokenizer cannot be used)."""
        import llguidance

        self._built.wait()
        if self._tokenizer is None:
            raise GrammarError(self._error or "grammar tokenizer unavailable")
        proto = self._prototypes.get(grammar)
        if proto is None:
            proto = llguidance.LLMatcher(self._tokenizer, grammar)
            if proto.is_error():
                raise GrammarError(proto.get_error())
            self._prototypes[grammar] = proto
            if len(self._prototypes) > _PROTOTYPES:
                self._prototypes.popitem(last=False)
        else:
            self._prototypes.move_to_end(grammar)
        return SequenceGrammar(proto.deep_copy())


def tokenizer_json(tokenizer) -> str | None:
    """The tokenizers-library JSON behind a tokenizer (ours, HF's fast one, or a test's)."""
    for attr in ("to_json",):
        fn = getattr(tokenizer, attr, None)
        if callable(fn):
            return fn()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    return None


def dumps_schema(schema: Any) -> str:
    """Canonical text of a schema (the cache key of its grammar)."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))
