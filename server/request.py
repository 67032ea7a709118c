"""Request-level data exchanged between the HTTP layer and the engine.

Torch-free on purpose: the API module imports this before the model (and torch) is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.errors import InvalidRequestError


@dataclass
class SamplingParams:
    """How to sample one request.

    `temperature == 0` means greedy. `top_k == 0` (or -1) disables top-k. A request without a
    `seed` is given a random one at admission, so every request samples from its own stream and
    the same seed reproduces the same tokens.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise InvalidRequestError naming the offending parameter."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be an integer >= 1", "max_tokens")
        if self.temperature < 0:
            raise InvalidRequestError("temperature must be >= 0", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p must be in (0, 1]", "top_p")
        if self.top_k < -1:
            raise InvalidRequestError(
                "top_k must be -1, 0 (disabled) or a positive integer", "top_k"
            )
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidRequestError("seed must fit in 64 bits", "seed")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings", "stop")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError(
                "stop_token_ids must be non-negative integers", "stop_token_ids"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class RequestOutput:
    """One increment of a request's output, as streamed by the engine.

    `text` and `token_ids` are the *new* text and tokens since the previous increment. Text held
    back (a possible stop-string prefix, an incomplete UTF-8 sequence) arrives in a later
    increment or is dropped if the request stops on it. The last increment has `finished=True`
    and a `finish_reason` of "stop", "length", "abort" or "error" (then `error` says why).
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (final output only)
    error: str | None = None
