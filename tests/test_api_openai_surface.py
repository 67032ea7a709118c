"""The OpenAI surface beyond plain sampling, against the fake engine (torch-free): what reaches
the engine, and the exact shapes of n / best_of / batched choices, logprobs (both APIs,
streamed too), echo, response_format and tool calls (collected and streamed deltas)."""

from __future__ import annotations

import json

from server.config import EngineConfig
from server.http.schemas import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
)
from tests.helpers.api_cases import CHAT, COMPL, USER_HI
from tests.helpers.app import parse_sse, serve_app
from tests.helpers.fake_engine import PHRASE

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
LONG = EngineConfig(max_model_len=2048, max_num_seqs=4, max_queue=8)  # room for tool schemas
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string"}}, "required": ["zone"]}}}


async def test_engine_params_of_the_extended_fields():
    async with serve_app() as h:
        resp = await h.client.post(COMPL, json={
            "prompt": "x", "n": 2, "best_of": 3, "presence_penalty": 0.5,
            "frequency_penalty": -0.25, "repetition_penalty": 1.2, "min_tokens": 2,
            "logit_bias": {"65": 150, "66": -7.5}, "user": "someone", "max_tokens": 4,
        })
        assert resp.status_code == 200, resp.text
        (_, _, params), = h.engine.submitted
    assert params.n == 3  # best_of choices generated, the best 2 returned
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.25)
    assert params.repetition_penalty == 1.2 and params.min_tokens == 2
    assert params.logit_bias == {65: 100.0, 66: -7.5}  # clamped to [-100, 100] as OpenAI
    assert params.logprobs == 0  # ranking needs cumulative logprobs; none are returned
    body = CompletionResponse.model_validate(resp.json())
    assert [c.index for c in body.choices] == [0, 1]
    assert all(c.logprobs is None for c in body.choices)


async def test_n_choices_and_batched_prompts_are_indexed_prompt_major():
    async with serve_app() as h:
        resp = await h.client.post(COMPL, json={"prompt": ["ab", "c"], "n": 2,
                                                "max_tokens": 5})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert len(h.engine.submitted) == 2
    CompletionResponse.model_validate(body)
    texts = {c["index"]: c["text"] for c in body["choices"]}
    # The fake's choice j writes the phrase from its j-th byte: index = prompt * n + choice.
    assert texts == {0: PHRASE[:5].decode(), 1: PHRASE[1:6].decode(),
                     2: PHRASE[:5].decode(), 3: PHRASE[1:6].decode()}
    assert body["usage"] == {"prompt_tokens": 3 + 2, "completion_tokens": 20,
                             "total_tokens": 25, "prompt_tokens_details": {"cached_tokens": 0}}


async def test_best_of_keeps_the_highest_cumulative_logprob():
    async with serve_app() as h:
        # The fake's logprobs fall with each token: the choice that stops first (EOS after 2
        # tokens through [eos:2]) is the most likely one.
        resp = await h.client.post(COMPL, json={"prompt": "[eos:2]", "best_of": 3,
                                                "max_tokens": 6, "logprobs": 1})
        body = resp.json()
    assert resp.status_code == 200, resp.text
    (choice,) = body["choices"]
    assert choice["index"] == 0 and len(choice["logprobs"]["tokens"]) == 3


