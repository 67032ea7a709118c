"""The HTTP layer's parts: errors, request/response schemas, prompt building, streaming,
per-request relay, shared server state, middleware and the OpenAPI document.

`server.api` assembles them into the FastAPI app. Nothing here imports torch; `errors` imports
nothing beyond the standard library, because the early health responder shares its rules
before FastAPI is imported.
"""
