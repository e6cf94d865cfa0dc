"""The gateway's shared state (:class:`Gateway`) and the helpers of its HTTP handlers."""

from __future__ import annotations

import datetime
import logging
import math
import weakref
from typing import Any

import attrs
import trio
from quart import request

from c2lcore import Config
from orchestrator import Orchestrator, Session

from ._audit import audit
from ._auth import Authenticator, AuthError, DevIssuer, Principal, bearer_token
from ._direct import DirectRoutes, make_direct_routes
from ._errors import ApiError, CreationRateLimited
from ._limits import MAX_BODY_BYTES as MAX_BODY_BYTES
from ._limits import MAX_HEAD_BYTES as MAX_HEAD_BYTES
from ._limits import MAX_HEADER_BYTES as MAX_HEADER_BYTES
from ._limits import MAX_REQUEST_HEADERS as MAX_REQUEST_HEADERS
from ._limits import (
    SESSION_CREATE_BURST,
    SESSION_CREATE_PERIOD_S,
    USER_FRAME_BURST,
    USER_FRAME_RATE,
    TokenBucket,
)
from ._metrics import Metrics
from ._traffic import Traffic
from ._upstream import SLOW_HTTP_CLIENT_S, HttpUpstream

log = logging.getLogger("c2l.gateway")

#: How long an HTTP client of /api/ollama waits for the desktop to start answering.
FIRST_BYTE_TIMEOUT_S = 120.0


@attrs.define
class Gateway:
    """State shared by the gateway's handlers."""

    config: Config
    orchestrator: Orchestrator
    auth: Authenticator
    dev_issuer: DevIssuer | None
    session_create_burst: int = SESSION_CREATE_BURST
    session_create_period_s: float = SESSION_CREATE_PERIOD_S
    #: user hash -> that user's session-creation budget (forgotten once full again)
    _create_budget: dict[str, TokenBucket] = attrs.field(factory=dict)
    #: Prometheus metrics (GET /metrics); also, with the audit trail, the orchestrator's
    #: session observer.
    metrics: Metrics = attrs.field(factory=Metrics)
    #: (user hash, desktop name) -> that desktop's newest agent connection (``gateway._ws``):
    #: a newer one of the same name replaces it (close 4001), so two agents of one desktop
    #: never take turns; desktops of other names stay connected side by side.
    bridges: dict[tuple[str, str], Any] = attrs.field(factory=dict)
    #: Frames per second that one user's connections may send together (a token bucket):
    #: beyond it the gateway reads that user's sockets more slowly, so one user's flood
    #: costs the others little (backpressure, not errors).
    user_frame_rate: float = USER_FRAME_RATE
    user_frame_burst: float = USER_FRAME_BURST
    #: user hash -> that user's frame budget, while any of their connections holds it
    frame_budgets: weakref.WeakValueDictionary[str, TokenBucket] = attrs.field(
        factory=weakref.WeakValueDictionary
    )
    #: How long the shared HTTP upstream waits for one HTTP client that reads nothing
    #: before it drops that client's request (cancelled on the desktop).
    slow_http_client_s: float = SLOW_HTTP_CLIENT_S
    #: session id -> the session's shared proxy connection for its HTTP requests
    _http: dict[str, HttpUpstream] = attrs.field(factory=dict)
    #: Users' tunnel registrations and the calls through them (DESIGN.md section 5).
    direct: DirectRoutes = attrs.field()
    #: The audit trail's key when the deployment shares one (Kubernetes: a Secret every
    #: replica reads); None: the key file beside the dev key.
    audit_key: bytes | None = attrs.field(default=None, repr=False)

    @direct.default
    def _direct_routes(self) -> DirectRoutes:
        return make_direct_routes(
            self.config.direct_key_path,
            allow_private=self.config.allow_private_tunnels,
            ttl=self.config.tunnel_ttl,
        )

    def served(self, user_hash: str, route: str) -> None:
        """Count one answer by its route (``/metrics``; a user's route change is audited)."""
        self.metrics.routes.labels(route).inc()
        self.direct.served(user_hash, route)

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
        burst = self.session_create_burst
        bucket = self._create_budget.get(uh)
        if bucket is None:
            bucket = TokenBucket(1 / self.session_create_period_s, float(burst), stamp=now)
            self._create_budget[uh] = bucket
        wait = bucket.try_take(now)
        if wait > 0:
            audit("access_denied", user=uh, reason="session creation rate limit")
            raise CreationRateLimited(
                f"this user started {burst} sessions lately: try again in {math.ceil(wait)} s",
                retry_after=wait,
            )
        if len(self._create_budget) > 10_000:  # forget users whose budget is full again
            for u in [u for u, b in self._create_budget.items() if b.is_full(now)]:
                del self._create_budget[u]

    async def ensure_session(self, principal: Principal) -> Session:
        """The user's live session, made if there is none.

        Starting a new session spends the user's creation budget (429 ``rate_limited``
        when empty); returning the live one does not.
        """
        live = self.orchestrator.get(principal.user_hash)
        if live is None or live.state in ("stopping", "ended"):
            self._take_creation(principal.user_hash)
        return await self.orchestrator.get_or_create(principal.sub)

    async def wait_for_session(self, user_hash: str) -> Session:
        """Wait until the user has a ready session that is not ending (the orchestrator's
        readiness event; another connection or request starts it)."""
        return await self.orchestrator.wait_ready(user_hash)

    def frame_budget(self, user_hash: str) -> TokenBucket:
        """The user's frame budget, shared by all their connections while any holds it."""
        budget = self.frame_budgets.get(user_hash)
        if budget is None:
            budget = TokenBucket(self.user_frame_rate, self.user_frame_burst)
            self.frame_budgets[user_hash] = budget
        return budget

    def http_upstream(self, session: Session) -> HttpUpstream:
        """The session's shared proxy connection for HTTP requests, opened on first use.

        Its task is the session's own (:meth:`Session.start_soon`): it ends with the
        session, before the session's teardown, or when the proxy drops it; a later
        request then opens a new one. Raises :class:`orchestrator.SessionGone` when the
        session is ending.
        """
        upstream = self._http.get(session.id)
        if upstream is None or upstream.closed:
            traffic = Traffic(self.metrics, "http", self.frame_budget(session.user_hash))
            upstream = HttpUpstream(session, traffic, slow_client_s=self.slow_http_client_s)
            session.start_soon(self._run_http_upstream, upstream, name=f"http-{session.id}")
            self._http[session.id] = upstream
        return upstream

    async def _run_http_upstream(self, upstream: HttpUpstream) -> None:
        try:
            await upstream.run()
        finally:
            if self._http.get(upstream.session.id) is upstream:
                del self._http[upstream.session.id]


async def http_principal(gw: Gateway) -> Principal:
    try:
        return await gw.authenticate(
            bearer_token(request.headers.get("Authorization")),
            endpoint=f"{request.method} {request.path}",
            remote=request.remote_addr,
        )
    except AuthError as exc:
        raise ApiError(401, exc.code, exc.message) from None


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
