"""The WebSocket endpoints: authentication, then one connection object per client.

An authenticated client is one :class:`_Connection` with an explicit state, in the manner
of h11's ``ConnectionState``: ``relaying`` (frames move between the client and the session's
proxy), ``parked`` (a desktop agent between sessions, held with no proxy behind it until the
user's next session starts) and ``closing``. For the connection's whole life one task reads
the client and one heartbeat counts the client's silence, across every change of state
(it pings only a client silent for an interval, so a desktop agent, which pings by itself
more often, is never pinged: one heartbeat per connection); everything else waits on
events (the proxy's frames, the session's end, the user's next session), never on a poll.
Frames are counted and paced by the user's frame budget in ``gateway._traffic``, as the
HTTP tunnel's are.

Close codes say what happened (DESIGN.md section 2). A close of the proxy's that is about
this client (4001 ``replaced``, 4002 ``backlog``, 1009 too big) reaches the client as it
is; a session that ended closes with 1000 (idle, deleted), 1001 (the gateway stops) or
4003 ``session_ended`` (its proxy died or was removed).
"""

from __future__ import annotations

import base64
import contextlib
import enum
import json
import logging
import time
from typing import Final

import attrs
import trio
from quart import websocket

import wire
from desktop import MAX_CHUNK_BYTES, BodySplitter
from orchestrator import (
    OrchestratorError,
    Session,
    ShuttingDown,
)

from ._audit import audit
from ._auth import AuthError, Principal, bearer_token
from ._closes import client_closed_cleanly
from ._direct import Registration, TunnelFailed
from ._errors import ApiError, session_error
from ._limits import check_header_limits
from ._state import Gateway
from ._traffic import Traffic, frame_type
from ._tunnel import FALLBACK_CODES
from ._upstream import CloseReason, ProxyClosed, ProxyLink, ProxyUnreachable, open_upstream

log = logging.getLogger("c2l.gateway")

#: How long a connection waits for the orchestrator to say why a proxy went away (a dying
#: proxy drops its connections before the runtime reports its exit).
END_REASON_WAIT_S: Final = 1.0
#: How long the final error message and close frame may take to reach the client.
CLOSE_TIMEOUT_S: Final = 1.0
#: Most requests of one connection kept for a fall back to the tunnel (the proxy's own
#: limit of open requests per connection is the same).
_MAX_FALLBACK: Final = 256
#: Close codes of the proxy's that concern only the client they close: passed on as they are.
_PASSED_ON: Final = frozenset({wire.CLOSE_REPLACED, wire.CLOSE_BACKLOG, wire.CLOSE_TOO_BIG})


class State(enum.Enum):
    """Where a connection is in its life."""

    RELAYING = "relaying"
    PARKED = "parked"
    CLOSING = "closing"


class FrameTooBig(Exception):
    """A client's text message over ``wire.MAX_FRAME_BYTES`` in UTF-8 bytes."""


async def _send(msg: wire.Message) -> None:
    await websocket.send(wire.encode(msg))


async def _receive() -> str:
    """The client's next frame as text (Quart gives None for an empty frame).

    Hypercorn's limit counts a text message's characters; the contract's limit is in
    bytes, so a text of many-byte characters is measured again here (FrameTooBig).
    """
    frame = await websocket.receive()
    if frame is None:
        return ""
    if isinstance(frame, bytes):
        return frame.decode("utf-8", "replace")
    text = str(frame)
    if (
        len(text) * 4 > wire.MAX_FRAME_BYTES  # else it cannot be too big: at most 4 bytes a char
        and not text.isascii()
        and len(text.encode("utf-8", "surrogatepass")) > wire.MAX_FRAME_BYTES
    ):
        raise FrameTooBig
    return text


async def _close(code: int, reason: str) -> None:
    try:
        await websocket.close(code, reason)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client's connection is gone already: nothing to close
    except RuntimeError as exc:
        if "multiple times" not in str(exc):  # Quart's word for "closed already"
            log.exception("closing a client connection with %d failed", code)
    except Exception:
        log.exception("closing a client connection with %d failed", code)


