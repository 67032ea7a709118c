"""Abuse benchmark: one hostile request at a time against a real server, with `/health` probed
and the server's RSS sampled throughout (issue 11's table, and the rest of its abuse list).

For every case it reports the answer (status or what the connection did), how long it took,
the slowest `/health` probe that overlapped it (each probe a fresh connection, as a kubelet's
is) and the server's RSS before, at peak and after. Nothing here imports the model stack: the
client must not compete with the server for CPU while it measures.

    python -m bench.abuse                                   # the embedded default model (CPU)
    python -m bench.abuse --cases prompt-1MiB,nested-100k  # a subset
    python -m bench.abuse --rss-cap-mib 6000 --out /tmp/abuse.json -- --max-model-len 1024

`--rss-cap-mib` kills the server when its RSS passes the cap (the case then reads "killed"):
a 64 MiB prompt used to need ~13 GB, which a shared machine may not have to spare. Arguments
after `--` go to `graphserve serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.common import (
    BenchError,
    ServerProcess,
    environment,
    fmt,
    print_table,
    wait_ready,
    write_json,
)

MiB = 1 << 20


# ============================================================================ observers
class HealthProber:
    """Probes `/health` back to back on fresh connections; keeps (start, latency, status)."""

    def __init__(self, host: str, port: int, interval_s: float = 0.05, timeout_s: float = 120.0):
        self.addr = (host, port)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.probes: list[tuple[float, float, str]] = []
        self.current_start: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> HealthProber:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            self.current_start = start
            status = probe(self.addr, self.timeout_s)
            self.probes.append((start, time.perf_counter() - start, status))
            self.current_start = None
            self._stop.wait(self.interval_s)

    def worst(self, t0: float, t1: float) -> tuple[float | None, str]:
        """The slowest probe overlapping [t0, t1] (one still waiting counts as waiting so far)."""
        worst, status = None, "-"
        for start, latency, st in self.probes:
            if start <= t1 and start + latency >= t0 and (worst is None or latency > worst):
                worst, status = latency, st
        pending = self.current_start
        if pending is not None and pending <= t1:
            waited = time.perf_counter() - pending
            if worst is None or waited > worst:
                worst, status = waited, "pending"
        return worst, status


def probe(addr: tuple[str, int], timeout_s: float) -> str:
    """One `GET /health` on a new connection: the status code, or what went wrong."""
    try:
        with socket.create_connection(addr, timeout=timeout_s) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "no answer"
    except OSError as exc:
        return type(exc).__name__


class RssSampler:
    """Samples /proc/<pid>/status VmRSS every 20 ms; kills the process above `cap_mib`."""

    def __init__(self, proc: ServerProcess, cap_mib: float | None):
        self.proc = proc
        self.cap_mib = cap_mib
        self.samples: list[tuple[float, float]] = []
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def now(self) -> float | None:
        return rss_mib(self.proc.proc.pid)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.now()
            if rss is not None:
                self.samples.append((time.perf_counter(), rss))
                if self.cap_mib is not None and rss > self.cap_mib and not self.killed:
                    self.killed = True
                    self.proc.proc.kill()
            self._stop.wait(0.02)

    def peak(self, t0: float, t1: float) -> float | None:
        inside = [r for t, r in self.samples if t0 <= t <= t1]
        return max(inside) if inside else None


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ============================================================================ the cases
def http_request(addr, method: str, path: str, body: bytes | Iterator[bytes] | None = None,
                 *, timeout_s: float, headers: dict[str, str] | None = None) -> str:
    """Send one request (Content-Length, or chunked for an iterator) and read the status line.

    Sends and reads at once on two threads, as curl does: a server that answers before the
    body is in must be seen answering, not blamed for the client's blocked write.
    """
    head = [f"{method} {path} HTTP/1.1", "Host: bench", "Content-Type: application/json",
            "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    chunked = body is not None and not isinstance(body, bytes)
    if isinstance(body, bytes):
        head.append(f"Content-Length: {len(body)}")
    elif chunked:
        head.append("Transfer-Encoding: chunked")
    s = socket.create_connection(addr, timeout=timeout_s)
    sent_error: list[str] = []

    def send_all() -> None:
        try:
            s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            if isinstance(body, bytes):
                s.sendall(body)
            elif chunked:
                for part in body:
                    s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
                s.sendall(b"0\r\n\r\n")
        except OSError as exc:
            sent_error.append(type(exc).__name__)

    writer = threading.Thread(target=send_all, daemon=True)
    writer.start()
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        return f"{type(exc).__name__} (send: {sent_error or 'ok'})"
    finally:
        s.close()
    if not data.startswith(b"HTTP/"):
        return f"closed without answer (send: {sent_error or 'ok'})"
    return data.split(b" ", 2)[1].decode()


def completion(prompt_json: bytes, extra: bytes = b', "max_tokens": 1') -> bytes:
    return b'{"prompt": ' + prompt_json + extra + b"}"


def lazy_body(build: Callable[[], bytes], path: str = "/v1/completions",
              ) -> Callable[[tuple, float], str]:
    """A case posting `build()`, built by `run.prepare()` before the clock starts (building a
    64 MiB body takes the client ~0.1 s, which is not the server's time)."""
    body: list[bytes] = []

    def prepare() -> None:
        if not body:
            body.append(build())

    def run(addr, timeout_s):
        prepare()
        return http_request(addr, "POST", path, body[0], timeout_s=timeout_s)

    run.prepare = prepare  # type: ignore[attr-defined]
    return run


def prompt_case(size: int) -> Callable[[tuple, float], str]:
    return lazy_body(lambda: completion(b'"' + b"a" * size + b'"'))


def chunked_prompt_case(size: int) -> Callable[[tuple, float], str]:
    def parts() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(size // MiB):
            yield b"a" * MiB
        yield b'", "max_tokens": 1}'

    def run(addr, timeout_s):
        return http_request(addr, "POST", "/v1/completions", parts(), timeout_s=timeout_s)
    return run


def chat_case(size: int) -> Callable[[tuple, float], str]:
    return lazy_body(lambda: b'{"messages": [{"role": "user", "content": "' + b"a " * (size // 2)
                     + b'"}], "max_tokens": 1}', "/v1/chat/completions")


def body_case(body: bytes, path: str = "/v1/completions") -> Callable[[tuple, float], str]:
    def run(addr, timeout_s):
        return http_request(addr, "POST", path, body, timeout_s=timeout_s)
    return run


def parallel_case(n: int, make: Callable[[tuple, float], str]) -> Callable[[tuple, float], str]:
    """`n` copies of a case at once; the answers counted by kind."""
    def prepare() -> None:
        getattr(make, "prepare", lambda: None)()

    def run(addr, timeout_s):
        answers: list[str] = []
        threads = [threading.Thread(target=lambda: answers.append(make(addr, timeout_s)))
                   for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        counts = {a: answers.count(a) for a in sorted(set(answers))}
        return " ".join(f"{k}x{v}" for k, v in counts.items())

    run.prepare = prepare  # type: ignore[attr-defined]
    return run


def slowloris_case(connections: int, hold_s: float) -> Callable[[tuple, float], str]:
    """`connections` sockets trickling a request head, one byte every 0.5 s, for `hold_s`."""
    def run(addr, timeout_s):
        head = b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nX-Pad: " + b"a" * 10_000
        socks = [socket.create_connection(addr, timeout=5) for _ in range(connections)]
        for s in socks:
            s.setblocking(False)
        open_ = set(range(connections))
        ended_at: list[float] = []
        t0 = time.perf_counter()
        for i in range(int(hold_s / 0.5)):
            for j in list(open_):
                try:
                    socks[j].recv(4096)  # an answer (408) or EOF: the server ended it
                    ended = True
                except BlockingIOError:
                    ended = False
                except OSError:
                    ended = True
                if not ended:
                    try:
                        socks[j].send(head[i:i + 1])
                    except BlockingIOError:
                        pass
                    except OSError:
                        ended = True
                if ended:
                    open_.discard(j)
                    ended_at.append(time.perf_counter() - t0)
            time.sleep(0.5)
        for s in socks:
            s.close()
        first = f", first after {min(ended_at):.1f} s" if ended_at else ""
        return f"{connections - len(open_)}/{connections} ended by server in {hold_s:.0f} s{first}"
    return run


def idle_case(connections: int, hold_s: float) -> Callable[[tuple, float], str]:
    """`connections` sockets that connect and send nothing for `hold_s`."""
    def run(addr, timeout_s):
        socks = [socket.create_connection(addr, timeout=5) for _ in range(connections)]
        time.sleep(hold_s)
        closed = 0
        for s in socks:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
            s.close()
        return f"{closed}/{connections} closed by server in {hold_s:.0f} s"
    return run


def slow_body_case(hold_s: float) -> Callable[[tuple, float], str]:
    """A complete head announcing 1000 body bytes, then one byte a second."""
    def run(addr, timeout_s):
        s = socket.create_connection(addr, timeout=hold_s + 5)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        t0 = time.perf_counter()
        s.setblocking(False)
        answer = None
        while time.perf_counter() - t0 < hold_s and answer is None:
            try:
                data = s.recv(4096)
                answer = data.split(b" ", 2)[1].decode() if data else "closed"
            except BlockingIOError:
                with contextlib.suppress(OSError):
                    s.send(b" ")
                time.sleep(1)
            except OSError as exc:
                answer = type(exc).__name__
        s.close()
        waited = time.perf_counter() - t0
        return f"{answer} after {waited:.1f} s" if answer else f"no answer in {hold_s:.0f} s"
    return run


DEEP = 100_000
CASES: dict[str, Callable[[tuple, float], str]] = {
    "prompt-1MiB": prompt_case(MiB),
    "prompt-8MiB": prompt_case(8 * MiB),
    "prompt-64MiB": prompt_case(64 * MiB),
    "nested-100k": body_case(completion(b"[" * DEEP + b"]" * DEEP)),
    "prompt-64MiB-chunked": chunked_prompt_case(64 * MiB),
    "prompt-1MiB-under": prompt_case(MiB - 100),  # just under the default limit
    "chat-1MiB-under": chat_case(MiB - 200),
    "16x-prompt-1MiB-under": parallel_case(16, prompt_case(MiB - 100)),
    "16x-chat-1MiB-under": parallel_case(16, chat_case(MiB - 200)),
    "chat-1MiB": chat_case(MiB),
    "chat-8MiB": chat_case(8 * MiB),
    "token-ids-1M": body_case(completion(b"[" + b"7," * (MiB - 1) + b"7]")),
    "invalid-utf8": body_case(completion(b'"caf\xe9 \xff"')),
    "max-tokens-1e30": body_case(completion(b'"hi"', b', "max_tokens": 1' + b"0" * 30)),
    "max-tokens-100k-digits": body_case(completion(b'"hi"', b', "max_tokens": 1' + b"0" * DEEP)),
    "stop-100k": body_case(completion(b'"hi"', b', "max_tokens": 1, "stop": ['
                                      + b",".join([b'"x"'] * DEEP) + b"]")),
    "stop-ids-100k": body_case(completion(b'"hi"', b', "max_tokens": 1, "stop_token_ids": ['
                                          + b",".join([b"1"] * DEEP) + b"]")),
    "n-1e18": body_case(completion(b'"hi"', b', "max_tokens": 1, "n": 1000000000000000000')),
    "slowloris-50": slowloris_case(50, 15.0),
    "idle-200": idle_case(200, 15.0),
    "slow-body": slow_body_case(40.0),
}


# ============================================================================ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--rss-cap-mib", type=float, default=None,
                        help="kill the server when its RSS passes this (protects the machine)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("serve_args", nargs="*", help="after --: arguments for graphserve serve")
    args = parser.parse_args()
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")

    rows, results = [], []
    server = ServerProcess(args.serve_args)
    with server:
        asyncio.run(_wait_ready(server))
        addr = (server.host, server.port)
        prober = HealthProber(*addr).start()
        sampler = RssSampler(server, args.rss_cap_mib).start()
        time.sleep(0.5)
        baseline = sampler.now()
        for name in names:
            if server.exited() is not None:
                results.append({"case": name, "answer": "server not running"})
                continue
            getattr(CASES[name], "prepare", lambda: None)()
            before = sampler.now()
            side: list[tuple[float, str]] = []  # one probe sent with the case, however short

            def side_probe(side: list[tuple[float, str]] = side) -> None:
                start = time.perf_counter()
                status = probe(addr, 120.0)
                side.append((time.perf_counter() - start, status))

            t0 = time.perf_counter()
            side_thread = threading.Thread(target=side_probe, daemon=True)
            side_thread.start()
            answer = CASES[name](addr, args.timeout)
            t1 = time.perf_counter()
            side_thread.join(120)
            time.sleep(0.5)  # let a probe in flight finish and the heap settle
            deadline = time.perf_counter() + 60
            while prober.current_start is not None and prober.current_start < t1 \
                    and time.perf_counter() < deadline:
                time.sleep(0.05)
            health, health_status = prober.worst(t0, t1)
            if side and (health is None or side[0][0] > health):
                health, health_status = side[0]
            if sampler.killed:
                answer += f" (server killed above {args.rss_cap_mib:.0f} MiB RSS)"
            result = {"case": name, "answer": answer, "seconds": t1 - t0,
                      "health_max_s": health, "health_status": health_status,
                      "rss_before_mib": before, "rss_peak_mib": sampler.peak(t0, t1 + 0.5),
                      "rss_after_mib": sampler.now()}
            results.append(result)
            rows.append([name, answer, fmt(t1 - t0, ".2f"), fmt(health, ".3f"), health_status,
                         fmt(before, ".0f"), fmt(result["rss_peak_mib"], ".0f"),
                         fmt(result["rss_after_mib"], ".0f")])
            print(f"{name}: {answer} in {t1 - t0:.2f} s, /health max {fmt(health, '.3f')} s",
                  flush=True)
        prober.stop()
        sampler.stop()
        final = sampler.now()
    print()
    print_table(["case", "answer", "s", "health max s", "health", "RSS before", "peak",
                 "after"], rows)
    if baseline is not None and final is not None:
        print(f"\nRSS over the run: {baseline:.0f} -> {final:.0f} MiB")
    write_json(args.out, {"environment": environment(), "serve_args": args.serve_args,
                          "rss_baseline_mib": baseline, "rss_final_mib": final,
                          "results": results})


async def _wait_ready(server: ServerProcess) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        await wait_ready(client, server, 300)


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        raise SystemExit(f"abuse: {exc}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
