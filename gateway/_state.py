"""State and helpers shared by the gateway's handlers: errors, sessions, upstreams."""

from __future__ import annotations

import datetime
import json
import logging
import math
import weakref
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

from ._audit import audit
from ._auth import Authenticator, AuthError, DevIssuer, Principal, bearer_token
from ._metrics import Metrics

log = logging.getLogger("c2l.gateway")

#: Largest HTTP request body accepted (413 beyond).
MAX_BODY_BYTES = 1024 * 1024
#: How long an HTTP client of /api/ollama waits for the desktop to start answering.
FIRST_BYTE_TIMEOUT_S = 120.0
PROXY_CONNECT_TIMEOUT_S = 10.0
#: Most request headers, and the longest header (name + value), of an HTTP request or
#: WebSocket upgrade; Hypercorn caps the whole head at ``MAX_HEAD_BYTES`` before that.
MAX_REQUEST_HEADERS = 100
MAX_HEADER_BYTES = 8 * 1024
MAX_HEAD_BYTES = 64 * 1024
#: New sessions a user may start: a burst of ``SESSION_CREATE_BURST``, refilled at one per
#: ``SESSION_CREATE_PERIOD_S`` seconds (a token bucket). Returning the live session is free.
SESSION_CREATE_BURST = 10
SESSION_CREATE_PERIOD_S = 6.0
#: Frames per second read from one user's WebSockets together (all sides), and the burst
#: above that rate (about 1,000 streamed chunks a second per user leaves room for the
#: others; a flood of tens of thousands is read at this pace).
USER_FRAME_RATE = 2000.0
USER_FRAME_BURST = 2000.0


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


def session_error(exc: OrchestratorError) -> ApiError:
    if isinstance(exc, CreationRateLimited):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return ApiError(429, "rate_limited", str(exc), {"Retry-After": retry})
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
    session_create_burst: int = SESSION_CREATE_BURST
    session_create_period_s: float = SESSION_CREATE_PERIOD_S
    #: user hash -> (tokens left, trio time of the last update): session-creation budget
    _create_budget: dict[str, tuple[float, float]] = attrs.field(factory=dict)
    #: ids of the sessions whose end is being watched for the audit trail
    _audited: set[str] = attrs.field(factory=set)
    #: Prometheus metrics (GET /metrics); also the orchestrator's session observer.
    metrics: Metrics = attrs.field(factory=Metrics)
    #: user hash -> the user's newest desktop-agent connection (``gateway._ws``): a newer
    #: one replaces it (close 4001), so two agents of one user never take turns.
    bridges: dict[str, Any] = attrs.field(factory=dict)
    #: Frames per second that one user's connections may send together (a token bucket,
    #: ``gateway._ws.FrameBudget``): beyond it the gateway reads that user's sockets more
    #: slowly, so one user's flood costs the others little (backpressure, not errors).
    user_frame_rate: float = USER_FRAME_RATE
    user_frame_burst: float = USER_FRAME_BURST
    #: user hash -> that user's budget, while any of their connections holds it
    frame_budgets: weakref.WeakValueDictionary[str, Any] = attrs.field(
        factory=weakref.WeakValueDictionary
    )

    async def authenticate(
        self, token: str | None, *, endpoint: str = "", remote: str | None = None
    ) -> Principal:
        """The principal of ``token`` or :class:`AuthError` (audited, without the token)."""
        try:
            if token is None:
                raise AuthError("missing_token", "send Authorization: Bearer <token>")
            return await self.auth.verify(token)
        except AuthError as exc:
            audit("auth_failed", code=exc.code, endpoint=endpoint, remote=remote)
            self.metrics.auth_failures.labels(exc.code).inc()
            raise

    def _take_creation(self, uh: str) -> None:
        """Spend one of the user's session creations, or raise :class:`CreationRateLimited`."""
        now = trio.current_time()
        burst, period = self.session_create_burst, self.session_create_period_s
        tokens, last = self._create_budget.get(uh, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) / period)
        if tokens < 1:
            wait = (1 - tokens) * period
            audit("access_denied", user=uh, reason="session creation rate limit")
            raise CreationRateLimited(
                f"this user started {burst} sessions lately: try again in {math.ceil(wait)} s",
                retry_after=wait,
            )
        self._create_budget[uh] = (tokens - 1, now)
        if len(self._create_budget) > 10_000:  # forget users whose budget is full again
            full = [
                u for u, (t, at) in self._create_budget.items() if t + (now - at) / period >= burst
            ]
            for u in full:
                del self._create_budget[u]

    async def ensure_session(self, principal: Principal) -> Session:
        """The user's live session, made if there is none; wakes the user's parked agent.

        Starting a new session spends the user's creation budget (429 ``rate_limited``
        when empty); returning the live one does not.
        """
        live = self.orchestrator.get(principal.user_hash)
        if live is None or live.state in ("stopping", "ended"):
            self._take_creation(principal.user_hash)
        session = await self.orchestrator.get_or_create(principal.sub)
        if session.id not in self._audited:
            self._audited.add(session.id)
            audit("session_created", user=principal.user_hash, session=session.id)
            self.nursery.start_soon(self._audit_end, session)
        event = self._new_session.pop(principal.user_hash, None)
        if event is not None:
            event.set()
        return session

    async def _audit_end(self, session: Session) -> None:
        try:
            await session.ended.wait()
        finally:
            self._audited.discard(session.id)
            reason = session.end_reason or "gateway stopped"
            audit("session_destroyed", user=session.user_hash, session=session.id, reason=reason)

    async def wait_for_session(self, user_hash: str) -> Session:
        """Wait until the user has a ready session that is not ending.

        Another connection creates it: every session is made by :meth:`ensure_session`,
        which sets the user's event once its session is ready, so this waits on that
        event alone, without re-checking on a timer.
        """
        while True:
            session = self.orchestrator.get(user_hash)
            if session is not None and session.state == "ready" and session.end_reason is None:
                return session
            event = self._new_session.setdefault(user_hash, trio.Event())
            try:
                await event.wait()
            finally:
                # the last waiter of a user gone: forget the event (no waiting list grows)
                idle = not event.statistics().tasks_waiting and not event.is_set()
                if idle and self._new_session.get(user_hash) is event:
                    del self._new_session[user_hash]


