"""The WebSocket endpoints: authentication, relays to the proxy, parked desktop agents."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import attrs
import trio
import trio_websocket
from quart import websocket

import wire
from orchestrator import (
    OrchestratorError,
    Session,
)

from ._audit import audit
from ._auth import AuthError, Principal, bearer_token
from ._state import ApiError, Gateway, check_header_limits, open_upstream, session_error

log = logging.getLogger("c2l.gateway")


async def _send(msg: wire.Message) -> None:
    await websocket.send(wire.encode(msg))


def _frame_type(frame: str) -> str | None:
    """The ``type`` of a relayed frame, cheaply: frames of wire.encode start with it."""
    if frame.startswith('{"type":"'):
        end = frame.find('"', 9)
        if end > 0:
            return frame[9:end]
    if len(frame) > 512:
        return None  # a big frame is request traffic whatever it claims; the proxy checks
    return wire.peek_type(frame)


class _Heartbeat:
    """Pings one client connection; notices when it has been silent for two intervals.

    Any frame from the peer counts as an answer (a ``pong`` to our ``ping`` is one).
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last_seen = trio.current_time()

    def seen(self) -> None:
        self.last_seen = trio.current_time()

    async def run(self) -> str:
        """Ping every interval; return (why) once the peer is considered dead."""
        while True:
            await trio.sleep(self.interval)
            silent = trio.current_time() - self.last_seen
            if silent >= 2 * self.interval:
                return f"no answer to heartbeats for {silent:.1f} s"
            await _send(wire.Ping(time.time() * 1000))


async def _receive() -> str:
    """The client's next frame as text (Quart gives None for an empty frame)."""
    frame = await websocket.receive()
    if frame is None:
        return ""
    if isinstance(frame, bytes):
        return frame.decode("utf-8", "replace")
    return str(frame)


async def _close(code: int, reason: str) -> None:
    try:
        await websocket.close(code, reason)
    except Exception as exc:  # already closed by the peer
        log.debug("close failed: %r", exc)


def _expiry_deadline(principal: Principal) -> float:
    """The trio deadline at which ``principal``'s token expires (inf: no ``exp``)."""
    if principal.expires is None:
        return float("inf")
    return trio.current_time() + (principal.expires - time.time())


@attrs.define
class _Conn:
    """One authenticated WebSocket: who it is, and when its token runs out."""

    gw: Gateway
    side: str
    principal: Principal
    #: Cancelled at token expiry; a fresh ``auth`` message moves its deadline.
    expiry: trio.CancelScope
    session_id: str | None = None

    async def reauthenticate(self, frame: str) -> bool:
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
            await _send(wire.Error(wire.ErrorCode.AUTH_FAILED, f"{code}: {exc}"))
            await _close(wire.CLOSE_POLICY, "authentication failed")
            return False
        if principal.user_hash != self.principal.user_hash:
            audit("access_denied", user=principal.user_hash, reason="re-auth as another user")
            await _send(
                wire.Error(wire.ErrorCode.AUTH_FAILED, "a connection cannot change its user")
            )
            await _close(wire.CLOSE_POLICY, "authentication failed")
            return False
        self.principal = principal
        self.expiry.deadline = _expiry_deadline(principal)
        await _send(wire.AuthOk(self.session_id or ""))
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
            frame = await _receive()
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
    await _send(wire.AuthOk(session.id))
    gauge = gw.metrics.connections.labels(side)
    gauge.inc()
    try:
        await _serve_authenticated(gw, side, principal, session)
    finally:
        gauge.dec()


async def _serve_authenticated(
    gw: Gateway, side: str, principal: Principal, session: Session
) -> None:
    uh = principal.user_hash
    audit("connection_opened", user=uh, session=session.id, side=side)
    why = "client closed"
    with trio.CancelScope(deadline=_expiry_deadline(principal)) as expiry:
        conn = _Conn(gw, side, principal, expiry, session.id)
        try:
            while True:
                ended = await _relay(session, conn)
                if not ended:
                    return  # the client went away, failed to re-authenticate or went silent
                if side == "stream":
                    reason = await _end_reason(session)
                    why = f"session {reason}"
                    if reason == "idle":  # a normal end: the user was away
                        code, close = wire.ErrorCode.SESSION_IDLE, wire.CLOSE_NORMAL
                    else:
                        code, close = wire.ErrorCode.SESSION_ENDED, wire.CLOSE_GOING_AWAY
                    gw.metrics.errors.labels(code).inc()
                    await _send(wire.Error(code, f"the {why}"))
                    await _close(close, why)
                    return
                # The desktop agent outlives sessions: keep it connected with no proxy
                # behind it until the user's next session starts, then attach it there.
                conn.session_id = None
                # A dying proxy drops the relay before its exit is reported: let the
                # orchestrator say (bounded) so the agent is not re-attached to it.
                await _end_reason(session)
                parked = await _park(gw, conn)
                while parked is not None and parked.end_reason is not None:
                    await trio.sleep(0.05)  # still tearing down: wait for the next one
                    parked = await _park(gw, conn)
                if parked is None:
                    return  # went away, went silent or failed to re-authenticate
                session = parked
                conn.session_id = session.id
                log.info("parked desktop of %s attached to session %s", uh, session.id)
                audit("connection_opened", user=uh, session=session.id, side=side)
        finally:
            if expiry.cancelled_caught or expiry.cancel_called:
                why = "token expired"
            audit("connection_closed", user=uh, session=conn.session_id, side=side, reason=why)
    if expiry.cancelled_caught:
        await _send(
            wire.Error(
                wire.ErrorCode.TOKEN_EXPIRED,
                "the token expired: reconnect with a fresh one, or send a new auth message"
                " before expiry",
            )
        )
        await _close(wire.CLOSE_POLICY, "token expired")


