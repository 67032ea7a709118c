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


@pytest.fixture(scope="module")
def backend():
    """One grammar process for this module's tests (each starts in ~0.1 s; most need one)."""
    b = GrammarBackend(FakeTokenizer().to_json(), VOCAB, {EOS})
    yield b
    b.close()


def _allowed(masks, row: int, token: int) -> bool:
    return bool(masks[row, token // 32] >> (token % 32) & 1)


def _drive(grammar: str, text: str, backend: GrammarBackend) -> bool:
    """Whether the fake's byte vocabulary can write `text` under `grammar` and then end."""
    m = backend.matcher(grammar)
    for byte in [*text.encode(), EOS]:
        _, _, masks = backend.step([], [(m, 0)], 1)
        if not _allowed(masks, 0, byte):
            return False
        rejected, lost, _ = backend.step([(m, byte)], [], 0)
        assert not rejected and not lost
    return True


def test_tool_grammar_enforces_names_schemas_and_parallelism(backend):
    one = '<tool_call>\n{"name":"a","arguments":{"x":5}}\n</tool_call>'
    two = one + '\n<tool_call>\n{"name":"b","arguments":{"s":"q"}}\n</tool_call>'
    parallel = tool_grammar(HERMES, TOOLS, parallel=True)
    single = tool_grammar(HERMES, TOOLS, parallel=False)
    assert _drive(parallel, one, backend) and _drive(parallel, two, backend)
    assert _drive(single, one, backend) and not _drive(single, two, backend)
    assert not _drive(parallel, one.replace("5", '"5"'), backend)  # arguments follow the schema
    assert not _drive(parallel, one.replace('"a"', '"c"'), backend)  # only declared functions
    named = tool_grammar(HERMES, TOOLS[1:], parallel=False)
    assert not _drive(named, one, backend)
    llama = tool_grammar(LLAMA, TOOLS, parallel=True)
    assert _drive(llama, '{"name":"a","parameters":{"x":1}}; {"name":"b","parameters":{"s":"p"}}',
                  backend)


def test_json_schema_grammar_and_errors(backend):
    g = json_schema_grammar({"type": "object", "properties": {"k": {"type": "boolean"}},
                             "required": ["k"], "additionalProperties": False})
    assert _drive(g, '{"k":true}', backend)
    assert not _drive(g, '{"k": true}', backend)  # compact whitespace
    with pytest.raises(GrammarError):
        backend.matcher("start: %json {\"x\"")


def test_wait_built_waits_for_the_build_and_gives_up_at_its_timeout(monkeypatch, caplog):
    """Readiness waits for the tokenizer build (in the grammar process) but not forever: past
    the timeout it goes on, logs why, and the first grammar waits for the rest of the build."""
    monkeypatch.setenv("GRAPHSERVE_GRAMMAR_TEST_FAULT", "build_delay:1.0")
    b = GrammarBackend(FakeTokenizer().to_json(), VOCAB, {EOS})
    try:
        with caplog.at_level("INFO", logger="graphserve.grammar"):
            assert 0.05 <= b.wait_built(0.05) < 0.9
            assert "still building after 0.1 s" in caplog.text
            assert 0.1 <= b.wait_built(10) < 5.0
            assert "ready waited" in caplog.text
            assert "grammar tokenizer built" in caplog.text
        assert b.wait_built(10) < 0.01  # built: no wait
        assert b.matcher(json_schema_grammar({"type": "boolean"})) is not None
    finally:
        b.close()


def test_the_first_grammar_waits_for_a_build_still_running(monkeypatch):
    monkeypatch.setenv("GRAPHSERVE_GRAMMAR_TEST_FAULT", "build_delay:0.5")
    b = GrammarBackend(FakeTokenizer().to_json(), VOCAB, {EOS})
    try:
        b.wait_built(0.01)  # readiness gave up on it
        m = b.matcher(json_schema_grammar({"type": "boolean"}))
        assert _drive(json_schema_grammar({"type": "boolean"}), "true", b)
        assert m.generation == 1
    finally:
        b.close()


def test_one_round_trip_advances_then_fills_and_rows_without_a_grammar_allow_everything(
        backend):  # fmt: skip
    g = json_schema_grammar({"type": "object", "properties": {"k": {"type": "boolean"}},
                             "required": ["k"], "additionalProperties": False})
    a, b = backend.matcher(g), backend.matcher(g)
    for byte in b'{"k":':
        backend.step([(a, byte), (b, byte)], [], 0)
    # Row 0: `a` after "t"; row 1: nothing constrained; row 2: `b` still before the value.
    rejected, lost, masks = backend.step([(a, ord("t"))], [(a, 0), (b, 2)], 3)
    assert not rejected and not lost
    assert _allowed(masks, 0, ord("r")) and not _allowed(masks, 0, ord("f"))
    assert (masks[1] == -1).all()
    assert _allowed(masks, 2, ord("t")) and _allowed(masks, 2, ord("f"))
    assert not _allowed(masks, 2, ord("1"))
    # A token the grammar does not allow is reported, with llguidance's reason.
    rejected, _, _ = backend.step([(b, ord("1"))], [], 0)
    assert list(rejected) == [b] and rejected[b]


def test_the_mask_buffer_grows_with_the_step(backend):
    g = json_schema_grammar({"type": "boolean"})
    handles = [backend.matcher(g) for _ in range(3)]
    rows = 200  # past the first buffer's 64 rows
    _, _, masks = backend.step([], [(h, 70 + 50 * i) for i, h in enumerate(handles)], rows)
    assert masks.shape == (rows, backend.mask_words)
    for i in range(3):
        assert _allowed(masks, 70 + 50 * i, ord("t")) and not _allowed(masks, 70 + 50 * i, 0)
    assert (masks[0] == -1).all() and (masks[rows - 1] == -1).all()


def test_dropped_sequences_free_their_matchers(backend):
    import gc

    g = json_schema_grammar({"type": "boolean"})
    handles = [backend.matcher(g) for _ in range(5)]
    slots = {h.slot for h in handles}
    del handles
    gc.collect()
    assert slots <= {slot for _, slot in backend._freed}
    keep = backend.matcher(g)  # the frees go out first
    assert not backend._freed
    assert backend.step([], [(keep, 0)], 1)[2] is not None


def test_a_dead_grammar_process_fails_its_sequences_and_the_next_grammar_starts_another(
        monkeypatch, caplog):  # fmt: skip
    from server.structured.grammar import GrammarWorkerError

    monkeypatch.setenv("GRAPHSERVE_GRAMMAR_TEST_FAULT", "exit_at_step:2")
    b = GrammarBackend(FakeTokenizer().to_json(), VOCAB, {EOS})
    try:
        g = json_schema_grammar({"type": "boolean"})
        m = b.matcher(g)
        b.step([], [(m, 0)], 1)
        with pytest.raises(GrammarWorkerError, match="grammar process exited"):
            b.step([(m, ord("t"))], [(m, 0)], 1)
        # Its sequences are reported lost, and their rows allow everything (they are failed).
        rejected, lost, masks = b.step([(m, ord("r"))], [(m, 0)], 1)
        assert not rejected and list(lost) == [m] and (masks == -1).all()
        monkeypatch.delenv("GRAPHSERVE_GRAMMAR_TEST_FAULT")
        with caplog.at_level("WARNING", logger="graphserve.grammar"):
            fresh = b.matcher(g)
        assert "starting a new grammar process" in caplog.text
        assert fresh.generation == 2
        assert _drive(g, "false", b)
    finally:
        b.close()


def test_a_grammar_process_that_stops_answering_is_replaced(monkeypatch):
    from server.structured.grammar import GrammarWorkerError

    monkeypatch.setenv("GRAPHSERVE_GRAMMAR_TEST_FAULT", "hang_at_step:1")
    b = GrammarBackend(FakeTokenizer().to_json(), VOCAB, {EOS}, step_timeout_s=0.3)
    try:
        g = json_schema_grammar({"type": "boolean"})
        m = b.matcher(g)
        hung = b._proc
        with pytest.raises(GrammarWorkerError, match="did not answer within"):
            b.step([], [(m, 0)], 1)
        assert hung.poll() is not None  # killed, not left behind
        monkeypatch.delenv("GRAPHSERVE_GRAMMAR_TEST_FAULT")
        assert _drive(g, "true", b)
    finally:
        b.close()


def test_a_grammar_process_that_cannot_start_fails_grammars_not_the_engine(monkeypatch):
    import subprocess

    from server.structured.grammar import GrammarWorkerError

    real = subprocess.Popen

    def no_processes(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", no_processes)
    b = GrammarBackend(FakeTokenizer().to_json(), VOCAB, {EOS})  # no exception: logged
    try:
        assert b.wait_built(1.0) < 0.5
        g = json_schema_grammar({"type": "boolean"})
        with pytest.raises(GrammarWorkerError, match="could not start"):
            b.matcher(g)
        monkeypatch.setattr(subprocess, "Popen", real)
        assert _drive(g, "true", b)  # the next grammar tries again
    finally:
        b.close()
    with pytest.raises(GrammarWorkerError, match="closed"):
        b.matcher(g)


def test_a_tokenizer_the_build_rejects_refuses_grammars(backend):
    b = GrammarBackend('{"not": "a tokenizer"}', VOCAB, {EOS})
    try:
        b.wait_built(10)
        with pytest.raises(GrammarError, match="grammar tokenizer could not be built"):
            b.matcher(json_schema_grammar({"type": "boolean"}))
    finally:
        b.close()


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


def test_auto_grammar_for_strict_tools_is_text_or_valid_calls(backend):
    one = '<tool_call>\n{"name":"a","arguments":{"x":5}}\n</tool_call>'
    g = auto_grammar(HERMES, TOOLS, parallel=True)
    assert _drive(g, "just words, < and all", backend) and _drive(g, one, backend)
    assert _drive(g, one + "\n" + one, backend)
    assert not _drive(g, one.replace("5", '"5"'), backend)  # a call must match its schema
    assert not _drive(g, "text then " + one, backend)  # text may not open a call
    single = auto_grammar(HERMES, TOOLS, parallel=False)
    assert _drive(single, one, backend) and not _drive(single, one + "\n" + one, backend)
    llama = auto_grammar(LLAMA, TOOLS, parallel=True)
    assert _drive(llama, "no call", backend)
    assert _drive(llama, '{"name":"b","parameters":{"s":"p"}}', backend)
    assert not _drive(llama, '{"name":"b","parameters":{"s":"z"}}', backend)
