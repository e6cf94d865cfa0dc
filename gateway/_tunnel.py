"""``/api/ollama/<path>``: the desktop's Ollama over HTTP, through the user's tunnel."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import trio
import trio_websocket
from quart import Response, request

import wire
from orchestrator import (
    OrchestratorError,
    Session,
)

from ._state import (
    FIRST_BYTE_TIMEOUT_S,
    ApiError,
    Gateway,
    http_principal,
    open_upstream,
    session_error,
)

log = logging.getLogger("c2l.gateway")


_STATUS_FOR_ERROR = {
    wire.ErrorCode.DESKTOP_UNAVAILABLE: 503,
    wire.ErrorCode.OLLAMA_UNAVAILABLE: 502,
    wire.ErrorCode.UPSTREAM_ERROR: 502,
    wire.ErrorCode.SESSION_ENDED: 503,
}


async def ollama_request(gw: Gateway, path: str) -> Response:
    principal = await http_principal(gw)
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
        raise session_error(exc) from None
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
            async with open_upstream(session, "stream") as proxy_ws:
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
