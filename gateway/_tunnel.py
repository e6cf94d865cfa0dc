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

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import trio
from quart import Response, request

import wire
from orchestrator import OrchestratorError, SessionGone

from ._auth import Principal
from ._direct import TunnelFailed
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


#: The header that says how an answer came (DESIGN.md section 5).
ROUTE_HEADER: Final = "X-C2L-Route"
#: The bridge's first answers that let a request move to the tunnel (nothing of the
#: answer has come: a generation is never duplicated).
FALLBACK_CODES: Final = frozenset(
    {
        wire.ErrorCode.DESKTOP_UNAVAILABLE,
        wire.ErrorCode.PROXY_UNAVAILABLE,
        wire.ErrorCode.SESSION_ENDED,
    }
)


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
    assert isinstance(raw, bytes)
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
    uh = principal.user_hash
    if gw.orchestrator.get(uh) is None and await gw.direct.get(uh) is not None:
        # No session, so no bridge: the desktop's tunnel answers, and no session is made
        # for a desktop that only offers the direct route.
        return await _direct(gw, principal, target, headers, raw)
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
        if await gw.direct.get(uh) is not None:
            return await _direct(gw, principal, target, headers, raw)
        raise session_error(exc) from None
    call = await upstream.call(request.method, target, headers, body)
    streaming = False
    try:
        first = await _first_message(call)
        if (
            isinstance(first, wire.Error)
            and first.code in FALLBACK_CODES
            and await gw.direct.get(uh) is not None
        ):
            # Nothing of the answer has come over the bridge: the tunnel may answer it.
            call.close()
            return await _direct(gw, principal, target, headers, raw)
        if isinstance(first, wire.Error):
            status = _STATUS_FOR_ERROR.get(first.code, 502)
            retry = {"Retry-After": "1"} if status == 429 else None
            raise ApiError(status, first.code, first.message, retry)
        if not isinstance(first, wire.ResponseStart):
            raise ApiError(502, wire.ErrorCode.UPSTREAM_ERROR, "the desktop answered out of order")
        out_headers = wire.http_response_headers(first.headers)
        out_headers[ROUTE_HEADER] = "cloud"
        gw.served(uh, "cloud")
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


async def _direct(
    gw: Gateway, principal: Principal, target: str, headers: dict[str, str], raw: bytes
) -> Response:
    """Answer the request through the user's tunnel (route ``direct``)."""
    reg = await gw.direct.get(principal.user_hash)
    if reg is None:
        raise ApiError(503, wire.ErrorCode.DESKTOP_UNAVAILABLE, "your desktop is not connected")
    stack = contextlib.AsyncExitStack()
    try:
        with trio.move_on_after(FIRST_BYTE_TIMEOUT_S) as waited:
            answer = await stack.enter_async_context(
                gw.direct.open(principal, reg, request.method, target, headers, raw)
            )
    except TunnelFailed as exc:
        raise ApiError(
            502,
            "tunnel_unreachable",
            f"your desktop has no bridge and its tunnel did not answer ({str(exc)[:200]})",
        ) from None
    if waited.cancelled_caught:
        await stack.aclose()
        raise ApiError(504, "desktop_timeout", "the desktop's tunnel did not start answering")
    out_headers = wire.http_response_headers(answer.headers)
    out_headers[ROUTE_HEADER] = "direct"
    gw.served(principal.user_hash, "direct")
    if request.method == "HEAD":
        await stack.aclose()
        return Response(b"", answer.status, out_headers)
    media_type = wire.media_type_of(answer.headers)

    async def body_stream() -> AsyncIterator[bytes]:
        try:
            async for piece in answer.body:
                yield piece
        except TunnelFailed as exc:
            yield error_data(media_type, f"the tunnel failed mid-answer: {str(exc)[:200]}")
        finally:
            # Also when the client went: closing the connection aborts the desktop's request.
            with trio.CancelScope(shield=True):
                await stack.aclose()

    response = Response(body_stream(), answer.status, out_headers)
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
