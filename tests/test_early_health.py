"""The stdlib responder that answers health probes before FastAPI/uvicorn are imported."""

from __future__ import annotations

import socket
import textwrap
import time

import httpx
import pytest

from server.cli import bind_socket
from server.config import ServerConfig
from server.early_health import EarlyHealthResponder
from server.health import Lifecycle
from tests.helpers_server import ServerProcess

FAKE_ENGINE = "tests.fake_engine:FakeEngine"


@pytest.fixture
def responder():
    """A responder on a fresh socket, plus the real app (fake engine) in the same phase."""
    from server.api import create_app

    sock = bind_socket("127.0.0.1", 0)
    lifecycle = Lifecycle()
    early = EarlyHealthResponder(sock, lifecycle, api_key="sekrit")
    early.start()
    app = create_app(
        ServerConfig(api_key="sekrit"), engine_class=FAKE_ENGINE, lifecycle=Lifecycle()
    )
    port = sock.getsockname()[1]
    yield f"http://127.0.0.1:{port}", app, early, sock
    early.stop()
    sock.close()


async def _app_answer(app, method, path, headers=None):
    transport = httpx.ASGITransport(app=app)  # no lifespan: the app stays in `starting`
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return await client.request(method, path, headers=headers)


@pytest.mark.parametrize(
    "method, path, headers",
    [
        ("GET", "/health/graphs", None),
        ("GET", "/v1/models", {"Authorization": "Bearer sekrit"}),
        ("POST", "/v1/completions", {"Authorization": "Bearer sekrit"}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models", {"Authorization": "Bearer wrong"}),
        ("GET", "/nope", None),
        ("POST", "/health", None),
    ],
)
async def test_answers_like_the_app_in_the_starting_phase(responder, method, path, headers):
    url, app, _, _ = responder
    ours = httpx.request(method, url + path, headers=headers, timeout=5)
    theirs = await _app_answer(app, method, path, headers)
    assert ours.status_code == theirs.status_code
    assert ours.json() == theirs.json()
    for name in ("retry-after", "www-authenticate"):
        assert ours.headers.get(name) == theirs.headers.get(name), name


async def test_liveness_and_readiness_bodies(responder):
    url, app, _, _ = responder
    for path, status in (("/health", 200), ("/health/ready", 503)):
        ours = httpx.get(url + path, timeout=5)
        theirs = await _app_answer(app, "GET", path)
        assert ours.status_code == theirs.status_code == status
        assert ours.json().keys() == theirs.json().keys()
        assert ours.json()["phase"] == "starting"
    assert httpx.head(url + "/health", timeout=5).status_code == 200


def test_bad_requests_and_a_stuck_client_do_not_block_others(responder):
    url, _, early, sock = responder
    host, port = sock.getsockname()[:2]
    stuck = socket.create_connection((host, port))  # connects, never sends a request
    garbage = socket.create_connection((host, port))
    garbage.sendall(b"NOT HTTP\r\n\r\n")
    assert garbage.recv(100).startswith(b"HTTP/1.1 400")
    t0 = time.monotonic()
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    assert time.monotonic() - t0 < 0.5
    stuck.close()
    garbage.close()
    assert early.answered >= 2


def test_handover_leaves_the_socket_listening(responder):
    url, _, early, sock = responder
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    early.stop()
    host, port = sock.getsockname()[:2]
    client = socket.create_connection((host, port))  # queued on the original socket
    sock.settimeout(5)
    conn, _ = sock.accept()  # whoever serves next (uvicorn) gets it
    conn.close()
    client.close()


@pytest.mark.slow
def test_health_answers_while_the_http_stack_is_still_importing(tmp_path):
    """A shim makes `import fastapi` take 3 s; /health must answer long before that."""
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import importlib.abc, sys, time

            class _Slow(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path=None, target=None):
                    if name == "fastapi":
                        sys.meta_path.remove(self)
                        time.sleep(3)
                    return None

            sys.meta_path.insert(0, _Slow())
            """
        )
    )
    with ServerProcess("--engine-class", FAKE_ENGINE, env={"PYTHONPATH": str(tmp_path)}) as srv:
        live = srv.wait_live(timeout=30)
        body = srv.client.get("/health/ready").json()
        print(f"exec -> /health 200 with fastapi's import delayed 3 s: {live:.3f} s")
        assert live < 2.5, f"/health took {live:.2f} s: it waited for the delayed import"
        assert body["phase"] == "starting"
        srv.wait_phase("ready", timeout=60)  # and the real app takes over afterwards
