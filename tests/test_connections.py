"""Issue 11, at the socket: slow and idle clients, the connection cap, lingering close, TLS.

Most tests run the real uvicorn stack (`server.uvicorn_server.uvicorn_config`: the guarded
protocol, the app, the fake engine) on a loopback socket in a background thread, so raw sockets
can misbehave precisely and the guard's counters can be read. The `slow` ones run the CLI as a
subprocess, TLS and the early health responder included.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time

import httpx
import pytest
import uvicorn

from server.api import create_app
from server.cli import main as cli_main
from server.config import EngineConfig, ServerConfig
from server.connection_guard import LINGER_IDLE_S, MAX_HEAD_BYTES
from server.early_health import EarlyHealthResponder
from server.health import Lifecycle
from server.launch import bind_socket, tls_context
from server.uvicorn_server import uvicorn_config
from tests.helpers.fake_engine import FAKE_ENGINE, FakeEngine
from tests.helpers.server_process import ServerProcess, slow_fastapi_env

HEALTH = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"


class ThreadedServer:
    """The app on uvicorn with graphserve's connection guard, in a thread, on a free port."""

    def __init__(self, tls: ssl.SSLContext | None = None, token_delay: float = 0.0,
                 **server_kwargs):
        config = ServerConfig(engine=EngineConfig(max_model_len=256, max_num_seqs=4,
                                                  max_queue=64), **server_kwargs)
        app = create_app(config, engine_factory=lambda c, on_phase: FakeEngine(
            c, on_phase, token_delay=token_delay))
        self.sock = bind_socket("127.0.0.1", 0)
        self.addr = self.sock.getsockname()[:2]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.addr[1]}"
        uv_config, self.connections = uvicorn_config(app, config, *self.addr, access_log=False,
                                                     tls=tls)
        self.server = uvicorn.Server(uv_config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.server.started and httpx.get(self.url + "/health/ready",
                                                 verify=False).status_code == 200:
                return self
            time.sleep(0.02)
        raise AssertionError("threaded server did not get ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def connect(self) -> socket.socket:
        return socket.create_connection(self.addr, timeout=10)

    def request(self, data: bytes) -> bytes:
        """One request on a new connection; the answer's head and body (Connection: close)."""
        with self.connect() as conn:
            conn.sendall(data)
            return read_until_close(conn)

    def health_latency(self) -> float:
        t0 = time.perf_counter()
        answer = self.request(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        return time.perf_counter() - t0


def read_until_close(conn: socket.socket) -> bytes:
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


def closed_by_peer(conn: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing `conn` within `within` seconds (None: still open)."""
    conn.settimeout(within)
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


# ------------------------------------------------------------------ slow and idle clients
def test_idle_connections_are_closed_after_the_header_timeout():
    with ThreadedServer(header_timeout=0.5) as srv:
        idle = [srv.connect() for _ in range(50)]
        assert srv.health_latency() < 1.0
        t0 = time.monotonic()
        for conn in idle:
            assert closed_by_peer(conn, 3.0) == b""  # closed quietly: no request, no answer
        assert time.monotonic() - t0 < 2.5
        assert srv.connections.stats["head_timeouts"] >= 50
        assert srv.health_latency() < 1.0


def test_a_head_trickled_byte_by_byte_gets_408_at_the_deadline():
    with ThreadedServer(header_timeout=0.6) as srv:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 1000
        conns = [srv.connect() for _ in range(20)]
        t0 = time.monotonic()
        latencies = []
        for i in range(8):  # 0.8 s of trickling, past the deadline
            for conn in conns:
                try:
                    conn.send(head[i:i + 1])
                except OSError:
                    pass
            latencies.append(srv.health_latency())
            time.sleep(0.1)
        for conn in conns:
            answer = closed_by_peer(conn, 3.0)
            assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
            assert b'"code":"request_timeout"' in answer
        assert time.monotonic() - t0 < 4.0
        assert max(latencies) < 1.0, latencies


def test_the_deadline_restarts_after_each_answer_on_a_kept_alive_connection():
    with ThreadedServer(header_timeout=0.6, keep_alive_timeout=5) as srv:
        conn = srv.connect()
        for _ in range(3):  # complete requests keep the connection, whatever its age
            conn.sendall(HEALTH)
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(0.3)
        conn.sendall(b"GET /health HTTP/1.1\r\n")  # then a head that never ends
        answer = closed_by_peer(conn, 3.0)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408")


def test_an_oversized_request_head_gets_431():
    with ThreadedServer() as srv:
        answer = srv.request(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: "
                             + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        assert srv.connections.stats["heads_too_large"] == 1
        assert srv.health_latency() < 1.0


def test_a_body_that_never_completes_gets_408_after_the_body_timeout():
    with ThreadedServer(body_timeout=0.5) as srv:
        conn = srv.connect()
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
        assert srv.health_latency() < 1.0  # while the request waits for its body
        answer = closed_by_peer(conn, 3.0)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"code":"request_timeout"' in answer


# ------------------------------------------------------------------ the connection cap
def test_over_the_cap_the_longest_waiting_connection_makes_room_for_a_probe():
    with ThreadedServer(max_connections=16, header_timeout=30) as srv:
        idle = [srv.connect() for _ in range(16)]
        time.sleep(0.2)  # all accepted and waiting for a head
        for _ in range(5):
            assert srv.health_latency() < 1.0
        assert srv.connections.stats["evicted"] == 1  # the first probe made room; it is gone
        assert closed_by_peer(idle[0], 2.0) == b""  # the oldest went first
        # 15 left + 10 new: the 9 over the cap evict the oldest, and so does the next probe.
        idle += [srv.connect() for _ in range(10)]
        assert srv.health_latency() < 1.0
        assert srv.connections.stats["evicted"] == 11
        assert all(closed_by_peer(conn, 2.0) == b"" for conn in idle[1:11])
        assert all(closed_by_peer(conn, 0.1) is None for conn in idle[11:])
        for conn in idle:
            conn.close()


def test_over_the_cap_with_every_connection_busy_a_newcomer_gets_503():
    with ThreadedServer(max_connections=16, token_delay=0.05) as srv:
        streams = []
        for _ in range(16):
            conn = srv.connect()
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: "
                         b"application/json\r\nContent-Length: 50\r\n\r\n"
                         + b'{"prompt": "a", "max_tokens": 100, "stream": true}'.ljust(50))
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")  # streaming now
            streams.append(conn)
        answer = srv.request(HEALTH)
        # The documented trade-off: only when every connection is inside a request does a
        # probe see 503 (the default cap, 4096, is far above max-num-seqs + max-queue).
        assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
        for conn in streams:
            conn.close()
        time.sleep(0.5)
        assert srv.health_latency() < 1.0


# ------------------------------------------------------------------ lingering close
def test_an_early_413_lingers_so_the_client_can_finish_sending():
    with ThreadedServer(max_request_bytes=64 * 1024) as srv:
        conn = srv.connect()
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 10000000\r\n\r\n")
        answer = b""
        while b'"code":"request_too_large"' not in answer:
            answer += conn.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower()
        # The client was still sending its body: the server reads and drops it instead of
        # resetting the connection (which would destroy an answer still in flight).
        conn.sendall(b"a" * 3_000_000)
        assert closed_by_peer(conn, 3.0) == b""  # the write side was shut: a clean EOF
        assert srv.connections.stats["lingered"] == 1
        conn.close()
        deadline = time.monotonic() + LINGER_IDLE_S + 3
        while srv.connections.open and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not srv.connections.open  # and the socket is gone once the client is


def test_httpx_and_the_openai_sdk_read_the_413_of_a_large_upload():
    import openai

    with ThreadedServer() as srv:
        resp = httpx.post(srv.url + "/v1/completions", content=b"a" * (16 << 20),
                          headers={"content-type": "application/json"}, timeout=30)
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model="fake-model", prompt="a" * (8 << 20), max_tokens=1)
        assert info.value.status_code == 413


# ------------------------------------------------------------------ TLS
@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost: (certfile, keyfile)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "graphserve-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)


def trust(certfile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certfile)


def test_tls_serves_the_api_and_refuses_plain_http(certificate):
    certfile, keyfile = certificate
    tls = tls_context(ServerConfig(ssl_certfile=certfile, ssl_keyfile=keyfile))
    with ThreadedServer(tls=tls) as srv, httpx.Client(verify=trust(certfile)) as client:
        assert client.get(srv.url + "/health").status_code == 200
        done = client.post(srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 3})
        assert done.status_code == 200 and done.json()["choices"][0]["text"] == "The"
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.url.replace("https", "http") + "/health", timeout=3)
        with pytest.raises(httpx.ConnectError):  # the certificate is checked, not ignored
            httpx.get(srv.url + "/health", timeout=3)
        assert client.get(srv.url + "/health").status_code == 200


def test_the_early_responder_speaks_tls_with_the_same_certificate(certificate):
    certfile, keyfile = certificate
    tls = tls_context(ServerConfig(ssl_certfile=certfile, ssl_keyfile=keyfile))
    sock = bind_socket("127.0.0.1", 0)
    responder = EarlyHealthResponder(sock, Lifecycle(), tls=tls)
    responder.start()
    try:
        url = f"https://127.0.0.1:{sock.getsockname()[1]}"
        with httpx.Client(verify=trust(certfile)) as client:
            resp = client.get(url + "/health")
            assert resp.status_code == 200 and resp.json()["status"] == "ok"
            assert "server" not in resp.headers  # the responder, not uvicorn
        # A plain-HTTP client or a stalled handshake costs the responder nothing.
        with socket.create_connection(sock.getsockname()[:2], timeout=5) as raw:
            raw.sendall(HEALTH)
            answer = closed_by_peer(raw, 5.0)
            assert answer is not None and not answer.startswith(b"HTTP/")
        stalled = socket.create_connection(sock.getsockname()[:2], timeout=5)
        with httpx.Client(verify=trust(certfile)) as client:
            assert client.get(url + "/health/ready").status_code == 503
        stalled.close()
    finally:
        responder.stop()
        sock.close()


def test_bad_limit_and_tls_flags_are_config_errors(certificate, tmp_path, capsys):
    assert cli_main(["serve", "--max-request-bytes", "lots"]) == 2
    assert cli_main(["serve", "--max-request-bytes", "12"]) == 2  # bytes, not MiB: too small
    assert cli_main(["serve", "--header-timeout", "0"]) == 2
    assert cli_main(["serve", "--max-connections", "3"]) == 2
    err = capsys.readouterr().err
    assert "--max-request-bytes: expected a size" in err and "at least 1 KiB" in err
    assert "--header-timeout must be > 0" in err and "--max-connections must be >= 16" in err
    # TLS files are loaded before the port is bound.
    certfile, keyfile = certificate
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate")
    assert cli_main(["serve", "--ssl-keyfile", keyfile]) == 2
    assert cli_main(["serve", "--ssl-certfile", str(tmp_path / "missing.pem")]) == 2
    assert cli_main(["serve", "--ssl-certfile", str(bogus)]) == 2
    assert cli_main(["serve", "--ssl-certfile", certfile]) == 2  # no key in it, none given
    err = capsys.readouterr().err
    assert "--ssl-keyfile needs --ssl-certfile" in err and "cannot be loaded" in err


# ------------------------------------------------------------------ the CLI, end to end


@pytest.mark.slow
def test_https_from_the_first_probe_through_the_handover(certificate, tmp_path):
    """`import fastapi` delayed 2 s: the early responder answers HTTPS, then uvicorn does,
    with the same certificate."""
    certfile, keyfile = certificate
    env = slow_fastapi_env(tmp_path, 2)
    with ServerProcess("--engine-class", FAKE_ENGINE, "--ssl-certfile", certfile,
                       "--ssl-keyfile", keyfile, env=env) as srv, \
            httpx.Client(verify=trust(certfile), timeout=5) as client:
        url = f"https://127.0.0.1:{srv.port}"
        servers, deadline = [], time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                resp = client.get(url + "/health/ready")
            except httpx.TransportError:
                if srv.proc.poll() is not None:
                    raise AssertionError(srv.log) from None
                time.sleep(0.02)
                continue
            servers.append(resp.headers.get("server", "early"))
            if resp.status_code == 200:
                break
            time.sleep(0.05)
        assert servers[0] == "early" and servers[-1] == "uvicorn", servers
        assert client.post(url + "/v1/completions",
                           json={"prompt": "a", "max_tokens": 2}).status_code == 200
        assert "listening on https://" in srv.log


@pytest.mark.slow
def test_limit_flags_reach_the_running_server():
    with ServerProcess("--engine-class", FAKE_ENGINE, "--max-request-bytes", "4KiB",
                       "--header-timeout", "0.5", "--max-connections", "16") as srv:
        srv.wait_phase("ready")
        resp = srv.client.post("/v1/completions", content=b"a" * 5000,
                               headers={"content-type": "application/json"})
        assert resp.status_code == 413 and "4096 bytes" in resp.json()["error"]["message"]
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(20)]
        assert srv.client.get("/health").status_code == 200  # over the cap: an idle one went
        for conn in idle:
            assert closed_by_peer(conn, 3.0) == b""  # the rest at the header timeout
