"""Issue 11, in process: request limits, the early context check and the prompt workers.

The raw-byte checks (`server.http.limits`), the token bound derived from tokenizers
(`server.http.token_bounds`) against real `tokenizers` pipelines and adversarial texts, and the
app's answers to oversized, slow, malformed and costly requests through the ASGI interface with
the fake engine. Process-level behaviour (sockets, timeouts, TLS, the soak) is in
tests/test_soak.py and tests/test_connections.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
import unicodedata
from types import SimpleNamespace

import httpx
import pytest

from server.api import create_app
from server.config import ConfigError, EngineConfig, ServerConfig, parse_byte_size
from server.http import limits
from server.http.limits import (
    MAX_JSON_DEPTH,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    default_max_request_bytes,
    json_depth_over,
    utf8_error,
)
from server.http.token_bounds import (
    MAX_CANONICAL_DECOMPOSITION,
    analyse_backend,
    max_chars_per_token,
    min_tokens,
    normalizer_shrink,
    pre_tokenizer_keeps_text,
)
from tests.helpers.app import assert_error, wait_for_phase
from tests.helpers.fake_engine import FakeEngine, FakeTokenizer

COMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
MiB = 1 << 20


@contextlib.asynccontextmanager
async def serve(*, max_len: int = 256, **server_kwargs):
    """The app on a fake engine (context `max_len`) with `ServerConfig` overrides."""
    config = ServerConfig(
        engine=EngineConfig(max_model_len=max_len, max_num_seqs=4, max_queue=8), **server_kwargs)
    app = create_app(config, engine_factory=lambda c, on_phase: FakeEngine(c, on_phase))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await wait_for_phase(client, "ready")
            state = app.state.graphserve
            yield SimpleNamespace(app=app, client=client, state=state, engine=state.engine)


# ------------------------------------------------------------------------- raw-byte checks
def test_default_body_limit_follows_the_context_with_a_floor():
    assert default_max_request_bytes(None) == MiB
    assert default_max_request_bytes(4096) == MiB
    assert default_max_request_bytes(131072) == 2 * MiB
    assert default_max_request_bytes(1 << 20) == 16 * MiB


@pytest.mark.parametrize("text,expected", [
    ("1048576", 1048576), ("512KiB", 512 << 10), ("8MiB", 8 << 20), ("8 mb", 8 << 20),
    ("1.5G", 3 << 29), ("100b", 100),
])
def test_byte_sizes_parse_with_binary_units(text, expected):
    assert parse_byte_size(text) == expected


@pytest.mark.parametrize("text", ["", "x", "-1", "8TB", "1e6"])
def test_bad_byte_sizes_are_config_errors(text):
    with pytest.raises(ConfigError):
        parse_byte_size(text)


def test_json_depth_counts_structure_and_ignores_strings():
    over = MAX_JSON_DEPTH + 1
    assert json_depth_over(b"[" * over + b"]" * over) == over
    assert json_depth_over(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is None
    # Brackets inside strings, escaped quotes included, are text, not structure.
    text = b'{"prompt": "' + b"[{" * 500 + b'\\"[[[", "stop": ["]]"]}'
    assert json_depth_over(text) is None
    # Unclosed openers count: a parser descends into them before it notices the JSON is broken.
    assert json_depth_over(b'{"prompt": ' + b"[" * 200) == 201
    # Many shallow containers are not deep.
    assert json_depth_over(b"[" + b"[[1],{}]," * 10_000 + b"1]") is None


def test_json_depth_of_the_issue_body_is_quick():
    body = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    t0 = time.perf_counter()
    assert json_depth_over(body) == 100_001
    assert time.perf_counter() - t0 < 0.5  # ~5 ms here; the parser took 17 s in the issue


def test_utf8_errors_name_the_byte_and_offset():
    assert utf8_error('{"prompt": "café"}'.encode()) is None
    assert utf8_error(b'{"prompt": "caf\xe9"}') == (
        "the request body is not valid UTF-8 (byte 0xe9 at offset 15)")


# ------------------------------------------------------------------------- token bounds
def test_the_longest_canonical_decomposition_is_what_the_nfc_factor_assumes():
    longest = max(len(unicodedata.normalize("NFD", chr(c))) for c in range(0x110000)
                  if not 0xD800 <= c < 0xE000)
    assert longest == MAX_CANONICAL_DECOMPOSITION


@pytest.mark.parametrize("spec,factor", [
    (None, 1), ({"type": "NFD"}, 1), ({"type": "Lowercase"}, 1),
    ({"type": "NFC"}, 4), ({"type": "NFKC"}, 4),
    ({"type": "Replace", "pattern": {"String": "  "}, "content": " "}, 2),
    ({"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}, 1),
    ({"type": "Replace", "pattern": {"String": "abc"}, "content": ""}, None),
    ({"type": "Replace", "pattern": {"Regex": "a+"}, "content": "a"}, None),
    ({"type": "Strip", "strip_left": True, "strip_right": True}, None),
    ({"type": "StripAccents"}, None), ({"type": "BertNormalizer"}, None),
    ({"type": "Precompiled", "precompiled_charsmap": ""}, None),
    ({"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Replace", "pattern": {
        "String": "   "}, "content": " "}]}, 12),
    ({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Strip"}]}, None),
])
def test_normalizer_shrink_factors(spec, factor):
    assert normalizer_shrink(spec) == factor


@pytest.mark.parametrize("spec,keeps", [
    (None, True), ({"type": "ByteLevel"}, True), ({"type": "Metaspace"}, True),
    ({"type": "Split", "behavior": "Isolated"}, True),
    ({"type": "Split", "behavior": "Removed"}, False),
    ({"type": "Punctuation", "behavior": "Removed"}, False),
    ({"type": "Whitespace"}, False), ({"type": "WhitespaceSplit"}, False),
    ({"type": "BertPreTokenizer"}, False), ({"type": "SomethingNew"}, False),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits"}, {"type": "ByteLevel"}]}, True),
])
def test_pre_tokenizers_that_drop_text_give_no_bound(spec, keeps):
    assert pre_tokenizer_keeps_text(spec) is keeps


CORPUS = ["The quick brown fox jumps over the lazy dog. " * 20,
          "def f(x):\n    return x * 2\n" * 20,
          "Ελληνικά και 中文 и русский текст " * 20,
          "   indented    spaces\t\ttabs\n\n" * 20]


def tiny_tokenizer(*, byte_level=True, normalizer=None, pre_tokenizer=None, byte_fallback=False,
                   unk_token=None, fuse_unk=False, added=()):
    """A BPE tokenizer trained in milliseconds on CORPUS, with the given pipeline."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=unk_token, byte_fallback=byte_fallback,
                               fuse_unk=fuse_unk))
    tok.normalizer = normalizer
    alphabet = []
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    specials = [unk_token] if unk_token else []
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet,
                                  special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if added:
        tok.add_special_tokens([AddedToken(a, **kw) for a, kw in added])
    return tok


