"""The stdlib responder that answers health probes before FastAPI/uvicorn are imported.

In process: its answers are held against the real app's (fake engine, same phase), then raw
sockets check partial, malformed, oversized and stuck requests and the handover. Subprocess tests
(`slow`) run the CLI with `import fastapi` delayed by a `sitecustomize` shim.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import time

import httpx
import pytest

import server.early_health as early_health
from server.config import ServerConfig
from server.early_health import EarlyHealthResponder
from server.health import DRAINING, FAILED, STARTING, Lifecycle
from server.launch import bind_socket
from tests.helpers.fake_engine import FAKE_ENGINE_CLASS
from tests.helpers.server_process import ServerProcess, slow_fastapi_env

KEY = "sekrit"
VOLATILE = ("uptime_s", "phase_elapsed_s", "at_s")  # timings: equal shape, different values


class Running:
    """A responder on a fresh loopback socket."""

    def __init__(self, api_key: str | None = None, lifecycle: Lifecycle | None = None):
        self.sock = bind_socket("127.0.0.1", 0)
        self.addr = self.sock.getsockname()[:2]
        self.url = f"http://{self.addr[0]}:{self.addr[1]}"
        self.lifecycle = lifecycle or Lifecycle()
        self.responder = EarlyHealthResponder(self.sock, self.lifecycle, api_key)
        self.responder.start()

    def raw(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send `data` on a new connection; everything read until the server closes."""
        with socket.create_connection(self.addr, timeout=timeout) as conn:
            conn.sendall(data)
            return read_all(conn)

    def close(self) -> None:
        self.responder.stop()
        self.sock.close()


