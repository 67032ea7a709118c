"""server/detokenizer.py: incremental UTF-8 release, stop strings across tokens, held-back text
and `flush`.

Two tokenizers: the fake engine's byte-level one (token id = byte), where every multi-byte
character spans several tokens and byte sequences are chosen exactly, and the embedded default
model's real byte-level BPE (what the server runs with by default), whose merges split
characters at places no one chose. A SentencePiece-style decoder checks the leading-space rule
that the context window exists for.
"""

from __future__ import annotations

import random

import pytest

from server import default_model as dm
from server.detokenizer import REPLACEMENT, IncrementalDetokenizer
from server.tokenizer import FastTokenizer
from tests.helpers.fake_engine import BOS, EOS, FakeTokenizer

BYTES = FakeTokenizer()

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "日本語のテキスト、한국어 문장, 中文：茶馆里的下午。",
    "emoji 😀🎉 ZWJ family 👨\u200d👩\u200d👧 flags 🇯🇵 skin tone 👍🏽",
    "Ünïcödé café naïve — “quotes” ½ ∑ᵢ aᵢ ≈ √2",
    "mixed العربية עברית हिन्दी Ελληνικά русский",
]


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """What each generated token releases, in order."""
    return [detok.add_token(t) for t in ids]


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def default_tokenizer() -> FastTokenizer:
    """The engine-thread tokenizer of the embedded default model (built once per cache)."""
    tok = FastTokenizer.load(dm.ensure_default_model(), "llama")
    return tok


# ------------------------------------------------------------------ UTF-8
def test_multibyte_characters_are_released_whole_when_their_last_byte_arrives():
    detok = IncrementalDetokenizer(BYTES, [BOS, *b"say: "])
    text = "a日😀é"
    released = feed(detok, byte_ids(text))
    # a | E6 97 A5 | F0 9F 98 80 | C3 A9: nothing until a character is complete.
    assert released == ["a", "", "", "日", "", "", "", "😀", "", "é"]
    assert detok.text == text and detok.flush() == ""


def test_every_release_is_the_longest_complete_prefix(default_tokenizer):
    """With the real BPE: after each token, everything released so far is all the decoded text
    when it ends on a whole character, else a prefix of it (the token holding the cut character
    waits), and never holds a replacement character."""
    tok = default_tokenizer
    prompt = tok.encode("Translate: ", add_special_tokens=True)
    split_chars = held = 0
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        split_chars += sum(REPLACEMENT in tok.decode([t]) for t in ids)
        detok = IncrementalDetokenizer(tok, prompt)
        out = ""
        for i, t in enumerate(ids):
            out += detok.add_token(t)
            decoded = tok.decode(ids[: i + 1])
            assert REPLACEMENT not in out, (text, i)
            if decoded.endswith(REPLACEMENT):
                held += 1
                assert decoded.startswith(out), (text, i)
            else:
                assert out == decoded, (text, i)
        assert out == text and detok.flush() == ""
    assert split_chars > 20 and held > 20  # the texts do split characters across tokens


def test_the_prompt_is_context_only(default_tokenizer):
    tok = default_tokenizer
    prompt = tok.encode("日本語の", add_special_tokens=True)
    ids = tok.encode("テキスト", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    assert "".join(feed(detok, ids)) + detok.flush() == "テキスト"


def test_invalid_utf8_is_released_after_a_bounded_wait():
    detok = IncrementalDetokenizer(BYTES, [BOS, *b"x"])
    # A lead byte followed by ASCII: the character can never complete; released at once with
    # the replacement character, as a decoder would show it.
    assert feed(detok, [0xE6, ord("a")]) == ["", "\ufffda"]
    # A run that keeps ending mid-character (continuation bytes without a lead) is held for
    # at most 8 tokens, then released rather than stalling the stream.
    released = feed(detok, [0x80] * 12)
    assert released[:7] == [""] * 7 and released[7] != ""
    assert REPLACEMENT in released[7]


def test_special_tokens_are_not_text():
    detok = IncrementalDetokenizer(BYTES, [BOS])
    assert feed(detok, [*b"hi", EOS]) == ["h", "i", ""]
    assert detok.flush() == ""


def test_sentencepiece_leading_space_survives_through_the_context_window():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁again": 3, "!": 4}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = tokenizers.decoders.Metaspace()

    class SentencePieceLike:
        def decode(self, ids, skip_special_tokens=True):
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)

    tok = SentencePieceLike()
    assert tok.decode([2]) == "world"  # alone, the leading space is dropped
    detok = IncrementalDetokenizer(tok, [1])
    assert feed(detok, [2, 3, 4]) == [" world", " again", "!"]