def _expiry_deadline(principal: Principal) -> float:
    """The trio deadline at which ``principal``'s token expires (inf: no ``exp``)."""
    if principal.expires is None:
        return float("inf")
    return trio.current_time() + (principal.expires - time.time())


def _session_close(reason: str | None) -> tuple[str, int]:
    """The error code and close code that tell a web client its session ended."""
    if reason == "idle":  # a normal end: the user was away
        return wire.ErrorCode.SESSION_IDLE, wire.CLOSE_NORMAL
    if reason == "deleted":
        return wire.ErrorCode.SESSION_ENDED, wire.CLOSE_NORMAL
    if reason == "shutdown":
        return wire.ErrorCode.SESSION_ENDED, wire.CLOSE_GOING_AWAY
    return wire.ErrorCode.SESSION_ENDED, wire.CLOSE_SESSION_ENDED


@attrs.define
class _Heartbeat:
    """The silence of one client, counted over its connection's whole life.

    Any frame from the client counts as an answer (a ``pong`` to our ``ping`` is one).
    """

    interval: float
    last_seen: float = attrs.field(factory=trio.current_time)

    def seen(self) -> None:
        self.last_seen = trio.current_time()

    def silence(self) -> float:
        return trio.current_time() - self.last_seen


@attrs.define(eq=False)
class _Close:
    """How a connection ends: what the client is told, and why (for the audit trail)."""

    code: int
    reason: str
    error: wire.Error | None = None
    why: str = ""


#: How a desktop agent is told that the gateway stops (it reconnects with backoff).
_STOPPING: Final = _Close(wire.CLOSE_GOING_AWAY, "the gateway is stopping", why="gateway stops")


