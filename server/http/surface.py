"""The OpenAI request fields beyond plain sampling, turned into engine settings and into the
plan of the answer: n / best_of, penalties, logit_bias, min_tokens, logprobs, echo,
response_format and tools.

Every field OpenAI accepts is honoured here or refused with a 400 naming it (`suffix` in
`http.sampling_params`); `user` is accepted and unused (it changes no output).
Event-loop thread; grammars are built and validated here (cached by their text), so a bad
schema is a 400 before anything is queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.http.errors import ApiError
from server.http.prompts import vocab_size
from server.http.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.request import LOGIT_BIAS_LIMIT
from server.structured.grammar import (
    GrammarError,
    check_grammar,
    json_object_grammar,
    json_schema_grammar,
)
from server.structured.tool_calls import ToolFormat, auto_grammar, detect_format, tool_grammar


@dataclass
class Plan:
    """What the engine is asked for (`engine_params`) and how its outputs are answered."""

    engine_params: dict[str, Any]
    n: int = 1  # choices returned per prompt
    best_of: int | None = None  # generated per prompt when more than n (ranked, not streamed)
    logprobs: int | None = None  # alternatives returned per token (None: no logprobs)
    echo: bool = False
    tool_format: ToolFormat | None = None  # parse tool calls out of the output
    tools: list[dict[str, Any]] | None = None  # rendered through the chat template
    parallel_tool_calls: bool = True  # False: at most one call per choice is returned

    @property
    def generated(self) -> int:
        return self.best_of or self.n


def plan_request(engine: Any, body: SamplingFields) -> Plan:
    """Validate the extra fields of `body` and build its `Plan` (ApiError 400)."""
    extra: dict[str, Any] = {}
    plan = Plan(extra, n=body.n)
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens"):
        value = getattr(body, name)
        if value is not None:
            extra[name] = value
    if body.logit_bias:
        extra["logit_bias"] = _logit_bias(engine, body.logit_bias)
    if isinstance(body, CompletionRequest):
        _plan_completion(body, plan, extra)
    elif isinstance(body, ChatCompletionRequest):
        _plan_chat(engine, body, plan, extra)
    extra["n"] = plan.generated
    return plan


def _plan_completion(body: CompletionRequest, plan: Plan, extra: dict[str, Any]) -> None:
    if body.best_of is not None and body.best_of > body.n:
        plan.best_of = body.best_of
    plan.echo = body.echo
    plan.logprobs = body.logprobs
    if body.logprobs is not None:
        extra["logprobs"] = body.logprobs
        if body.echo:
            extra["prompt_logprobs"] = body.logprobs
    elif plan.best_of is not None:
        extra["logprobs"] = 0  # ranking needs each choice's cumulative logprob
    if body.echo and body.max_tokens == 0 and body.logprobs is None:
        # Nothing to compute: the engine still scores the prompt, which costs one prefill.
        extra["prompt_logprobs"] = 0


def _plan_chat(engine: Any, body: ChatCompletionRequest, plan: Plan,
               extra: dict[str, Any]) -> None:
    if body.logprobs:
        plan.logprobs = body.top_logprobs or 0
        extra["logprobs"] = plan.logprobs
    grammar = _response_format_grammar(body)
    choice = body.tool_choice
    if body.tools and choice != "none":
        fmt = detect_format(getattr(engine.tokenizer, "chat_template", None), engine.tokenizer)
        if fmt is None:
            raise ApiError(400, "tools: this model's chat template does not render tools in a "
                           "format graphserve can parse (Hermes/Qwen <tool_call>, Llama 3 JSON, "
                           "Mistral [TOOL_CALLS]).", param="tools",
                           code="unsupported_parameter")
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
        plan.tools, plan.tool_format = tools, fmt
        # auto mode cannot stop a model from writing two calls; the answer keeps the first
        plan.parallel_tool_calls = body.parallel_tool_calls is not False
        extra["skip_special_tokens"] = False  # a call marker may be a special token
        forced = tools
        if not isinstance(choice, str) and choice is not None:
            forced = [t for t in tools if t["function"]["name"] == choice.function.name]
            if not forced:
                raise ApiError(400, f"tool_choice names '{choice.function.name}', which is not "
                               "in tools.", param="tool_choice")
        if choice == "required" or forced is not tools:
            if grammar is not None:
                raise ApiError(400, "response_format cannot be combined with a forced "
                               "tool_choice.", param="response_format")
            parallel = body.parallel_tool_calls is not False and forced is tools
            try:
                grammar = tool_grammar(fmt, forced, parallel=parallel)
            except GrammarError as exc:
                raise ApiError(400, f"tools: a function's parameters cannot be enforced: {exc}",
                               param="tools") from None
        elif any(t["function"].get("strict") for t in tools):
            # auto with strict tools: calls must match their schemas, so the whole answer is
            # constrained (text that opens no call, or calls only).
            if grammar is not None:
                raise ApiError(400, "response_format cannot be combined with strict tools.",
                               param="response_format")
            try:
                grammar = auto_grammar(fmt, tools, parallel=plan.parallel_tool_calls)
            except GrammarError as exc:
                raise ApiError(400, f"tools: a function's parameters cannot be enforced: {exc}",
                               param="tools") from None
    elif not body.tools and choice is not None and choice not in ("none", "auto"):
        raise ApiError(400, "tool_choice needs tools.", param="tool_choice")
    if grammar is not None:
        extra["grammar"] = grammar


def _response_format_grammar(body: ChatCompletionRequest) -> str | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    try:
        if fmt.type == "json_object":
            return check_grammar(json_object_grammar())
        if fmt.json_schema is None:
            raise ApiError(400, "response_format json_schema needs a json_schema object.",
                           param="response_format.json_schema")
        schema = fmt.json_schema.schema_ or {"type": "object"}
        return check_grammar(json_schema_grammar(schema))
    except GrammarError as exc:
        raise ApiError(400, f"response_format: the schema cannot be enforced: {exc}",
                       param="response_format") from None


def _logit_bias(engine: Any, bias: dict[str, float]) -> dict[int, float]:
    vocab = vocab_size(engine)
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if token < 0 or (vocab is not None and token >= vocab) or not key.strip().isdigit():
            raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model "
                           f"(0..{(vocab or 1) - 1}).", param="logit_bias")
        # OpenAI clamps rather than refuses; -100 / 100 ban or force a token in practice.
        out[token] = max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(value)))
    return out