async def http_principal(gw: Gateway) -> Principal:
    try:
        return await gw.authenticate(
            bearer_token(request.headers.get("Authorization")),
            endpoint=f"{request.method} {request.path}",
            remote=request.remote_addr,
        )
    except AuthError as exc:
        raise ApiError(401, exc.code, exc.message) from None


def check_header_limits(headers: Any) -> None:
    """Raise ApiError 431 when a request has too many headers or one that is too long."""
    items = list(headers.items())  # werkzeug Headers: every pair, repeats included
    if len(items) > MAX_REQUEST_HEADERS:
        raise ApiError(431, "headers_too_large", f"more than {MAX_REQUEST_HEADERS} request headers")
    for name, value in items:
        if len(name) + len(value) > MAX_HEADER_BYTES:
            raise ApiError(
                431,
                "headers_too_large",
                f"header {name[:40]!r} is over {MAX_HEADER_BYTES} bytes",
            )


async def check_request_limits() -> None:
    """``before_request`` hook: header limits, and a declared body over the limit (413)."""
    check_header_limits(request.headers)
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"request body over {MAX_BODY_BYTES} bytes")


def public_base(public_url: str | None) -> str:
    """The HTTP base URL clients use: C2L_PUBLIC_URL, else the one of this request's Host."""
    if public_url:
        return public_url
    secure = request.scheme in ("https", "wss")
    return f"{'https' if secure else 'http'}://{request.host}"


def websocket_base(public_url: str | None) -> str:
    """:func:`public_base` with the WebSocket scheme (``wss`` behind TLS, else ``ws``)."""
    base = public_base(public_url)
    return "wss" + base[5:] if base.startswith("https:") else "ws" + base[4:]


def endpoints(session: Session, public_url: str | None = None) -> dict[str, Any]:
    """The session API's answer: ids and the absolute WebSocket URLs of both sides."""
    base = websocket_base(public_url)
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