@attrs.define(eq=False)
class _Connection:
    """One authenticated WebSocket: who it is, its state, and its proxy connection."""

    gw: Gateway
    side: str
    principal: Principal
    #: Cancelled at token expiry; a fresh ``auth`` message moves its deadline.
    expiry: trio.CancelScope
    session: Session | None
    heartbeat: _Heartbeat
    #: Counts and paces this client's frames (the user's frame budget, shared by all
    #: their connections, is held while this lives).
    traffic: Traffic
    state: State = State.PARKED
    upstream: ProxyLink | None = None
    #: Set when the relay over ``upstream`` has let go of it (the state has moved on).
    _relay_done: trio.Event = attrs.field(factory=trio.Event)
    #: The reader's send to the proxy in progress, cancelled when its relay ends: a send
    #: must not outlive the link it writes to.
    _sending: trio.CancelScope | None = None
    #: Set once the connection must end; the first decision wins.
    closing: _Close | None = None
    _nursery: trio.Nursery | None = None
    #: The client's requests that may still go to the desktop's tunnel: sent to the proxy
    #: while the user has a tunnel, and not yet answered (DESIGN.md section 5).
    _fallback: dict[str, wire.Request] = attrs.field(factory=dict)
    #: The client's requests served through the tunnel: id -> its cancel scope.
    _direct: dict[str, trio.CancelScope] = attrs.field(factory=dict)
    _reading: bool = False
    _pinging: bool = False
    _greeted: bool = False
    #: The desktop's name (``X-C2L-Desktop-Name``, checked), passed on to the proxy.
    desktop_name: str = wire.DEFAULT_DESKTOP_NAME

    # ---- the connection's life ------------------------------------------------------

    async def run(self) -> None:
        """Serve the client until the connection ends; then tell it how (bounded)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.closing is not None:  # replaced before it even started
                nursery.cancel_scope.cancel()
            nursery.start_soon(self._heartbeat)
            await self._lifecycle()
            nursery.cancel_scope.cancel()
        self.state = State.CLOSING
        end = self.closing
        if end is not None:
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                if end.error is not None:
                    with contextlib.suppress(Exception):  # the client may be gone already
                        await _send(end.error)
                await _close(end.code, end.reason)

    def finish(self, close: _Close) -> None:
        """End the connection with ``close`` (unless another end came first)."""
        if self.closing is None:
            self.closing = close
        self.state = State.CLOSING
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _lifecycle(self) -> None:
        """Relay, park, re-attach: the states of the connection, until it must end."""
        session = self.session
        uh = self.principal.user_hash
        while True:
            if session is None:
                try:
                    session = await self._park()
                except ShuttingDown:
                    self.finish(_STOPPING)
                    return
                log.info("parked desktop of %s attached to session %s", uh, session.id)
                audit("connection_opened", user=uh, session=session.id, side=self.side)
            closed = await self._relay(session)
            if closed is not None and closed.code in _PASSED_ON:
                self.finish(self._passed_on(closed))
                return
            # The proxy went, or never answered: either the session is ending, or the
            # proxy dropped this connection. A dying proxy drops it before the runtime
            # reports the exit, so let the orchestrator say (bounded).
            with trio.move_on_after(END_REASON_WAIT_S):
                await session.ending.wait()
            reason = session.end_reason
            if self.side == "stream":
                self.finish(self._session_ended(reason))
                return
            if reason == "shutdown":  # no next session here: the agent reconnects later
                self.finish(_STOPPING)
                return
            if reason is not None:
                # The desktop agent outlives sessions: keep it connected with no proxy
                # behind it until the user's next session starts.
                session = None
            # else: the session lives and its proxy dropped us: attach to it again

    def _passed_on(self, closed: CloseReason) -> _Close:
        code = closed.code
        if code == wire.CLOSE_REPLACED:
            error = wire.Error(
                wire.ErrorCode.DESKTOP_REPLACED,
                "another desktop agent of this user took over: this one stops",
            )
            return _Close(code, closed.reason or "replaced", error, "replaced by a newer agent")
        if code == wire.CLOSE_BACKLOG:
            return _Close(code, closed.reason or "backlog", why="read too slowly: dropped")
        return _Close(code, closed.reason or "message too big", why="message too big")

    def _session_ended(self, reason: str | None) -> _Close:
        if reason is None:  # the session lives, but its proxy does not answer us
            error = wire.Error(
                wire.ErrorCode.PROXY_UNAVAILABLE, "the session's proxy is unavailable: reconnect"
            )
            return _Close(wire.CLOSE_TRY_AGAIN, "proxy unavailable", error, "proxy unavailable")
        code, close = _session_close(reason)
        self.gw.metrics.errors.labels(code).inc()
        error = wire.Error(code, f"the session {reason}")
        text = "session_ended" if close == wire.CLOSE_SESSION_ENDED else f"session {reason}"
        return _Close(close, text, error, f"session {reason}")

    async def _park(self) -> Session:
        """Hold a desktop agent with no proxy behind it until the user's next session."""
        self.state = State.PARKED
        self.session = None
        return await self.gw.wait_for_session(self.principal.user_hash)

    def _start_reading(self) -> None:
        """Once attached (or parked) for the first time: start reading the client."""
        if not self._reading:
            self._reading = True
            assert self._nursery is not None
            self._nursery.start_soon(self._read_client)

    async def _relay(self, session: Session) -> CloseReason | None:
        """Relay between the client and ``session``'s proxy until either side ends.

        Returns the proxy's close reason, or None when the proxy never answered or the
        session ended first.
        """
        try:
            headers = {wire.DESKTOP_NAME_HEADER: self.desktop_name} if self.side == "bridge" else {}
            async with open_upstream(session, self.side, headers) as upstream:
                if not self._greeted:
                    self._greeted = True
                    await _send(wire.AuthOk(session.id))
                self.session, self.upstream = session, upstream
                self._relay_done = trio.Event()
                self.state = State.RELAYING
                self.traffic.attached(session, 1)
                try:
                    self._start_reading()
                    return await self._pump(session, upstream)
                finally:
                    if client_closed_cleanly(websocket.scope):
                        # else the client vanished: the proxy keeps its answers for a resume
                        await upstream.close_cleanly()
                    self.traffic.attached(session, -1)
                    self.upstream = None
                    if self.state is State.RELAYING:
                        self.state = State.PARKED
                    if self._sending is not None:
                        self._sending.cancel()
                    self._relay_done.set()
        except (OSError, ProxyUnreachable, ProxyClosed) as exc:
            log.info("relay to session %s failed: %r", session.id, exc)
            if self.side == "bridge" and not self._greeted:
                self._greeted = True  # the agent is parked: it hears auth_ok all the same
                await _send(wire.AuthOk(session.id))
                self._start_reading()
            return None

    async def _pump(self, session: Session, upstream: ProxyLink) -> CloseReason | None:
        """Move the proxy's frames to the client until the proxy closes or the session ends."""
        closed: CloseReason | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await session.ended.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                while True:
                    frame = await upstream.get_message()
                    kind = frame_type(frame)
                    if kind == "response_start":
                        self.gw.served(self.principal.user_hash, "cloud")
                    tunnel_may_answer = self._fallback and kind in ("response_start", "error")
                    if tunnel_may_answer and await self._to_tunnel(frame):
                        continue
                    self.traffic.outbound(session, frame, kind)
                    await websocket.send(frame)
            except ProxyClosed as exc:
                closed = exc.reason
            nursery.cancel_scope.cancel()
        return closed

    # ---- the client's side: one reader, one heartbeat ------------------------------------

    async def _read_client(self) -> None:
        """Read the client for the connection's whole life, in whatever state it is."""
        while True:
            try:
                frame = await _receive()
            except FrameTooBig:
                self.finish(_Close(wire.CLOSE_TOO_BIG, "message too big", why="message too big"))
                return
            self.heartbeat.seen()
            await self.traffic.pace()  # over the user's frame budget: read more slowly
            if _is_auth(frame):
                # Re-authentication is the gateway's business; the proxy never sees tokens.
                if not await self._reauthenticate(frame):
                    return
                continue
            kind = frame_type(frame)
            if kind == "pong":
                continue  # an answer to the gateway's heartbeat: nothing for the proxy
            if self.side == "stream" and await self._direct_frame(frame, kind):
                continue
            counted = False
            while True:  # until the frame is handled in the state the connection is in
                upstream, session, done = self.upstream, self.session, self._relay_done
                if self.state is State.PARKED:
                    await self._parked_frame(frame)
                    break
                if self.state is not State.RELAYING or upstream is None or session is None:
                    break  # closing
                if not counted:
                    counted = True
                    self.traffic.inbound(session, frame, kind)
                sent = False
                with trio.CancelScope() as self._sending:
                    with contextlib.suppress(ProxyClosed):
                        await upstream.send_message(frame)
                        sent = True
                self._sending = None
                if sent:
                    break
                # The proxy went while this frame was on its way. The relay hears the close
                # too and moves the connection on: handle the frame there (a parked agent's
                # ping is answered), never let it escape or vanish.
                await done.wait()

    # ---- the direct route: requests the bridge cannot answer go to the tunnel -----------

    async def _direct_frame(self, frame: str, kind: str | None) -> bool:
        """Note a request that may fall back to the tunnel; take a cancel of one it serves.

        Returns True when the frame is handled here (not for the proxy).
        """
        if kind == "cancel" and self._direct:
            try:
                msg = wire.decode(frame)
            except wire.ProtocolError:
                return False
            scope = self._direct.get(msg.id) if isinstance(msg, wire.Cancel) else None
            if scope is not None:
                scope.cancel()
                return True
            return False
        if (
            kind not in ("request", None)
            or await self.gw.direct.get(self.principal.user_hash) is None
        ):
            return False
        try:
            msg = wire.decode(frame)
        except wire.ProtocolError:
            return False  # the proxy answers it with the error
        room = len(self._fallback) < _MAX_FALLBACK
        # A streamed body goes to the proxy piece by piece: the tunnel could not have it.
        if (
            isinstance(msg, wire.Request)
            and not msg.body_stream
            and msg.id not in self._direct
            and room
        ):
            self._fallback[msg.id] = msg
        return False

    async def _to_tunnel(self, frame: str) -> bool:
        """The proxy's first answer to a request the tunnel may take instead.

        Returns True when the request goes to the tunnel (the frame is not passed on):
        the bridge answered ``desktop_unavailable`` before any byte of the answer.
        """
        try:
            msg = wire.decode(frame)
        except wire.ProtocolError:
            return False
        if not isinstance(msg, wire.ResponseStart | wire.Error) or msg.id is None:
            return False
        req = self._fallback.pop(msg.id, None)
        if req is None or isinstance(msg, wire.ResponseStart):
            return False
        if msg.code not in FALLBACK_CODES or self._nursery is None:
            return False
        reg = await self.gw.direct.get(self.principal.user_hash)
        if reg is None or req.id in self._direct:
            return False
        scope = trio.CancelScope()
        self._direct[req.id] = scope
        self._nursery.start_soon(self._serve_direct, req, reg, scope)
        return True

    async def _serve_direct(
        self, req: wire.Request, reg: Registration, scope: trio.CancelScope
    ) -> None:
        """Serve ``req`` through the user's tunnel, as the proxy would have (route direct).

        Not resumable: its chunks are numbered (``seq``) like the proxy's, but its
        ``response_start`` has no ``resume`` token, since nothing here outlives the client's
        connection; a client that drops sends the request again.
        """
        body = b"" if req.body is None else json.dumps(req.body).encode()
        if req.body_base64 is not None:
            body = base64.b64decode(req.body_base64)
        headers = wire.request_headers(req.headers.items())
        started = False
        try:
            with scope:
                async with self.gw.direct.open(
                    self.principal, reg, req.method, req.path, headers, body
                ) as answer:
                    start = wire.ResponseStart(req.id, answer.status, answer.headers, "direct")
                    await _send(start)
                    started = True
                    self.gw.served(self.principal.user_hash, "direct")
                    media_type = wire.media_type_of(answer.headers)
                    splitter = BodySplitter.for_response(media_type)
                    seq = 0
                    async for piece in answer.body:
                        if not wire.is_text_media(media_type):  # bytes, as the bridge sends
                            for at in range(0, len(piece), MAX_CHUNK_BYTES):
                                raw = base64.b64encode(piece[at : at + MAX_CHUNK_BYTES])
                                seq += 1
                                await _send(wire.Chunk(req.id, data_base64=raw.decode(), seq=seq))
                            continue
                        for data in splitter.feed(piece):
                            seq += 1
                            await _send(wire.Chunk(req.id, data, seq=seq))
                    for data in splitter.flush():
                        seq += 1
                        await _send(wire.Chunk(req.id, data, seq=seq))
                    await _send(wire.ResponseEnd(req.id))
        except TunnelFailed as exc:
            if started:
                error = wire.Error(
                    wire.ErrorCode.UPSTREAM_ERROR, f"the tunnel failed mid-answer: {exc}", req.id
                )
            else:
                error = wire.Error(
                    wire.ErrorCode.DESKTOP_UNAVAILABLE,
                    "your desktop has no bridge and its tunnel did not answer",
                    req.id,
                )
            with contextlib.suppress(Exception):  # the client may be gone
                await _send(error)
        finally:
            self._direct.pop(req.id, None)

    async def _parked_frame(self, frame: str) -> None:
        """A parked agent's frame: pings are answered, anything else has no one to go to."""
        try:
            msg = wire.decode(frame)
        except wire.ProtocolError:
            return
        if isinstance(msg, wire.Ping):
            await _send(wire.Pong(msg.timestamp))

    async def _heartbeat(self) -> None:
        """Ping a client not heard for an interval; end the connection after two.

        The deadlines count from the client's last frame, so a client that pings by
        itself more often than the interval (the desktop agent) is never pinged: one
        heartbeat per connection.
        """
        beat = self.heartbeat
        while True:
            await trio.sleep_until(beat.last_seen + beat.interval)
            if beat.silence() < beat.interval:
                continue  # heard meanwhile: the next deadline counts from then
            if not self._pinging:  # a client that reads nothing must not stall the count
                assert self._nursery is not None
                self._nursery.start_soon(self._ping)
            await trio.sleep_until(beat.last_seen + 2 * beat.interval)
            silent = beat.silence()
            if silent >= 2 * beat.interval:
                why = f"no answer to heartbeats for {silent:.1f} s"
                log.info(
                    "%s of %s (%s) dropped: %s",
                    self.side,
                    self.principal.user_hash,
                    self.state.value,
                    why,
                )
                self.gw.metrics.heartbeat_drops.labels(self.side).inc()
                self.finish(_Close(wire.CLOSE_GOING_AWAY, "heartbeat timeout", why=why))
                return

    async def _ping(self) -> None:
        self._pinging = True
        try:
            await _send(wire.Ping(time.time() * 1000))
        finally:
            self._pinging = False

    async def _reauthenticate(self, frame: str) -> bool:
        """Handle an ``auth`` message on a live connection; False when it must close."""
        try:
            msg = wire.decode(frame)
            if not isinstance(msg, wire.Auth):
                raise AuthError("malformed_token", "an auth message needs a token")
            principal = await self.gw.authenticate(
                msg.token, endpoint=f"WS /ws/{self.side}", remote=websocket.remote_addr
            )
        except (wire.ProtocolError, AuthError) as exc:
            code = getattr(exc, "code", "")
            error = wire.Error(wire.ErrorCode.AUTH_FAILED, f"{code}: {exc}")
            self.finish(_Close(wire.CLOSE_POLICY, "authentication failed", error))
            return False
        if principal.user_hash != self.principal.user_hash:
            audit("access_denied", user=principal.user_hash, reason="re-auth as another user")
            error = wire.Error(wire.ErrorCode.AUTH_FAILED, "a connection cannot change its user")
            self.finish(_Close(wire.CLOSE_POLICY, "authentication failed", error))
            return False
        self.principal = principal
        self.expiry.deadline = _expiry_deadline(principal)
        await _send(wire.AuthOk(self.session.id if self.session is not None else ""))
        return True


