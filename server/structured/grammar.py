"""Grammars for constrained decoding, with llguidance.

Why llguidance (measured on the 2-core CI box, docs/benchmarks.md section "Structured outputs"):
per-token mask 3-30 us at a 63k-128k vocabulary against 27-66 us for xgrammar and 80-150 us
for outlines-core, grammar compile under 1 ms (xgrammar 2.5-15 ms, outlines-core 30 ms to 7 s),
and a 3 MB abi3 wheel with no dependencies (xgrammar needs torch, transformers, triton and
tvm-ffi). It compiles lazily (Earley parser + lexer over the token trie), so a new schema costs
about as much as its first mask.

Two sides:

* Event loop: `json_schema_grammar`, `json_object_grammar` (and `tool_calls.tool_grammar`)
  build grammar strings; `check_grammar` validates one (cached by the grammar text) and
  raises `GrammarError` with llguidance's message, which the HTTP layer turns into a 400.
* Engine thread: `GrammarBackend` runs the grammar process (`grammar_worker`), which holds the
  llguidance tokenizer (built there at startup, beside the weight load: 0.3-0.7 s for a 128k
  vocabulary that no longer holds this process's GIL; readiness checks it ended:
  `wait_built`) and every constrained sequence's matcher, copied from a cached prototype per
  grammar. The engine holds a `SequenceGrammar` handle per sequence and makes one round trip
  per step (`step`: consume the tokens read, fill the next masks into a shared buffer). Masks
  are int32 bitmasks, bit `t % 32` of word `t // 32` set when token t is allowed, the layout
  `server.logits_processors.apply_bitmask` unpacks on the device.

Whitespace is not flexible (compact JSON: `{"a":1}`): a model (or a random one) cannot stall
in whitespace, and the output is what OpenAI's strict mode produces.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import mmap
import os
import socket
import subprocess
import threading
import time
import weakref
from array import array
from typing import Any

from server.errors import GrammarError

log = logging.getLogger("graphserve.grammar")

__all__ = ["GrammarError", "GrammarBackend", "GrammarWorkerError", "SequenceGrammar",
           "check_grammar", "json_object_grammar", "json_schema_grammar", "tokenizer_json"]

COMPACT = {"whitespace_flexible": False}


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """A grammar for JSON documents valid against `schema` (compact whitespace)."""
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT)
    except Exception as exc:  # the binding raises ValueError, or TypeError on odd input
        raise GrammarError(str(exc)) from None


def json_object_grammar() -> str:
    """Any JSON object (`response_format: {"type": "json_object"}`)."""
    return json_schema_grammar({"type": "object"})


@functools.lru_cache(maxsize=256)
def _validate(grammar: str) -> str:
    import llguidance

    return llguidance.LLMatcher.validate_grammar(grammar)


def check_grammar(grammar: str) -> str:
    """Return `grammar` if llguidance accepts it, else raise GrammarError (cached)."""
    message = _validate(grammar)
    if message and not message.startswith("WARNING"):
        raise GrammarError(message.strip().splitlines()[0])
    return grammar


class GrammarWorkerError(GrammarError):
    """The grammar process is gone or did not answer: the constrained sequences it held fail
    (the engine serves on; the next grammar starts a new process)."""


class SequenceGrammar:
    """One constrained sequence's matcher, which lives in the grammar process under `slot`.
    Engine thread only.

    Invariant: the matcher has consumed exactly the tokens of its sequence that the host has
    read (the engine advances it right after reading a step, before filling the next step's
    mask). Dropping the last reference frees the matcher (with the backend's next message).
    """

    __slots__ = ("slot", "generation", "__weakref__")

    def __init__(self, slot: int, generation: int):
        self.slot = slot
        self.generation = generation  # which grammar process holds it


class GrammarBackend:
    """The engine's side of the grammar process (`server.structured.grammar_worker`).

    Thread ownership: the engine thread makes the calls (a lock keeps the channel whole if
    another thread does too, as the tests' fake engine does). A sequence's finalizer may run on
    any thread; it only appends to `_freed`, which the next call sends.

    The process is started here, as the tokenizer loads (the engine calls this while the
    weights stream), and builds llguidance's tokenizer meanwhile, on another core and off this
    process's GIL. A process that dies or stops answering fails the sequences it held
    (`GrammarWorkerError`); the next `matcher` starts a new one and waits for its build.
    """

    def __init__(self, tokenizer_json: str | None, vocab_size: int, eos_ids,
                 timeout_s: float = 60.0, step_timeout_s: float = 10.0):
        self.vocab_size = vocab_size
        self.mask_words = (vocab_size + 31) // 32
        self._eos = sorted(eos_ids)
        self._json = tokenizer_json
        self._timeout = timeout_s  # a build, a grammar's compile
        # A step's masks take microseconds to milliseconds: past this the process is taken for
        # hung (every stream waits meanwhile), and its sequences fail.
        self._step_timeout = step_timeout_s
        self._error: str | None = None  # the build's error: grammars are refused with it
        self._proc: subprocess.Popen | None = None
        self._channel: Any = None
        self._built = False
        self._generation = 0
        self.restarts = 0  # processes started after the first (one died or hung)
        self._next_slot = 0
        # (generation, slot) of dropped sequences; a deque, as finalizers may append from any
        # thread while the engine thread pops.
        self._freed: collections.deque[tuple[int, int]] = collections.deque()
        self._buffer: mmap.mmap | None = None
        self._rows = 0
        self._lock = threading.RLock()
        if tokenizer_json is None:
            self._error = "this model's tokenizer has no tokenizer.json for grammars"
            self._built = True
            return
        self._start()  # a failure is logged; the first grammar tries again

    # -- the process ------------------------------------------------------------------------

    def _start(self) -> str | None:
        """Start a process and send it the build; returns why that failed, or None. A failure
        here never fails the engine: the next grammar tries again."""
        from server.child_process import spawn_module
        from server.structured import grammar_worker as gw

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = spawn_module("server.structured.grammar_worker",
                                      "--fd", str(theirs.fileno()), pass_fds=(theirs.fileno(),))
        except OSError as exc:  # out of processes or memory, for instance
            ours.close()
            log.error("grammar process could not start: %s", exc)
            return f"grammar process could not start: {exc}"
        finally:
            theirs.close()
        self._generation += 1
        self.restarts = self._generation - 1  # read by /metrics (another thread): one int
        self._channel = gw.Channel(ours)
        self._built = False
        self._buffer, self._rows = None, 0
        # The JSON (MBs) goes in a shared file: a socket write that size would wait for the
        # new process to start reading, and this is the engine thread on the path to ready.
        try:
            fd = gw.shared_file(self._json.encode("utf-8"))
            try:
                self._channel.send(gw.Kind.BUILD, json.dumps(
                    {"vocab_size": self.vocab_size, "eos_ids": self._eos}).encode(), fds=(fd,))
            finally:
                os.close(fd)
        except OSError as exc:
            self._stop(f"could not send it the tokenizer: {exc}")
            return f"grammar process could not start: {exc}"
        return None

    def _stop(self, reason: str) -> None:
        """The process is unusable (`reason`): close our end, make sure it is gone."""
        channel, proc, self._channel, self._proc = self._channel, self._proc, None, None
        self._freed.clear()  # its matchers went with it
        if channel is not None:
            channel.sock.close()
        if proc is not None:  # dead already, or broken: nothing of it is worth waiting for
            proc.kill()
            proc.wait()
        log.error("grammar process stopped: %s", reason)

    def _ensure(self) -> None:
        """A process that has finished its build; started again if the last one died."""
        if self._channel is None:
            if self._json is None:
                raise GrammarWorkerError("the grammar process is closed")
            log.warning("starting a new grammar process")
            failed = self._start()
            if failed is not None:
                raise GrammarWorkerError(failed)
        if not self._built:
            self._await_build(self._timeout)
            if not self._built:
                self._fail("the grammar tokenizer is still building")

    def _fail(self, reason: str):
        self._stop(reason)
        raise GrammarWorkerError(reason)

    def _await_build(self, timeout: float) -> None:
        from server.structured import grammar_worker as gw

        try:
            kind, payload, _ = self._channel.recv(timeout)
        except TimeoutError:
            return
        except (gw.ChannelClosed, OSError) as exc:
            self._fail(f"grammar process exited during its build ({exc})")
        if kind != gw.Kind.BUILT:
            self._fail(f"grammar process answered {kind!r} to BUILD")
        reply = json.loads(payload)
        self._built = True
        self._error = reply["error"]
        log.info("grammar tokenizer %s in %.2f s (grammar process, pid %d)",
                 "built" if self._error is None else "failed", reply["seconds"],
                 self._proc.pid if self._proc else -1)

    def _call(self, kind, payload: bytes, answer, timeout: float):
        """Send `kind` (after any frees) and return the payload of the `answer` it gets."""
        from server.structured import grammar_worker as gw

        self._ensure()
        channel = self._channel
        try:
            self._send_frees()
            channel.send(kind, payload)
            got, body, _ = channel.recv(timeout)
        except TimeoutError:
            self._fail(f"grammar process did not answer within {timeout:.0f} s")
        except (gw.ChannelClosed, OSError) as exc:
            code = self._proc.poll() if self._proc is not None else None
            self._fail(f"grammar process exited ({exc if code is None else f'code {code}'})")
        if got != answer:
            self._fail(f"grammar process answered {got!r}, expected {answer!r}")
        return body

    def _send_frees(self) -> None:
        from server.structured import grammar_worker as gw

        slots = array("i")
        while self._freed:
            gen, slot = self._freed.popleft()
            if gen == self._generation:
                slots.append(slot)
        if slots:
            self._channel.send(gw.Kind.FREE, slots.tobytes())

    def _release(self, generation: int, slot: int) -> None:
        self._freed.append((generation, slot))  # any thread

    def _map(self, rows: int) -> None:
        """A shared mask buffer of at least `rows` rows, sent to the process."""
        from server.structured import grammar_worker as gw

        rows = max(64, 1 << (rows - 1).bit_length())
        size = rows * self.mask_words * 4
        fd = gw.shared_file(b"")
        try:
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size)
            self._channel.send(gw.Kind.MAP, json.dumps(
                {"rows": rows, "words": self.mask_words}).encode(), fds=(fd,))
        finally:
            os.close(fd)
        self._buffer, self._rows = buffer, rows

    # -- the engine's calls -----------------------------------------------------------------

    def wait_built(self, timeout_s: float) -> float:
        """Wait up to `timeout_s` for the tokenizer build to end (built or failed); returns the
        seconds waited. The engine calls it before it reports ready, so a grammar request right
        after ready never waits for the build. It normally ended long before (it starts while
        the weights load, in another process). Past the timeout readiness goes ahead; the first
        grammar waits for the rest."""
        t0 = time.perf_counter()
        with self._lock:
            self._wait_built(timeout_s)
        waited = time.perf_counter() - t0
        if waited >= 0.01:
            log.info("ready waited %.2f s for the grammar tokenizer", waited)
        return waited

    def _wait_built(self, timeout_s: float) -> None:
        if not self._built and self._channel is not None:
            try:
                self._await_build(timeout_s)
            except GrammarWorkerError:
                pass  # logged; the next grammar starts a new process
            if not self._built and self._channel is not None:
                log.warning("grammar tokenizer still building after %.1f s; ready without it "
                            "(constrained requests wait for it)", timeout_s)

    def matcher(self, grammar: str) -> SequenceGrammar:
        """A fresh matcher for `grammar` (waits for the tokenizer the first time; raises
        GrammarError if the grammar or the tokenizer cannot be used)."""
        with self._lock:
            return self._matcher(grammar)

    def _matcher(self, grammar: str) -> SequenceGrammar:
        from server.structured import grammar_worker as gw

        if self._error is not None:
            raise GrammarError(self._error)
        slot = self._next_slot
        self._next_slot = (slot + 1) % (1 << 31)  # int32 on the wire
        body = json.loads(self._call(gw.Kind.NEW, json.dumps(
            {"slot": slot, "grammar": grammar}).encode(), gw.Kind.CREATED, self._timeout))
        if self._error is not None:  # the build this call waited for failed
            raise GrammarError(self._error)
        if body["error"] is not None:
            raise GrammarError(body["error"])
        handle = SequenceGrammar(slot, self._generation)
        weakref.finalize(handle, self._release, self._generation, slot)
        return handle

    def step(self, advance: list[tuple[SequenceGrammar, int]],
             fill: list[tuple[SequenceGrammar, int]], rows: int):
        """One round trip: the matchers in `advance` consume their tokens, then the masks of
        a step of `rows` rows are filled (`fill`: which matcher fills which row; every other
        row allows every token). Returns `(rejected, lost, masks)`: the handles whose grammar
        rejected its token, and those whose matcher went with a process that stopped, each
        with the reason; and the masks (numpy int32 `[rows, mask_words]`, a view of the
        shared buffer, valid until the next call; None when `rows` is 0). Raises
        GrammarWorkerError when the process fails during this call."""
        with self._lock:
            return self._step(advance, fill, rows)

    def _step(self, advance, fill, rows: int):
        import numpy as np

        from server.structured import grammar_worker as gw

        live = self._channel is not None
        stale = {h: "the grammar process holding this sequence's grammar stopped"
                 for h, _ in (*advance, *fill) if not live or h.generation != self._generation}
        advance = [(h, t) for h, t in advance if h not in stale]
        fill = [(h, r) for h, r in fill if h not in stale]
        if not advance and not fill:  # nothing for a process to do (or none to do it)
            masks = np.full((rows, self.mask_words), -1, dtype=np.int32) if rows else None
            return {}, stale, masks
        if rows > self._rows:
            self._map(rows)
        body = self._call(gw.Kind.STEP, gw.encode_step(
            [(h.slot, t) for h, t in advance], [(h.slot, r) for h, r in fill], rows),
            gw.Kind.STEPPED, self._step_timeout)  # fmt: skip
        rejected: dict[SequenceGrammar, str] = {}
        if body:
            by_slot = {int(k): v for k, v in json.loads(body).items()}
            rejected = {h: by_slot[h.slot] for h, _ in advance if h.slot in by_slot}
        if rows == 0:
            return rejected, stale, None
        masks = np.frombuffer(self._buffer, dtype=np.int32, count=rows * self.mask_words)
        return rejected, stale, masks.reshape(rows, self.mask_words)

    def close(self) -> None:
        """End the process (engine shutdown); idempotent."""
        with self._lock:
            channel, proc, self._channel, self._proc = self._channel, self._proc, None, None
            self._json = None  # nothing restarts it
        if channel is not None:
            channel.sock.close()  # end of file: it exits
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def tokenizer_json(tokenizer) -> str | None:
    """The tokenizers-library JSON behind a tokenizer (ours, HF's fast one, or a test's)."""
    for attr in ("to_json",):
        fn = getattr(tokenizer, attr, None)
        if callable(fn):
            return fn()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    return None


def dumps_schema(schema: Any) -> str:
    """Canonical text of a schema (the cache key of its grammar)."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))