async def _end_reason(session: Session) -> str:
    """Why the session ended. A dying proxy closes its connection before the runtime
    reports the exit, so wait (bounded) for the orchestrator to say."""
    for _ in range(20):
        if session.end_reason is not None:
            return session.end_reason
        await trio.sleep(0.05)
    return "proxy unavailable"


async def _park(gw: Gateway, conn: _Conn) -> Session | None:
    """Hold the desktop's connection until the user's next session; None if it must close."""
    session: Session | None = None
    heartbeat = _Heartbeat(gw.config.heartbeat_interval)
    async with trio.open_nursery() as nursery:

        async def ping() -> None:
            why = await heartbeat.run()
            log.info("parked desktop of %s dropped: %s", conn.principal.user_hash, why)
            gw.metrics.heartbeat_drops.labels("bridge").inc()
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await _close(wire.CLOSE_GOING_AWAY, "heartbeat timeout")

        async def answer_pings() -> None:
            while True:
                frame = await _receive()
                heartbeat.seen()
                if _is_auth(frame):
                    if not await conn.reauthenticate(frame):
                        nursery.cancel_scope.cancel()
                        return
                    continue
                try:
                    msg = wire.decode(frame)
                except wire.ProtocolError:
                    continue
                if isinstance(msg, wire.Ping):
                    await _send(wire.Pong(msg.timestamp))

        nursery.start_soon(answer_pings)
        nursery.start_soon(ping)
        session = await gw.wait_for_session(conn.principal.user_hash)
        nursery.cancel_scope.cancel()
    return session


async def _relay(session: Session, conn: _Conn) -> bool:
    """Move frames between the client's WebSocket and the proxy until one side ends.

    Returns True when the session ended (the client is still connected), False when the
    client went away or stopped answering heartbeats (then its proxy connection closes and
    the proxy fails the requests in flight on it). Request traffic both ways is session
    activity; heartbeats (ping/pong) are not.
    """
    session_ended = False
    side = conn.side
    relay_scope: trio.CancelScope | None = None
    metrics = conn.gw.metrics
    in_msgs, in_bytes = metrics.messages.labels(side, "in"), metrics.bytes.labels(side, "in")
    out_msgs, out_bytes = metrics.messages.labels(side, "out"), metrics.bytes.labels(side, "out")
    heartbeat = _Heartbeat(conn.gw.config.heartbeat_interval)

    async def up(proxy_ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            frame = await _receive()
            heartbeat.seen()
            if _is_auth(frame):
                # Re-authentication is the gateway's business; the proxy never sees tokens.
                if not await conn.reauthenticate(frame):
                    assert relay_scope is not None
                    relay_scope.cancel()  # closed: the client is gone, not the session
                    return
                continue
            kind = _frame_type(frame)
            if kind == "pong":
                continue  # an answer to the gateway's heartbeat: nothing for the proxy
            session.relayed("in", len(frame), activity=kind != "ping")
            in_msgs.inc()
            in_bytes.inc(len(frame))
            await proxy_ws.send_message(frame)

    async def down(proxy_ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            frame = await proxy_ws.get_message()
            if isinstance(frame, bytes):
                frame = frame.decode("utf-8", "replace")
            kind = _frame_type(frame)
            if kind == "error":  # rare: worth a parse, for errors by code
                with contextlib.suppress(wire.ProtocolError):
                    err = wire.decode(frame)
                    if isinstance(err, wire.Error):
                        metrics.errors.labels(err.code).inc()
            session.relayed("out", len(frame), activity=kind != "pong")
            out_msgs.inc()
            out_bytes.inc(len(frame))
            await websocket.send(frame)

    async def watch() -> None:
        await session.ended.wait()

    session.connected(side, 1)
    try:
        async with open_upstream(session, side) as proxy_ws, trio.open_nursery() as nursery:

            async def until_done(fn: Any, *args: Any) -> None:
                # Whichever of the three finishes first ends the relay.
                nonlocal session_ended
                with contextlib.suppress(trio_websocket.ConnectionClosed):
                    await fn(*args)
                session_ended = True
                nursery.cancel_scope.cancel()

            async def ping() -> None:
                why = await heartbeat.run()
                log.info("%s of session %s dropped: %s", side, session.id, why)
                metrics.heartbeat_drops.labels(side).inc()
                nursery.cancel_scope.cancel()  # the client is gone, not the session
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await _close(wire.CLOSE_GOING_AWAY, "heartbeat timeout")

            relay_scope = nursery.cancel_scope
            nursery.start_soon(up, proxy_ws)
            nursery.start_soon(until_done, down, proxy_ws)
            nursery.start_soon(until_done, watch)
            nursery.start_soon(ping)
    except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed) as exc:
        log.info("relay to session %s failed: %r", session.id, exc)
        session_ended = True
    finally:
        session.connected(side, -1)
    return session_ended
