"""The engine's OpenAI surface on CPU (tiny random Llama): n choices, logprobs and prompt
logprobs against HF's log-softmax, penalties and logit_bias against their definitions applied
to HF's logits, min_tokens, and grammar-constrained decoding that stays valid with random
weights."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from server.request import SamplingParams
from server.scheduler import PROMPT_LOGPROBS_CHUNK
from server.structured.grammar import json_schema_grammar
from tests.helpers.tiny_models import build_checkpoint, hf_reference
from tests.test_engine import _rid, collect, start_engine, tokens_of

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("llama-surface"), "llama")


@pytest.fixture(scope="module")
def ref(llama_dir):
    return hf_reference(llama_dir)


@pytest.fixture(scope="module")
def engine(llama_dir):
    engine = start_engine(llama_dir, max_num_seqs=4, block_size=8, max_model_len=512)
    yield engine
    engine.shutdown()


def hf_logits(ref, ids: list[int]) -> torch.Tensor:
    """Logits of every position of `ids` `[len, vocab]` (full forward, no cache)."""
    with torch.no_grad():
        return ref(torch.tensor([ids]), use_cache=False).logits[0].float()


def by_choice(outs) -> dict[int, list]:
    choices: dict[int, list] = {}
    for o in outs:
        choices.setdefault(o.index, []).append(o)
    return choices


# -- n ------------------------------------------------------------------------------------------


async def test_n_choices_share_one_prefill_and_are_reproducible(engine):
    prompt = [(7 * i) % 390 + 2 for i in range(30)]  # 3 full blocks of 8 + a partial one
    params = dict(max_tokens=12, temperature=1.0, ignore_eos=True, seed=42)
    outs = await collect(engine, prompt, SamplingParams(n=3, **params))
    choices = by_choice(outs)
    assert sorted(choices) == [0, 1, 2]
    finals = {j: c[-1] for j, c in choices.items()}
    assert all(f.finished and f.finish_reason == "length" for f in finals.values())
    assert all(f.completion_tokens == 12 for f in finals.values())
    # One prefill: the later choices found the first one's full blocks in the prefix cache.
    assert finals[0].cached_tokens == 0
    assert finals[1].cached_tokens == finals[2].cached_tokens == 24
    texts = {j: tokens_of(c) for j, c in choices.items()}
    assert len({tuple(t) for t in texts.values()}) == 3  # different draws per choice
    # Choice 0 is what a one-choice request with that seed gets; the whole request is
    # reproducible while other requests share the batch.
    single, again, _ = await asyncio.gather(
        collect(engine, prompt, SamplingParams(**params)),
        collect(engine, prompt, SamplingParams(n=3, **params)),
        collect(engine, [5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True)),
    )
    assert tokens_of(single) == texts[0]
    assert {j: tokens_of(c) for j, c in by_choice(again).items()} == texts


async def test_abort_ends_every_choice(engine):
    stream = engine.add_request("abort-n", [1, 2, 3], SamplingParams(n=3, max_tokens=200,
                                                                     ignore_eos=True))
    finals = []
    got = 0
    async for out in stream:
        got += 1
        if got == 3:
            engine.abort("abort-n")
        if out.finished:
            finals.append(out)
    assert sorted(f.index for f in finals) == [0, 1, 2]
    assert {f.finish_reason for f in finals} == {"abort"}
    for _ in range(200):
        if engine.stats()["running"] == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0


# -- logprobs -----------------------------------------------------------------------------------


async def test_logprobs_match_hf_log_softmax(engine, ref):
    prompt = [5, 9, 13, 17, 21]
    outs = await collect(engine, prompt, SamplingParams(max_tokens=6, temperature=0.0,
                                                        ignore_eos=True, logprobs=5))
    tokens = tokens_of(outs)
    entries = [e for o in outs for e in (o.logprobs or [])]
    assert len(entries) == len(tokens) == 6
    logits = hf_logits(ref, prompt + tokens)
    cumulative = 0.0
    for i, (tok, entry) in enumerate(zip(tokens, entries, strict=True)):
        lp = torch.log_softmax(logits[len(prompt) - 1 + i], dim=-1)
        assert entry.token_id == tok
        assert entry.logprob == pytest.approx(lp[tok].item(), abs=1e-4)
        top = lp.topk(5)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        cumulative += entry.logprob
    assert outs[-1].cumulative_logprob == pytest.approx(cumulative, abs=1e-4)


async def test_prompt_logprobs_with_no_generation(engine, ref):
    """echo + logprobs + max_tokens 0: every prompt token's logprob given the ones before it
    (the first None), nothing generated."""
    # Longer than PROMPT_LOGPROBS_CHUNK: two prompt chunks, each keeping its logits.
    prompt = [(11 * i) % 390 + 2 for i in range(300)]
    outs = await collect(engine, prompt, SamplingParams(max_tokens=0, prompt_logprobs=3))
    assert len(outs) == 1 and outs[0].finish_reason == "length"
    assert outs[0].token_ids == [] and outs[0].completion_tokens == 0
    entries = outs[0].prompt_logprobs
    assert len(entries) == len(prompt) and entries[0] is None
    lp = torch.log_softmax(hf_logits(ref, prompt), dim=-1)
    assert PROMPT_LOGPROBS_CHUNK < len(prompt)
    for pos in range(1, len(prompt)):
        assert entries[pos].token_id == prompt[pos]
        assert entries[pos].logprob == pytest.approx(lp[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert [t for t, _ in entries[pos].top] == lp[pos - 1].topk(3).indices.tolist()
    # A cached prefix does not skip them: the same prompt again gives the same numbers.
    again = await collect(engine, prompt, SamplingParams(max_tokens=2, prompt_logprobs=0,
                                                         temperature=0.0, ignore_eos=True))
    second = again[0].prompt_logprobs
    assert [e.logprob for e in second[1:]] == pytest.approx(
        [e.logprob for e in entries[1:]], abs=1e-5)


# -- penalties, bias, min_tokens ------------------------------------------------------------------


def reference_greedy(ref, prompt, steps, *, rep=1.0, freq=0.0, pres=0.0, bias=None):
    """Greedy decoding with the penalties applied to HF's logits by their definitions."""
    ids, out = list(prompt), []
    for _ in range(steps):
        logits = hf_logits(ref, ids)[-1]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel())
        counts = counts[: logits.numel()].float()
        if rep != 1.0:
            seen = counts > 0
            seen[torch.tensor(prompt)] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep),
                                 logits)
        logits = logits - freq * counts - pres * (counts > 0).float()
        for tok, b in (bias or {}).items():
            logits[tok] += b
        tok = int(logits.argmax())
        out.append(tok)
        ids.append(tok)
    return out