# ------------------------------------------------------------------ stop strings
def test_a_stop_string_spanning_tokens_is_never_emitted():
    detok = IncrementalDetokenizer(BYTES, [BOS], stop=["fox"])
    released = feed(detok, byte_ids("brown fox jumps"))
    # "f" and "o" are held back (they could start "fox"); at "x" the request stops.
    assert released == ["b", "r", "o", "w", "n", " ", "", "", ""] + [""] * 6
    assert detok.stopped and detok.text == "brown "
    assert detok.flush() == ""


def test_held_back_text_is_released_once_it_cannot_start_a_stop_string():
    detok = IncrementalDetokenizer(BYTES, [BOS], stop=["quick", "quiet!"])
    released = feed(detok, byte_ids("a quiet one"))
    # "q", "qu", "qui", "quie", "quiet" each still start a stop string; " " rules both out.
    assert released == ["a", " ", "", "", "", "", "", "quiet ", "o", "n", "e"]
    assert not detok.stopped


def test_the_earliest_stop_string_wins_and_cuts_inside_a_token(default_tokenizer):
    tok = default_tokenizer
    ids = tok.encode("The quick brown fox", add_special_tokens=False)
    assert tok.decode([ids[4]]) == "row"  # " b", "row", "n": the stop starts inside "row"
    detok = IncrementalDetokenizer(tok, [tok.bos_token_id], stop=["own fox", "ow"])
    out = "".join(feed(detok, ids))
    assert detok.stopped and out == "The quick br"


def test_multibyte_stop_strings_across_byte_tokens():
    detok = IncrementalDetokenizer(BYTES, [BOS], stop=["本語"])
    out = "".join(feed(detok, byte_ids("日本語のテキスト")))
    assert detok.stopped and out == "日" and detok.flush() == ""


def test_stop_strings_with_the_real_tokenizer_at_every_cut(default_tokenizer):
    tok = default_tokenizer
    rng = random.Random(0)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        for _ in range(15):
            start = rng.randrange(len(text) - 1)
            stop = text[start : start + rng.randint(1, 4)]
            detok = IncrementalDetokenizer(tok, [tok.bos_token_id], stop=[stop])
            out = "".join(feed(detok, ids))
            assert detok.stopped, (text, stop)
            assert out == text[: text.index(stop)], (text, stop)


# ------------------------------------------------------------------ flush
def test_flush_releases_a_held_back_stop_prefix():
    detok = IncrementalDetokenizer(BYTES, [BOS], stop=["quick"])
    assert "".join(feed(detok, byte_ids("The qu"))) == "The "
    assert detok.flush() == "qu"
    assert detok.text == "The qu" and not detok.stopped
    assert detok.flush() == ""  # idempotent


def test_flush_releases_an_incomplete_character():
    detok = IncrementalDetokenizer(BYTES, [BOS])
    assert feed(detok, [ord("a"), 0xE6, 0x97]) == ["a", "", ""]
    assert detok.flush() == REPLACEMENT  # what a decoder shows for the cut character


def test_flush_finds_a_stop_string_in_text_it_releases():
    # "x" arrives in the same held text as a cut character: add_token never saw it released.
    detok = IncrementalDetokenizer(BYTES, [BOS], stop=["x"])
    assert feed(detok, [ord("a"), ord("x"), 0xE6]) == ["a", "", ""]
    assert detok.flush() == ""
    assert detok.stopped and detok.text == "a"


def test_nothing_after_a_stop():
    detok = IncrementalDetokenizer(BYTES, [BOS], stop=["b"])
    assert feed(detok, byte_ids("abc")) == ["a", "", ""]
    assert detok.add_token(ord("d")) == "" and detok.flush() == ""
