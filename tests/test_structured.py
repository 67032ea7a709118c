"""Tool-call formats, grammars and the incremental parser (pure Python + llguidance), and the
bitmask / logits-processing ops against per-row references."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from server.logits_processors import apply_bitmask
from server.structured.grammar import GrammarBackend, GrammarError, json_schema_grammar
from server.structured.tool_calls import (
    ToolCallParser,
    auto_grammar,
    detect_format,
    parse_tool_calls,
    tool_grammar,
)
from tests.helpers.fake_engine import EOS, VOCAB, FakeTokenizer

HERMES = detect_format("{% if tools %}<tool_call>{% endif %}")
MISTRAL = detect_format("{{ tools }} [TOOL_CALLS]")
LLAMA = detect_format("{{ tools }} <|python_tag|>")
TOOLS = [
    {"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
        "additionalProperties": False}}},
    {"type": "function", "function": {"name": "b", "parameters": {
        "type": "object", "properties": {"s": {"enum": ["p", "q"]}}, "required": ["s"],
        "additionalProperties": False}}},
]
OUTPUTS = {
    "hermes": (HERMES, 'Let me check.<tool_call>\n{"name": "a", "arguments": {"x": 1, "y": '
               '{"z": "}{"}}}\n</tool_call>\n<tool_call>\n{"name":"b","arguments":{}}\n'
               '</tool_call>', "Let me check."),
    "mistral": (MISTRAL, 'ok[TOOL_CALLS][{"name": "a", "arguments": {"x": [1, 2]}}, '
                '{"name": "b", "arguments": {}}]', "ok"),
    "llama3_json": (LLAMA, '<|python_tag|>{"name": "a", "parameters": {"x": 1, "y": "]"}}; '
                    '{"name": "b", "parameters": {}}', ""),
}


def test_formats_are_detected_from_the_template():
    assert (HERMES.family, MISTRAL.family, LLAMA.family) == ("hermes", "mistral", "llama3_json")
    assert detect_format("<|start_header_id|> {{ tools }} \"parameters\"").family == "llama3_json"
    assert detect_format("no tool support here") is None
    assert detect_format(None) is None
    assert detect_format("{{ tools }} but an unknown call format") is None


@pytest.mark.parametrize("family", sorted(OUTPUTS))
def test_parser_streamed_char_by_char_equals_collected(family):
    fmt, text, content = OUTPUTS[family]
    parsed = parse_tool_calls(fmt, text)
    assert parsed.content == content
    assert [c.name for c in parsed.calls] == ["a", "b"]
    args = [json.loads(c.arguments) for c in parsed.calls]
    assert args[1] == {}
    parser = ToolCallParser(fmt)
    deltas = [d for ch in text for d in parser.feed(ch)] + parser.finish()
    streamed_content = "".join(d["content"] for d in deltas if "content" in d)
    assert streamed_content == content
    calls: dict[int, dict] = {}
    for d in deltas:
        if "tool_call" in d:
            tc = d["tool_call"]
            call = calls.setdefault(tc["index"], {"name": None, "args": ""})
            if "id" in tc:
                assert call["name"] is None and tc["function"]["arguments"] == ""
                assert tc["type"] == "function" and tc["id"].startswith("call_")
                call["name"] = tc["function"]["name"]
            call["args"] += tc["function"]["arguments"]
    assert [c["name"] for c in calls.values()] == ["a", "b"]
    assert [json.loads(c["args"]) for c in calls.values()] == args


def test_text_that_is_not_a_call_stays_content():
    assert parse_tool_calls(HERMES, "plain <tool text").content == "plain <tool text"
    broken = parse_tool_calls(HERMES, "<tool_call>\n{\"nam\": 1}\n</tool_call>")
    assert broken.calls == [] and broken.content.startswith("<tool_call>")
    assert parse_tool_calls(LLAMA, "hello {\"name\": \"a\"}").calls == []


def _drive(grammar: str, text: str) -> bool:
    """Whether the fake's byte vocabulary can write `text` under `grammar` and then end."""
    backend = GrammarBackend(FakeTokenizer().to_json(), VOCAB, {EOS})
    m = backend.matcher(grammar)
    mask = np.zeros((1, backend.mask_words), dtype=np.int32)
    for byte in [*text.encode(), EOS]:
        mask[:] = 0
        m.fill(mask, 0)
        if not mask[0, byte // 32] >> (byte % 32) & 1:
            return False
        assert m.consume(byte)
    return True


def test_tool_grammar_enforces_names_schemas_and_parallelism():
    one = '<tool_call>\n{"name":"a","arguments":{"x":5}}\n</tool_call>'
    two = one + '\n<tool_call>\n{"name":"b","arguments":{"s":"q"}}\n</tool_call>'
    parallel = tool_grammar(HERMES, TOOLS, parallel=True)
    single = tool_grammar(HERMES, TOOLS, parallel=False)
    assert _drive(parallel, one) and _drive(parallel, two)
    assert _drive(single, one) and not _drive(single, two)
    assert not _drive(parallel, one.replace("5", '"5"'))  # arguments follow the schema
    assert not _drive(parallel, one.replace('"a"', '"c"'))  # only declared functions
    named = tool_grammar(HERMES, TOOLS[1:], parallel=False)
    assert not _drive(named, one)
    llama = tool_grammar(LLAMA, TOOLS, parallel=True)
    assert _drive(llama, '{"name":"a","parameters":{"x":1}}; {"name":"b","parameters":{"s":"p"}}')


def test_json_schema_grammar_and_errors():
    g = json_schema_grammar({"type": "object", "properties": {"k": {"type": "boolean"}},
                             "required": ["k"], "additionalProperties": False})
    assert _drive(g, '{"k":true}') and not _drive(g, '{"k": true}')  # compact whitespace
    with pytest.raises(GrammarError):
        GrammarBackend(FakeTokenizer().to_json(), VOCAB, {EOS}).matcher("start: %json {\"x\"")


def test_wait_built_waits_for_the_build_and_gives_up_at_its_timeout(monkeypatch, caplog):
    """Readiness waits for the tokenizer build (it holds the GIL) but not forever: past the
    timeout it goes on, logs why, and the build still finishes for the requests that need it."""
    import threading

    import llguidance

    release = threading.Event()
    real = llguidance.LLTokenizer

    def slow(*args, **kwargs):
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(llguidance, "LLTokenizer", slow)
    backend = GrammarBackend(FakeTokenizer().to_json(), VOCAB, {EOS})
    with caplog.at_level("INFO", logger="graphserve.grammar"):
        assert 0.05 <= backend.wait_built(0.05) < 1.0
        assert "still building after 0.1 s" in caplog.text
        threading.Timer(0.2, release.set).start()
        assert 0.1 <= backend.wait_built(10) < 5.0
        assert "ready waited" in caplog.text
    assert backend.wait_built(10) < 0.01  # built: no wait
    assert backend.matcher(json_schema_grammar({"type": "boolean"})) is not None


def test_bitmask_application_matches_a_per_row_reference():
    rng = random.Random(0)
    vocab, n = 1000, 5
    words = (vocab + 31) // 32
    mask = np.array([[rng.getrandbits(32) - 2**31 for _ in range(words)] for _ in range(n)],
                    dtype=np.int32)
    mask[2] = -1  # an unconstrained row keeps everything
    logits = torch.randn(n, vocab)
    out = logits.clone()
    apply_bitmask(out, torch.from_numpy(mask))
    for r in range(n):
        for t in range(vocab):
            allowed = (int(mask[r, t // 32]) >> (t % 32)) & 1
            assert out[r, t].item() == (logits[r, t].item() if allowed else float("-inf"))


def test_auto_grammar_for_strict_tools_is_text_or_valid_calls():
    one = '<tool_call>\n{"name":"a","arguments":{"x":5}}\n</tool_call>'
    g = auto_grammar(HERMES, TOOLS, parallel=True)
    assert _drive(g, "just words, < and all") and _drive(g, one) and _drive(g, one + "\n" + one)
    assert not _drive(g, one.replace("5", '"5"'))  # a call must match its schema
    assert not _drive(g, "text then " + one)  # text may not open a call
    single = auto_grammar(HERMES, TOOLS, parallel=False)
    assert _drive(single, one) and not _drive(single, one + "\n" + one)
    llama = auto_grammar(LLAMA, TOOLS, parallel=True)
    assert _drive(llama, "no call") and _drive(llama, '{"name":"b","parameters":{"s":"p"}}')
    assert not _drive(llama, '{"name":"b","parameters":{"s":"z"}}')
