"""The OpenAPI document: error answers per route, no 422 (validation errors are 400 here), and
the schema of each server-sent event of the streamed endpoints."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from server.http.schemas import ChatCompletionChunk, CompletionChunk, ErrorResponse


def error_docs(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Invalid request",
        401: "Missing or wrong API key",
        404: "Unknown model",
        429: "Queue full; retry after `Retry-After` seconds",
        500: "Engine fault while generating",
        503: "Not ready (starting, draining or failed); see `Retry-After`",
    }
    return {c: {"model": ErrorResponse, "description": text[c]} for c in codes}


# Placeholder: customize_openapi replaces it with the per-event schema of each endpoint.
STREAM_DOC = {"text/event-stream": {}}
STREAM_CHUNKS = {"/v1/completions": CompletionChunk,
                 "/v1/chat/completions": ChatCompletionChunk}


def _sse_event_schema(chunk: str) -> dict[str, Any]:
    """OpenAPI 3.1 schema of one SSE event: `data` is a JSON chunk, an error, or `[DONE]`."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"const": "message"},
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "then": {},
                "else": {"contentMediaType": "application/json", "contentSchema": payload},
            },
        },
    }


def customize_openapi(app: FastAPI) -> None:
    """Drop FastAPI's 422 answers (validation errors are 400 here) and describe SSE events."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for op in path.values():
                if isinstance(op, dict):
                    op.get("responses", {}).pop("422", None)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.pop("HTTPValidationError", None)
        comps.pop("ValidationError", None)
        # Streamed answers: document each SSE event (FastAPI knows only the JSON body).
        _, defs = models_json_schema(
            [(m, "serialization") for m in (*STREAM_CHUNKS.values(), ErrorResponse)],
            ref_template="#/components/schemas/{model}",
        )
        for name, definition in defs.get("$defs", {}).items():
            comps.setdefault(name, definition)
        for path, chunk in STREAM_CHUNKS.items():
            op = schema["paths"].get(path, {}).get("post")
            if op is not None:
                content = op["responses"]["200"].setdefault("content", {})
                content["text/event-stream"] = {"schema": _sse_event_schema(chunk.__name__)}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
