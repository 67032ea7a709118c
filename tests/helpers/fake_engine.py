"""A torch-free engine satisfying `server.engine_protocol.EngineProtocol`, for API tests.

Like the real engine it runs its own thread: that thread reports the startup phases through
`on_phase`, schedules requests into `max_num_seqs` slots with a `max_queue`-deep waiting queue,
"decodes" one token per running request per step and hands `RequestOutput` increments to each
request's `server.engine_protocol.RequestStream` with `deliver` (the real stream type and
hand-over). Text goes through the project's real `IncrementalDetokenizer`, so stop strings
behave as they will in production. `tests/test_engine_protocol.py` checks the contract.

The "model" is byte-level: token ids 0..255 are bytes, 256 is BOS, 257 is EOS. It writes a fixed
phrase over and over. Markers in the prompt script the rest:
  `[eos:N]`    emit EOS after N tokens (finish_reason "stop" unless ignore_eos)
  `[fault:N]`  fail the request after N tokens (finish_reason "error")
  `[say:TEXT]` write TEXT (then the phrase) instead of the phrase

The rest of the protocol is honoured the way the real engine does, with fake numbers: `n`
choices (choice j writes the phrase from its j-th byte), logprobs and prompt logprobs (token t
at output position i has logprob -(i + 1) / 8, its alternatives t+1, t+2, ... one lower each),
`max_tokens` 0 for prompt scoring, and grammars through the real llguidance matcher over this
byte vocabulary (at each step the first allowed of EOS, `"`, `}`, `]`, the scripted byte, the
lowest allowed byte), so structured outputs and forced tool calls are valid documents.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from server.config import EngineConfig, default_capture_sizes
from server.detokenizer import IncrementalDetokenizer
from server.engine_protocol import PhaseCallback, RequestStream, deliver
from server.errors import EngineNotReadyError, InvalidRequestError, QueueFullError
from server.request import RequestOutput, SamplingParams, TokenLogprob
from server.structured.grammar import GrammarBackend, GrammarError

BOS = 256
EOS = 257
VOCAB = 258
PHRASE = b"The quick brown fox jumps over the lazy dog. "

# `--engine-class` / `create_app(engine_class=...)` references to this module: the factory that
# reads the FAKE_ENGINE_* knobs from the environment, and the class itself (no knobs).
FAKE_ENGINE = "tests.helpers.fake_engine:env_engine"
FAKE_ENGINE_CLASS = "tests.helpers.fake_engine:FakeEngine"


class FakeTokenizer:
    """Byte-level tokenizer with the slice of the HF tokenizer API the server uses; its chat
    template renders tools the Hermes way (`<tool_call>`)."""

    bos_token_id = BOS
    eos_token_id = EOS
    chat_template = "{# fake: renders tools, calls as <tool_call> JSON blocks #}"

    def to_json(self) -> str:
        """This vocabulary as a tokenizers-library JSON (what grammar engines load)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        # GPT-2's byte -> character map, in byte order: id b is byte b.
        chars = sorted(alphabet, key=_byte_of)
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
        return tok.to_str()

    def __len__(self) -> int:
        return VOCAB

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytearray()
        for t in ids:
            if t < 256:
                data.append(t)
            elif not skip_special_tokens:
                data += b"<s>" if t == BOS else b"</s>"
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, conversation, add_generation_prompt=False, tokenize=True,
                            tools=None, **kwargs):
        # Real templates raise on conversations they cannot render; mimic one such rule.
        for i, msg in enumerate(conversation):
            if msg["role"] == "system" and i != 0:
                raise ValueError("System message must be at the beginning.")
        text = "<s>"
        if tools:
            text += "<|tools|>" + json.dumps(tools) + "\n"
        for m in conversation:
            calls = "".join(f"<tool_call>{json.dumps(c['function'])}</tool_call>"
                            for c in m.get("tool_calls") or [])
            text += f"<|{m['role']}|>{m['content']}{calls}\n"
        if add_generation_prompt:
            text += "<|assistant|>"
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _byte_of(ch: str) -> int:
    """GPT-2's byte-level character -> its byte."""
    code = ord(ch)
    printable = (ord("!") <= code <= ord("~") or ord("¡") <= code <= ord("¬")
                 or ord("®") <= code <= ord("ÿ"))
    if printable:
        return code
    others = [b for b in range(256) if not (ord("!") <= b <= ord("~") or ord("¡") <= b <= ord("¬")
                                            or ord("®") <= b <= ord("ÿ"))]
    return others[code - 256]


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    detok: IncrementalDetokenizer
    eos_after: int | None
    fault_after: int | None
    script: bytes = b""
    index: int = 0
    grammar: Any = None
    generated: list[int] = field(default_factory=list)
    cumulative: float = 0.0
    prompt_sent: bool = False
    aborted: bool = False

    @property
    def key(self) -> str:
        return f"{self.request_id}#{self.index}"