@pytest.mark.parametrize("kwargs", [
    {"frequency_penalty": 1.5},
    {"presence_penalty": 2.0},
    {"repetition_penalty": 1.8},
    {"frequency_penalty": 0.7, "presence_penalty": -0.5, "repetition_penalty": 1.3},
])
async def test_penalties_follow_their_definitions(engine, ref, kwargs):
    prompt = [40, 41, 42, 40, 41]
    steps = 14
    plain = reference_greedy(ref, prompt, steps)
    expected = reference_greedy(
        ref, prompt, steps, rep=kwargs.get("repetition_penalty", 1.0),
        freq=kwargs.get("frequency_penalty", 0.0), pres=kwargs.get("presence_penalty", 0.0),
    )
    assert expected != plain  # the penalty changes this output: the test can fail
    # Run beside a plain request and a penalised one in other rows: rows do not mix.
    outs, other = await asyncio.gather(
        collect(engine, prompt, SamplingParams(max_tokens=steps, temperature=0.0,
                                               ignore_eos=True, **kwargs)),
        collect(engine, prompt, SamplingParams(max_tokens=steps, temperature=0.0,
                                               ignore_eos=True)),
    )
    assert tokens_of(outs) == expected
    assert tokens_of(other) == plain


async def test_logit_bias_adds_to_the_logits(engine, ref):
    prompt = [7, 8, 9]
    plain = reference_greedy(ref, prompt, 8)
    banned = {t: -100.0 for t in set(plain)}
    outs = await collect(engine, prompt, SamplingParams(max_tokens=8, temperature=0.0,
                                                        ignore_eos=True, logit_bias=banned))
    assert not set(tokens_of(outs)) & set(plain)
    assert tokens_of(outs) == reference_greedy(ref, prompt, 8, bias=banned)
    forced = await collect(engine, prompt, SamplingParams(max_tokens=5, temperature=0.7,
                                                          seed=3, ignore_eos=True,
                                                          logit_bias={123: 100.0}))
    assert tokens_of(forced) == [123] * 5


