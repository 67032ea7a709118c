"""End to end with the official `openai` SDK: the model list and retrieval, structured
outputs (`chat.completions.parse`), a full tool round trip, streamed tool calls, typed
logprobs, `n`, echo logprobs against HF on CPU, and penalties / logit_bias changing the
output as defined. One real server on the embedded default model (random weights: the
grammar is what makes the output valid)."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
import torch
from pydantic import BaseModel, Field

from tests.helpers.server_process import ServerProcess

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
        "additionalProperties": False}}}


class Pet(BaseModel):
    name: str = Field(max_length=10)
    kind: Literal["cat", "dog", "parrot"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--max-num-seqs", "8", "--max-model-len", "2048") as srv:
        srv.wait_phase("ready")
        srv.model = srv.client.get("/v1/models").json()["data"][0]["id"]
        yield srv


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf():
    """The default model through transformers (the reference for logprobs and penalties)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.default_model import ensure_default_model

    path = ensure_default_model()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].float()


# -- models ------------------------------------------------------------------------------------


def test_models_list_and_retrieve(server, sdk):
    (listed,) = sdk.models.list().data
    assert listed.id == server.model
    card = sdk.models.retrieve(server.model)
    assert (card.id, card.object, card.created) == (listed.id, "model", listed.created)
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("no-such-model")


# -- structured outputs and tools ----------------------------------------------------------------


def test_parse_with_a_pydantic_model(server, sdk):
    for seed in (1, 2):
        completion = sdk.chat.completions.parse(
            model=server.model, messages=[{"role": "user", "content": "Describe a pet."}],
            response_format=Pet, max_tokens=120, seed=seed,
        )
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "stop", message.content
        assert isinstance(message.parsed, Pet), message.content


def test_tool_round_trip(server, sdk):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = sdk.chat.completions.create(model=server.model, messages=messages,
                                        tools=[WEATHER, CLOCK], tool_choice="required",
                                        parallel_tool_calls=False, max_tokens=150, seed=3)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert len(calls) == 1 and all(c.function.name in ("get_weather", "get_time") for c in calls)
    for call in calls:
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    messages.append(choice.message.model_dump(exclude_none=True))
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "21 degrees"})
    answer = sdk.chat.completions.create(model=server.model, messages=messages,
                                         tools=[WEATHER, CLOCK], max_tokens=12, seed=3)
    # The history (calls and results) went through the template: the prompt grew by them.
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens + 5
    final = answer.choices[0]
    assert final.message.role == "assistant"
    assert final.finish_reason in ("stop", "length", "tool_calls")


def test_streamed_tool_calls_reassemble(server, sdk):
    stream = sdk.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Time in Tokyo?"}],
        tools=[CLOCK, WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=80, stream=True, seed=5,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            if delta.id:
                call["id"] = delta.id
            if delta.function and delta.function.name:
                call["name"] = delta.function.name
            if delta.function and delta.function.arguments:
                call["arguments"] += delta.function.arguments
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    (call,) = calls.values()
    assert call["id"].startswith("call_") and call["name"] == "get_time"
    assert set(json.loads(call["arguments"])) == {"zone"}


# -- logprobs, n, echo ----------------------------------------------------------------------------


def test_typed_logprobs_and_n(server, sdk):
    chat = sdk.chat.completions.create(model=server.model, messages=[{"role": "user",
                                                                      "content": "hi"}],
                                       max_tokens=5, logprobs=True, top_logprobs=3, n=3, seed=9,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1, 2]
    for choice in chat.choices:
        content = choice.logprobs.content
        assert len(content) == 5
        for entry in content:
            assert isinstance(entry.token, str) and entry.logprob <= 0
            assert len(entry.top_logprobs) == 3
            assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-5
    again = sdk.chat.completions.create(model=server.model, messages=[{"role": "user",
                                                                       "content": "hi"}],
                                        max_tokens=5, n=3, seed=9, extra_body={"ignore_eos": True})
    assert [c.message.content for c in again.choices] == [c.message.content for c in chat.choices]
    legacy = sdk.completions.create(model=server.model, prompt="Once", max_tokens=4, logprobs=2,
                                    extra_body={"ignore_eos": True})
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_echo_logprobs_match_hf(server, sdk, hf):
    model, tok = hf
    prompt = tok("The quick brown fox jumps over the lazy dog")["input_ids"]
    out = sdk.completions.create(model=server.model, prompt=prompt, echo=True, max_tokens=0,
                                 logprobs=1)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 0
    got = choice.logprobs.token_logprobs
    assert len(got) == len(prompt) and got[0] is None
    lp = torch.log_softmax(_logits(model, prompt), dim=-1)
    expected = [lp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert got[1:] == pytest.approx(expected, abs=2e-4)


# -- penalties and bias --------------------------------------------------------------------------


def test_penalties_and_bias_change_the_output_as_defined(server, sdk, hf):
    model, tok = hf
    prompt = tok("a")["input_ids"]  # greedy repeats tokens within 16 steps from here
    kwargs = dict(model=server.model, prompt=prompt, max_tokens=16, temperature=0,
                  extra_body={"ignore_eos": True})
    ids, expected = list(prompt), []
    for _ in range(16):
        logits = _logits(model, ids)[-1]
        counts = torch.bincount(torch.tensor(expected, dtype=torch.long),
                                minlength=logits.numel())[: logits.numel()].float()
        logits = logits - 1.5 * counts - 0.5 * (counts > 0).float()
        expected.append(int(logits.argmax()))
        ids.append(expected[-1])
    penalised = sdk.completions.create(**kwargs, frequency_penalty=1.5, presence_penalty=0.5)
    plain = sdk.completions.create(**kwargs)
    assert penalised.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    assert penalised.choices[0].text != plain.choices[0].text
    token = tok(" fox", add_special_tokens=False)["input_ids"][0]
    forced = sdk.completions.create(**kwargs, logit_bias={str(token): 100})
    assert forced.choices[0].text == tok.decode([token] * 16)
