"""``/api/ollama/<path>``: the desktop's Ollama over HTTP, through the user's tunnel.

Each HTTP request becomes one wire ``request`` on the session's shared HTTP upstream to
its proxy (``gateway._upstream.HttpUpstream``, one WebSocket for all of the session's HTTP
requests, multiplexed by request id); the desktop's ``response_start`` gives the status
and headers, every ``chunk`` (one NDJSON line or SSE event) is written to the HTTP client
as soon as it arrives, and nothing holds a whole body. A client that goes away mid-stream
makes the tunnel send ``cancel``, which the desktop agent turns into an aborted request to
Ollama.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import trio
from quart import Response, request

import wire
from orchestrator import OrchestratorError, SessionGone

from ._errors import ApiError, session_error
from ._state import FIRST_BYTE_TIMEOUT_S, Gateway, http_principal
from ._upstream import HttpCall

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
    target = "/" + path
    if request.query_string:
        target += "?" + request.query_string.decode("latin-1")
    headers = wire.request_headers(request.headers.items())
    try:
        for attempt in (1, 2):
            session = await gw.ensure_session(principal)
            try:
                upstream = gw.http_upstream(session)
                break
            except SessionGone:
                if attempt == 2:  # it ended as it was handed out, twice: say so
                    raise
    except OrchestratorError as exc:
        raise session_error(exc) from None
    call = await upstream.call(request.method, target, headers, body)
    streaming = False
    try:
        first = await _first_message(call)
        if isinstance(first, wire.Error):
            status = _STATUS_FOR_ERROR.get(first.code, 502)
            retry = {"Retry-After": "1"} if status == 429 else None
            raise ApiError(status, first.code, first.message, retry)
        if not isinstance(first, wire.ResponseStart):
            raise ApiError(502, wire.ErrorCode.UPSTREAM_ERROR, "the desktop answered out of order")
        out_headers = wire.http_response_headers(first.headers)
        if request.method == "HEAD":
            return Response(b"", first.status, out_headers)
        media_type = wire.media_type_of(first.headers)
        streaming = True
    finally:
        if not streaming:
            call.close()

    async def body_stream() -> AsyncIterator[bytes]:
        try:
            async for msg in call.answer:
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
            # disconnected: in the second case the request is cancelled upstream.
            call.close()

    response = Response(body_stream(), first.status, out_headers)
    response.timeout = None
    return response


async def _first_message(call: HttpCall) -> wire.Message:
    """The desktop's first answer to ``call`` (504 when it does not come in time)."""
    with trio.move_on_after(FIRST_BYTE_TIMEOUT_S):
        try:
            return await call.answer.receive()
        except trio.EndOfChannel:
            return wire.Error(wire.ErrorCode.PROXY_UNAVAILABLE, "the session's proxy went away")
    raise ApiError(
        504,
        "desktop_timeout",
        f"the desktop did not start answering within {FIRST_BYTE_TIMEOUT_S:.0f} s",
    )
