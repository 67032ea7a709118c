"""Messages between the HTTP process and the engine process, framed over a Unix socket pair.

The HTTP process (`server.engine_process.EngineProcess`) sends:

* `CONFIG` (the `EngineConfig`), once, first;
* `ADD` (request id, prompt ids, `SamplingParams`, seed), `ABORT` (request id),
  `STOP_ACCEPTING` (draining);
* `QUERY` (sequence number, "stats" or "graph_report"), answered by `REPLY`;
* `SHUTDOWN` (seconds the engine may take).

The engine process (`server.engine_host`) sends:

* `PHASE` (phase, detail), as the in-process engine calls `on_phase`;
* `INFO` (model name, context length, vocabulary, checkpoint path), right before `PHASE` ready;
* `OUTPUTS` (one step's `RequestOutput`s);
* `LEFT` (a number of requests that left the waiting queue: the HTTP side bounds that queue);
* `REPLY` (sequence number, value).

Payloads are pickles: both ends are this package, started together; nothing from a client is
unpickled (request bodies are parsed by the HTTP layer and only its own objects travel). The
HTTP side unpickles strictly (`Channel(strict=True)`): only builtins and this package's own
classes, so a stray object (a torch or numpy value in an output or a report) is an error that
names it, not a silent `import torch` in the HTTP process.
Stdlib only: the HTTP process imports this before anything heavy.
"""

from __future__ import annotations

import io
import pickle
import socket
import struct
import threading
from enum import IntEnum
from typing import Any

_HEADER = struct.Struct("<4sBxxxQ")  # magic, kind, payload bytes
_MAGIC = b"GSEP"
# Room for a step's outputs or a long prompt without a sender waiting for the reader.
_SOCKET_BUFFER = 4 << 20


class Kind(IntEnum):
    # HTTP process -> engine process
    CONFIG = 1
    ADD = 2
    ABORT = 3
    STOP_ACCEPTING = 4
    QUERY = 5
    SHUTDOWN = 6
    # engine process -> HTTP process
    PHASE = 20
    INFO = 21
    OUTPUTS = 22
    REPLY = 23
    LEFT = 24


class ChannelClosed(ConnectionError):
    """The other end closed the socket, or its process died."""


# What the HTTP side may unpickle: builtins, the containers pickle itself reaches for, and this
# package's own classes (which import no model stack on the HTTP side).
_STRICT_MODULES = ("builtins", "copyreg", "collections", "_codecs", "pathlib")


class _StrictUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _STRICT_MODULES or module == "server" or module.startswith("server."):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} may not cross to the HTTP process")


class Channel:
    """Framed pickles over a stream socket.

    Thread ownership: any number of threads may send (a lock keeps frames whole); one thread
    receives.
    """

    def __init__(self, sock: socket.socket, *, strict: bool = False):
        self.sock = sock
        self._strict = strict
        sock.setblocking(True)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
            except OSError:  # a smaller buffer only means more waiting
                pass
        self._send_lock = threading.Lock()
        self._head = bytearray(_HEADER.size)

    def send(self, kind: Kind, obj: Any = None) -> None:
        """Raises ChannelClosed when the other end is gone."""
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        data = _HEADER.pack(_MAGIC, kind, len(payload)) + payload
        try:
            with self._send_lock:
                self.sock.sendall(data)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc

    def recv(self) -> tuple[Kind, Any]:
        """The next message (blocks). Raises ChannelClosed at end of file or on a garbled
        stream; `pickle.UnpicklingError` (strict) for a payload with a class not allowed,
        after which the stream is still whole."""
        self._read_into(memoryview(self._head))
        magic, kind, size = _HEADER.unpack(self._head)
        if magic != _MAGIC:
            raise ChannelClosed(f"garbled engine-process stream (header {bytes(self._head)!r})")
        payload = bytearray(size)
        self._read_into(memoryview(payload))
        try:
            kind = Kind(kind)
        except ValueError:
            raise ChannelClosed(f"unknown engine-process message kind {kind}") from None
        if self._strict:
            return kind, _StrictUnpickler(io.BytesIO(payload)).load()
        return kind, pickle.loads(payload)

    def _read_into(self, view: memoryview) -> None:
        while view:
            try:
                n = self.sock.recv_into(view)
            except OSError as exc:
                raise ChannelClosed(str(exc)) from exc
            if n == 0:
                raise ChannelClosed("end of file")
            view = view[n:]

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
