"""Schemathesis fuzzes every operation of the app's own OpenAPI schema (fake engine, in-process):
no 5xx, no undocumented status or content type, every JSON answer valid against the schema.

Bounded for CI: a fixed example budget per operation and derandomized generation, so a run takes
a few seconds and is reproducible. Set GRAPHSERVE_FUZZ_EXAMPLES to fuzz harder locally, and
GRAPHSERVE_FUZZ_REAL=1 to fuzz a real server process (real engine) instead of the in-process app.
"""

from __future__ import annotations

import os
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402  (after the importorskip)
from schemathesis.core.failures import FailureGroup  # noqa: E402

from server.config import EngineConfig  # noqa: E402
from tests.helpers.app import make_app  # noqa: E402

MAX_EXAMPLES = int(os.environ.get("GRAPHSERVE_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def api_schema():
    if os.environ.get("GRAPHSERVE_FUZZ_REAL"):
        # Opt-in: fuzz a real server process (real engine, default model) over HTTP instead.
        from tests.helpers.server_process import ServerProcess

        with ServerProcess("--max-model-len", "128", "--max-num-seqs", "4") as srv:
            srv.wait_phase("ready")
            yield schemathesis.openapi.from_url(srv.base_url + "/openapi.json")
            assert "Traceback" not in srv.log, srv.log
        return
    app, _ = make_app(engine_config=EngineConfig(max_model_len=256, max_num_seqs=8,
                                                 max_queue=64))
    # Loading the schema starts the app's lifespan (and so the fake engine) in schemathesis'
    # own event-loop thread, where it serves every fuzzed request.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    lifecycle = app.state.graphserve.lifecycle
    deadline = time.monotonic() + 10
    while not lifecycle.ready:
        assert time.monotonic() < deadline, f"fake engine not ready: {lifecycle.phase}"
        time.sleep(0.01)
    yield schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_own_schema(case):
    # positive_data_acceptance expects every schema-valid body to succeed; it cannot hold for
    # rules a JSON schema cannot state (prompt + max_tokens within the context, the served model
    # name, token ids within the vocabulary, unsupported-but-declared OpenAI fields). Those are
    # answered with documented 400/404s, which the other checks still verify.
    case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])


# Random bodies rarely make it past validation to a full answer, so the success paths (and the
# error event of a failing stream) are also checked with fixed bodies against the same schema.
SUCCESS_CASES = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5}),
    ("/v1/completions", {"prompt": [256, 104, 105], "max_tokens": 5, "stream": True}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 40, "stream": True, "stop": "fox",
                         "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": "[fault:2]", "max_tokens": 5, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 5, "stream": True,
                              "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "[fault:1]"}],
                              "stream": True}),
]


def _wait_ready(api_schema, timeout: float = 10.0) -> None:
    """Schemathesis ends the app's lifespan after every test and the next request starts it
    again, so the engine boots anew (503 until ready) at the start of each test."""
    deadline = time.monotonic() + timeout
    while api_schema["/health/ready"]["GET"].Case().call().status_code != 200:
        assert time.monotonic() < deadline, "the app did not become ready"
        time.sleep(0.01)


@pytest.mark.parametrize("path,body", SUCCESS_CASES)
def test_answers_validate_against_the_schema(api_schema, path, body):
    _wait_ready(api_schema)
    case = api_schema[path]["POST"].Case(body=body, media_type="application/json")
    response = case.call()
    assert response.status_code == 200, response.text
    case.validate_response(response)


def test_schema_validation_catches_a_malformed_stream_chunk(api_schema, monkeypatch):
    # The SSE event schema must really bite: a chunk with the wrong `object` is reported.
    if os.environ.get("GRAPHSERVE_FUZZ_REAL"):
        pytest.skip("patches the in-process app")
    import server.http.relay as relay  # the answers' SSE events are rendered there

    _wait_ready(api_schema)
    real = relay.sse
    monkeypatch.setattr(relay, "sse", lambda obj: real({**obj, "object": "bogus"}))
    case = api_schema["/v1/chat/completions"]["POST"].Case(
        body={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True},
        media_type="application/json",
    )
    response = case.call()
    with pytest.raises(FailureGroup) as failure:
        case.validate_response(response)
    assert "SSE event violates schema" in str(failure.value)


def test_models_answer_validates(api_schema):
    _wait_ready(api_schema)
    case = api_schema["/v1/models"]["GET"].Case()
    response = case.call()
    assert response.status_code == 200
    case.validate_response(response)
