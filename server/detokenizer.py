"""Incremental detokenisation with stop strings.

Byte-level BPE tokens often end inside a multi-byte UTF-8 character; decoding token by token would
emit U+FFFD garbage. We decode a small window of recent tokens and only release text once the
window decodes without a trailing replacement character. Stop strings are matched on the text,
so a stop string split across tokens is still caught; text that could be the start of a stop
string is held back until it is known not to be one, so a stop string is never emitted.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
# Tokens of context kept before the new ones: enough for tokenizers whose decode of a token
# depends on its neighbours (SentencePiece's leading-space rule).
_CONTEXT_TOKENS = 6
# A token run that still ends in U+FFFD after this many tokens is genuinely invalid UTF-8
# (possible with random or broken models): release it rather than hold text forever.
_MAX_PENDING_TOKENS = 8


class IncrementalDetokenizer:
    """Turns a request's generated tokens into text deltas and detects stop strings."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        # False for tool calls whose marker is a special token (Mistral's [TOOL_CALLS]).
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = [s for s in (stop or []) if s]
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""  # all generated text decoded so far (held-back part included)
        self._emitted = 0  # length of self.text already released to the client
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _decode_new(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        pending = len(self._ids) - self._read_offset
        if len(full) > len(prefix) and (
            not full.endswith(REPLACEMENT) or pending >= _MAX_PENDING_TOKENS
        ):
            # Re-base so the next prefix decode covers exactly the released tokens.
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""

    def add_token(self, token_id: int) -> str:
        """Append one generated token; return the text that may be released now ('' if none).

        After a stop string is found, `stopped` is True and the returned text ends just before
        it; further calls return ''.
        """
        if self.stopped:
            return ""
        self._ids.append(token_id)
        new = self._decode_new()
        if not new:
            return ""
        search_from = max(0, len(self.text) - self._max_stop + 1)
        self.text += new
        if self._stop:
            hit = self._find_stop(search_from)
            if hit is not None:
                self.stopped = True
                self.text = self.text[:hit]
                return self._release(len(self.text))
            return self._release(len(self.text) - self._held_back())
        return self._release(len(self.text))

    def flush(self) -> str:
        """At the end of the request: release everything still held (no stop string matched)."""
        if self.stopped:
            return ""
        tail = self._decode(self._ids[self._prefix_offset :])
        head = self._decode(self._ids[self._prefix_offset : self._read_offset])
        if len(tail) > len(head):
            self.text += tail[len(head) :]
            self._read_offset = len(self._ids)
        if self._stop:
            hit = self._find_stop(max(0, self._emitted - self._max_stop + 1))
            if hit is not None:
                self.stopped = True
                self.text = self.text[:hit]
        return self._release(len(self.text))

    def _find_stop(self, start: int) -> int | None:
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        text = self.text
        for n in range(min(self._max_stop - 1, len(text)), 0, -1):
            suffix = text[-n:]
            if any(s.startswith(suffix) for s in self._stop):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        out = self.text[self._emitted : upto]
        self._emitted = upto
        return out
