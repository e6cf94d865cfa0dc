"""The gateway's HTTP errors: :class:`ApiError`, its JSON answer, and the one table that
translates the orchestrator's errors into HTTP statuses and error codes."""

from __future__ import annotations

import json
import math
from typing import Final

from quart import Response

import wire
from orchestrator import (
    OrchestratorError,
    RuntimeUnavailable,
    TooManySessions,
)


class CreationRateLimited(TooManySessions):
    """The user started too many sessions lately; answered 429 ``rate_limited``."""


class ApiError(Exception):
    """An HTTP error answered as ``{"error": code, "message": text}``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(exc: ApiError) -> Response:
    body = json.dumps({"error": exc.code, "message": exc.message})
    return Response(body, exc.status, exc.headers, mimetype="application/json")


#: Orchestrator errors by class, most specific first: (HTTP status, error code). Any
#: other orchestrator error (a failed start, a shutdown) is the last row's.
_SESSION_ERRORS: Final[tuple[tuple[type[OrchestratorError], int, str], ...]] = (
    (CreationRateLimited, 429, "rate_limited"),
    (TooManySessions, 429, "too_many_sessions"),
    (RuntimeUnavailable, 503, "runtime_unavailable"),
    (OrchestratorError, 503, wire.ErrorCode.PROXY_UNAVAILABLE),
)


def session_error(exc: OrchestratorError) -> ApiError:
    """The HTTP error that answers ``exc`` (429s say when to retry)."""
    status, code = next((s, c) for kind, s, c in _SESSION_ERRORS if isinstance(exc, kind))
    headers = None
    if isinstance(exc, TooManySessions):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return ApiError(status, code, str(exc), headers)
