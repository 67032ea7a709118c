"""Run `python -m server serve` as a subprocess on loopback for CLI and end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.helpers import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int, marker: bytes | None = None) -> list[int]:
    """The live processes below `pid` (children, their children, ...) whose command line
    contains `marker` (all of them when None)."""
    parents: dict[int, int] = {}
    cmdlines: dict[int, bytes] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
            cmdlines[int(entry)] = cmdline
    found, frontier = [], {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found.extend(sorted(frontier))
    return [p for p in found if marker is None or marker in cmdlines.get(p, b"")]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class ServerProcess:
    """A server subprocess: its port, its log, and helpers to wait on it and stop it."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="graphserve-", suffix=".log", delete=False)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), full_env.get("PYTHONPATH")) if p
        )
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), *args],
            cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.base_url, timeout=30)

    @property
    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def wait_live(self, timeout: float = 30.0) -> float:
        """Poll /health until 200; returns seconds from exec to that answer."""
        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return time.monotonic() - self.started_at
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log}")
            time.sleep(0.01)
        raise AssertionError(f"/health not 200 within {timeout}s:\n{self.log}")

    def wait_phase(self, phase: str, timeout: float = 120.0) -> dict:
        """Poll /health/ready until it names `phase`; returns the body."""
        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            try:
                body = httpx.get(self.base_url + "/health/ready", timeout=2).json()
                if body.get("phase") == phase:
                    return body
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log}")
            time.sleep(0.05)
        raise AssertionError(
            f"phase {phase!r} not reached in {timeout}s (last {body}):\n{self.log}"
        )

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server did not exit within {timeout}s:\n{self.log}") from None

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def sse_events(lines) -> list:
    """Decode an iterator of SSE lines (httpx iter_lines) into payloads, '[DONE]' kept."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out

_SLOW_FASTAPI = """
import importlib.abc, os, sys, time

class _SlowFastapi(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastapi":
            sys.meta_path.remove(self)
            time.sleep(float(os.environ["SLOW_FASTAPI_S"]))
        return None

sys.meta_path.insert(0, _SlowFastapi())
"""


def slow_fastapi_env(tmp_path, delay: float) -> dict[str, str]:
    """Environment for a server process whose `import fastapi` takes `delay` extra seconds:
    a `sitecustomize` shim written into `tmp_path`, put on the child's path."""
    (tmp_path / "sitecustomize.py").write_text(_SLOW_FASTAPI)
    return {"PYTHONPATH": str(tmp_path), "SLOW_FASTAPI_S": str(delay)}