async def test_min_tokens_suppresses_stop_tokens(engine, ref):
    prompt = [5, 6, 7, 8]
    greedy = reference_greedy(ref, prompt, 10)
    stop = greedy[0]
    early = await collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0.0,
                                                         stop_token_ids=[stop]))
    assert tokens_of(early) == [stop] and early[-1].finish_reason == "stop"
    held = await collect(engine, prompt, SamplingParams(max_tokens=10, temperature=0.0,
                                                        stop_token_ids=[stop], min_tokens=4))
    assert stop not in tokens_of(held)[:4]
    assert len(tokens_of(held)) >= 4


# -- grammars -----------------------------------------------------------------------------------


def _valid(doc: dict) -> bool:
    return (
        set(doc) == {"name", "age", "pet", "tags"}
        and isinstance(doc["name"], str) and len(doc["name"]) <= 6
        and isinstance(doc["age"], int) and 0 <= doc["age"] <= 120
        and doc["pet"] in ("cat", "dog")
        and isinstance(doc["tags"], list) and len(doc["tags"]) <= 3
        and all(isinstance(t, bool) for t in doc["tags"])
    )


async def test_grammar_output_is_valid_with_random_weights(engine):
    grammar = json_schema_grammar(SCHEMA)
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, grammar=grammar, n=2)
              for s in range(3)]
    plain = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    results = await asyncio.gather(
        *(collect(engine, [3, 4, 5], p) for p in params),
        collect(engine, [9, 9, 9], plain),
    )
    for outs in results[:-1]:
        for choice in by_choice(outs).values():
            text = "".join(o.text for o in choice)
            assert choice[-1].finish_reason == "stop", text
            assert _valid(json.loads(text)), text
    # The plain request beside them is what it is alone.
    alone = await collect(engine, [9, 9, 9], plain)
    assert tokens_of(results[-1]) == tokens_of(alone)


async def test_grammar_truncated_by_max_tokens_reports_length(engine):
    grammar = json_schema_grammar({"type": "object", "properties": {"s": {"type": "string"}},
                                   "required": ["s"]})
    outs = await collect(engine, [3, 4], SamplingParams(max_tokens=3, temperature=0.0,
                                                        grammar=grammar))
    assert outs[-1].finish_reason == "length" and len(tokens_of(outs)) == 3


async def test_a_dead_grammar_process_fails_only_the_constrained_requests(engine):
    """The matchers live in the grammar process (server.structured.grammar_worker). Killed
    mid-stream, it takes only the constrained sequences with it; the next grammar starts a
    new process."""
    import os
    import signal

    backend = engine._core.scheduler.grammars
    # At least 100 numbers: the document cannot end before the kill takes effect.
    long_doc = json_schema_grammar({"type": "array", "items": {"type": "integer"},
                                    "minItems": 100})
    constrained = engine.add_request(_rid(), [3, 4], SamplingParams(
        max_tokens=400, temperature=1.0, seed=1, grammar=long_doc))
    plain = asyncio.ensure_future(collect(engine, [9, 9, 9], SamplingParams(
        max_tokens=40, temperature=0.0, ignore_eos=True)))
    old_pid = backend._proc.pid
    outs = []
    async for out in constrained:
        outs.append(out)
        if len(outs) == 2:
            os.kill(old_pid, signal.SIGKILL)
    assert outs[-1].finish_reason == "error" and "grammar process" in outs[-1].error
    assert (await plain)[-1].finish_reason == "length"
    again = await collect(engine, [3, 4], SamplingParams(
        max_tokens=20, temperature=0.0, grammar=json_schema_grammar({"type": "boolean"})))
    assert again[-1].finish_reason == "stop"
    assert "".join(o.text for o in again) in ("true", "false")
    assert backend._proc.pid != old_pid
    assert engine.stats()["grammar_restarts"] == 1  # graphserve_grammar_process_restarts_total


async def test_a_bad_grammar_fails_only_its_request(engine):
    stream = engine.add_request(_rid(), [1, 2], SamplingParams(max_tokens=4,
                                                               grammar="start: %json {\"x\""))
    outs = [o async for o in stream]
    assert outs[-1].finish_reason == "error" and "grammar" in outs[-1].error
    ok = await collect(engine, [1, 2], SamplingParams(max_tokens=3, ignore_eos=True))
    assert ok[-1].finish_reason == "length"
