"""The per-request limits of the HTTP layer, and the cheap checks that enforce them on raw bytes.

Every limit here exists so that one request cannot stall the event loop, the prompt workers or
the engine thread, or hold memory out of proportion to the work it asks for. They are chosen
wide enough for any legitimate OpenAI-style request; docs/deployment.md ("Reliability") lists
them with what each abuse gets. Standard library only, no state: safe from any thread.
"""

from __future__ import annotations

import re
from array import array
from itertools import accumulate

MiB = 1 << 20

# Request bodies: by default 16 bytes per token of context, and never less than 1 MiB. A prompt
# that fills the context takes ~4 bytes a token as English text, ~6 as JSON-escaped CJK text
# (one \\uXXXX per token) and ~7 as a token-id list, so 16 leaves twice the room of the worst
# common encoding; a 4k-context model gets 1 MiB, a 128k one 2 MiB, a 1M one 16 MiB.
DEFAULT_REQUEST_BYTES_PER_TOKEN = 16
MIN_DEFAULT_REQUEST_BYTES = MiB
# Bodies being read, parsed or tokenised at the same time may hold this many times the request
# limit in total; beyond it a request is refused with 429 before its body is read, so a flood
# of maximal bodies costs bounded memory (each body exists ~3 times: bytes, str, parsed).
BODY_BUDGET_REQUESTS = 64

# JSON nesting: OpenAI's requests nest 5 deep (messages -> content parts); tool schemas, which
# are parsed before being refused, rarely pass 20. Python's parser recurses once per level and
# pydantic again, so depth is work and stack, refused before parsing.
MAX_JSON_DEPTH = 64

# Stop conditions are checked by the engine thread for every generated token of the request:
# the stop-string check costs about (strings x longest string) character comparisons per token
# (measured with the project's detokenizer on the 2-core CPU box: 16 strings of 128 characters
# ~0.2 ms a token, 100,000 one-character strings ~16 ms a token, which would slow every sequence
# in the batch); stop ids cost a list scan.
MAX_STOP_STRINGS = 16  # OpenAI allows 4; vLLM has no limit; 16 covers multi-template clients
MAX_STOP_STRING_CHARS = 128
MAX_STOP_TOKEN_IDS = 128  # a model has a handful of end-of-turn ids
# Names are echoed in answers and logs.
MAX_NAME_CHARS = 256


def default_max_request_bytes(max_model_len: int | None) -> int:
    """The body limit when `--max-request-bytes` is not given, from the context length."""
    per_context = DEFAULT_REQUEST_BYTES_PER_TOKEN * (max_model_len or 0)
    return max(MIN_DEFAULT_REQUEST_BYTES, per_context)


# ------------------------------------------------------------------------- raw-body checks
def utf8_error(body: bytes) -> str | None:
    """Why `body` is not UTF-8 (RFC 8259 requires it of JSON), or None when it is."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the request body is not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset " \
               f"{exc.start})"
    return None


# A JSON string: quotes around any run of non-quote, non-backslash bytes and escape pairs (the
# unrolled form: no per-character alternation, so a multi-MiB string is one fast match).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_TO_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes


def json_depth_over(body: bytes, limit: int = MAX_JSON_DEPTH) -> int | None:
    """How deep the JSON text `body` nests arrays and objects, if that is more than `limit`.

    A body with at most `limit` opening brackets cannot nest deeper: one C-speed count, the
    usual case. Otherwise strings (whose brackets are not structure) are cut out and the depth
    is the largest running sum of +1 per opening and -1 per closing bracket, which also counts
    the unclosed openers of broken JSON (a parser descends into them before it fails). About
    25 ns per bracket: 200 KB of brackets take ~4 ms, 4 MB ~100 ms.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return None
    steps = array("b", _JSON_STRING.sub(b"", body).translate(_TO_STEPS, _NOT_BRACKETS))
    depth = max(accumulate(steps), default=0)
    return depth if depth > limit else None