async def test_streamed_n_choices_each_end_with_their_finish_reason():
    async with serve_app() as h:
        resp = await h.client.post(CHAT, json={"messages": USER_HI, "n": 3, "max_tokens": 4,
                                               "stream": True,
                                               "stream_options": {"include_usage": True}})
    events = parse_sse(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(e) for e in events[:-1]]
    text: dict[int, str] = {}
    finish: dict[int, str] = {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        text[choice.index] = text.get(choice.index, "") + (choice.delta.content or "")
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    assert text == {j: PHRASE[j:j + 4].decode() for j in range(3)}
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


# -- logprobs -----------------------------------------------------------------------------------


async def test_chat_logprobs_shape_collected_and_streamed():
    async with serve_app() as h:
        body = {"messages": USER_HI, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
        resp = await h.client.post(CHAT, json=body)
        streamed = await h.client.post(CHAT, json={**body, "stream": True})
    parsed = ChatCompletionResponse.model_validate(resp.json())
    content = parsed.choices[0].logprobs.content
    assert [e.token for e in content] == list("The")
    assert [e.logprob for e in content] == [0.0, -0.125, -0.25]
    assert content[0].bytes == [ord("T")]
    assert [(t.token, t.logprob) for t in content[1].top_logprobs] == [("h", -0.125),
                                                                       ("i", -1.125)]
    entries = []
    for event in parse_sse(streamed.text)[:-1]:
        choice = ChatCompletionChunk.model_validate(event).choices[0]
        if choice.logprobs is not None:
            entries += choice.logprobs.content
    assert [e.model_dump() for e in entries] == [e.model_dump() for e in content]


async def test_completion_logprobs_with_echo_and_max_tokens_zero():
    async with serve_app() as h:
        resp = await h.client.post(COMPL, json={"prompt": "abc", "echo": True, "max_tokens": 0,
                                                "logprobs": 1})
        (_, _, params), = h.engine.submitted
    assert resp.status_code == 200, resp.text
    assert params.max_tokens == 0 and params.prompt_logprobs == 1
    choice = CompletionResponse.model_validate(resp.json()).choices[0]
    assert choice.text == "abc" and choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp.tokens == ["<s>", "a", "b", "c"]
    assert lp.token_logprobs == [None, -0.25, -0.25, -0.25]
    assert lp.top_logprobs[0] is None and lp.top_logprobs[1] == {"a": -0.25}
    assert lp.text_offset == [0, 3, 4, 5]
    assert resp.json()["usage"]["completion_tokens"] == 0


async def test_completion_logprobs_streamed_with_echo():
    async with serve_app() as h:
        resp = await h.client.post(COMPL, json={"prompt": "ab", "echo": True, "max_tokens": 3,
                                                "logprobs": 0, "stream": True})
    chunks = [CompletionChunk.model_validate(e) for e in parse_sse(resp.text)[:-1]]
    assert chunks[0].choices[0].text == "ab"  # the echo first
    assert chunks[0].choices[0].logprobs.token_logprobs == [None, -0.25, -0.25]
    tokens = [t for c in chunks[1:] for t in c.choices[0].logprobs.tokens]
    assert tokens == list("The")
    assert "".join(c.choices[0].text for c in chunks) == "abThe"
    assert chunks[-1].choices[0].finish_reason == "length"


# -- structured outputs and tools ----------------------------------------------------------------


async def test_json_schema_response_format_is_valid():
    schema = {"type": "object", "properties": {"a": {"type": "integer"},
                                               "b": {"enum": ["x", "y"]}},
              "required": ["a", "b"], "additionalProperties": False}
    async with serve_app() as h:
        resp = await h.client.post(CHAT, json={
            "messages": USER_HI, "max_tokens": 40,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "t", "schema": schema, "strict": True}}})
    choice = resp.json()["choices"][0]
    doc = json.loads(choice["message"]["content"])
    assert set(doc) == {"a", "b"} and isinstance(doc["a"], int) and doc["b"] in ("x", "y")
    assert choice["finish_reason"] == "stop"


async def test_required_tool_call_collected():
    async with serve_app(engine_config=LONG) as h:
        resp = await h.client.post(CHAT, json={
            "messages": USER_HI, "tools": [WEATHER, TIME], "tool_choice": "required",
            "parallel_tool_calls": False, "max_tokens": 120})
        (_, prompt_ids, params), = h.engine.submitted
    assert resp.status_code == 200, resp.text
    body = ChatCompletionResponse.model_validate(resp.json())
    choice = body.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in ("get_weather", "get_time")
    json.loads(call.function.arguments)
    assert choice.message.content is None
    assert params.grammar is not None and not params.skip_special_tokens
    assert b"get_weather" in bytes(t for t in prompt_ids if t < 256)  # tools were rendered


