"""The FastAPI app: OpenAI-compatible routes, health routes, metrics.

The app never touches torch. A request reads top-down: `http.middleware` gates `/v1` on the
API key and readiness; the route validates the body (`http.schemas`), turns it into token ids
(`http.prompts`) and `SamplingParams` (`http.sampling_params`), submits it through
`http.state.ServerState` to the engine, and relays the engine's increments as one JSON body or
as server-sent events (`http.streaming`). The engine is created in the background after the
socket is serving (importing `server.engine`'s model runner pulls in torch), so `/health`
answers from the first moment; `/v1/*` answers 503 until the engine reports `ready`.

Every error a client can cause is a 4xx with OpenAI's `{"error": {message, type, param, code}}`
body; FastAPI's 422 validation answer is replaced by that shape with status 400.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from server import __version__
from server.config import ServerConfig
from server.health import Lifecycle, graphs_body
from server.http.body_guard import BodyGuard
from server.http.error_handlers import install_error_handlers
from server.http.errors import ApiError
from server.http.limits import MAX_NAME_CHARS
from server.http.logprobs import TokenTexts
from server.http.middleware import V1Middleware
from server.http.openapi import STREAM_DOC, customize_openapi, error_docs
from server.http.prompts import Room, conversation, encode_chat, encode_text, select_prompts
from server.http.relay import Answer, GenerationGroup, collect_answer
from server.http.responses import JSONBody
from server.http.sampling_params import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    check_stop_ids,
    check_stop_limits,
    max_tokens_for,
    refuse_unsupported,
    sampling_params,
    stop_strings,
)
from server.http.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingFields,
)
from server.http.state import DEFAULT_ENGINE_CLASS, ServerState
from server.http.streaming import ClientGone, EventStreamResponse
from server.http.surface import plan_request
from server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE


def create_app(
    config: ServerConfig | None = None,
    *,
    engine_factory: Callable[..., Any] | None = None,
    engine_class: str = DEFAULT_ENGINE_CLASS,
    lifecycle: Lifecycle | None = None,
    on_exit: Callable[[int], None] | None = None,
) -> FastAPI:
    """Build the app. `engine_factory(engine_config, on_phase=cb)` overrides `engine_class`
    (a 'module:Name' imported in the background); `on_exit(code)` asks the process to exit."""
    config = config or ServerConfig()
    state = ServerState(config, lifecycle=lifecycle, engine_factory=engine_factory,
                        engine_class=engine_class, on_exit=on_exit)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(
        title="graphserve",
        version=__version__,
        description="OpenAI-compatible LLM server with graph-aware readiness.",
        lifespan=lifespan,
        default_response_class=JSONBody,
    )
    app.state.graphserve = state
    # Added first, so it runs inside V1Middleware: bodies are read only once auth and
    # readiness have passed.
    app.add_middleware(BodyGuard, state=state)
    app.add_middleware(V1Middleware, state=state)
    install_error_handlers(app)
    _add_health_routes(app, state)
    _add_v1_routes(app, state)
    customize_openapi(app)
    return app


def _add_health_routes(app: FastAPI, state: ServerState) -> None:
    lifecycle = state.lifecycle
    health_doc = {503: {"description": "The server failed to start"}}

    @app.head("/health", include_in_schema=False)  # HEAD probes: same answer, no body
    @app.get("/health", tags=["health"], responses=health_doc,
             summary="Liveness: 200 unless startup failed")
    async def health() -> Response:
        status, body = lifecycle.liveness()
        return JSONBody(body, status_code=status)

    @app.head("/health/ready", include_in_schema=False)  # HEAD probes: same answer, no body
    @app.get("/health/ready", tags=["health"],
             responses={503: {"description": "Not ready: the body names the phase"}},
             summary="Readiness: 200 once the largest decode graph is captured")
    async def ready() -> Response:
        status, body = lifecycle.readiness()
        return JSONBody(body, status_code=status)

    @app.head("/health/graphs", include_in_schema=False)  # HEAD probes: same answer, no body
    @app.get("/health/graphs", tags=["health"], summary="CUDA graph capture report")
    def graphs() -> Response:
        # A plain function, so FastAPI runs it on its thread pool: with the engine in its own
        # process the report is a round trip (server.engine_process), never the loop's wait.
        return JSONBody(graphs_body(lifecycle, state.engine))

    @app.head("/metrics", include_in_schema=False)  # HEAD probes: same answer, no body
    @app.get("/metrics", tags=["health"], summary="Prometheus metrics",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    def metrics() -> Response:  # on the thread pool too: it reads the engine's stats
        return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


_GENERATION_DOCS = {200: {"content": STREAM_DOC}, **error_docs(400, 401, 404, 429, 500, 503)}


def _add_v1_routes(app: FastAPI, state: ServerState) -> None:
    created = int(time.time())  # the card's creation time: this app's, the same in every answer

    def card() -> dict:
        engine = state.engine
        return {"id": engine.model_name, "object": "model", "created": created,
                "owned_by": "graphserve", "max_model_len": engine.max_model_len}

    @app.get("/v1/models", response_model=ModelList, tags=["openai"],
             responses=error_docs(401, 503))
    async def list_models() -> Response:
        return JSONBody({"object": "list", "data": [card()]})

    # OpenAI's "retrieve model" (`client.models.retrieve`); `:path` because served names such as
    # `meta-llama/Llama-3.1-8B` contain slashes.
    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, tags=["openai"],
             responses=error_docs(401, 404, 503))
    async def retrieve_model(model_id: str) -> Response:
        _check_model(state.engine, model_id)
        return JSONBody(card())

    @app.post("/v1/completions", response_model=CompletionResponse, tags=["openai"],
              responses=_GENERATION_DOCS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _generate(state, request, body, chat=False)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["openai"],
              responses=_GENERATION_DOCS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _generate(state, request, body, chat=True)


async def _generate(state: ServerState, request: Request, body: SamplingFields,
                    chat: bool) -> Response:
    """Both generation endpoints: prompts -> params -> submit -> stream or collect.

    One engine request per prompt (batched completions), each generating the plan's choices;
    `http.relay` answers for all of them. The checks that cost nothing come first; rendering
    and tokenisation, whose cost grows with the text, run on a prompt worker
    (`state.prompt_workers`) so the event loop keeps serving meanwhile.
    """
    engine = state.engine
    model = _check_model(engine, body.model)
    refuse_unsupported(body)
    check_stop_limits(stop_strings(body), body.stop_token_ids or [])
    plan = plan_request(engine, body)
    max_len = engine.max_model_len
    if chat:
        if body.max_completion_tokens is not None:
            requested, param = body.max_completion_tokens, "max_completion_tokens"
        else:
            requested, param = body.max_tokens, "max_tokens"
        default, room = None, Room(max_len, requested, param, "messages")
        entries = conversation(body.messages)
        prompts = [await state.prompt_workers.run(encode_chat, engine.tokenizer, entries, room,
                                                  plan.tools)]
        texts = [""]
    else:
        requested, param = body.max_tokens, "max_tokens"
        default, room = COMPLETIONS_DEFAULT_MAX_TOKENS, Room(max_len, requested, param, "prompt")
        prompts = []
        for prompt in select_prompts(engine, body.prompt, room):
            if isinstance(prompt, str):
                prompt = await state.prompt_workers.run(encode_text, engine.tokenizer, prompt,
                                                        room)
            prompts.append(prompt)
        texts = _prompt_texts(engine, body.prompt, prompts) if plan.echo else [""] * len(prompts)
    params = []
    for ids in prompts:
        max_tokens = max_tokens_for(requested, default, len(ids), max_len, param,
                                    room.prompt_param)
        params.append(sampling_params(body, max_tokens, **plan.engine_params))
        check_stop_ids(engine, params[-1])
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    arrival = request.scope.get("state", {}).get("arrival") or time.perf_counter()
    gens = []
    try:
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            gens.append(state.submit(rid, ids, p, arrival))
    except BaseException:
        GenerationGroup(gens).close()  # the prompts already queued are aborted
        raise
    group = GenerationGroup(gens)
    answer = Answer(group, plan, chat=chat, request_id=request_id, model=model,
                    prompt_ids=prompts, prompt_texts=texts, texts=_token_texts(state))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(answer.events(include_usage), group, request_id)
    try:
        result = await collect_answer(request.receive, answer)
    except ClientGone:
        return Response(status_code=499)
    return JSONBody(result, headers={"X-Request-Id": request_id})


def _prompt_texts(engine: Any, prompt: Any, prompts: list[list[int]]) -> list[str]:
    """What `echo` repeats: each prompt as the client sent it (token prompts decoded)."""
    given = prompt if isinstance(prompt, list) and prompt and isinstance(
        prompt[0], (str, list)) else [prompt]
    return [p if isinstance(p, str) else engine.tokenizer.decode(ids, skip_special_tokens=True)
            for p, ids in zip(given, prompts, strict=True)]


def _token_texts(state: ServerState) -> TokenTexts:
    """One token-text cache per engine tokenizer (logprob answers)."""
    tokenizer = state.engine.tokenizer
    cache = getattr(state, "_token_texts", None)
    if cache is None or cache[0] is not tokenizer:
        cache = (tokenizer, TokenTexts(tokenizer))
        state._token_texts = cache
    return cache[1]


def _check_model(engine: Any, name: str | None) -> str:
    served = engine.model_name
    if name is not None and name != served:
        shown = name if len(name) <= MAX_NAME_CHARS else name[:MAX_NAME_CHARS] + "..."
        raise ApiError(404, f"The model '{shown}' does not exist; this server serves "
                       f"'{served}'.", param="model", code="model_not_found")
    return served


__all__ = ["ServerState", "create_app"]
