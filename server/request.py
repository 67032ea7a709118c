"""Request-level data exchanged between the HTTP layer and the engine.

Torch-free on purpose: the API module imports this before the model (and torch) is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.errors import InvalidRequestError

MAX_N = 128  # sequences one request may ask for (n, or best_of)
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
LOGIT_BIAS_LIMIT = 100.0


@dataclass
class SamplingParams:
    """How to sample one request.

    `temperature == 0` means greedy. `top_k == 0` (or -1) disables top-k. A request without a
    `seed` is given a random one at admission, so every request samples from its own stream and
    the same seed reproduces the same tokens.

    The rest, applied to the logits in this order (`server.logits_processors`):
    * `repetition_penalty` (HF's definition: a seen token's logit is divided by it when
      positive, multiplied when negative; "seen" covers prompt and output),
    * `frequency_penalty` / `presence_penalty` (OpenAI's: `logit -= frequency * count +
      presence * (count > 0)`, counting the tokens generated so far),
    * `logit_bias` (token id -> value added, within [-100, 100]);
    * then the log-probabilities are taken (`logprobs`: the sampled token's, plus the `logprobs`
      most likely alternatives; `prompt_logprobs`: each prompt token's given the ones before it,
      from the raw logits);
    * then `min_tokens` (EOS and `stop_token_ids` are impossible before that many tokens) and
      the grammar mask (`grammar`: an llguidance grammar, see `server.structured`);
    * then temperature, top-k, top-p and the draw.

    `n` sequences are generated from one prompt (one prefill: the others reuse its KV blocks);
    choice j draws from a key derived from (seed, j), so each choice is reproducible whatever
    else is batched. `max_tokens == 0` is allowed for prompt-logprobs requests only (scoring a
    prompt without generating).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    grammar: str | None = None
    skip_special_tokens: bool = True

    def validate(self) -> None:
        """Raise InvalidRequestError naming the offending parameter."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise InvalidRequestError("max_tokens must be an integer >= 1", "max_tokens")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            raise InvalidRequestError(
                "max_tokens must be an integer >= 1 (0 only to score a prompt: echo with "
                "logprobs)", "max_tokens",
            )
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
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"n must be an integer in [1, {MAX_N}]", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2]", name)
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise InvalidRequestError("repetition_penalty must be in (0, 100]",
                                      "repetition_penalty")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0:
                raise InvalidRequestError("logit_bias keys must be token ids >= 0", "logit_bias")
            if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise InvalidRequestError("logit_bias values must be in [-100, 100]",
                                          "logit_bias")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError("min_tokens must be in [0, max_tokens]", "min_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidRequestError(f"{name} must be in [0, {MAX_LOGPROBS}]", name)
        if self.grammar is not None and self.min_tokens:
            # The grammar decides where the output may end; forcing it on would leave rows
            # whose only allowed token is the one min_tokens forbids.
            raise InvalidRequestError(
                "min_tokens cannot be combined with structured output (response_format, "
                "tools)", "min_tokens",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the penalties need the per-row token counts on the device."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def processed(self) -> bool:
        """Whether anything beyond temperature/top-k/top-p touches this row's logits."""
        return (
            self.penalized
            or bool(self.logit_bias)
            or self.min_tokens > 0
            or self.logprobs is not None
            or self.grammar is not None
        )


@dataclass
class TokenLogprob:
    """A token's log-probability and the `top` most likely tokens at its position (best
    first), as (token id, logprob) pairs."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprobs(ks, tokens, lps, top_ids, top_lps) -> list[TokenLogprob | None]:
    """Host lists of a step's rows -> one TokenLogprob per row (None where the row asked for
    no logprobs; `ks[i]` top entries where it did)."""
    out: list[TokenLogprob | None] = []
    for i, k in enumerate(ks):
        if k is None:
            out.append(None)
            continue
        top = list(zip(top_ids[i][:k], top_lps[i][:k], strict=True)) if k and top_ids else []
        out.append(TokenLogprob(tokens[i], lps[i], top))
    return out


@dataclass
class RequestOutput:
    """One increment of a request's output, as streamed by the engine.

    `text` and `token_ids` are the *new* text and tokens since the previous increment of the
    same choice (`index`, in [0, n)). Text held back (a possible stop-string prefix, an
    incomplete UTF-8 sequence) arrives in a later increment or is dropped if the request stops
    on it. Each choice's last increment has `finished=True` and a `finish_reason` of "stop",
    "length", "abort" or "error" (then `error` says why); the stream ends after every choice's.

    `logprobs` has one entry per token of `token_ids` when the request asked for them;
    `prompt_logprobs` (one per prompt token, the first None) comes once, with the choice's
    first increment; `cumulative_logprob` (the sum over the choice's tokens) on the last one
    when logprobs were computed.
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
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cumulative_logprob: float | None = None


def validate_prompt(prompt_ids, vocab_size: int | None, max_model_len: int | None) -> None:
    """Raise InvalidRequestError unless `prompt_ids` is a non-empty list of token ids of this
    vocabulary that leaves room for at least one token in the context."""
    if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        raise InvalidRequestError("the prompt is empty", "prompt")
    vocab = vocab_size or 0
    for t in prompt_ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
            raise InvalidRequestError(
                f"prompt token ids must be integers in [0, {vocab}); got {t!r}", "prompt"
            )
    if max_model_len is not None and len(prompt_ids) >= max_model_len:
        raise InvalidRequestError(
            f"the prompt has {len(prompt_ids)} tokens; this model's maximum context is "
            f"{max_model_len} tokens (prompt + completion), so at most "
            f"{max_model_len - 1} prompt tokens fit",
            "prompt",
        )
