"""The WebSocket endpoints: authentication, relays to the proxy, parked desktop agents."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import trio
import trio_websocket
from quart import websocket

import wire
from orchestrator import (
    OrchestratorError,
    Session,
)

from ._auth import AuthError, Principal, bearer_token
from ._state import Gateway, open_upstream, session_error

log = logging.getLogger("c2l.gateway")


async def _send(msg: wire.Message) -> None:
    await websocket.send(wire.encode(msg))


async def _close(code: int, reason: str) -> None:
    try:
        await websocket.close(code, reason)
    except Exception as exc:  # already closed by the peer
        log.debug("close failed: %r", exc)


async def _ws_authenticate(gw: Gateway) -> Principal | None:
    """Authenticate by the upgrade's Authorization header or a first ``auth`` message."""
    await websocket.accept()
    token = bearer_token(websocket.headers.get("Authorization"))
    if token is None:
        frame: str | bytes | None = None
        with trio.move_on_after(wire.AUTH_TIMEOUT_S):
            frame = await websocket.receive()
        if frame is None:
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
            await _send(wire.Error(wire.ErrorCode.AUTH_FAILED, why))
            await _close(wire.CLOSE_POLICY, "authentication failed")
            return None
        token = msg.token
    try:
        return await gw.authenticate(token)
    except AuthError as exc:
        await _send(wire.Error(wire.ErrorCode.AUTH_FAILED, f"{exc.code}: {exc.message}"))
        await _close(wire.CLOSE_POLICY, "authentication failed")
        return None


async def serve_websocket(gw: Gateway, side: str) -> None:
    principal = await _ws_authenticate(gw)
    if principal is None:
        return
    try:
        session = await gw.ensure_session(principal)
    except OrchestratorError as exc:
        err = session_error(exc)
        await _send(wire.Error(err.code, err.message))
        await _close(wire.CLOSE_TRY_AGAIN, "session unavailable")
        return
    await _send(wire.AuthOk(session.id))
    log.info("%s connected for user %s (session %s)", side, principal.user_hash, session.id)
    try:
        while True:
            ended = await _relay(session, side)
            if not ended:
                return  # the client went away
            if side == "stream":
                why = session.end_reason or "ended"
                await _send(wire.Error(wire.ErrorCode.SESSION_ENDED, f"the session ended ({why})"))
                await _close(wire.CLOSE_GOING_AWAY, f"session {why}")
                return
            # The desktop agent outlives sessions: keep it connected with no proxy behind
            # it until the user's next session starts, then attach it there.
            session = await _park(gw, principal)
            log.info("parked desktop of %s attached to session %s", principal.user_hash, session.id)
    finally:
        log.info("%s disconnected for user %s", side, principal.user_hash)


async def _park(gw: Gateway, principal: Principal) -> Session:
    async with trio.open_nursery() as nursery:

        async def answer_pings() -> None:
            while True:
                frame = await websocket.receive()
                try:
                    msg = wire.decode(frame)
                except wire.ProtocolError:
                    continue
                if isinstance(msg, wire.Ping):
                    await _send(wire.Pong(msg.timestamp))

        nursery.start_soon(answer_pings)
        session = await gw.wait_for_session(principal.user_hash)
        nursery.cancel_scope.cancel()
    return session


async def _relay(session: Session, side: str) -> bool:
    """Move frames between the client's WebSocket and the proxy until one side ends.

    Returns True when the session ended (the client is still connected), False when the
    client went away.
    """
    session_ended = False

    async def up(proxy_ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            frame = await websocket.receive()
            if isinstance(frame, bytes):
                frame = frame.decode("utf-8", "replace")
            session.touch()
            await proxy_ws.send_message(frame)

    async def down(proxy_ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            frame = await proxy_ws.get_message()
            await websocket.send(frame)

    async def watch() -> None:
        await session.ended.wait()

    try:
        async with open_upstream(session, side) as proxy_ws, trio.open_nursery() as nursery:

            async def until_done(fn: Any, *args: Any) -> None:
                # Whichever of the three finishes first ends the relay.
                nonlocal session_ended
                with contextlib.suppress(trio_websocket.ConnectionClosed):
                    await fn(*args)
                session_ended = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(up, proxy_ws)
            nursery.start_soon(until_done, down, proxy_ws)
            nursery.start_soon(until_done, watch)
    except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed) as exc:
        log.info("relay to session %s failed: %r", session.id, exc)
        session_ended = True
    return session_ended
