"""``/api/ollama/<path>``: the desktop's Ollama over HTTP, through the user's tunnel.

Each HTTP request becomes one wire ``request`` on the session's shared HTTP upstream to
its proxy (``gateway._upstream.HttpUpstream``, one WebSocket for all of the session's HTTP
requests, multiplexed by request id); the desktop's ``response_start`` gives the status
and headers, every ``chunk`` (one NDJSON line or SSE event) is written to the HTTP client
as soon as it arrives, and nothing holds a whole body. A client that goes away mid-stream
makes the tunnel send ``cancel``, which the desktop agent turns into an aborted request to
Ollama.

Bodies that are not JSON pass byte for byte (DESIGN.md section 2): a small one as the
request's ``bodyBase64``, a blob upload (``POST /api/blobs/<digest>``, up to C2L_MAX_BLOB)
streamed from the client's body in ``body`` messages as it arrives; an answer that is not
text comes back in ``chunk.dataBase64`` and is written out as the bytes it was.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Final

import trio
from quart import Response, request
from werkzeug.exceptions import RequestEntityTooLarge

import wire
from orchestrator import OrchestratorError, SessionGone

from ._auth import Principal
from ._direct import TunnelFailed
from ._errors import ApiError, session_error
from ._limits import blob_too_large, drain_body
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


#: Bodies that go as JSON (``body``) when they parse: JSON, and curl's default type for
#: ``-d`` (Ollama reads its body as JSON whatever the type says).
_JSON_LIKE: Final = frozenset({"", "application/x-www-form-urlencoded"})


def _is_json_body(content_type: str) -> bool:
    kind = wire.media_type(content_type)
    return kind in _JSON_LIKE or wire.is_json_media(kind)


async def _blob_pieces(limit: int) -> AsyncGenerator[bytes, None]:
    """The request's body as it arrives, in pieces of at most ``wire.BODY_PIECE_BYTES``.

    Nothing is kept once passed on; over ``limit`` bytes in all it stops with the 413 of
    :func:`blob_too_large` (a body without Content-Length is counted here).
    """
    total = 0
    try:
        async for data in request.body:
            total += len(data)
            if total > limit:
                await drain_body()
                raise blob_too_large(limit)
            for piece in _split(data):
                yield piece
    except RequestEntityTooLarge:
        raise blob_too_large(limit) from None


def _split(data: bytes) -> list[bytes]:
    """``data`` in pieces of at most ``wire.BODY_PIECE_BYTES`` (one ``body`` message each)."""
    return [
        data[at : at + wire.BODY_PIECE_BYTES] for at in range(0, len(data), wire.BODY_PIECE_BYTES)
    ]


async def _pieces_of(raw: bytes) -> AsyncGenerator[bytes, None]:
    for piece in _split(raw):
        yield piece


async def ollama_request(gw: Gateway, path: str) -> Response:
    """Answer one ``/api/ollama/<path>`` request from the user's desktop Ollama."""
    principal = await http_principal(gw)
    blob_limit = getattr(request, "blob_limit", None)
    streamed = blob_limit is not None and (
        request.content_length is None or request.content_length > wire.BODY_PIECE_BYTES
    )
    raw = b"" if streamed else await request.get_data(as_text=False)
    assert isinstance(raw, bytes)
    body: Any = None
    body_base64: str | None = None
    pieces: AsyncGenerator[bytes, None] | None = None
    blob = path.startswith("api/blobs/")
    if streamed:
        assert blob_limit is not None
        pieces = _blob_pieces(blob_limit)
    elif raw and (blob or not _is_json_body(request.headers.get("content-type", ""))):
        if len(raw) <= wire.BODY_PIECE_BYTES:
            body_base64 = base64.b64encode(raw).decode("ascii")
        else:
            pieces = _pieces_of(raw)
    elif raw.strip():
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser
            raise ApiError(
                400,
                "bad_json",
                "the request body is not valid JSON (give a Content-Type for any other body)",
            ) from None
    target = "/" + path
    if request.query_string:
        target += "?" + request.query_string.decode("latin-1")
    headers = wire.request_headers(request.headers.items())
    uh = principal.user_hash
    if gw.orchestrator.get(uh) is None and await gw.direct.get(uh) is not None:
        # No session, so no bridge: the desktop's tunnel answers, and no session is made
        # for a desktop that only offers the direct route.
        _direct_takes(streamed)
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
            _direct_takes(streamed)
            return await _direct(gw, principal, target, headers, raw)
        raise session_error(exc) from None
    call = await upstream.call(
        request.method, target, headers, body, body_base64=body_base64, pieces=pieces
    )
    streaming = False
    try:
        first = await _first_message(call)
        if (
            isinstance(first, wire.Error)
            and first.code in FALLBACK_CODES
            and not streamed  # its body is gone: the tunnel cannot have it again
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
                    # A chunk is one NDJSON line or SSE event with its own line ending,
                    # or bytes of a body that is not text (dataBase64).
                    yield msg.raw()
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


def _direct_takes(streamed: bool) -> None:
    """A streamed blob upload does not go through the tunnel (which takes whole bodies)."""
    if streamed:
        raise ApiError(
            503,
            "blob_needs_bridge",
            f"a blob over {wire.BODY_PIECE_BYTES} bytes is uploaded only over the desktop's"
            " bridge, which is not connected: start `c2l desktop` with its bridge, or run"
            " `ollama create` on the desktop",
        )


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
