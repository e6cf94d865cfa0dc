"""``/api/ollama/<path>``: the desktop's Ollama over HTTP, through the user's tunnel.

Each HTTP request becomes one wire ``request`` on its own WebSocket to the user's proxy;
the desktop's ``response_start`` gives the status and headers, every ``chunk`` (one NDJSON
line or SSE event) is written to the HTTP client as soon as it arrives, and nothing holds
a whole body. A client that goes away mid-stream makes the tunnel send ``cancel``, which
the desktop agent turns into an aborted request to Ollama.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Final

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


_STATUS_FOR_ERROR: Final = {
    wire.ErrorCode.DESKTOP_UNAVAILABLE: 503,
    wire.ErrorCode.OLLAMA_UNAVAILABLE: 502,
    wire.ErrorCode.UPSTREAM_ERROR: 502,
    wire.ErrorCode.SESSION_ENDED: 503,
    wire.ErrorCode.PROXY_UNAVAILABLE: 503,
    wire.ErrorCode.TOO_MANY_REQUESTS: 429,
    wire.ErrorCode.BAD_PATH: 400,
    wire.ErrorCode.BAD_MESSAGE: 400,
    wire.ErrorCode.TOO_LARGE: 413,
}

#: Never sent on to the desktop: the gateway credentials and the client's own connection
#: framing. (The agent drops these too; the token must not leave the gateway at all.)
_DROP_REQUEST_HEADERS: Final = wire.UNFORWARDED_REQUEST_HEADERS | {
    "expect",
    "remote-addr",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
}
#: Not passed back to the HTTP client: framing of the desktop's connection (this
#: response is re-framed), cookies, and headers Hypercorn sets itself.
_DROP_RESPONSE_HEADERS: Final = wire.UNFORWARDED_RESPONSE_HEADERS | {
    "date",
    "server",
}
_STREAMING_TYPES: Final = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "text/event-stream"}
)


def request_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The client's headers that travel to the desktop's Ollama (lower-case names)."""
    out: dict[str, str] = {}
    for key, value in headers:
        name = key.lower()
        if name in _DROP_REQUEST_HEADERS or name.startswith("x-c2l-"):
            continue
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def response_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The desktop's response headers that reach the HTTP client."""
    out = {k: v for k, v in headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS}
    kind = _media_type(headers)
    if kind in _STREAMING_TYPES:
        # A reverse proxy in front of the gateway must not buffer a token stream.
        out.setdefault("cache-control", "no-cache")
        out["x-accel-buffering"] = "no"
    return out


def _media_type(headers: Mapping[str, str]) -> str:
    for key, value in headers.items():
        if key.lower() == "content-type":
            return value.split(";", 1)[0].strip().lower()
    return ""


def error_data(media_type: str, message: str) -> bytes:
    """A failure after the body has begun, in the stream's own format.

    NDJSON streams get Ollama's ``{"error": ...}`` line; SSE streams get the event that
    Ollama's OpenAI-compatible endpoints send, ``data: {"error": {"message": ...}}``.
    """
    if media_type == "text/event-stream":
        error = {"message": message, "type": "api_error", "param": None, "code": None}
        return f"data: {json.dumps({'error': error})}\n\n".encode()
    return (json.dumps({"error": message}) + "\n").encode()


async def ollama_request(gw: Gateway, path: str) -> Response:
    """Answer one ``/api/ollama/<path>`` request from the user's desktop Ollama."""
    principal = await http_principal(gw)
    raw = await request.get_data(as_text=False)
    body: Any = None
    if raw.strip():
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser
            raise ApiError(
                400, "bad_json", "the request body is not valid JSON (the tunnel carries JSON)"
            ) from None
    try:
        session = await gw.ensure_session(principal)
    except OrchestratorError as exc:
        raise session_error(exc) from None
    target = "/" + path
    if request.query_string:
        target += "?" + request.query_string.decode("latin-1")
    headers = request_headers(request.headers.items())
    req = wire.Request("http", request.method, target, headers, body)
    send, receive = trio.open_memory_channel[wire.Message](16)
    client_gone = trio.Event()
    gw.nursery.start_soon(_tunnel, session, req, send, client_gone)
    streaming = False
    try:
        first: wire.Message | None = None
        with trio.move_on_after(FIRST_BYTE_TIMEOUT_S):
            try:
                first = await receive.receive()
            except trio.EndOfChannel:
                first = wire.Error(
                    wire.ErrorCode.PROXY_UNAVAILABLE, "the session's proxy went away"
                )
        if first is None:
            raise ApiError(
                504,
                "desktop_timeout",
                f"the desktop did not start answering within {FIRST_BYTE_TIMEOUT_S:.0f} s",
            )
        if isinstance(first, wire.Error):
            status = _STATUS_FOR_ERROR.get(first.code, 502)
            retry = {"Retry-After": "1"} if status == 429 else None
            raise ApiError(status, first.code, first.message, retry)
        if not isinstance(first, wire.ResponseStart):
            raise ApiError(502, wire.ErrorCode.UPSTREAM_ERROR, "the desktop answered out of order")
        out_headers = response_headers(first.headers)
        if request.method == "HEAD":
            return Response(b"", first.status, out_headers)
        media_type = _media_type(first.headers)
        streaming = True
    finally:
        if not streaming:
            client_gone.set()
            receive.close()

    async def body_stream() -> AsyncIterator[bytes]:
        try:
            async with receive:
                async for msg in receive:
                    if isinstance(msg, wire.Chunk):
                        # A chunk is one NDJSON line or SSE event with its own line ending.
                        yield msg.data.encode()
                    elif isinstance(msg, wire.Error):
                        yield error_data(media_type, msg.message)
                        return
                    else:
                        return
        finally:
            # Runs when the body is complete and when Quart cancels it because the client
            # disconnected: in the second case the tunnel cancels the request upstream.
            client_gone.set()

    response = Response(body_stream(), first.status, out_headers)
    response.timeout = None
    return response


async def _pump(
    proxy_ws: trio_websocket.WebSocketConnection,
    rid: str,
    out: trio.MemorySendChannel[wire.Message],
) -> bool:
    """Move the answer to ``rid`` into ``out``; False when the HTTP side went away."""
    while True:
        msg = wire.decode(await proxy_ws.get_message())
        if getattr(msg, "id", None) != rid:
            continue
        try:
            await out.send(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        if isinstance(msg, wire.ResponseEnd | wire.Error):
            return True


async def _tunnel(
    session: Session,
    req: wire.Request,
    out: trio.MemorySendChannel[wire.Message],
    client_gone: trio.Event,
) -> None:
    """Run one tunnelled HTTP request over a WebSocket to the proxy; feed ``out``.

    Owned by the gateway's nursery because the streamed body outlives the handler call.
    When the HTTP client goes away (``client_gone``, even while the desktop is silent,
    say loading a model) the request is cancelled upstream at once.
    """
    async with out:
        try:
            async with open_upstream(session, "stream") as proxy_ws:
                await proxy_ws.send_message(wire.encode(req))
                session.touch()
                complete = False
                async with trio.open_nursery() as nursery:

                    async def watch_client() -> None:
                        await client_gone.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(watch_client)
                    complete = await _pump(proxy_ws, req.id, out)
                    nursery.cancel_scope.cancel()
                if not complete:
                    log.debug("HTTP client of session %s left: cancelling upstream", session.id)
                    with trio.move_on_after(1):
                        await proxy_ws.send_message(wire.encode(wire.Cancel(req.id)))
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
