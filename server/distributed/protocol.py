"""Rank 0's messages to the workers and their replies, framed over pipes.

Rank 0 writes one ordered stream to every worker: `CONFIG` (what to load), `SETUP` (the agreed
KV cache and where the rendezvous store listens), then, while serving, one `STEP` per engine
step (the encoded `server.step_plan.StepPlan`), `WARM` and `CAPTURE` orders at step boundaries,
and `SHUTDOWN`. A worker runs them in the order they come, so every rank issues the same
collectives in the same order, and a capture happens on every rank between the same two steps.

Workers answer only when an agreement needs them (`LOADED`, `READY`, `CAPTURED`) or when they
fail (`ERROR`, then they exit). Every message carries rank 0's sequence number; a reply carries
the number of the order it answers, so a late or stray reply cannot be taken for the current one.

Why pipes and not a collective: step plans and orders are host data the workers need on the
host (what to launch), rank 0 never waits for a worker to read them, a write to a dead worker
fails at once (EPIPE), and a blocked read costs no CPU, which matters on a 2-core CI box.

Frame: a 20-byte header (magic, kind, sequence number, payload length) and the payload (JSON
for orders and replies, the plan's own bytes for `STEP`). Torch-free.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time
from enum import IntEnum
from typing import Any

_MAGIC = b"GSTP"
_HEADER = struct.Struct("<4sHHQI")  # magic, kind, reserved, sequence number, payload bytes
_MAX_PAYLOAD = 1 << 30


class Kind(IntEnum):
    # rank 0 -> worker
    CONFIG = 1
    SETUP = 2
    STEP = 3
    WARM = 4
    CAPTURE = 5
    SHUTDOWN = 6
    # worker -> rank 0
    LOADED = 20
    READY = 21
    CAPTURED = 22
    ERROR = 23


class PeerGone(ConnectionError):
    """The other end of the pipe is closed: its process has exited (or is exiting)."""


class ProtocolError(RuntimeError):
    """Bytes on the pipe that are not a message of this protocol."""


class Message:
    """One decoded frame. `json()` parses a JSON payload."""

    __slots__ = ("kind", "seq", "payload")

    def __init__(self, kind: Kind, seq: int, payload: bytes):
        self.kind = kind
        self.seq = seq
        self.payload = payload

    def json(self) -> Any:
        return json.loads(self.payload) if self.payload else None

    def __repr__(self) -> str:
        return f"Message({self.kind.name}, seq={self.seq}, {len(self.payload)} bytes)"


def frame(kind: Kind, seq: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(_MAGIC, int(kind), 0, seq, len(payload)) + payload


def json_payload(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def frame_json(kind: Kind, seq: int, obj: Any) -> bytes:
    return frame(kind, seq, json_payload(obj))


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte (blocking); PeerGone if the reader has gone."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise PeerGone(str(exc)) from exc
        view = view[written:]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, left = [], n
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
        chunk = os.read(fd, left)
        if not chunk:
            raise PeerGone("end of stream")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_message(fd: int, timeout: float | None = None) -> Message:
    """The next message on `fd`: blocks (up to `timeout` seconds; None: forever).

    Raises TimeoutError when nothing (or only part of a message) came in time, PeerGone at
    end of stream, ProtocolError for a corrupt frame. A timeout inside a message leaves the
    stream unusable: callers treat it as fatal.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    head = _read_exact(fd, _HEADER.size, deadline)
    magic, kind, _, seq, length = _HEADER.unpack(head)
    if magic != _MAGIC or length > _MAX_PAYLOAD:
        raise ProtocolError(f"corrupt frame header {head!r}")
    try:
        kind = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}") from None
    return Message(kind, seq, _read_exact(fd, length, deadline) if length else b"")


def enlarge_pipe(fd: int, size: int = 1 << 20) -> None:
    """Ask for a larger pipe buffer (Linux), so a prompt chunk's plan fits without the writer
    waiting for the reader; the default 64 KiB still works, just with more blocking."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (ImportError, OSError):
        pass
