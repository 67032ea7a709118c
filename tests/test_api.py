"""The OpenAI routes against the fake engine: formats, streaming, errors, auth, aborts, drain."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.config import EngineConfig
from tests.helpers.api_cases import BAD_REQUESTS, CHAT, COMPL, USER_HI
from tests.helpers.app import RawExchange, assert_error, parse_sse, serve_app, wait_until
from tests.helpers.fake_engine import BOS, PHRASE


def phrase(n: int) -> str:
    return (PHRASE * 10).decode()[:n]


# ------------------------------------------------------------------ non-streaming
async def test_models_lists_the_served_model():
    async with serve_app(engine_config=EngineConfig(served_model_name="tiny", max_model_len=99)) \
            as h:
        resp = await h.client.get("/v1/models")
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "tiny" and card["object"] == "model" and card["max_model_len"] == 99
    assert isinstance(card["created"], int) and card["owned_by"]


async def test_a_model_is_retrieved_by_its_id_and_an_unknown_one_is_404():
    """OpenAI's `GET /v1/models/{model}` (`client.models.retrieve`): the served model's card,
    the same as in the list (`created` included), also for a name with slashes; any other id
    is a 404 `model_not_found`."""
    name = "org/tiny-model"
    async with serve_app(engine_config=EngineConfig(served_model_name=name, max_model_len=99)) \
            as h:
        listed = (await h.client.get("/v1/models")).json()["data"][0]
        resp = await h.client.get(f"/v1/models/{name}")
        assert resp.status_code == 200, resp.text
        assert resp.json() == listed and listed["id"] == name
        err = assert_error(await h.client.get("/v1/models/other"), 404, "invalid_request_error")
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert "org/tiny-model" in err["message"]


async def test_completion_text_usage_and_default_max_tokens():
    async with serve_app() as h:
        resp = await h.client.post(COMPL, json={"model": "fake-model", "prompt": "Hello"})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        (rid, prompt_ids, params), = h.engine.submitted
    assert body["object"] == "text_completion" and body["model"] == "fake-model"
    assert body["id"].startswith("cmpl-") and body["id"] == rid
    assert resp.headers["x-request-id"] == rid
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    # OpenAI's legacy default is 16 tokens; the fake model writes one byte per token.
    assert params.max_tokens == 16
    assert choice["text"] == phrase(16) and choice["finish_reason"] == "length"
    assert prompt_ids == [BOS, *b"Hello"]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 16, "total_tokens": 22,
                             "prompt_tokens_details": {"cached_tokens": 0}}


async def test_completion_default_max_tokens_is_clipped_to_the_context():
    async with serve_app() as h:
        resp = await h.client.post(COMPL, json={"prompt": "x" * 250})  # 251 of 256 tokens
        assert resp.status_code == 200, resp.text
        assert h.engine.submitted[0][2].max_tokens == 5
        assert resp.json()["usage"]["completion_tokens"] == 5


async def test_completion_accepts_token_ids_and_a_single_prompt_list():
    async with serve_app() as h:
        ids = [BOS, *b"abc"]
        r1 = await h.client.post(COMPL, json={"prompt": ids, "max_tokens": 3})
        r2 = await h.client.post(COMPL, json={"prompt": ["abc"], "max_tokens": 3})
        r3 = await h.client.post(COMPL, json={"prompt": [ids], "max_tokens": 3})
        assert [r.status_code for r in (r1, r2, r3)] == [200, 200, 200]
        assert [s[1] for s in h.engine.submitted] == [ids, ids, ids]
        assert r1.json()["usage"]["prompt_tokens"] == 4


async def test_chat_completion_uses_the_template_and_fills_the_context_by_default():
    async with serve_app() as h:
        resp = await h.client.post(CHAT, json={
            "model": "fake-model",
            "messages": [{"role": "developer", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "text", "text": "there"}]}],
            "ignore_eos": True,
        })
        assert resp.status_code == 200, resp.text
        _, prompt_ids, params = h.engine.submitted[0]
    text = bytes(prompt_ids).decode()
    # developer maps to system; text parts are joined; the generation prompt is appended.
    assert text == "<s><|system|>be brief\n<|user|>hi\nthere\n<|assistant|>"
    assert params.max_tokens == 256 - len(prompt_ids)
    body = resp.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": phrase(params.max_tokens)}
    assert choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["usage"]["completion_tokens"] == params.max_tokens


async def test_sampling_parameters_reach_the_engine():
    async with serve_app() as h:
        resp = await h.client.post(CHAT, json={
            "messages": USER_HI, "max_completion_tokens": 4, "max_tokens": 9, "temperature": 0.5,
            "top_p": 0.9, "top_k": 7, "seed": 1234, "stop": "zzz", "stop_token_ids": [200],
            "ignore_eos": True, "presence_penalty": 0, "n": 1, "user": "u1",
        })
        assert resp.status_code == 200, resp.text
        params = h.engine.submitted[0][2]
    assert params.max_tokens == 4  # max_completion_tokens wins over the deprecated max_tokens
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.5, 0.9, 7, 1234)
    assert params.stop == ["zzz"] and params.stop_token_ids == [200] and params.ignore_eos


async def test_stop_string_ends_generation_before_it():
    async with serve_app() as h:
        r1 = await h.client.post(COMPL, json={"prompt": "a", "max_tokens": 30, "stop": "quick"})
        r2 = await h.client.post(COMPL, json={"prompt": "a", "max_tokens": 30,
                                              "stop": ["nope", "brown"]})
        r3 = await h.client.post(COMPL, json={"prompt": "a", "max_tokens": 30,
                                              "stop_token_ids": [ord("q")]})
    c1, c2, c3 = (r.json()["choices"][0] for r in (r1, r2, r3))
    assert (c1["text"], c1["finish_reason"]) == ("The ", "stop")
    assert (c2["text"], c2["finish_reason"]) == ("The quick ", "stop")
    assert (c3["text"], c3["finish_reason"]) == ("The ", "stop")


async def test_eos_gives_stop_and_ignore_eos_keeps_going():
    async with serve_app() as h:
        r1 = await h.client.post(COMPL, json={"prompt": "[eos:3]", "max_tokens": 10})
        r2 = await h.client.post(COMPL, json={"prompt": "[eos:3]", "max_tokens": 10,
                                              "ignore_eos": True})
    assert r1.json()["choices"][0] == {"index": 0, "text": "The", "logprobs": None,
                                       "finish_reason": "stop"}
    assert r1.json()["usage"]["completion_tokens"] == 4  # the EOS token counts, as in OpenAI
    assert r2.json()["choices"][0]["finish_reason"] == "length"
    assert r2.json()["choices"][0]["text"] == phrase(10)


# ------------------------------------------------------------------ streaming
async def test_chat_stream_matches_openai_chunk_format():
    async with serve_app() as h:
        resp = await h.client.post(CHAT, json={"messages": USER_HI, "max_tokens": 5,
                                               "stream": True})
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(resp.text)
        assert h.state.inflight == {}
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == "fake-model"
        assert isinstance(c["created"], int) and "usage" not in c
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "length"}
    middle = chunks[1:-1]
    assert all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == phrase(5)


async def test_stream_include_usage_adds_a_usage_chunk():
    async with serve_app() as h:
        resp = await h.client.post(CHAT, json={
            "messages": USER_HI, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True},
        })
    events = parse_sse(resp.text)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 3
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 3
    assert all(e["usage"] is None for e in events[:-2])


async def test_completion_stream_format_and_stop():
    async with serve_app() as h:
        resp = await h.client.post(COMPL, json={"prompt": "a", "max_tokens": 40, "stream": True,
                                                "stop": ["fox"],
                                                "stream_options": {"include_usage": True}})
    events = parse_sse(resp.text)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["object"] == "text_completion"
    chunks = events[:-2]
    for c in chunks:
        assert c["object"] == "text_completion" and c["id"].startswith("cmpl-")
        assert set(c["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == "The quick brown "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_engine_fault_mid_stream_sends_an_error_event_then_done():
    async with serve_app() as h:
        resp = await h.client.post(COMPL, json={"prompt": "[fault:2]", "max_tokens": 10,
                                                "stream": True})
        assert resp.status_code == 200
        events = parse_sse(resp.text)
        assert events[-1] == "[DONE]"
        err = events[-2]["error"]
        assert err["type"] == "server_error" and "fake engine fault" in err["message"]
        assert "".join(e["choices"][0]["text"] for e in events[:-2]) == "Th"
        # Non-streaming: an engine fault (not bad input) is the one case for a 500.
        resp = await h.client.post(CHAT, json={"messages": [{"role": "user",
                                                             "content": "[fault:1]"}]})
        assert_error(resp, 500, "server_error")
        ok = await h.client.post(COMPL, json={"prompt": "fine", "max_tokens": 2})
        assert ok.status_code == 200


# ------------------------------------------------------------------ bad input
@pytest.fixture
async def harness():
    async with serve_app() as h:
        yield h


@pytest.mark.parametrize("path,body,status,param", [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
async def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(harness, path, body,
                                                                       status, param):
    client = harness.client
    if isinstance(body, bytes):
        resp = await client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        resp = await client.post(path, json=body)
    err = assert_error(resp, status, "invalid_request_error", param)
    if param:
        assert param.split(".")[0] in err["message"] or err["code"], err
    assert harness.engine.submitted == []  # refused before reaching the engine
    ok = await client.post(COMPL, json={"prompt": "fine", "max_tokens": 2})
    assert ok.status_code == 200


async def test_a_body_not_sent_as_json_is_a_clear_400(harness):
    for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}):
        resp = await harness.client.post(COMPL, content=b'{"prompt": "x"}', headers=headers)
        err = assert_error(resp, 400, "invalid_request_error")
        assert "application/json" in err["message"]


async def test_unknown_model_is_404(harness):
    resp = await harness.client.post(CHAT, json={"model": "gpt-9", "messages": USER_HI})
    err = assert_error(resp, 404, "invalid_request_error", "model")
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]


async def test_unknown_route_and_wrong_method_use_the_error_shape(harness):
    assert_error(await harness.client.get("/v1/nothing"), 404)
    resp = await harness.client.get(COMPL)
    assert_error(resp, 405)
    assert "POST" in resp.headers["allow"]


async def test_validation_errors_are_400_in_the_openapi_schema(harness):
    schema = (await harness.client.get("/openapi.json")).json()
    assert "422" not in json.dumps(schema["paths"])
    op = schema["paths"][CHAT]["post"]
    assert {"400", "401", "404", "429", "503"} <= set(op["responses"])
    assert "text/event-stream" in op["responses"]["200"]["content"]


# ------------------------------------------------------------------ auth
async def test_api_key_guards_v1_but_not_health_or_metrics():
    async with serve_app(api_key="s3cret") as h:
        c = h.client
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            resp = await c.post(CHAT, json={"messages": USER_HI}, headers=headers)
            err = assert_error(resp, 401, "authentication_error")
            assert err["code"] == "invalid_api_key"
            assert resp.headers["www-authenticate"] == "Bearer"
        # Auth is checked before the body: bad input without a key is still 401.
        assert_error(await c.post(CHAT, content=b"{", headers={}), 401)
        assert_error(await c.get("/v1/models"), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert (await c.get("/v1/models", headers=good)).status_code == 200
        resp = await c.post(CHAT, json={"messages": USER_HI, "max_tokens": 2}, headers=good)
        assert resp.status_code == 200
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/health/ready")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200


# ------------------------------------------------------------------ overload and aborts
async def test_queue_full_is_429_with_retry_after():
    cfg = EngineConfig(max_model_len=256, max_num_seqs=1, max_queue=1)
    async with serve_app(engine_config=cfg, token_delay=0.01) as h:
        body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True}
        first = asyncio.ensure_future(h.client.post(COMPL, json=body))
        await wait_until(lambda: h.engine.stats()["running"] == 1)
        second = asyncio.ensure_future(h.client.post(COMPL, json=body))
        await wait_until(lambda: h.engine.stats()["waiting"] == 1)
        resp = await h.client.post(COMPL, json=body)
        err = assert_error(resp, 429, "rate_limit_error")
        assert err["code"] == "queue_full" and resp.headers["retry-after"] == "1"
        h.engine.abort(list(h.state.inflight)[0])
        h.engine.abort(list(h.state.inflight)[1])
        await asyncio.gather(first, second)


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_aborts_the_engine_request(stream):
    async with serve_app(token_delay=0.005) as h:
        ex = RawExchange(h.app, COMPL, {"prompt": "x", "max_tokens": 200, "stream": stream})
        task = ex.run()
        await wait_until(lambda: h.engine.stats()["running"] == 1)
        if stream:
            await asyncio.wait_for(ex.first_body.wait(), 5)
        ex.disconnect.set()
        await asyncio.wait_for(task, 5)
        (rid, _, _), = h.engine.submitted
        assert h.engine.aborted == [rid]
        await wait_until(lambda: h.engine.stats()["running"] == 0)
        assert h.state.inflight == {}
        metrics = (await h.client.get("/metrics")).text
        assert 'graphserve_requests_aborted_total{cause="client_disconnect"} 1.0' in metrics
        if not stream:
            assert 'graphserve_requests_total{endpoint="/v1/completions",status="499"}' \
                in metrics


async def test_disconnect_while_queued_frees_the_queue_slot_without_waiting_for_a_token():
    cfg = EngineConfig(max_model_len=256, max_num_seqs=1, max_queue=4)
    async with serve_app(engine_config=cfg, token_delay=0.01) as h:
        long = {"prompt": "x", "max_tokens": 250, "ignore_eos": True}
        blocker = asyncio.ensure_future(h.client.post(COMPL, json=long))
        await wait_until(lambda: h.engine.stats()["running"] == 1)
        ex = RawExchange(h.app, CHAT, {"messages": USER_HI, "stream": True})
        task = ex.run()
        await wait_until(lambda: h.engine.stats()["waiting"] == 1)
        ex.disconnect.set()
        await asyncio.wait_for(task, 5)
        await wait_until(lambda: h.engine.stats()["waiting"] == 0)
        assert len(h.engine.aborted) == 1
        h.engine.abort(h.engine.submitted[0][0])
        assert (await blocker).status_code == 500  # aborted by the engine, not by bad input


# ------------------------------------------------------------------ readiness gate and drain
async def test_v1_is_503_with_retry_after_until_ready():
    async with serve_app(wait_ready=False, gated=True) as h:
        for path, method in (("/v1/models", "get"), ("/v1/models/fake-model", "get"),
                             (COMPL, "post")):
            resp = await getattr(h.client, method)(path, **({"json": {"prompt": "x"}}
                                                              if method == "post" else {}))
            err = assert_error(resp, 503, "service_unavailable_error")
            assert resp.headers["retry-after"]
            assert err["code"] in ("starting", "loading_weights")
        # Even a malformed body gets the 503: readiness is decided before parsing.
        assert_error(await h.client.post(COMPL, content=b"{"), 503)
        await wait_until(lambda: h.state.engine is not None)
        for _ in range(3):
            h.engine.release_phase()
        await wait_until(lambda: h.state.lifecycle.ready)
        assert (await h.client.get("/v1/models")).status_code == 200


async def test_drain_lets_streams_finish_and_refuses_new_requests():
    async with serve_app(token_delay=0.005) as h:
        ex = RawExchange(h.app, CHAT, {"messages": USER_HI, "max_tokens": 40, "stream": True})
        task = ex.run()
        await asyncio.wait_for(ex.first_body.wait(), 5)
        drain = asyncio.ensure_future(h.state.drain(timeout=10))
        await wait_until(lambda: h.state.lifecycle.phase == "draining")
        ready = await h.client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["phase"] == "draining"
        assert (await h.client.get("/health")).status_code == 200
        err = assert_error(await h.client.post(CHAT, json={"messages": USER_HI}), 503)
        assert err["code"] == "draining"
        await asyncio.wait_for(drain, 10)
        await task
        body = b"".join(m.get("body", b"") for m in ex.messages).decode()
        events = parse_sse(body)
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert h.engine.aborted == []


async def test_drain_timeout_aborts_what_is_left():
    async with serve_app(token_delay=0.01) as h:
        stream = RawExchange(h.app, CHAT, {"messages": USER_HI, "max_tokens": 200,
                                           "stream": True, "ignore_eos": True})
        t1 = stream.run()
        plain = asyncio.ensure_future(h.client.post(COMPL, json={"prompt": "x",
                                                                 "max_tokens": 200}))
        await wait_until(lambda: h.engine.stats()["running"] == 2)
        await asyncio.wait_for(h.state.drain(timeout=0.05), 10)
        await t1
        events = parse_sse(b"".join(m.get("body", b"") for m in stream.messages).decode())
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "draining"
        err = assert_error(await plain, 503, "service_unavailable_error")
        assert "shutting down" in err["message"]
        assert len(h.engine.aborted) == 2


# ------------------------------------------------------------------ metrics
def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_requests_tokens_and_latencies(harness):
    c = harness.client
    await c.post(COMPL, json={"prompt": "abc", "max_tokens": 5})
    await c.post(CHAT, json={"messages": USER_HI, "max_tokens": 3, "stream": True})
    await c.post(COMPL, json={"prompt": "x", "max_tokens": 0})
    # The stream's last bytes reach the client before its request leaves the engine's books.
    await wait_until(lambda: harness.engine.stats()["running"] == 0)
    resp = await c.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    s = _samples(resp.text)
    assert s[("graphserve_requests_total",
              (("endpoint", "/v1/completions"), ("status", "200")))] == 1
    assert s[("graphserve_requests_total",
              (("endpoint", "/v1/chat/completions"), ("status", "200")))] == 1
    assert s[("graphserve_requests_total",
              (("endpoint", "/v1/completions"), ("status", "400")))] == 1
    assert s[("graphserve_generation_tokens_total", ())] == 8
    assert s[("graphserve_prompt_tokens_total", ())] == 4 + len(harness.engine.submitted[1][1])
    assert s[("graphserve_time_to_first_token_seconds_count", ())] == 2
    assert s[("graphserve_inter_token_latency_seconds_count", ())] == 4 + 2
    assert s[("graphserve_request_duration_seconds_count", ())] == 2
    assert s[("graphserve_ready", ())] == 1
    assert ("graphserve_event_loop_lag_seconds_count", ()) in s  # the HTTP side's own lag
    assert s[("graphserve_phase", (("phase", "ready"),))] == 1
    assert s[("graphserve_requests_running", ())] == 0
    assert s[("graphserve_requests_waiting", ())] == 0
    # Engine-side values come from graph_report() at scrape time.
    assert s[("graphserve_graph_coverage_ratio", ())] == pytest.approx(1 / 3)
    assert s[("graphserve_graph_pool_bytes", ())] == 1024
    assert s[("graphserve_graph_captures_total", (("result", "captured"),))] == 1
    assert s[("graphserve_graph_captures_total", (("result", "failed"),))] == 0
    assert s[("graphserve_graph_capture_seconds", (("size", "4"),))] == pytest.approx(0.0015)
    steps = {k: s.get(("graphserve_decode_steps_total", (("kind", k),))) for k in
             ("exact", "padded", "eager")}
    assert steps["padded"] > 0 and steps["exact"] == 0 and steps["eager"] == 0
    # Unknown /v1 paths share one label instead of growing the series without bound.
    await c.get("/v1/whatever-1")
    await c.get("/v1/whatever-2")
    s = _samples((await c.get("/metrics")).text)
    assert s[("graphserve_requests_total", (("endpoint", "other"), ("status", "404")))] == 2


async def test_each_app_has_its_own_registry():
    async with serve_app() as a, serve_app() as b:
        await a.client.post(COMPL, json={"prompt": "x", "max_tokens": 1})
        sa = _samples((await a.client.get("/metrics")).text)
        sb = _samples((await b.client.get("/metrics")).text)
    key = ("graphserve_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    assert sa[key] == 1 and key not in sb


async def test_concurrent_streams_are_independent(harness):
    async def one(i: int) -> str:
        r = await harness.client.post(COMPL, json={"prompt": str(i), "max_tokens": 5 + i,
                                                   "stream": True})
        return "".join(e["choices"][0]["text"] for e in parse_sse(r.text)[:-1])

    texts = await asyncio.gather(*(one(i) for i in range(6)))
    assert texts == [phrase(5 + i) for i in range(6)]


async def test_httpx_client_timeout_is_a_disconnect_for_non_streaming_requests():
    # httpx's ASGI transport cannot disconnect mid-request; this checks the opposite guarantee:
    # a request that completes normally is not mistaken for a disconnect.
    async with serve_app(token_delay=0.001) as h:
        r = await h.client.post(COMPL, json={"prompt": "x", "max_tokens": 20},
                                timeout=httpx.Timeout(10))
        assert r.status_code == 200 and h.engine.aborted == []


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("index", [0, 3])
@pytest.mark.parametrize(
    "text", ["", " hello", 'quote " and \\ backslash', "é 漢字 🙂", "\n\t\x00"]
)
def test_streamed_token_chunks_are_byte_identical_to_full_rendering(chat, index, text):
    from server.http.errors import dumps as _dumps
    from server.http.relay import text_template
    from server.http.streaming import sse as _sse

    base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "system_fingerprint": None, "usage": None}
    prefix, suffix = text_template(base, index, chat)
    if chat:
        choice = {"index": index, "delta": {"content": text}, "logprobs": None,
                  "finish_reason": None}
    else:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": None}
    assert prefix + _dumps(text) + suffix == _sse({**base, "choices": [choice]})
