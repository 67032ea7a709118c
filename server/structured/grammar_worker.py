"""The grammar process: llguidance's tokenizer and every sequence's matcher, off the engine's
process.

    python -m server.structured.grammar_worker --fd N [--log-format F --log-level L]

Why a process of its own: llguidance builds its tokenizer holding the GIL, 0.3-0.6 s for a
128k vocabulary on the H200 box (docs/benchmarks.md 8g, 8p). In the server's process that
hold sat on the path to ready, every start, whether or not any request ever asks for a
grammar; after ready it would stall every running stream. Here it runs beside the engine's
torch import and weight load, on another core, and the engine's readiness only checks that it
has ended. Per step the engine makes one round trip (tens of microseconds), made while the
device runs the next forward (`server.engine`), and the matchers' work no longer takes the
engine process's GIL.

The engine (`server.structured.grammar.GrammarBackend`) talks to it over a Unix socket pair:

* `BUILD` (vocabulary size and EOS ids; with a file descriptor holding the tokenizer JSON, so
  the engine never waits for this process to start reading) -> `BUILT` (the error, if any;
  the seconds it took);
* `NEW` (a slot number the engine chose, the grammar) -> `CREATED` (the error, if any):
  compiled grammars are cached as prototypes (least recently used dropped), each sequence
  gets a copy;
* `FREE` (slots): the engine dropped those sequences; no answer;
* `MAP` (with a file descriptor): the shared mask buffer, `rows x words` int32, replacing any
  earlier one; no answer;
* `STEP` (tokens to consume per slot, then rows to fill per slot, and how many rows the step
  has) -> `STEPPED` (the slots whose grammar rejected its token, with the reason). Every row of
  the step not filled by a live matcher is all ones (unconstrained).

One thread; it handles messages in the order they come, so a `FREE` or a `MAP` takes effect
before anything sent after it. End of file on the socket (the engine closed it, or its
process died) ends this process.

Test seam: `GRAPHSERVE_GRAMMAR_TEST_FAULT` = `build_delay:S` (the build waits S seconds first),
`exit_at_step:K` (the process dies at its K-th `STEP`) or `hang_at_step:K` (it stops answering
there).
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import mmap
import os
import signal
import socket
import struct
import sys
import time
from array import array
from enum import IntEnum
from typing import Any

log = logging.getLogger("graphserve.grammar.worker")

_HEADER = struct.Struct("<4sBxxxI")  # magic, kind, payload bytes
_MAGIC = b"GSGW"
_STEP_HEAD = struct.Struct("<III")  # tokens to consume, rows to fill, rows in the step
_MAX_FDS = 4
_SEND_TIMEOUT_S = 10.0
PROTOTYPES = 64  # compiled grammars kept (least recently used dropped)


class Kind(IntEnum):
    # engine -> worker
    BUILD = 1
    NEW = 2
    FREE = 3
    MAP = 4
    STEP = 5
    # worker -> engine
    BUILT = 11
    CREATED = 12
    STEPPED = 13


class ChannelClosed(ConnectionError):
    """The other end closed the socket or died."""


class Channel:
    """Framed messages over a stream socket, file descriptors alongside (`MAP`). One thread
    per end."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray()
        self._fds: collections.deque[int] = collections.deque()

    def send(self, kind: Kind, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        # Messages are small (the big ones travel as descriptors) and the other end reads all
        # the time: a send that cannot go out within this is a peer that stopped reading.
        self.sock.settimeout(_SEND_TIMEOUT_S)
        data = _HEADER.pack(_MAGIC, kind, len(payload)) + payload
        if fds:
            sent = socket.send_fds(self.sock, [data], list(fds))
            data = data[sent:]
        if data:
            self.sock.sendall(data)

    def recv(self, timeout: float | None = None) -> tuple[Kind, bytes, list[int]]:
        """The next message, its payload and the descriptors sent with it. Raises
        ChannelClosed at end of file, TimeoutError past `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self._buf) < _HEADER.size:
            self._fill(deadline)
        magic, kind, size = _HEADER.unpack_from(self._buf)
        if magic != _MAGIC:
            raise ChannelClosed(f"garbled grammar-worker stream (header {bytes(self._buf[:8])!r})")
        while len(self._buf) < _HEADER.size + size:
            self._fill(deadline)
        payload = bytes(self._buf[_HEADER.size:_HEADER.size + size])
        del self._buf[:_HEADER.size + size]
        fds: list[int] = []
        if kind in (Kind.BUILD, Kind.MAP) and self._fds:  # the kinds sent with one
            fds.append(self._fds.popleft())
        return Kind(kind), payload, fds

    def _fill(self, deadline: float | None) -> None:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from the grammar process")
            self.sock.settimeout(left)
        else:
            self.sock.settimeout(None)
        try:
            # 64 KiB: every message fits, and a buffer under malloc's mmap threshold costs no
            # system calls of its own on each step's read.
            data, ancillary, _flags, _addr = self.sock.recvmsg(
                1 << 16, socket.CMSG_SPACE(_MAX_FDS * 4))
        except TimeoutError:
            raise TimeoutError("no answer from the grammar process") from None
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        for level, type_, blob in ancillary:
            if level == socket.SOL_SOCKET and type_ == socket.SCM_RIGHTS:
                fds = array("i")
                fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
                self._fds.extend(fds)
        if not data:
            raise ChannelClosed("end of file")
        self._buf += data


def encode_step(advance: list[tuple[int, int]], fill: list[tuple[int, int]], rows: int) -> bytes:
    """`STEP`'s payload: (slot, token) pairs to consume, then (slot, row) pairs to fill."""
    ints = array("i", [s for s, _ in advance])
    ints.extend(t for _, t in advance)
    ints.extend(s for s, _ in fill)
    ints.extend(r for _, r in fill)
    return _STEP_HEAD.pack(len(advance), len(fill), rows) + ints.tobytes()


def decode_step(payload: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    n_adv, n_fill, rows = _STEP_HEAD.unpack_from(payload)
    ints = array("i")
    ints.frombytes(payload[_STEP_HEAD.size:])
    adv = list(zip(ints[:n_adv], ints[n_adv:2 * n_adv], strict=True))
    base = 2 * n_adv
    fill = list(zip(ints[base:base + n_fill], ints[base + n_fill:base + 2 * n_fill], strict=True))
    return adv, fill, rows


def shared_file(data: bytes) -> int:
    """A descriptor of an anonymous file holding `data` (memfd on Linux), to send along."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        fd = memfd("graphserve-grammar")
    else:  # not Linux: an unlinked temporary file
        import tempfile

        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    try:
        if data:
            os.ftruncate(fd, len(data))
            with mmap.mmap(fd, len(data)) as view:
                view[:] = data
    except BaseException:
        os.close(fd)
        raise
    return fd


def _faults() -> dict[str, float]:
    """`GRAPHSERVE_GRAMMAR_TEST_FAULT` (test seam, see the module docstring)."""
    kind, _, value = os.environ.get("GRAPHSERVE_GRAMMAR_TEST_FAULT", "").partition(":")
    return {kind: float(value)} if kind else {}


class Worker:
    """The process's state: the tokenizer, the prototypes, the live matchers, the buffer."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.faults = _faults()
        self.steps = 0
        self.tokenizer: Any = None
        self.error: str | None = "no BUILD received"
        self.prototypes: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.matchers: dict[int, Any] = {}
        self.buffer: mmap.mmap | None = None
        self.base = 0
        self.row_bytes = 0
        self.rows = 0

    def serve(self) -> None:
        handlers = {Kind.BUILD: self.build, Kind.NEW: self.new, Kind.FREE: self.free,
                    Kind.MAP: self.map, Kind.STEP: self.step}
        while True:
            try:
                kind, payload, fds = self.channel.recv()
            except ChannelClosed:
                return
            handler = handlers.get(kind)
            if handler is None:
                raise RuntimeError(f"unexpected message kind {kind}")
            handler(payload, fds)

    def build(self, payload: bytes, fds: list[int]) -> None:
        t0 = time.perf_counter()
        time.sleep(self.faults.get("build_delay", 0.0))
        meta = json.loads(payload)
        if not fds:
            raise RuntimeError("BUILD came without its file descriptor")
        try:
            with open(fds[0], "rb", closefd=False) as f:
                text = f.read().decode("utf-8")
        finally:
            os.close(fds[0])
        self.error = None
        try:
            import llguidance

            eos = sorted(meta["eos_ids"])
            try:
                self.tokenizer = llguidance.LLTokenizer(
                    text, n_vocab=meta["vocab_size"], eos_token=eos)
            except TypeError:  # llguidance < 1.7 takes one EOS id (the GPU image's 1.6.1)
                self.tokenizer = llguidance.LLTokenizer(
                    text, n_vocab=meta["vocab_size"], eos_token=eos[0])
        except Exception as exc:  # reported to the engine, which refuses grammars with it
            self.tokenizer = None
            self.error = f"grammar tokenizer could not be built: {exc}"
        self.channel.send(Kind.BUILT, json.dumps(
            {"error": self.error, "seconds": time.perf_counter() - t0}).encode())

    def new(self, payload: bytes, _fds) -> None:
        order = json.loads(payload)
        try:
            self.matchers[order["slot"]] = self._matcher(order["grammar"])
            error = None
        except ValueError as exc:
            error = str(exc)
        self.channel.send(Kind.CREATED, json.dumps({"error": error}).encode())

    def _matcher(self, grammar: str):
        import llguidance

        if self.tokenizer is None:
            raise ValueError(self.error or "grammar tokenizer unavailable")
        proto = self.prototypes.get(grammar)
        if proto is None:
            proto = llguidance.LLMatcher(self.tokenizer, grammar)
            if proto.is_error():
                raise ValueError(proto.get_error())
            self.prototypes[grammar] = proto
            if len(self.prototypes) > PROTOTYPES:
                self.prototypes.popitem(last=False)
        else:
            self.prototypes.move_to_end(grammar)
        return proto.deep_copy()

    def free(self, payload: bytes, _fds) -> None:
        slots = array("i")
        slots.frombytes(payload)
        for slot in slots:
            self.matchers.pop(slot, None)

    def map(self, payload: bytes, fds: list[int]) -> None:
        shape = json.loads(payload)
        if not fds:
            raise RuntimeError("MAP came without its file descriptor")
        fd = fds[0]
        try:
            size = shape["rows"] * shape["words"] * 4
            buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.buffer = buffer  # the previous mapping, if any, is unmapped when dropped
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        self.row_bytes = shape["words"] * 4
        self.rows = shape["rows"]

    def step(self, payload: bytes, _fds) -> None:
        self.steps += 1
        if self.steps == self.faults.get("exit_at_step"):
            log.error("injected exit at step %d (GRAPHSERVE_GRAMMAR_TEST_FAULT)", self.steps)
            os._exit(9)
        if self.steps == self.faults.get("hang_at_step"):
            time.sleep(3600)
        advance, fill, rows = decode_step(payload)
        errors: dict[int, str] = {}
        for slot, token in advance:
            m = self.matchers.get(slot)
            if m is None:
                errors[slot] = "no matcher for this sequence"
            elif m.is_stopped():
                continue  # past the end (EOS was consumed): the token is being discarded
            elif not m.consume_token(token):
                errors[slot] = m.get_error() or f"token {token} rejected"
        if rows > self.rows:
            raise RuntimeError(f"a step of {rows} rows on a mask buffer of {self.rows}")
        filled = set()
        for slot, row in fill:
            m = self.matchers.get(slot)
            if m is None or m.is_error():
                continue  # the sequence is being failed; its row is discarded
            # A finished grammar (stopped) yields a mask of the EOS tokens alone: that is how a
            # complete document ends the sequence.
            m.unsafe_compute_mask_ptr(self.base + row * self.row_bytes, self.row_bytes)
            filled.add(row)
        for row in range(rows):
            if row not in filled:
                ctypes.memset(self.base + row * self.row_bytes, 0xFF, self.row_bytes)
        body = json.dumps({str(k): v for k, v in errors.items()}).encode() if errors else b""
        self.channel.send(Kind.STEPPED, body)


def main(argv: list[str] | None = None) -> int:
    from server.child_process import child_arguments, start_logging

    ap = child_arguments("server.structured.grammar_worker")
    ap.add_argument("--fd", type=int, required=True)
    args = ap.parse_args(argv)
    # The engine decides when this process ends (it closes the socket); a terminal's Ctrl-C
    # reaches the whole process group and is the server's to act on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    start_logging(args)
    sock = socket.socket(fileno=args.fd)
    try:
        Worker(Channel(sock)).serve()
    except Exception:
        log.exception("grammar process failed")
        return 1
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