async def test_named_tool_call_streamed_as_openai_deltas():
    async with serve_app(engine_config=LONG) as h:
        resp = await h.client.post(CHAT, json={
            "messages": USER_HI, "tools": [WEATHER, TIME], "max_tokens": 120, "stream": True,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    chunks = [ChatCompletionChunk.model_validate(e) for e in parse_sse(resp.text)[:-1]]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    first, *rest = deltas
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert all(d.id is None and d.function.name is None and d.index == 0 for d in rest)
    args = json.loads("".join(d.function.arguments for d in rest))
    assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)


async def test_auto_tool_choice_parses_calls_from_text_and_keeps_plain_text():
    call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    async with serve_app(engine_config=LONG) as h:
        tool = await h.client.post(CHAT, json={
            "messages": [{"role": "user", "content": f"[say:{call}][eos:{len(call)}]"}],
            "tools": [TIME], "max_tokens": 200})
        plain = await h.client.post(CHAT, json={"messages": USER_HI, "tools": [TIME],
                                                "max_tokens": 5})
    choice = tool.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (got,) = choice["message"]["tool_calls"]
    assert got["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    assert plain.json()["choices"][0]["message"] == {"role": "assistant",
                                                     "content": PHRASE[:5].decode()}


async def test_tool_history_is_rendered_and_tool_choice_none_hides_tools():
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3"},
    ]
    async with serve_app(engine_config=LONG) as h:
        resp = await h.client.post(CHAT, json={"messages": history, "tools": [WEATHER],
                                               "tool_choice": "none", "max_tokens": 2})
        (_, prompt_ids, params), = h.engine.submitted
    assert resp.status_code == 200, resp.text
    rendered = bytes(t for t in prompt_ids if t < 256).decode()
    assert '"city": "Oslo"' in rendered and "<|tool|>-3" in rendered
    assert "<|tools|>" not in rendered and params.grammar is None


async def test_auto_mode_without_parallel_calls_returns_the_first_call_only():
    one = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    two = one + "\n" + one.replace("UTC", "CET")
    body = {"messages": [{"role": "user", "content": f"[say:{two}][eos:{len(two)}]"}],
            "tools": [TIME], "max_tokens": 300}
    async with serve_app(engine_config=LONG) as h:
        both = await h.client.post(CHAT, json=body)
        first = await h.client.post(CHAT, json={**body, "parallel_tool_calls": False})
        streamed = await h.client.post(CHAT, json={**body, "parallel_tool_calls": False,
                                                   "stream": True})
    assert len(both.json()["choices"][0]["message"]["tool_calls"]) == 2
    (call,) = first.json()["choices"][0]["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"zone": "UTC"}
    deltas = [d for e in parse_sse(streamed.text)[:-1]
              for d in e["choices"][0]["delta"].get("tool_calls") or []]
    assert {d["index"] for d in deltas} == {0}


async def test_strict_tools_in_auto_mode_constrain_the_answer():
    strict = {"type": "function", "function": {**TIME["function"], "strict": True}}
    async with serve_app(engine_config=LONG) as h:
        loose = await h.client.post(CHAT, json={"messages": USER_HI, "tools": [TIME],
                                                "max_tokens": 4})
        tight = await h.client.post(CHAT, json={"messages": USER_HI, "tools": [strict],
                                                "max_tokens": 40})
        (_, _, loose_params), (_, _, tight_params) = h.engine.submitted
    assert loose.status_code == tight.status_code == 200, tight.text
    assert loose_params.grammar is None and tight_params.grammar is not None
    message = tight.json()["choices"][0]["message"]
    assert "<tool_call>" not in (message["content"] or "")  # text never opens a call
