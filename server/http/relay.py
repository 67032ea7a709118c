"""One request's answer from its engine streams: choices (n, best_of, batched prompts),
logprobs, echo and tool calls, collected into one body or streamed as server-sent events.

A request has one engine stream per prompt (`Generation`), each carrying `plan.generated`
choices. Choice j of prompt i is answered as index `i * n + j`, as OpenAI indexes them; under
`best_of` the `n` choices of a prompt with the highest cumulative logprob are kept, in that
order. Event-loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Receive

from server.http.errors import ApiError, dumps, error_body
from server.http.generation import Generation
from server.http.logprobs import CompletionLogprobs, TokenTexts, chat_entries
from server.http.streaming import ClientGone, race_disconnect, sse
from server.http.surface import Plan
from server.request import RequestOutput
from server.structured.tool_calls import ToolCallParser, parse_tool_calls

logger = logging.getLogger("graphserve.api")

_TEXT_MARK = "\x00graphserve-text\x00"


def text_template(base: dict[str, Any], index: int, chat: bool) -> tuple[bytes, bytes]:
    """The bytes before and after the JSON string of a token's text in a streamed chunk of
    choice `index`, rendered from the same dict a full chunk is (a marker as the text), so
    `prefix + dumps(text) + suffix` and the full rendering are byte-identical."""
    if chat:
        probe = {"index": index, "delta": {"content": _TEXT_MARK}, "logprobs": None,
                 "finish_reason": None}
    else:
        probe = {"index": index, "text": _TEXT_MARK, "logprobs": None, "finish_reason": None}
    prefix, suffix = sse({**base, "choices": [probe]}).split(dumps(_TEXT_MARK), 1)
    return prefix, suffix


class GenerationGroup:
    """The engine streams of one request, aborted and closed together."""

    def __init__(self, gens: list[Generation]):
        self.gens = gens

    def abort(self, cause: str) -> None:
        for gen in self.gens:
            gen.abort(cause)

    def close(self) -> None:
        for gen in self.gens:
            gen.close()

    def failure(self) -> ApiError | None:
        return next((f for f in (g.failure() for g in self.gens) if f is not None), None)

    def usage(self) -> dict[str, object]:
        """Summed over the prompts; `cached_tokens`: prompt tokens the prefix cache supplied."""
        prompt = sum(g.prompt_tokens for g in self.gens)
        completion = sum(g.completion_tokens for g in self.gens)
        cached = sum(g.cached_tokens for g in self.gens)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as they come, interleaving the prompts' streams."""
        if len(self.gens) == 1:
            async for out in self.gens[0].outputs():
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen: Generation) -> None:
            try:
                async for out in gen.outputs():
                    queue.put_nowait((i, out))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(self.gens)]
        try:
            open_streams = len(tasks)
            while open_streams:
                i, out = await queue.get()
                if out is None:
                    open_streams -= 1
                else:
                    yield i, out
        finally:
            for t in tasks:
                t.cancel()


class _Choice:
    """One generated choice's accumulated answer."""

    def __init__(self, answer: Answer, prompt: int, engine_index: int):
        plan = answer.plan
        self.prompt = prompt
        self.engine_index = engine_index
        self.index = prompt * plan.n + engine_index
        self.parts: list[str] = []
        self.entries: list = []
        self.prompt_entries: list | None = None
        self.finish_reason: str | None = None
        self.cumulative = 0.0
        self.started = False
        self.parser = ToolCallParser(plan.tool_format) if plan.tool_format else None
        echo = answer.prompt_texts[prompt] if plan.echo else ""
        self.completion_lp = (CompletionLogprobs(answer.texts, plan.logprobs or 0, len(echo))
                              if plan.logprobs is not None and not answer.chat else None)

    def add(self, out: RequestOutput) -> None:
        if out.text:
            self.parts.append(out.text)
        if out.logprobs:
            self.entries.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_entries = out.prompt_logprobs
        if out.finished:
            self.finish_reason = out.finish_reason
            self.cumulative = out.cumulative_logprob or 0.0