@pytest.fixture
def running():
    made: list[Running] = []

    def make(**kwargs) -> Running:
        made.append(Running(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def read_all(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def normalize(value):
    if isinstance(value, dict):
        return {k: None if k in VOLATILE else normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


async def app_answer(app, method: str, path: str, headers=None, json=None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # no lifespan: the app never creates its engine
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return await client.request(method, path, headers=headers, json=json)


REQUESTS = [  # method, path, headers, JSON body
    ("GET", "/health", None, None),
    ("GET", "/health/ready", None, None),
    ("GET", "/health/graphs", None, None),
    ("GET", "/health/ready?verbose=1", None, None),
    ("GET", "/v1/models", {"Authorization": f"Bearer {KEY}"}, None),
    ("POST", "/v1/completions", {"Authorization": f"Bearer {KEY}"}, {"prompt": "hi"}),
    ("POST", "/v1/chat/completions", {"Authorization": f"bearer  {KEY}"}, {"messages": []}),
    ("GET", "/v1/nothing-here", {"Authorization": f"Bearer {KEY}"}, None),
    ("GET", "/v1", {"Authorization": f"Bearer {KEY}"}, None),
    ("GET", "/v1/models", None, None),
    ("GET", "/v1/models", {"Authorization": "Bearer wrong"}, None),
    ("GET", "/v1/models", {"Authorization": f"Basic {KEY}"}, None),
    ("GET", "/nope", None, None),
    ("GET", "/health/nope", None, None),
    ("POST", "/health", None, {"x": 1}),
    ("DELETE", "/health/ready", None, None),
    ("GET", "/health/", None, None),
]


@pytest.mark.parametrize("api_key", [None, KEY])
@pytest.mark.parametrize("phase", [STARTING, DRAINING, FAILED])
async def test_answers_like_the_app_in_the_same_phase(running, api_key, phase):
    from server.api import create_app

    ours_lc, app_lc = Lifecycle(), Lifecycle()
    for lc in (ours_lc, app_lc):
        if phase != STARTING:
            lc.set_phase(phase, "boom" if phase == FAILED else "shutdown requested")
    r = running(api_key=api_key, lifecycle=ours_lc)
    app = create_app(
        ServerConfig(api_key=api_key), engine_class=FAKE_ENGINE_CLASS, lifecycle=app_lc
    )
    with httpx.Client(base_url=r.url, timeout=5, follow_redirects=False) as client:
        for method, path, headers, body in REQUESTS:
            ours = client.request(method, path, headers=headers, json=body)
            theirs = await app_answer(app, method, path, headers, body)
            what = f"{method} {path} {headers}"
            assert ours.status_code == theirs.status_code, what
            assert ours.headers["connection"] == "close"
            for name in ("retry-after", "www-authenticate", "content-type"):
                assert ours.headers.get(name) == theirs.headers.get(name), (what, name)
            if theirs.status_code == 307:  # the app writes an absolute URL, we a path
                assert ours.headers["location"] == httpx.URL(theirs.headers["location"]).path
                assert ours.content == theirs.content == b""
            else:
                assert normalize(ours.json()) == normalize(theirs.json()), what
            if theirs.status_code == 405:  # the app's GET routes; we answer HEAD as well
                assert "GET" in ours.headers["allow"].split(", ")


def test_uptime_and_history_come_from_the_shared_lifecycle(running):
    lifecycle = Lifecycle()
    time.sleep(0.05)
    r = running(lifecycle=lifecycle)
    live = httpx.get(r.url + "/health", timeout=5).json()
    ready = httpx.get(r.url + "/health/ready", timeout=5).json()
    assert live["uptime_s"] >= 0.05 and ready["uptime_s"] >= 0.05
    assert ready["phases"] == [{"phase": "starting", "at_s": 0.0}]
    assert ready["ready"] is False


def test_head_answers_without_a_body(running):
    r = running(api_key=KEY)
    raw = r.raw(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    # The length a GET would get (its uptime digits vary, so only roughly the GET's).
    length = int(re.search(rb"\r\ncontent-length: (\d+)", head.lower()).group(1))
    assert abs(length - len(httpx.get(r.url + "/health", timeout=5).content)) <= 3
    assert body == b""
    raw = r.raw(b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekrit\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 503 ") and raw.endswith(b"\r\n\r\n")


def test_metrics_and_docs_say_not_yet_rather_than_not_found(running):
    r = running()
    for path in ("/metrics", "/openapi.json", "/docs"):
        resp = httpx.get(r.url + path, timeout=5)
        assert resp.status_code == 503, path
        assert resp.headers["retry-after"] == "5"
        assert resp.json()["error"]["code"] == "starting"


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"NOT HTTP\r\n\r\n", 400),
        (b"GET /health HTTP/2.0\r\n\r\n", 400),
        (b"GET  /health HTTP/1.1\r\n\r\n", 400),
        (b"GET health HTTP/1.1\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n", 400),
        (b"GET /h\xc3\xa9alth HTTP/1.1\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nX: " + b"a" * (17 * 1024), 431),
        (b"GET /health HTTP/1.0\n\n", 200),  # bare LF line ends are tolerated
        (b"\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n", 200),  # a stray empty line first
        (b"GET http://example.com/health/ready HTTP/1.1\r\nHost: x\r\n\r\n", 503),
        (b"GET /health%2Fready HTTP/1.1\r\nHost: x\r\n\r\n", 503),  # decoded, as by the app
    ],
)
def test_malformed_and_unusual_requests(running, request_bytes, status):
    r = running()
    raw = r.raw(request_bytes)
    assert raw.startswith(f"HTTP/1.1 {status} ".encode()), raw[:200]
    assert b"\r\nconnection: close\r\n" in raw.lower()
    assert raw.split(b"\r\n\r\n", 1)[1].startswith(b"{")  # a JSON body, also for errors


def test_a_request_in_pieces_is_answered_once_complete(running):
    r = running()
    with socket.create_connection(r.addr, timeout=5) as conn:
        for piece in (b"GE", b"T /hea", b"lth HTTP/1.1\r\nHo", b"st: x\r\n", b"\r\n"):
            conn.sendall(piece)
            time.sleep(0.05)
        assert read_all(conn).startswith(b"HTTP/1.1 200 ")


def test_unread_request_body_does_not_reset_the_connection(running):
    """The answer comes after the head; a large body still on its way must not cause an RST."""
    r = running()
    body = b'{"prompt": "' + b"x" * 500_000 + b'"}'
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    with socket.create_connection(r.addr, timeout=5) as conn:
        conn.sendall(head + body)
        data = read_all(conn)  # ConnectionResetError here if the server closed with unread data
    assert data.startswith(b"HTTP/1.1 503 ")
    assert b'"code":"starting"' in data


def test_a_stuck_client_blocks_neither_others_nor_the_handover(running):
    r = running()
    silent = socket.create_connection(r.addr)  # connects, never sends
    partial = socket.create_connection(r.addr)
    partial.sendall(b"GET /hea")  # starts, never finishes
    time.sleep(0.1)
    t0 = time.monotonic()
    assert httpx.get(r.url + "/health", timeout=5).status_code == 200
    assert time.monotonic() - t0 < 0.5
    t0 = time.monotonic()
    r.responder.stop(wait=0.1)
    assert time.monotonic() - t0 < 0.5, "stop() waited for clients that never sent a request"
    # ... and the stuck ones are dropped at their deadline, by the responder's thread.
    for conn in (silent, partial):
        conn.settimeout(early_health.CLIENT_TIMEOUT_S + 3)
        assert conn.recv(100) == b""
        conn.close()


def test_a_connection_accepted_before_the_handover_is_answered_after_it(running):
    r = running()
    with socket.create_connection(r.addr, timeout=5) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(0.2)  # accepted and half read by the responder
        r.responder.stop(wait=0)
        conn.sendall(b"Host: x\r\n\r\n")
        assert read_all(conn).startswith(b"HTTP/1.1 200 ")
    assert r.responder.answered == 1


def test_handover_leaves_the_socket_listening_for_the_next_owner(running):
    r = running()
    assert httpx.get(r.url + "/health", timeout=5).status_code == 200
    r.responder.stop()
    client = socket.create_connection(r.addr, timeout=5)  # after the handover
    time.sleep(0.2)  # had the responder still been accepting, it would have taken this one
    r.sock.settimeout(5)
    conn, _ = r.sock.accept()  # the original socket: what uvicorn is given
    conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    conn.close()
    assert read_all(client).startswith(b"HTTP/1.1 204 ")
    client.close()
    r.responder.stop()  # a second stop is a no-op


def test_connections_beyond_the_cap_wait_in_the_queue(running, monkeypatch):
    monkeypatch.setattr(early_health, "MAX_CLIENTS", 3)
    monkeypatch.setattr(early_health, "CLIENT_TIMEOUT_S", 0.4)
    r = running()
    idle = [socket.create_connection(r.addr) for _ in range(3)]
    time.sleep(0.05)
    t0 = time.monotonic()
    assert httpx.get(r.url + "/health", timeout=5).status_code == 200
    waited = time.monotonic() - t0
    assert 0.1 < waited < 2.0, f"{waited:.2f} s: the cap did not hold, or nothing freed it"
    for conn in idle:
        conn.close()


def test_a_client_that_resets_does_not_hurt_the_responder(running):
    r = running()
    for _ in range(5):
        conn = socket.create_connection(r.addr)
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # RST
    assert httpx.get(r.url + "/health", timeout=5).status_code == 200
    assert r.responder._thread.is_alive()


def test_stop_before_start_closes_only_the_duplicate():
    sock = bind_socket("127.0.0.1", 0)
    try:
        responder = EarlyHealthResponder(sock, Lifecycle())
        responder.stop()
        client = socket.create_connection(sock.getsockname()[:2], timeout=5)
        sock.settimeout(5)
        sock.accept()[0].close()
        client.close()
    finally:
        sock.close()


# ---------------------------------------------------------------- the CLI, imports slowed down


def slow_fastapi_server(tmp_path, delay: float, *args: str) -> ServerProcess:
    """The CLI with `import fastapi` taking `delay` extra seconds (sitecustomize shim)."""
    env = slow_fastapi_env(tmp_path, delay)
    return ServerProcess(
        "--engine-class", FAKE_ENGINE_CLASS, "--log-level", "debug", *args, env=env
    )


@pytest.mark.slow
def test_health_answers_while_fastapi_is_still_importing(tmp_path):
    with slow_fastapi_server(tmp_path, 2.0, "--api-key", KEY) as srv:
        live = srv.wait_live(timeout=30)
        t0 = time.monotonic()
        early = srv.client.get("/health")
        took = time.monotonic() - t0
        print(f"\nexec -> /health 200 with `import fastapi` delayed 2 s: {live:.3f} s; "
              f"one more probe: {took * 1000:.1f} ms")
        assert live < 1.0, f"/health took {live:.2f} s from exec: it waited for the import"
        assert took < 0.5
        assert "server" not in early.headers  # uvicorn sends `server: uvicorn`
        ready = srv.client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["phase"] == "starting"
        v1 = srv.client.get("/v1/models")
        assert v1.status_code == 401  # the key is checked first, as by the app

        srv.wait_phase("ready", timeout=60)  # uvicorn took over on the same socket
        late = srv.client.get("/health")
        assert late.status_code == 200 and late.headers.get("server") == "uvicorn"
        assert srv.client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}
                              ).status_code == 200
        srv.signal(signal.SIGINT)
        assert srv.wait_exit() == 0
        answered = re.search(r"early health responder: (\d+) request\(s\) answered", srv.log)
        assert answered and int(answered.group(1)) >= 3, srv.log


@pytest.mark.slow
def test_probes_across_the_handover_all_get_answers(tmp_path):
    """A prober hammering /health through the handover sees only 200s, no error, no reset."""
    with slow_fastapi_server(tmp_path, 0.5) as srv:
        srv.wait_live(timeout=30)
        failures: list[str] = []
        statuses: list[int] = []
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set():
                try:
                    statuses.append(httpx.get(srv.base_url + "/health", timeout=5).status_code)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

        threads = [threading.Thread(target=probe) for _ in range(4)]
        for t in threads:
            t.start()
        srv.wait_phase("ready", timeout=60)
        stop.set()
        for t in threads:
            t.join(10)
        assert not failures, failures[:5]
        assert statuses and set(statuses) == {200}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_imports_exits_0(tmp_path, sig):
    with slow_fastapi_server(tmp_path, 1.5) as srv:
        srv.wait_live(timeout=30)
        srv.signal(sig)
        assert srv.wait_exit(timeout=30) == 0, srv.log
        assert "draining" in srv.log and "Traceback" not in srv.log


@pytest.mark.slow
def test_a_second_signal_during_the_imports_exits_at_once(tmp_path):
    with slow_fastapi_server(tmp_path, 20.0) as srv:
        srv.wait_live(timeout=30)
        srv.signal(signal.SIGTERM)
        time.sleep(0.1)
        srv.signal(signal.SIGINT)
        t0 = time.monotonic()
        assert srv.wait_exit(timeout=10) == 0, srv.log
        assert time.monotonic() - t0 < 3.0  # not after the 20 s import
        assert "exiting without waiting" in srv.log and "Traceback" not in srv.log


@pytest.mark.parametrize("path", ["/health", "/health/ready", "/health/graphs", "/metrics"])
async def test_head_probes_get_the_same_status_before_and_after_the_handover(path):
    """A HEAD probe must not flip from 200 (responder) to 405 (app) at the handover."""
    from server.api import create_app

    app = create_app(ServerConfig(), engine_class=FAKE_ENGINE_CLASS, lifecycle=Lifecycle())
    head, get = await app_answer(app, "HEAD", path), await app_answer(app, "GET", path)
    assert head.status_code == get.status_code
    assert head.content == b""