def _is_auth(frame: str) -> bool:
    # Cheap test first: relays move frames without parsing them.
    return '"auth"' in frame and wire.peek_type(frame) == "auth"


async def _ws_authenticate(gw: Gateway, side: str) -> tuple[Principal, str | None] | None:
    """Authenticate by the upgrade's Authorization header or a first ``auth`` message.

    Returns the principal and the session id the client asked for (None: any).
    """
    await websocket.accept()
    endpoint, remote = f"WS /ws/{side}", websocket.remote_addr
    token = bearer_token(websocket.headers.get("Authorization"))
    wanted: str | None = None
    if token is None:
        frame: str | None = None
        with trio.move_on_after(wire.AUTH_TIMEOUT_S):
            try:
                frame = await _receive()
            except FrameTooBig:
                audit("auth_failed", code="too_large", endpoint=endpoint, remote=remote)
                await _close(wire.CLOSE_TOO_BIG, "message too big")
                return None
        if frame is None:
            audit("auth_failed", code=wire.ErrorCode.AUTH_TIMEOUT, endpoint=endpoint, remote=remote)
            await _send(
                wire.Error(
                    wire.ErrorCode.AUTH_TIMEOUT,
                    f"no auth message within {wire.AUTH_TIMEOUT_S:.0f} s",
                )
            )
            await _close(wire.CLOSE_POLICY, "authentication timeout")
            return None
        try:
            msg = wire.decode(frame)
        except wire.ProtocolError as exc:
            msg = None
            why = exc.message
        else:
            why = "the first message must be of type 'auth'"
        if not isinstance(msg, wire.Auth):
            audit("auth_failed", code="no_auth_message", endpoint=endpoint, remote=remote)
            await _send(wire.Error(wire.ErrorCode.AUTH_FAILED, why))
            await _close(wire.CLOSE_POLICY, "authentication failed")
            return None
        token, wanted = msg.token, msg.session_id
    try:
        return await gw.authenticate(token, endpoint=endpoint, remote=remote), wanted
    except AuthError as exc:
        await _send(wire.Error(wire.ErrorCode.AUTH_FAILED, f"{exc.code}: {exc.message}"))
        await _close(wire.CLOSE_POLICY, "authentication failed")
        return None