class Answer:
    """Builds the body or the event stream of one request (see the module docstring)."""

    def __init__(self, group: GenerationGroup, plan: Plan, *, chat: bool, request_id: str,
                 model: str, prompt_ids: list[list[int]], prompt_texts: list[str],
                 texts: TokenTexts):
        self.group, self.plan, self.chat = group, plan, chat
        self.request_id, self.model = request_id, model
        self.prompt_ids, self.prompt_texts, self.texts = prompt_ids, prompt_texts, texts
        self.choices: dict[tuple[int, int], _Choice] = {}
        self.created = int(time.time())

    def _choice(self, prompt: int, out: RequestOutput) -> _Choice:
        key = (prompt, out.index)
        choice = self.choices.get(key)
        if choice is None:
            choice = self.choices[key] = _Choice(self, prompt, out.index)
        return choice

    # -- collected -----------------------------------------------------------------------

    async def collect(self) -> dict[str, Any]:
        async for prompt, out in self.group.outputs():
            self._choice(prompt, out).add(out)
        failure = self.group.failure()
        if failure is not None:
            raise failure
        kept = self._ranked()
        return {
            "id": self.request_id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created, "model": self.model, "system_fingerprint": None,
            "choices": [self._collected_choice(c, index) for index, c in kept],
            "usage": self.group.usage(),
        }

    def _ranked(self) -> list[tuple[int, _Choice]]:
        plan = self.plan
        out = []
        for prompt in range(len(self.prompt_ids)):
            mine = sorted((c for (p, _), c in self.choices.items() if p == prompt),
                          key=lambda c: c.engine_index)
            if plan.best_of is not None:
                mine = sorted(mine, key=lambda c: -c.cumulative)[: plan.n]
            out += [(prompt * plan.n + rank, c) for rank, c in enumerate(mine)]
        return out

    def _collected_choice(self, c: _Choice, index: int) -> dict[str, Any]:
        text = "".join(c.parts)
        plan = self.plan
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            reason = c.finish_reason
            if plan.tool_format is not None:
                parsed = parse_tool_calls(plan.tool_format, text)
                if not plan.parallel_tool_calls:
                    parsed.calls = parsed.calls[:1]
                if parsed.calls:
                    message["content"] = parsed.content or None
                    message["tool_calls"] = [
                        {"id": call.id, "type": "function",
                         "function": {"name": call.name, "arguments": call.arguments}}
                        for call in parsed.calls
                    ]
                    if reason == "stop":
                        reason = "tool_calls"
            logprobs = None
            if plan.logprobs is not None:
                logprobs = {"content": chat_entries(self.texts, c.entries, plan.logprobs),
                            "refusal": None}
            return {"index": index, "message": message, "logprobs": logprobs,
                    "finish_reason": reason}
        logprobs = None
        if c.completion_lp is not None:
            if plan.echo:
                c.completion_lp.offset = 0
                c.completion_lp.add_prompt(self.prompt_ids[c.prompt], c.prompt_entries or [])
                c.completion_lp.offset = len(self.prompt_texts[c.prompt])
            c.completion_lp.add(c.entries)
            logprobs = c.completion_lp.body()
        if plan.echo:
            text = self.prompt_texts[c.prompt] + text
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": c.finish_reason}

    # -- streamed ------------------------------------------------------------------------

    async def events(self, include_usage: bool) -> AsyncIterator[bytes]:
        base: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created, "model": self.model, "system_fingerprint": None,
        }
        if include_usage:
            base["usage"] = None  # OpenAI sends "usage": null on every chunk but the last
        templates: dict[int, tuple[bytes, bytes]] = {}

        def chunk(choice: dict[str, Any]) -> bytes:
            return sse({**base, "choices": [choice]})

        def text_chunk(index: int, text: str) -> bytes:
            # A plain text chunk differs from the next only in its text: serialise the rest
            # once per choice (the per-token JSON was ~6 of ~30 us per token on the loop).
            tpl = templates.get(index)
            if tpl is None:
                tpl = templates[index] = text_template(base, index, self.chat)
            return tpl[0] + dumps(text) + tpl[1]

        try:
            async for prompt, out in self.group.outputs():
                c = self._choice(prompt, out)
                if self.chat:
                    for event in self._chat_events(c, out, chunk, text_chunk):
                        yield event
                else:
                    for event in self._completion_events(c, out, chunk, text_chunk):
                        yield event
            failure = self.group.failure()
            if failure is not None:
                logger.warning("request %s ended with an error: %s", self.request_id,
                               failure.message)
                yield sse(failure.body())
            elif include_usage:
                yield sse({**base, "choices": [], "usage": self.group.usage()})
        except Exception as exc:
            # A bug here must not cut the stream mid-way without a word: tell the client.
            logger.exception("request %s: stream failed", self.request_id)
            yield sse(error_body(f"internal error while streaming: {exc}", "server_error",
                                 code="internal_error"))
        yield b"data: [DONE]\n\n"

    def _chat_events(self, c: _Choice, out: RequestOutput, chunk, text_chunk):
        plan = self.plan
        if not c.started:
            c.started = True
            yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None})
        final = out.finished and out.finish_reason in ("stop", "length")
        lp = None
        if plan.logprobs is not None and out.logprobs:
            lp = {"content": chat_entries(self.texts, out.logprobs, plan.logprobs),
                  "refusal": None}
        if c.parser is not None:
            deltas = c.parser.feed(out.text) if out.text else []
            if out.finished:
                deltas += c.parser.finish()
            content = "".join(d["content"] for d in deltas if "content" in d)
            if content or lp:
                yield chunk({"index": c.index, "delta": {"content": content}, "logprobs": lp,
                             "finish_reason": None})
            for d in deltas:
                if "tool_call" in d and (plan.parallel_tool_calls or d["tool_call"]["index"] == 0):
                    yield chunk({"index": c.index, "delta": {"tool_calls": [d["tool_call"]]},
                                 "logprobs": None, "finish_reason": None})
        elif lp is not None:
            yield chunk({"index": c.index, "delta": {"content": out.text}, "logprobs": lp,
                         "finish_reason": None})
        elif out.text:
            yield text_chunk(c.index, out.text)
        if final:
            reason = out.finish_reason
            if c.parser is not None and c.parser.calls and reason == "stop":
                reason = "tool_calls"
            yield chunk({"index": c.index, "delta": {}, "logprobs": None,
                         "finish_reason": reason})

    def _completion_events(self, c: _Choice, out: RequestOutput, chunk, text_chunk):
        plan = self.plan
        lp_state = c.completion_lp
        if not c.started:
            c.started = True
            if plan.echo:
                echo_lp = None
                if lp_state is not None:
                    lp_state.offset = 0
                    echo_lp = lp_state.add_prompt(self.prompt_ids[c.prompt],
                                                  out.prompt_logprobs or [])
                    lp_state.offset = len(self.prompt_texts[c.prompt])
                yield chunk({"index": c.index, "text": self.prompt_texts[c.prompt],
                             "logprobs": echo_lp, "finish_reason": None})
        final = out.finished and out.finish_reason in ("stop", "length")
        lp = lp_state.add(out.logprobs or []) if lp_state is not None else None
        if final or lp is not None and (out.text or lp["tokens"]):
            yield chunk({"index": c.index, "text": out.text, "logprobs": lp,
                         "finish_reason": out.finish_reason if final else None})
        elif out.text:
            yield text_chunk(c.index, out.text)


async def collect_answer(receive: Receive, answer: Answer) -> dict[str, Any]:
    """The collected body; raise ClientGone (every stream aborted) if the client leaves."""
    try:
        gone, outcome = await race_disconnect(receive, answer.collect())
    finally:
        answer.group.close()
    if gone:
        raise ClientGone
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