def adversarial_texts(tok) -> list[str]:
    rng = random.Random(11)
    vocab = tok.get_vocab(with_added_tokens=True)
    longest = max(vocab, key=len)
    return [
        "a" * 3000, " " * 3000, "\n" * 1000, "-" * 2000, CORPUS[0], CORPUS[3],
        longest * 200, "".join(rng.choice(list(vocab)) for _ in range(500)),
        "\u0391\u0314\u0342\u0345" * 300,  # NFC composes these 4 code points into one
        "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(2000)),
        "".join(chr(rng.randint(0x10000, 0x1FFFF)) for _ in range(500)),
    ]


def assert_bound_holds(tok, bound):
    for text in adversarial_texts(tok):
        fewest = min_tokens(text, bound)
        assert len(tok.encode(text, add_special_tokens=False).ids) >= fewest, text[:40]


def test_byte_level_bound_is_the_longest_token_and_holds():
    tok = tiny_tokenizer()
    bound = analyse_backend(tok)
    assert bound == max(len(t) for t in tok.get_vocab(with_added_tokens=True))
    assert_bound_holds(tok, bound)


def test_nfc_multiplies_the_bound_by_four_and_it_holds():
    from tokenizers import normalizers

    tok = tiny_tokenizer(normalizer=normalizers.NFC())
    plain = max(len(t) for t in tok.get_vocab(with_added_tokens=True))
    assert analyse_backend(tok) == 4 * plain
    assert_bound_holds(tok, 4 * plain)


