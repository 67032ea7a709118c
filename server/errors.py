"""The typed errors that cross module boundaries, in one place.

Torch-free and FastAPI-free: the HTTP layer imports this before the model stack exists.

* Submission errors (`EngineError` and subclasses) are raised by `engine.add_request` before
  anything is queued; the HTTP layer maps them to 400 / 429 / 503.
* Startup errors (`StartupError`, `ModelLoadError`) end the engine's startup; their message is
  shown on `/health/ready` and in the pod log, so it names what an operator has to change.
* `FatalEngineError` ends a running engine: something the engine cannot step past (a
  tensor-parallel rank died, or the ranks can no longer be kept in the same step). The engine
  fails every request and reports `failed`, and the server exits non-zero.
* `GrammarError`: a schema or grammar that cannot be enforced (`server.structured`); the HTTP
  layer answers 400 naming the parameter it came from, the engine fails only that request.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of the errors the engine raises at a request's submission."""


class InvalidRequestError(EngineError, ValueError):
    """The request can never be served as given (maps to HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFullError(EngineError):
    """The waiting queue is at `--max-queue`; the client should retry later (HTTP 429)."""


class EngineNotReadyError(EngineError):
    """The engine is still starting, draining or has failed (HTTP 503)."""


class StartupError(RuntimeError):
    """The engine cannot start with this configuration (message says why)."""


class ModelLoadError(StartupError):
    """The model directory cannot be served; the message names the path and the problem."""


class FatalEngineError(RuntimeError):
    """The engine cannot go on serving; unlike a failing step, nothing is retried.

    Raised on the engine thread, e.g. when a tensor-parallel peer dies, misses an agreement's
    deadline or answers out of turn: the ranks' collectives would no longer pair up, so any
    further step could hang or mix up tensors. The message names the rank and what happened.
    """


class GrammarError(ValueError):
    """A JSON schema or grammar llguidance cannot compile; the message says why."""
