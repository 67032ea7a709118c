"""Engine logprobs (`server.request.TokenLogprob`) in OpenAI's two shapes.

* chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}], "refusal": null}`, per chunk when streamed;
* completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}],
  "text_offset"}`, with the prompt's tokens first under `echo` (the first one's logprob and
  alternatives null).

What the numbers are (docs/architecture.md, "Logprobs"): log-softmax of the logits after
penalties and logit_bias, before min_tokens, the grammar mask and temperature / top-k / top-p;
prompt logprobs from the raw logits. Event-loop thread.
"""

from __future__ import annotations

from typing import Any

from server.request import TokenLogprob


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: vocabulary character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


_BYTES = _byte_decoder()


class TokenTexts:
    """Token id -> (text, UTF-8 bytes), cached per tokenizer. Bytes are the token's own bytes
    for byte-level vocabularies (a token may hold part of a character), else its text's."""

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._pieces = getattr(tokenizer, "convert_ids_to_tokens", None)

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        raw: bytes | None = None
        if self._pieces is not None:
            try:
                piece = self._pieces([token_id])[0]
            except Exception:
                piece = None
            if piece and all(ch in _BYTES for ch in piece):
                raw = bytes(_BYTES[ch] for ch in piece)
        if raw is not None:
            text = raw.decode("utf-8", errors="replace")
        else:
            text = self._tok.decode([token_id], skip_special_tokens=False)
            raw = text.encode("utf-8", errors="replace")
        if len(self._cache) < 200_000:
            self._cache[token_id] = (text, list(raw))
        return self._cache[token_id] if token_id in self._cache else (text, list(raw))


def chat_entries(texts: TokenTexts, entries: list[TokenLogprob | None], k: int) -> list[dict]:
    out = []
    for e in entries:
        if e is None:
            continue
        text, raw = texts(e.token_id)
        top = []
        for tid, lp in e.top[:k]:
            t, b = texts(tid)
            top.append({"token": t, "logprob": lp, "bytes": b})
        out.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
    return out


def chat_logprobs(texts: TokenTexts, entries: list[TokenLogprob | None], k: int) -> dict:
    return {"content": chat_entries(texts, entries, k), "refusal": None}


class CompletionLogprobs:
    """Accumulates one choice's completions-style logprobs; `offset` is the character offset
    of the next token in the choice's text."""

    def __init__(self, texts: TokenTexts, k: int, offset: int = 0):
        self.texts, self.k, self.offset = texts, k, offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, entries: list[TokenLogprob | None]) -> dict[str, list]:
        """Append entries (None: a token without logprob, the prompt's first); returns the
        part just added, in the same shape (a streamed chunk's logprobs)."""
        start = len(self.tokens)
        for e in entries:
            if e is None:
                continue
            self._add_one(e.token_id, e.logprob, e.top)
        return self._slice(start)

    def add_prompt(self, prompt_ids: list[int], entries: list[TokenLogprob | None]) -> dict:
        start = len(self.tokens)
        for i, tid in enumerate(prompt_ids):
            e = entries[i] if i < len(entries) else None
            if e is None:
                self._add_one(tid, None, None)
            else:
                self._add_one(tid, e.logprob, e.top)
        return self._slice(start)

    def _add_one(self, token_id: int, logprob: float | None, top) -> None:
        text, _ = self.texts(token_id)
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        if top is None:
            self.top_logprobs.append(None)
        else:
            best: dict[str, float] = {}
            for tid, lp in top[: self.k]:
                best.setdefault(self.texts(tid)[0], lp)
            self.top_logprobs.append(best)
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def _slice(self, start: int) -> dict[str, list]:
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top_logprobs[start:],
            "text_offset": self.text_offset[start:],
        }

    def body(self) -> dict[str, list]:
        return self._slice(0)