async def serve_websocket(gw: Gateway, side: str) -> None:
    try:
        check_header_limits(websocket.headers)
    except ApiError:
        audit("access_denied", endpoint=f"WS /ws/{side}", reason="headers too large")
        raise
    authenticated = await _ws_authenticate(gw, side)
    if authenticated is None:
        return
    principal, wanted = authenticated
    name = websocket.headers.get(wire.DESKTOP_NAME_HEADER, wire.DEFAULT_DESKTOP_NAME)
    if side == "bridge" and not wire.valid_desktop_name(name):
        audit("access_denied", user=principal.user_hash, reason="bad desktop name")
        await _send(
            wire.Error(
                wire.ErrorCode.BAD_MESSAGE,
                "the desktop name (X-C2L-Desktop-Name) must be 1-64 characters of"
                " A-Z a-z 0-9 . _ -",
            )
        )
        await _close(wire.CLOSE_POLICY, "bad desktop name")
        return
    if wanted:
        # A session id that is not the caller's own live session is unknown to them,
        # whether it is another user's or none at all: 404, as on the HTTP side.
        live = gw.orchestrator.get(principal.user_hash)
        if live is None or live.id != wanted:
            audit("access_denied", user=principal.user_hash, reason="unknown session id")
            await _send(wire.Error(wire.ErrorCode.NOT_FOUND, "no such session: create one first"))
            await _close(wire.CLOSE_POLICY, "no such session")
            return
    try:
        session = await gw.ensure_session(principal)
    except OrchestratorError as exc:
        err = session_error(exc)
        await _send(wire.Error(err.code, err.message))
        await _close(wire.CLOSE_TRY_AGAIN, "session unavailable")
        return
    traffic = Traffic(gw.metrics, side, gw.frame_budget(principal.user_hash))
    traffic.client_opened()
    try:
        await _serve_authenticated(gw, side, principal, session, traffic, name)
    finally:
        traffic.client_closed()