def test_sentencepiece_style_byte_fallback_gives_a_bound_that_holds():
    from tokenizers import Tokenizer, pre_tokenizers

    missing = tiny_tokenizer(byte_level=False, pre_tokenizer=pre_tokenizers.Metaspace(),
                             byte_fallback=True)
    # Without <0xNN> tokens in its vocabulary, byte fallback has nothing to fall back on: 2000
    # unknown characters vanish, so there is no bound.
    assert len(missing.encode("-" * 2000).ids) < 5
    assert analyse_backend(missing) is None
    # As Llama 2 ships it: the 256 byte tokens are part of the model's vocabulary.
    data = json.loads(missing.to_str())
    for b in range(256):
        data["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(data["model"]["vocab"]))
    tok = Tokenizer.from_str(json.dumps(data))
    bound = analyse_backend(tok)
    assert bound is not None
    assert_bound_holds(tok, bound)
    assert len(tok.encode("-" * 2000).ids) >= 2000


def test_pipelines_that_can_drop_characters_give_no_bound():
    from tokenizers import normalizers, pre_tokenizers

    # Characters outside the vocabulary vanish without byte fallback or an unknown token:
    # 3000 of them encode to the one "▁" Metaspace puts in front: no length-based bound.
    dropping = tiny_tokenizer(byte_level=False, pre_tokenizer=pre_tokenizers.Metaspace())
    assert len(dropping.encode("\u4e01" * 3000).ids) == 1
    assert analyse_backend(dropping) is None
    fused = tiny_tokenizer(byte_level=False, pre_tokenizer=pre_tokenizers.Metaspace(),
                           unk_token="<unk>", fuse_unk=True)
    assert len(fused.encode("\u4e01" * 3000).ids) == 2  # "▁" and one fused unknown
    assert analyse_backend(fused) is None
    unfused = tiny_tokenizer(byte_level=False, pre_tokenizer=pre_tokenizers.Metaspace(),
                             unk_token="<unk>")
    assert analyse_backend(unfused) is not None
    assert_bound_holds(unfused, analyse_backend(unfused))
    assert analyse_backend(tiny_tokenizer(normalizer=normalizers.Strip())) is None
    whitespace = tiny_tokenizer(byte_level=False, pre_tokenizer=pre_tokenizers.Whitespace(),
                                unk_token="<unk>")
    assert analyse_backend(whitespace) is None
    # An added token that swallows whitespace covers any number of characters.
    stripping = tiny_tokenizer(added=[("<eot>", {"lstrip": True, "special": True})])
    assert len(stripping.encode(" " * 3000 + "<eot>").ids) == 1
    assert analyse_backend(stripping) is None
    truncating = tiny_tokenizer()
    truncating.enable_truncation(16)
    assert analyse_backend(truncating) is None


def test_the_default_model_tokenizer_gets_the_same_bound_through_both_loaders():
    from transformers import AutoTokenizer

    from server.default_model import ensure_default_model
    from server.tokenizer import FastTokenizer

    path = ensure_default_model()
    fast = FastTokenizer.load(path, "llama")
    hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bound = max_chars_per_token(fast)
    assert bound == max_chars_per_token(hf) == 17  # "<|begin_of_text|>"
    assert_bound_holds(fast.backend_tokenizer, bound)


def test_a_tokenizer_may_declare_its_bound_and_others_get_none():
    class Declared(FakeTokenizer):
        max_chars_per_token = 1

    assert max_chars_per_token(Declared()) == 1
    assert max_chars_per_token(FakeTokenizer()) is None  # no backend to inspect


# ------------------------------------------------------------------------- the API: sizes
def oversized_error(resp, limit: int) -> dict:
    err = assert_error(resp, 413, "invalid_request_error")
    assert err["code"] == "request_too_large" and str(limit) in err["message"], err
    assert resp.headers["connection"] == "close"
    return err


async def test_a_declared_oversized_body_is_refused_before_it_is_read():
    async with serve(max_request_bytes=64 * 1024) as h:
        read = []

        async def body():
            for _ in range(64):
                read.append(1)
                yield b"a" * 4096

        resp = await h.client.post(COMPL, content=body(), headers={
            "content-type": "application/json", "content-length": str(64 * 4096 + 1)})
        oversized_error(resp, 64 * 1024)
        assert read == []  # not one chunk was asked for
        assert h.engine.submitted == []
        assert h.state.body_bytes_held == 0


async def test_a_chunked_body_is_cut_off_at_the_limit():
    async with serve(max_request_bytes=64 * 1024) as h:
        read = []

        async def body():  # no length: httpx sends it chunked
            yield b'{"prompt": "'
            for _ in range(1000):
                read.append(1)
                yield b"a" * 4096

        resp = await h.client.post(COMPL, content=body(),
                                   headers={"content-type": "application/json"})
        oversized_error(resp, 64 * 1024)
        assert len(read) <= 17  # stopped right after the limit, not after 4 MB
        assert h.state.body_bytes_held == 0
        ok = await h.client.post(COMPL, json={"prompt": "still serving", "max_tokens": 2})
        assert ok.status_code == 200


async def test_the_default_limit_comes_from_the_context_length():
    async with serve(max_len=256) as h:  # 256 tokens: the 1 MiB floor
        assert h.state.max_request_bytes() == MiB
        resp = await h.client.post(COMPL, json={"prompt": "a" * MiB})
        oversized_error(resp, MiB)
    async with serve(max_len=131072) as h:
        assert h.state.max_request_bytes() == 2 * MiB


async def test_a_body_that_stalls_gets_408():
    async with serve(body_timeout=0.3) as h:
        async def body():
            yield b'{"prompt": '
            await asyncio.sleep(5)
            yield b'"late"}'

        t0 = time.perf_counter()
        resp = await h.client.post(COMPL, content=body(),
                                   headers={"content-type": "application/json"})
        took = time.perf_counter() - t0
        err = assert_error(resp, 408, "invalid_request_error")
        assert err["code"] == "request_timeout" and took < 3.0
        assert h.state.body_bytes_held == 0


async def test_a_flood_of_large_bodies_is_refused_beyond_the_budget():
    async with serve(max_request_bytes=4096) as h:
        budget = limits.BODY_BUDGET_REQUESTS * 4096
        h.state.body_bytes_held = budget - 100  # as if 63.97 maximal bodies were in progress
        resp = await h.client.post(COMPL, json={"prompt": "x" * 200, "max_tokens": 1})
        err = assert_error(resp, 429, "rate_limit_error")
        assert err["code"] == "server_busy" and resp.headers["retry-after"]
        h.state.body_bytes_held = 0
        ok = await h.client.post(COMPL, json={"prompt": "x" * 200, "max_tokens": 1})
        assert ok.status_code == 200 and h.state.body_bytes_held == 0


async def test_auth_comes_before_the_body_limit():
    async with serve(api_key="k", max_request_bytes=4096) as h:
        resp = await h.client.post(COMPL, content=b"x" * 10_000,
                                   headers={"content-type": "application/json"})
        assert_error(resp, 401, "authentication_error")


# ------------------------------------------------------------------------- the API: shapes
@pytest.mark.parametrize("body,code,fragment", [
    (b'{"prompt": "caf\xe9"}', "invalid_encoding", "not valid UTF-8"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "json_too_deep", "100001 levels"),
    (b'{"messages": [{"role": "user", "content": "x"}], "tools": [' + b'{"a":' * 70 + b"1"
     + b"}" * 70 + b"]}", "json_too_deep", "72 levels"),
    (b'{"prompt": "x", "max_tokens": 1' + b"0" * 100_000 + b"}", None, "4300 digits"),
], ids=["invalid-utf8", "nested-100k", "deep-tool-schema", "100k-digit-number"])
async def test_malformed_bodies_get_a_quick_400_saying_why(body, code, fragment):
    async with serve() as h:
        t0 = time.perf_counter()
        resp = await h.client.post(COMPL, content=body,
                                   headers={"content-type": "application/json"})
        err = assert_error(resp, 400, "invalid_request_error")
        assert err["code"] == code and fragment in err["message"], err
        assert time.perf_counter() - t0 < 1.0
        assert "set_int_max_str_digits" not in err["message"]


@pytest.mark.parametrize("extra,param", [
    ({"stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]}, "stop"),
    ({"stop": ["x"] * 100_000}, "stop"),
    ({"stop": "x" * (MAX_STOP_STRING_CHARS + 1)}, "stop"),
    ({"stop": ["ok", "x" * (MAX_STOP_STRING_CHARS + 1)]}, "stop"),
    ({"stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"n": 10**18}, "n"),
    ({"best_of": 10**18}, "best_of"),
], ids=["17-stops", "100k-stops", "long-stop", "long-stop-in-list", "129-stop-ids",
        "max-tokens-1e30", "n-1e18", "best-of-1e18"])
async def test_costly_parameters_get_a_400_naming_them(extra, param):
    async with serve() as h:
        resp = await h.client.post(COMPL, json={"prompt": "hi", **extra})
        assert_error(resp, 400, "invalid_request_error", param)
        assert h.engine.submitted == []


async def test_the_most_stop_conditions_allowed_are_accepted():
    async with serve() as h:
        resp = await h.client.post(COMPL, json={
            "prompt": "a", "max_tokens": 8, "stop_token_ids": [1] * MAX_STOP_TOKEN_IDS,
            "stop": [f"{i:03d}" + "z" * (MAX_STOP_STRING_CHARS - 3)
                     for i in range(MAX_STOP_STRINGS)]})
        assert resp.status_code == 200, resp.text


async def test_an_unknown_model_name_is_not_echoed_in_full():
    async with serve() as h:
        resp = await h.client.post(COMPL, json={"prompt": "hi", "model": "m" * 100_000})
        err = assert_error(resp, 404, "invalid_request_error", "model")
        assert len(err["message"]) < 400


# ------------------------------------------------------------------------- the API: prompts
class CountingTokenizer(FakeTokenizer):
    """The fake byte-level tokenizer, declaring its bound (one token per byte, so at least one
    per character) and recording which threads encode."""

    max_chars_per_token = 1

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.encoded_on: list[str] = []

    def encode(self, text, add_special_tokens=True):
        self.encoded_on.append(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)  # sleeping releases the GIL, as `tokenizers` does
        return super().encode(text, add_special_tokens)


@pytest.mark.parametrize("path,body,param,least", [
    (COMPL, {"prompt": "x" * 300}, "prompt", 300),
    (COMPL, {"prompt": "x" * 250, "max_tokens": 10}, "max_tokens", 250),
    # Chat: the bound applies to the rendered template, 25 characters more here.
    (CHAT, {"messages": [{"role": "user", "content": "x" * 300}]}, "messages", 325),
    (CHAT, {"messages": [{"role": "user", "content": "x" * 200}], "max_completion_tokens": 60},
     "max_completion_tokens", 225),
])
async def test_a_prompt_that_cannot_fit_is_refused_without_tokenising(path, body, param, least):
    async with serve(max_len=256) as h:
        tok = CountingTokenizer()
        h.engine.tokenizer = tok
        resp = await h.client.post(path, json=body)
        err = assert_error(resp, 400, "invalid_request_error", param)
        assert err["code"] == "context_length_exceeded"
        assert "at least" in err["message"] and str(least) in err["message"], err
        assert tok.encoded_on == []


async def test_a_prompt_that_may_fit_is_tokenised_on_a_prompt_worker():
    async with serve(max_len=256) as h:
        tok = CountingTokenizer()
        h.engine.tokenizer = tok
        for path, body in ((COMPL, {"prompt": "x" * 200, "max_tokens": 2}),
                           (CHAT, {"messages": [{"role": "user", "content": "hi"}],
                                   "max_tokens": 2})):
            assert (await h.client.post(path, json=body)).status_code == 200
        assert len(tok.encoded_on) == 2
        assert all(name.startswith("graphserve-prompt") for name in tok.encoded_on)
        # Past the bound (246 + 10 fit), refused by the exact count: 246 bytes + BOS + 10 > 256.
        resp = await h.client.post(COMPL, json={"prompt": "y" * 246, "max_tokens": 10})
        err = assert_error(resp, 400, "invalid_request_error", "max_tokens")
        assert "at least" not in err["message"]


async def test_health_keeps_its_latency_while_prompts_are_tokenised():
    async with serve() as h:
        h.engine.tokenizer = CountingTokenizer(delay=1.5)
        slow = [asyncio.ensure_future(h.client.post(COMPL, json={"prompt": f"p{i}",
                                                                  "max_tokens": 1}))
                for i in range(3)]  # more than the workers: one waits its turn
        await asyncio.sleep(0.2)
        latencies = []
        for _ in range(5):
            t0 = time.perf_counter()
            assert (await h.client.get("/health")).status_code == 200
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.1)
        assert not any(task.done() for task in slow)  # the probes overlapped the work
        assert max(latencies) < 0.25, latencies  # ~1 ms; the work takes 1.5 s per prompt
        assert [r.status_code for r in await asyncio.gather(*slow)] == [200] * 3


async def test_a_token_id_prompt_longer_than_the_context_is_refused_by_its_length():
    async with serve(max_len=256) as h:
        resp = await h.client.post(COMPL, json={"prompt": [7] * 100_000})
        err = assert_error(resp, 400, "invalid_request_error", "prompt")
        assert "100000 tokens" in err["message"]
