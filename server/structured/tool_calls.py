"""Tool calls: the formats of the chat-template families we support, which one a model uses,
the grammar that forces calls, and the incremental parser of calls out of generated text.

Families (`detect_format` reads the model's chat template):

* `hermes` (Hermes, Qwen 2/2.5/3, the demo model), detected by `<tool_call>` in the template:
  `<tool_call>\n{"name": .., "arguments": {..}}\n</tool_call>`, one block per call, a newline
  between blocks;
* `mistral`, detected by `[TOOL_CALLS]`: `[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]`
  (`[TOOL_CALLS]` is a special token: such requests are detokenised with special tokens);
* `llama3_json` (Llama 3.1/3.2/3.3), detected by `<|python_tag|>`, or `<|start_header_id|>`
  with a `parameters` key: `{"name": .., "parameters": {..}}`, calls separated by `; `.

A template that never reads `tools` cannot show the model its tools: `detect_format` returns
None and a request with tools is refused (400) rather than silently answered without them.

`tool_grammar` forces calls for `tool_choice` "required" (one or more calls, or exactly one
when `parallel_tool_calls` is false) and for a named function (exactly one call of it): each
call's arguments follow the function's JSON schema, so they always parse. "auto" is unforced:
the output is parsed, and a call that does not parse is left as content, unless a tool is
`strict`: then `auto_grammar` lets the model answer either in text (that never opens a call) or
with calls only (no text before them), each call matching its schema.

`ToolCallParser` is incremental: fed text deltas, it returns content deltas and OpenAI-shaped
tool-call deltas (the first for a call carries id, type and name with empty arguments, the
next ones argument fragments), holding back text that may still be the start of a call.
Everything here is pure Python; the event loop runs it per request.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.structured.grammar import COMPACT, check_grammar


@dataclass(frozen=True)
class ToolFormat:
    family: str
    args_key: str  # "arguments" or "parameters": the key holding a call's arguments
    start: str  # text that opens the calls ("" for llama3_json: the output starts with "{")
    end: str  # text that closes one call block (hermes) or ""
    separator: str  # between two calls in the grammar
    start_token_id: int | None = None  # `start` is this special token (mistral)

    def call_schema(self, tool: dict[str, Any]) -> dict[str, Any]:
        fn = tool["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        return {
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, self.args_key: params},
            "required": ["name", self.args_key],
            "additionalProperties": False,
            "x-guidance": COMPACT,
        }


def detect_format(chat_template: str | None, tokenizer: Any = None) -> ToolFormat | None:
    """The tool-call family a chat template uses (table in the module docstring), or None."""
    if not chat_template or "tools" not in chat_template:
        return None
    if "<tool_call>" in chat_template:
        return ToolFormat("hermes", "arguments", "<tool_call>", "</tool_call>", "\n")
    if "[TOOL_CALLS]" in chat_template:
        token_id = _special_id(tokenizer, "[TOOL_CALLS]")
        return ToolFormat("mistral", "arguments", "[TOOL_CALLS]", "", ", ", token_id)
    if "<|python_tag|>" in chat_template or (
        "<|start_header_id|>" in chat_template and "parameters" in chat_template
    ):
        return ToolFormat("llama3_json", "parameters", "", "", "; ")
    return None


def _special_id(tokenizer: Any, text: str) -> int | None:
    if tokenizer is None:
        return None
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except Exception:
        return None
    return ids[0] if len(ids) == 1 else None


def _lark_string(text: str) -> str:
    return json.dumps(text)


def tool_grammar(fmt: ToolFormat, tools: list[dict[str, Any]], *, parallel: bool) -> str:
    """A Lark grammar (llguidance) whose sentences are calls of `tools` in `fmt`: one call,
    or one or more when `parallel`. Validated before it is returned (GrammarError)."""
    bodies = []
    lines = []
    for i, tool in enumerate(tools):
        lines.append(f"fn{i}: %json {json.dumps(fmt.call_schema(tool))}")
        bodies.append(f"fn{i}")
    body = " | ".join(bodies)
    sep = _lark_string(fmt.separator)
    if fmt.family == "hermes":
        call = f'{_lark_string(fmt.start + chr(10))} body {_lark_string(chr(10) + fmt.end)}'
        start = f"start: call ({sep} call)*" if parallel else "start: call"
        lines = [start, f"call: {call}", f"body: {body}", *lines]
    elif fmt.family == "mistral":
        opener = f"<[{fmt.start_token_id}]>" if fmt.start_token_id is not None else (
            _lark_string(fmt.start))
        items = f'body ({_lark_string(",")} body)*' if parallel else "body"
        lines = [f'start: {opener} "[" {items} "]"', f"body: {body}", *lines]
    else:
        start = f"start: body ({sep} body)*" if parallel else "start: body"
        lines = [start, f"body: {body}", *lines]
    return check_grammar("\n".join(lines))


def auto_grammar(fmt: ToolFormat, tools: list[dict[str, Any]], *, parallel: bool) -> str:
    """`tool_choice: auto` with strict tools: plain text that never opens a call, or calls
    (as `tool_grammar`) and nothing else. Validated (GrammarError)."""
    calls = tool_grammar(fmt, tools, parallel=parallel).split("\n")
    calls[0] = calls[0].replace("start:", "calls:", 1)
    if fmt.family == "llama3_json":
        text = r"/(?s:.+)/ & ~/(?s:\s*(\{|<\|python_tag\|>).*)/"
    elif fmt.start_token_id is not None:
        text = r"/(?s:.+)/"  # the marker is a special token: text cannot write it
    else:
        text = rf"/(?s:.+)/ & ~/(?s:.*{re.escape(fmt.start)}.*)/"
    return check_grammar("\n".join(["start: TEXT | calls", f"TEXT: {text}", *calls]))


# -- parsing ------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as generated


@dataclass
class ParseResult:
    content: str
    calls: list[ToolCall] = field(default_factory=list)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


_HEADER = re.compile(
    r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)
_PYTHON_TAG = "<|python_tag|>"


class ToolCallParser:
    """Splits generated text into content and tool calls, incrementally (see module doc).

    `feed(text)` and `finish()` return lists of deltas: `{"content": str}` or
    `{"tool_call": {"index", "id"?, "type"?, "function": {"name"?, "arguments"}}}`, the latter
    exactly what goes into a streamed chunk's `delta.tool_calls`. `calls` holds the calls
    parsed so far; `invalid` becomes True when a call region held something that is not a
    call (auto mode: the caller then treats the whole output as content).
    """

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.calls: list[ToolCall] = []
        self.invalid = False
        self._buf = ""  # text not yet classified
        self._in_calls = False  # inside a call region
        self._started = False  # llama3_json: seen the first non-space character
        self._obj: list[str] | None = None  # the call object being read
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._streamed_header = False
        self._args_from = 0  # index in the object text where the arguments start
        self._args_sent = 0

    # -- public ---------------------------------------------------------------------------

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buf += text
        out: list[dict[str, Any]] = []
        self._run(out, final=False)
        return out

    def finish(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        self._run(out, final=True)
        if self._obj is not None:  # cut off mid-call (length): flush what there is
            self._complete_object(out, truncated=True)
        if self._buf and not self._in_calls and not (self.calls and not self._buf.strip()):
            out.append({"content": self._buf})
        self._buf = ""
        return out

    # -- the state machine ----------------------------------------------------------------

    def _run(self, out: list, final: bool) -> None:
        while self._buf:
            if self._obj is not None:
                self._scan_object(out)
                if self._obj is not None:
                    return  # need more text
                continue
            if self._in_calls:
                if not self._between_calls(final):
                    return
                continue
            if not self._content(out, final):
                return

    def _content(self, out: list, final: bool) -> bool:
        """Outside calls: emit content up to the start of a call region. False: wait."""
        fmt = self.fmt
        if fmt.family == "llama3_json":
            if self._started:
                out.append({"content": self._buf})
                self._buf = ""
                return False
            stripped = self._buf.lstrip()
            if stripped.startswith(_PYTHON_TAG):
                stripped = stripped[len(_PYTHON_TAG):].lstrip()
            elif not stripped or (_PYTHON_TAG.startswith(stripped) and not final):
                return False  # only whitespace or a partial tag so far
            if not stripped:
                return False
            self._started = True
            if stripped[0] == "{":
                self._in_calls = True
                self._buf = stripped
                return True
            return True  # plain content from here on
        marker = fmt.start
        at = self._buf.find(marker)
        if at >= 0:
            if at and not (self.calls and not self._buf[:at].strip()):
                out.append({"content": self._buf[:at]})
            self._buf = self._buf[at + len(marker):]
            self._in_calls = True
            return True
        hold = 0 if final else _partial_suffix(self._buf, marker)
        emit = self._buf[: len(self._buf) - hold]
        if self.calls and not emit.strip():
            # Whitespace between or after calls is layout, not content; it is kept back
            # until something else follows it.
            if final:
                self._buf = ""
            return False
        if emit:
            out.append({"content": emit})
        self._buf = self._buf[len(emit):]
        return False

    def _between_calls(self, final: bool) -> bool:
        """Inside a call region, between calls: separators, the block end, the next "{"."""
        fmt = self.fmt
        buf = self._buf.lstrip()
        if fmt.family == "hermes" and fmt.end.strip():
            end = fmt.end.strip()
            if buf.startswith(end):
                self._buf = buf[len(end):]
                self._in_calls = False
                return True
            if end.startswith(buf) and not final:
                self._buf = buf
                return False
        while buf and buf[0] in "[],;":
            buf = buf[1:].lstrip()
        self._buf = buf
        if not buf:
            return False
        if buf[0] == "{":
            self._obj = []
            self._depth = 0
            self._in_str = self._esc = False
            self._streamed_header = False
            self._args_sent = 0
            return True
        # Something that is not a call where a call should be.
        self.invalid = True
        self._in_calls = False
        self._started = True
        return True

    def _scan_object(self, out: list) -> None:
        obj = self._obj
        assert obj is not None
        consumed = 0
        done = False
        for ch in self._buf:
            consumed += 1
            obj.append(ch)
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
            elif ch == '"':
                self._in_str = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    done = True
                    break
        self._buf = self._buf[consumed:]
        text = "".join(obj)
        if not self._streamed_header:
            m = _HEADER.match(text)
            if m:
                self._streamed_header = True
                self._args_from = m.end()
                out.append(self._delta(id=new_call_id(), name=_unescape(m.group(1)), args=""))
        if self._streamed_header:
            # Stream argument text up to what is surely not the wrapper's closing brace.
            limit = len(text) - 1 if done else len(text)
            if not done:
                # A trailing "}" at depth 1 may close the wrapper: hold back trailing space and
                # any closing brace at the wrapper's level until the next character comes.
                limit = len(text.rstrip())
                if self._depth <= 1 and not self._in_str and text.rstrip().endswith("}"):
                    limit -= 1
            frag = text[self._args_from + self._args_sent : limit]
            if not self._args_sent:  # whitespace after the key's colon is not arguments
                skipped = len(frag) - len(frag.lstrip())
                self._args_from += skipped
                frag = frag[skipped:]
            if done:
                frag = frag.rstrip()
            if frag:
                self._args_sent += len(frag)
                out.append(self._delta(args=frag))
        if done:
            self._complete_object(out, truncated=False)

    def _complete_object(self, out: list, truncated: bool) -> None:
        text = "".join(self._obj or [])
        self._obj = None
        if self._streamed_header:
            args = text[self._args_from:]
            if not truncated:
                args = args[: args.rfind("}")]
            call = self._open_call
            call.arguments = args.rstrip()
            if not truncated:
                try:
                    json.loads(call.arguments)
                except ValueError:
                    self.invalid = True
            return
        try:
            parsed = json.loads(text)
            name = parsed["name"]
            args = parsed.get(self.fmt.args_key, parsed.get("arguments", parsed.get("parameters")))
            if not isinstance(name, str) or args is None:
                raise ValueError("not a call")
        except (ValueError, KeyError, TypeError):
            self.invalid = True
            out.append({"content": text})
            return
        arguments = json.dumps(args, ensure_ascii=False)
        out.append(self._delta(id=new_call_id(), name=name, args=""))
        out.append(self._delta(args=arguments))

    def _delta(self, *, id: str | None = None, name: str | None = None,  # noqa: A002
               args: str) -> dict[str, Any]:
        if id is not None:
            self.calls.append(ToolCall(id, name or "", ""))
            delta = {"index": len(self.calls) - 1, "id": id, "type": "function",
                     "function": {"name": name, "arguments": args}}
        else:
            call = self._open_call
            call.arguments += args
            delta = {"index": len(self.calls) - 1, "function": {"arguments": args}}
        return {"tool_call": delta}

    @property
    def _open_call(self) -> ToolCall:
        return self.calls[-1]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _unescape(s: str) -> str:
    try:
        return json.loads(f'"{s}"')
    except ValueError:
        return s


def parse_tool_calls(fmt: ToolFormat, text: str) -> ParseResult:
    """The whole output at once: content and calls (all content if a call did not parse)."""
    parser = ToolCallParser(fmt)
    deltas = parser.feed(text) + parser.finish()
    if parser.invalid:
        return ParseResult(text)
    content = "".join(d["content"] for d in deltas if "content" in d)
    return ParseResult(content, parser.calls)
