"""The gateway's HTTP and WebSocket surface (DESIGN.md section 2), on Quart-Trio.

The gateway authenticates every request and WebSocket, asks the orchestrator for the
user's session and relays the connection to that user's proxy over loopback. It moves
frames without re-framing them; the proxy validates every message.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio
import trio_websocket
from quart import Response, request, websocket
from quart_trio import QuartTrio

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


def _error_response(exc: ApiError) -> Response:
    body = json.dumps({"error": exc.code, "message": exc.message})
    return Response(body, exc.status, exc.headers, mimetype="application/json")


def _session_error(exc: OrchestratorError) -> ApiError:
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


async def _http_principal(gw: Gateway) -> Principal:
    try:
        return await gw.authenticate(bearer_token(request.headers.get("Authorization")))
    except AuthError as exc:
        raise ApiError(401, exc.code, exc.message) from None


def _endpoints(session: Session) -> dict[str, Any]:
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


def create_app(gw: Gateway) -> QuartTrio:
    """The Quart-Trio application of one gateway."""
    app = QuartTrio("c2l-gateway")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["RESPONSE_TIMEOUT"] = None  # streamed answers last as long as the model talks
    app.config["BODY_TIMEOUT"] = 30

    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> Response:
        return _error_response(exc)

    @app.errorhandler(404)
    async def _not_found(_: Exception) -> Response:
        return _error_response(ApiError(404, "not_found", "no such endpoint"))

    @app.errorhandler(405)
    async def _bad_method(_: Exception) -> Response:
        return _error_response(ApiError(405, "method_not_allowed", "method not allowed here"))

    @app.errorhandler(413)
    async def _too_large(_: Exception) -> Response:
        text = f"request body over {MAX_BODY_BYTES} bytes"
        return _error_response(ApiError(413, "too_large", text))

    @app.errorhandler(Exception)
    async def _internal(exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return _error_response(ApiError(500, "internal", "internal error"))

    @app.get("/health")
    async def health() -> Response:
        body = {
            "status": "healthy",
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
            "sessions": len(gw.orchestrator.sessions()),
        }
        return Response(json.dumps(body), 200, mimetype="application/json")

    @app.get("/.well-known/jwks.json")
    async def jwks() -> Response:
        if gw.dev_issuer is None:
            raise ApiError(404, "not_found", "this gateway has no local issuer (jwks mode)")
        return Response(json.dumps(gw.dev_issuer.jwks()), 200, mimetype="application/json")

    @app.post("/api/streaming/create")
    async def create() -> tuple[dict[str, Any], int]:
        principal = await _http_principal(gw)
        try:
            session = await gw.ensure_session(principal)
        except OrchestratorError as exc:
            raise _session_error(exc) from None
        return _endpoints(session), 200

    @app.get("/api/streaming/status")
    async def status() -> dict[str, Any]:
        principal = await _http_principal(gw)
        session = gw.orchestrator.get(principal.user_hash)
        if session is None:
            raise ApiError(404, "not_found", "you have no live session: POST /api/streaming/create")
        return _endpoints(session)

    @app.delete("/api/streaming/<session_id>")
    async def delete(session_id: str) -> Response:
        principal = await _http_principal(gw)
        if not await gw.orchestrator.delete(principal.user_hash, session_id, reason="deleted"):
            raise ApiError(404, "not_found", "no such session")
        return Response("", 204)

    @app.get("/api/admin/streaming/sessions")
    async def admin_sessions() -> dict[str, Any]:
        principal = await _http_principal(gw)
        if not principal.admin:
            raise ApiError(403, "forbidden", "this needs the c2l:admin permission")
        rows = []
        for s in gw.orchestrator.sessions():
            row = s.as_dict()
            row.pop("host", None)
            row.pop("port", None)
            rows.append(row)
        return {"sessions": rows, "count": len(rows)}

    @app.websocket("/ws/stream")
    async def ws_stream() -> None:
        await _websocket(gw, "stream")

    @app.websocket("/ws/bridge")
    async def ws_bridge() -> None:
        await _websocket(gw, "bridge")

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]

    @app.route("/api/ollama/<path:path>", methods=methods)
    async def ollama(path: str) -> Response:
        return await _ollama(gw, path)

    return app


# ---- WebSockets -----------------------------------------------------------------------


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


async def _websocket(gw: Gateway, side: str) -> None:
    principal = await _ws_authenticate(gw)
    if principal is None:
        return
    try:
        session = await gw.ensure_session(principal)
    except OrchestratorError as exc:
        err = _session_error(exc)
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
        async with _open_upstream(session, side) as proxy_ws, trio.open_nursery() as nursery:

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


def _open_upstream(session: Session, side: str) -> Any:
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


# ---- the Ollama-compatible HTTP API through the tunnel -------------------------------

_STATUS_FOR_ERROR = {
    wire.ErrorCode.DESKTOP_UNAVAILABLE: 503,
    wire.ErrorCode.OLLAMA_UNAVAILABLE: 502,
    wire.ErrorCode.UPSTREAM_ERROR: 502,
    wire.ErrorCode.SESSION_ENDED: 503,
}


async def _ollama(gw: Gateway, path: str) -> Response:
    principal = await _http_principal(gw)
    raw = await request.get_data(as_text=False)
    body: Any = None
    if raw:
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "bad_json", "the request body is not valid JSON") from None
    try:
        session = await gw.ensure_session(principal)
    except OrchestratorError as exc:
        raise _session_error(exc) from None
    target = "/" + path
    if request.query_string:
        target += "?" + request.query_string.decode("latin-1")
    req = wire.Request("http", request.method, target, {}, body)
    send, receive = trio.open_memory_channel[wire.Message](16)
    gw.nursery.start_soon(_tunnel, session, req, send)
    with trio.fail_after(FIRST_BYTE_TIMEOUT_S):
        try:
            first = await receive.receive()
        except trio.EndOfChannel:
            first = wire.Error(wire.ErrorCode.PROXY_UNAVAILABLE, "the session's proxy went away")
    if isinstance(first, wire.Error):
        await receive.aclose()
        status = _STATUS_FOR_ERROR.get(first.code, 502)
        raise ApiError(status, first.code, first.message)
    assert isinstance(first, wire.ResponseStart)
    headers = {k: v for k, v in first.headers.items() if k.lower() in ("content-type",)}

    async def body_stream() -> AsyncIterator[bytes]:
        try:
            async with receive:
                async for msg in receive:
                    if isinstance(msg, wire.Chunk):
                        # A chunk is one NDJSON line or SSE event with its own line ending.
                        yield msg.data.encode()
                    elif isinstance(msg, wire.Error):
                        # Mid-stream failure: Ollama's own shape, one error line.
                        yield (json.dumps({"error": msg.message}) + "\n").encode()
                        return
                    else:
                        return
        finally:
            receive.close()

    response = Response(body_stream(), first.status, headers)
    response.timeout = None
    return response


async def _tunnel(
    session: Session, req: wire.Request, out: trio.MemorySendChannel[wire.Message]
) -> None:
    """Run one tunnelled HTTP request over a WebSocket to the proxy; feed ``out``.

    Owned by the gateway's nursery because the streamed body outlives the handler call.
    When the HTTP client goes away, ``out`` breaks and the request is cancelled upstream.
    """
    async with out:
        try:
            async with _open_upstream(session, "stream") as proxy_ws:
                await proxy_ws.send_message(wire.encode(req))
                session.touch()
                while True:
                    msg = wire.decode(await proxy_ws.get_message())
                    if getattr(msg, "id", None) != req.id:
                        continue
                    try:
                        await out.send(msg)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        with trio.move_on_after(1):
                            await proxy_ws.send_message(wire.encode(wire.Cancel(req.id)))
                        return
                    if isinstance(msg, wire.ResponseEnd | wire.Error):
                        return
        except (
            trio.TooSlowError,
            OSError,
            trio_websocket.HandshakeError,
            trio_websocket.ConnectionClosed,
            wire.ProtocolError,
        ) as exc:
            log.info("tunnel for session %s failed: %r", session.id, exc)
            unavailable = wire.Error(
                wire.ErrorCode.PROXY_UNAVAILABLE, "the session's proxy is unavailable"
            )
            with (
                trio.move_on_after(1),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await out.send(unavailable)