async def _serve_authenticated(
    gw: Gateway,
    side: str,
    principal: Principal,
    session: Session,
    traffic: Traffic,
    name: str = wire.DEFAULT_DESKTOP_NAME,
) -> None:
    uh = principal.user_hash
    audit("connection_opened", user=uh, session=session.id, side=side)
    beat = _Heartbeat(gw.config.heartbeat_interval)
    with trio.CancelScope(deadline=_expiry_deadline(principal)) as expiry:
        conn = _Connection(gw, side, principal, expiry, session, beat, traffic, desktop_name=name)
        # One agent per desktop (user and name); agents of other names stay connected.
        key = (uh, name)
        replaced = gw.bridges.get(key) if side == "bridge" else None
        if side == "bridge":
            # The newest agent of a desktop wins, once: the one it replaces stops for good.
            gw.bridges[key] = conn
        if isinstance(replaced, _Connection):
            replaced.finish(
                _Close(
                    wire.CLOSE_REPLACED,
                    "replaced",
                    wire.Error(
                        wire.ErrorCode.DESKTOP_REPLACED,
                        "another desktop agent of this user took over: this one stops",
                    ),
                    "replaced by a newer agent",
                )
            )
        try:
            await conn.run()
        finally:
            if side == "bridge" and gw.bridges.get(key) is conn:
                del gw.bridges[key]
            why = conn.closing.why if conn.closing is not None else "client closed"
            if expiry.cancelled_caught or expiry.cancel_called:
                why = "token expired"
            session_id = conn.session.id if conn.session is not None else None
            audit("connection_closed", user=uh, session=session_id, side=side, reason=why)
    if expiry.cancelled_caught:
        await _send(
            wire.Error(
                wire.ErrorCode.TOKEN_EXPIRED,
                "the token expired: reconnect with a fresh one, or send a new auth message"
                " before expiry",
            )
        )
        await _close(wire.CLOSE_POLICY, "token expired")
