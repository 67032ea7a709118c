"""One admitted request on the HTTP side: relays the engine's increments, records the
request's metrics (TTFT, inter-token latency, tokens), and aborts the engine request when the
client leaves or the server drains."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

from server.engine_protocol import EngineProtocol
from server.http.errors import RETRY_AFTER_UNAVAILABLE, ApiError
from server.metrics import ServerMetrics
from server.request import RequestOutput

logger = logging.getLogger("graphserve.api")


class Generation:
    """One admitted request: relays the engine stream, records metrics, aborts when abandoned.

    The stream carries `choices` interleaved choices (n); the request is finished when all
    are. `finish_reason` is the last choice's, `finish_reasons` each choice's.
    Event-loop thread only. `on_close(request_id)` is called once the HTTP exchange is over.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        stream: AsyncIterator[RequestOutput],
        arrival: float,
        *,
        engine: EngineProtocol,
        metrics: ServerMetrics,
        on_close: Callable[[str], None],
        choices: int = 1,
    ):
        self.request_id = request_id
        self._open_choices = choices
        self.finish_reasons: dict[int, str] = {}
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.finished = False
        self.abort_cause: str | None = None
        self._stream = stream
        self._arrival = arrival
        self._engine = engine  # kept: the server state drops its engine at shutdown
        self._metrics = metrics
        self._on_close = on_close

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The engine's increments; ends after the one with `finished=True`."""
        metrics = self._metrics
        last_token_at: dict[int, float] = {}  # per choice: choices interleave in one stream
        async for out in self._stream:
            n = len(out.token_ids)
            if n:
                now = time.perf_counter()
                last = last_token_at.get(out.index)
                if last is None:
                    if not last_token_at:
                        metrics.ttft.observe(now - self._arrival)
                else:
                    per_token = (now - last) / n
                    for _ in range(n):
                        metrics.itl.observe(per_token)
                last_token_at[out.index] = now
                self.completion_tokens += n
                metrics.generation_tokens.inc(n)
            if out.finished:
                if out.index == 0:  # choices past the first reuse its prefill: count it once
                    self.cached_tokens = out.cached_tokens
                self.finish_reason = out.finish_reason or "stop"
                self.finish_reasons[out.index] = self.finish_reason
                if out.finish_reason in ("error", "abort") and self.error is None:
                    self.error = out.error
                self._open_choices -= 1
                if self._open_choices <= 0:
                    self.finished = True
                    if len(self.finish_reasons) == 1:
                        self.completion_tokens = max(self.completion_tokens,
                                                     out.completion_tokens or 0)
                    metrics.duration.observe(time.perf_counter() - self._arrival)
            yield out
            if self.finished:
                return
        if not self.finished:
            # The contract says the last increment is finished; a stream that just stops is an
            # engine fault, reported like one rather than passed off as a normal end.
            self.finished = True
            self.finish_reason = self.finish_reasons[-1] = "error"
            self.error = "the engine ended the request's stream without a final output"
            logger.error("request %s: %s", self.request_id, self.error)
            yield RequestOutput(self.request_id, finished=True, finish_reason="error",
                                error=self.error)

    def usage(self) -> dict[str, object]:
        """OpenAI's usage object; `cached_tokens`: prompt tokens the prefix cache supplied."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    def abort(self, cause: str) -> None:
        """Ask the engine to free this request's slot (idempotent)."""
        if self.finished or self.abort_cause is not None:
            return
        self.abort_cause = cause
        self._metrics.aborted.labels(cause).inc()
        logger.info("aborting request %s (%s)", self.request_id, cause)
        try:
            self._engine.abort(self.request_id)
        except Exception:
            logger.exception("engine.abort(%s) failed", self.request_id)

    def close(self) -> None:
        """End of the HTTP exchange: abort if the engine is still working on it, deregister."""
        if not self.finished:
            self.abort("client_disconnect")
        self._on_close(self.request_id)

    def failure(self) -> ApiError | None:
        """The error to answer with if the request ended badly (engine fault or abort)."""
        reasons = set(self.finish_reasons.values()) or {self.finish_reason}
        if "error" in reasons:
            return ApiError(500, f"generation failed: {self.error or 'engine error'}",
                            type="server_error", code="engine_error")
        if "abort" in reasons:
            if self.abort_cause == "drain":
                return ApiError(503, "request aborted: the server is shutting down",
                                type="service_unavailable_error", code="draining",
                                headers={"Retry-After": RETRY_AFTER_UNAVAILABLE})
            return ApiError(500, "request aborted by the engine",
                            type="server_error", code="aborted")
        return None
