"""State and helpers shared by the gateway's handlers: errors, sessions, upstreams."""

from __future__ import annotations

import datetime
import json
import logging
import math
from typing import Any

import attrs
import trio
import trio_websocket
from quart import Response, request

import wire
from c2l import Config
from orchestrator import (
    Orchestrator,
    OrchestratorError,
    RuntimeUnavailable,
    Session,
    SessionStartError,
    TooManySessions,
)
from proxy import SECRET_HEADER

from ._auth import Authenticator, AuthError, DevIssuer, Principal, bearer_token

log = logging.getLogger("c2l.gateway")

#: Largest HTTP request body accepted (413 beyond).
MAX_BODY_BYTES = 1024 * 1024
#: How long an HTTP client of /api/ollama waits for the desktop to start answering.
FIRST_BYTE_TIMEOUT_S = 120.0
PROXY_CONNECT_TIMEOUT_S = 10.0


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


def session_error(exc: OrchestratorError) -> ApiError:
    if isinstance(exc, TooManySessions):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return ApiError(429, "too_many_sessions", str(exc), {"Retry-After": retry})
    if isinstance(exc, RuntimeUnavailable):
        return ApiError(503, "runtime_unavailable", str(exc))
    if isinstance(exc, SessionStartError):
        return ApiError(503, wire.ErrorCode.PROXY_UNAVAILABLE, str(exc))
    return ApiError(503, wire.ErrorCode.PROXY_UNAVAILABLE, str(exc))


@attrs.define
class Gateway:
    """State shared by the gateway's handlers."""

    config: Config
    orchestrator: Orchestrator
    auth: Authenticator
    dev_issuer: DevIssuer | None
    #: Owns tasks that outlive one handler call (HTTP tunnels feeding streamed bodies).
    nursery: trio.Nursery
    #: user hash -> event set when a new session of that user is ready (wakes parked agents)
    _new_session: dict[str, trio.Event] = attrs.field(factory=dict)

    async def authenticate(self, token: str | None) -> Principal:
        """The principal of ``token`` or :class:`AuthError`."""
        if token is None:
            raise AuthError("missing_token", "send Authorization: Bearer <token>")
        try:
            return await self.auth.verify(token)
        except AuthError as exc:
            log.info("authentication failed: %s", exc.code)
            raise

    async def ensure_session(self, principal: Principal) -> Session:
        """The user's live session, made if there is none; wakes the user's parked agent."""
        session = await self.orchestrator.get_or_create(principal.sub)
        event = self._new_session.pop(principal.user_hash, None)
        if event is not None:
            event.set()
        return session

    async def wait_for_session(self, user_hash: str) -> Session:
        """Wait until the user has a ready session (another connection creates it)."""
        while True:
            session = self.orchestrator.get(user_hash)
            if session is not None and session.state == "ready":
                return session
            event = self._new_session.setdefault(user_hash, trio.Event())
            with trio.move_on_after(5):  # also re-check now and then: nothing waits forever
                await event.wait()


async def http_principal(gw: Gateway) -> Principal:
    try:
        return await gw.authenticate(bearer_token(request.headers.get("Authorization")))
    except AuthError as exc:
        raise ApiError(401, exc.code, exc.message) from None


def endpoints(session: Session) -> dict[str, Any]:
    secure = request.scheme in ("https", "wss")
    base = f"{'wss' if secure else 'ws'}://{request.host}"
    return {
        "sessionId": session.id,
        "endpoint": f"{base}/ws/stream",
        "bridgeEndpoint": f"{base}/ws/bridge",
        "state": session.state,
        "createdAt": _iso(session.created),
    }


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat()


def open_upstream(session: Session, side: str) -> Any:
    """An ``async with`` WebSocket to the session's proxy, presenting the session secret."""
    if session.port is None:
        raise OSError("the session's proxy has no port yet")
    return trio_websocket.open_websocket(
        session.host,
        session.port,
        f"/ws/{side}",
        use_ssl=False,
        extra_headers=[(SECRET_HEADER.encode(), session.secret.encode())],
        max_message_size=wire.MAX_FRAME_BYTES + 1024,
        connect_timeout=PROXY_CONNECT_TIMEOUT_S,
        disconnect_timeout=2,
    )