class FakeEngine:
    """Stand-in for `server.engine.AsyncEngine` (no torch, no model); implements
    `server.engine_protocol.EngineProtocol`."""

    def __init__(
        self,
        config: EngineConfig,
        on_phase: PhaseCallback | None = None,
        *,
        token_delay: float = 0.0,
        phase_delay: float = 0.0,
        gated: bool = False,
        fail_in: str | None = None,
        fail_reason: str = "CUDA out of memory (fake)",
    ):
        self.config = config
        self._on_phase = on_phase or (lambda phase, detail=None: None)
        self.token_delay = token_delay
        self.phase_delay = phase_delay
        self.fail_in = fail_in
        self.fail_reason = fail_reason
        self.model_name = config.served_model_name or "fake-model"
        self.max_model_len = config.max_model_len or 256
        self.max_num_seqs = config.max_num_seqs or 4
        self.max_queue = config.max_queue
        self.vocab_size = VOCAB
        self.tokenizer: FakeTokenizer | None = None
        # Its grammar process starts with the first constrained request (most tests have none).
        self._grammars: GrammarBackend | None = None
        # Observable by tests.
        self.submitted: list[tuple[str, list[int], SamplingParams]] = []
        self.aborted: list[str] = []
        self.phases: list[str] = []
        self.started = False
        self.shut_down = False

        self._gated = gated
        self._gate = threading.Semaphore(0)
        self._lock = threading.Condition()
        self._running: dict[str, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._abort_ids: set[str] = set()
        self._ready = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._sizes = sorted(config.cuda_graph_sizes or default_capture_sizes(self.max_num_seqs))
        self._captured: dict[int, float] = {}
        self._traffic = {"exact_steps": 0, "padded_steps": 0, "eager_steps": 0}
        self._replays: dict[int, int] = {}

    # ---------------------------------------------------------------- startup
    def start(self) -> None:
        self.started = True
        self._thread = threading.Thread(target=self._main, name="fake-engine", daemon=True)
        self._thread.start()

    def release_phase(self) -> None:
        """With gated=True, let the engine thread move past the phase it is waiting in."""
        self._gate.release()

    def _phase(self, phase: str, detail: str | None = None) -> bool:
        """Report a phase; False if the engine must stop (scripted failure or shutdown)."""
        if self.fail_in == phase:
            self.phases.append("failed")
            self._on_phase("failed", f"{self.fail_reason} (while {phase})")
            return False
        self.phases.append(phase)
        self._on_phase(phase, detail)
        if self.phase_delay:
            time.sleep(self.phase_delay)
        if self._gated:
            while not self._gate.acquire(timeout=0.05):
                if self._stop:
                    return False
        return not self._stop

    def _main(self) -> None:
        if self.config.model is not None and not os.path.isdir(self.config.model):
            self._on_phase("failed", f"model directory not found: {self.config.model}")
            return
        if not self._phase("loading_weights"):
            return
        self.tokenizer = FakeTokenizer()
        if not self._phase("allocating_kv_cache"):
            return
        largest = self._sizes[-1]
        if self.config.graph_capture != "off":
            if not self._phase("capturing_graphs", f"size {largest}"):
                return
            self._captured[largest] = 1.5
        with self._lock:
            self._ready = True
        self._on_phase("ready", None)
        self.phases.append("ready")
        self._loop()

    # ---------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt_ids: list[int],
                    params: SamplingParams) -> RequestStream:
        if not self._ready or self._stop:
            raise EngineNotReadyError("engine is not ready")
        params.validate()
        if not prompt_ids:
            raise InvalidRequestError("prompt is empty", "prompt")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError("prompt + max_tokens exceeds max_model_len", "max_tokens")
        if any(not 0 <= t < VOCAB for t in prompt_ids):
            raise InvalidRequestError("token id out of range", "prompt")
        text = self.tokenizer.decode(prompt_ids)
        eos = re.search(r"\[eos:(\d+)\]", text)
        fault = re.search(r"\[fault:(\d+)\]", text)
        say = re.search(r"\[say:([^\]]*)\]", text)
        stream = RequestStream(request_id, asyncio.get_running_loop(), choices=params.n)
        reqs = []
        for j in range(params.n):
            grammar = None
            if params.grammar is not None:
                try:
                    if self._grammars is None:
                        self._grammars = GrammarBackend(FakeTokenizer().to_json(), VOCAB, {EOS})
                    grammar = self._grammars.matcher(params.grammar)
                except GrammarError as exc:
                    raise InvalidRequestError(f"grammar: {exc}", "grammar") from None
            reqs.append(_Request(
                request_id, list(prompt_ids), params, stream,
                IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop,
                                       params.skip_special_tokens),
                int(eos.group(1)) if eos else None, int(fault.group(1)) if fault else None,
                script=say.group(1).encode() if say else b"", index=j, grammar=grammar,
            ))
        with self._lock:
            # Like the real engine: a request waits (and counts against max_queue) from
            # submission until the engine thread gives it a slot.
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the waiting queue is full ({self.max_queue} requests)")
            self._waiting.extend(reqs)
            self.submitted.append((request_id, list(prompt_ids), params))
            self._lock.notify_all()
        return stream

    def stop_accepting(self) -> None:
        self._ready = False

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id not in self.aborted:
                self.aborted.append(request_id)
            self._abort_ids.add(request_id)
            self._lock.notify_all()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "aborted": len(self.aborted)}

    def graph_report(self) -> dict[str, Any]:
        with self._lock:
            sizes = [
                {"size": s, "state": "captured" if s in self._captured else "pending",
                 "capture_ms": self._captured.get(s), "pool_bytes_after": None,
                 "replays": self._replays.get(s, 0), "padded_tokens_wasted": 0,
                 "demand": 0, "error": None}
                for s in self._sizes
            ]
            captured = len(self._captured)
            traffic = dict(self._traffic)
        total_steps = sum(traffic.values())
        traffic["hit_rate"] = traffic["exact_steps"] / total_steps if total_steps else None
        return {
            "mode": self.config.graph_capture,
            "reason": "fake engine",
            "complete": captured == len(self._sizes),
            "sizes": sizes,
            "coverage": {"captured": captured, "total": len(self._sizes),
                         "ratio": captured / len(self._sizes)},
            "traffic": traffic,
            "pending_demand": 0,
            "pool_bytes_total": 1024 * captured,
            "memory": {"estimate_full_bytes": 1024 * len(self._sizes), "budget_bytes": 1 << 30,
                       "warning": None},
            "device": "fake",
        }

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._grammars is not None:
            self._grammars.close()
        self.shut_down = True

    # ---------------------------------------------------------------- engine thread
    def _emit(self, req: _Request, out: RequestOutput) -> None:
        deliver([(req.stream, out)])  # drops it if the request's loop is closed

    def _finish(self, req: _Request, reason: str, text: str = "", ids=(), error=None,
                lps=None) -> None:
        p = req.params
        self._emit(req, RequestOutput(
            req.request_id, text=text, token_ids=list(ids), finished=True, finish_reason=reason,
            prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.generated), error=error,
            index=req.index, logprobs=lps,
            prompt_logprobs=self._prompt_logprobs(req) if reason in ("stop", "length") else None,
            cumulative_logprob=req.cumulative if p.logprobs is not None else None,
        ))

    @staticmethod
    def _prompt_logprobs(req: _Request) -> list | None:
        k = req.params.prompt_logprobs
        if k is None or req.prompt_sent:
            return None
        req.prompt_sent = True  # with the choice's first output only
        return [None] + [
            TokenLogprob(t, -0.25, [((t + d) % 256, -0.25 - d) for d in range(k)])
            for t in req.prompt_ids[1:]
        ]

    @staticmethod
    def _logprob(req: _Request, token: int) -> TokenLogprob:
        lp = -(len(req.generated)) / 8
        k = req.params.logprobs or 0
        return TokenLogprob(token, lp, [((token + d) % 256, lp - d) for d in range(k)])

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._running and not self._waiting:
                    self._lock.wait()
                if self._stop:
                    for req in [*self._running.values(), *self._waiting]:
                        self._finish(req, "abort")
                    self._running.clear()
                    self._waiting.clear()
                    return
                for rid in self._abort_ids:
                    for req in [r for r in self._running.values() if r.request_id == rid]:
                        del self._running[req.key]
                        self._finish(req, "abort")
                    for req in [r for r in self._waiting if r.request_id == rid]:
                        self._waiting.remove(req)
                        self._finish(req, "abort")
                self._abort_ids.clear()
                while self._waiting and len(self._running) < self.max_num_seqs:
                    req = self._waiting.popleft()
                    self._running[req.key] = req
                batch = list(self._running.values())
                self._count_step(len(batch))
            for req in batch:
                if self._step(req):
                    with self._lock:
                        self._running.pop(req.key, None)
            if self.token_delay:
                time.sleep(self.token_delay)

    def _count_step(self, n: int) -> None:
        if not n:
            return
        fits = [s for s in self._captured if s >= n]
        if n in self._captured:
            self._traffic["exact_steps"] += 1
            self._replays[n] = self._replays.get(n, 0) + 1
        elif fits:
            self._traffic["padded_steps"] += 1
            self._replays[min(fits)] = self._replays.get(min(fits), 0) + 1
        else:
            self._traffic["eager_steps"] += 1

    def _step(self, req: _Request) -> bool:
        """Decode one token for `req`; True when it finished."""
        n = len(req.generated)
        p = req.params
        if req.fault_after is not None and n >= req.fault_after:
            self._finish(req, "error", error="fake engine fault")
            return True
        if p.max_tokens == 0:
            self._finish(req, "length")
            return True
        if req.eos_after is not None and n >= req.eos_after and not p.ignore_eos:
            token = EOS
        elif n < len(req.script):
            token = req.script[n]
        else:
            token = PHRASE[(n - len(req.script) + req.index) % len(PHRASE)]
        if req.grammar is not None:
            token = self._constrained(req, token)
        lp = self._logprob(req, token) if p.logprobs is not None else None
        req.generated.append(token)
        if lp is not None:
            req.cumulative += lp.logprob
        lps = None if lp is None else [lp]
        if token == EOS or token in p.stop_token_ids:
            self._finish(req, "stop", req.detok.flush(), [token], lps=lps)
            return True
        text = req.detok.add_token(token)
        if req.detok.stopped:
            self._finish(req, "stop", text, [token], lps=lps)
            return True
        if len(req.generated) >= p.max_tokens:
            self._finish(req, "length", text + req.detok.flush(), [token], lps=lps)
            return True
        self._emit(req, RequestOutput(req.request_id, text=text, token_ids=[token],
                                      prompt_tokens=len(req.prompt_ids),
                                      completion_tokens=len(req.generated), index=req.index,
                                      logprobs=lps,
                                      prompt_logprobs=self._prompt_logprobs(req)))
        return False

    def _constrained(self, req: _Request, wanted: int) -> int:
        """The grammar's choice (see the module docstring), consumed by the matcher."""
        _, _, masks = self._grammars.step([], [(req.grammar, 0)], 1)
        mask = masks.copy()
        allowed = [t for t in range(VOCAB) if mask[0, t // 32] >> (t % 32) & 1]
        token = next((t for t in (EOS, ord('"'), ord("}"), ord("]"), wanted) if t in allowed),
                     allowed[0])
        rejected, _, _ = self._grammars.step([(req.grammar, token)], [], 0)
        assert not rejected, rejected
        return token


def env_engine(config: EngineConfig, on_phase: PhaseCallback | None = None) -> FakeEngine:
    """Factory for `python -m server serve --engine-class tests.helpers.fake_engine:env_engine`:
    knobs come from FAKE_ENGINE_TOKEN_DELAY, FAKE_ENGINE_PHASE_DELAY and FAKE_ENGINE_FAIL_IN."""
    return FakeEngine(
        config, on_phase,
        token_delay=float(os.environ.get("FAKE_ENGINE_TOKEN_DELAY", "0")),
        phase_delay=float(os.environ.get("FAKE_ENGINE_PHASE_DELAY", "0")),
        fail_in=os.environ.get("FAKE_ENGINE_FAIL_IN") or None,
    )
