"""The gateway's limits: sizes of requests, and the token buckets that pace users.

:class:`TokenBucket` is sans-IO: it is given the time and answers how long to wait, and the
caller decides whether to wait (the per-user frame budget) or to refuse (the session
creation budget). Tests drive it on trio's MockClock.
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import trio
from quart import Request, request
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers.request import TrioBody

from ._errors import ApiError

#: Largest HTTP request body accepted (413 beyond), except a blob upload's.
MAX_BODY_BYTES = 1024 * 1024
#: Where Ollama takes blob uploads (``POST /api/blobs/<digest>``), under ``/api/ollama``.
BLOB_PATH = "/api/blobs/"
BLOB_UPLOAD_PATH = "/api/ollama" + BLOB_PATH
#: How long the rest of a refused blob upload is read (and dropped): a client that sends
#: its whole body before reading the answer (httpx, the ollama client) then hears the 413
#: instead of stalling on a server that has stopped reading.
REFUSED_BODY_DRAIN_S = 30.0
#: Bytes of a blob upload the gateway holds before it stops reading the client (the
#: unread part of the body; the route takes it piece by piece as the desktop does).
BLOB_BUFFER_BYTES = 1024 * 1024
#: Most request headers, and the longest header (name + value), of an HTTP request or
#: WebSocket upgrade; Hypercorn caps the whole head at ``MAX_HEAD_BYTES`` before that.
MAX_REQUEST_HEADERS = 100
MAX_HEADER_BYTES = 8 * 1024
MAX_HEAD_BYTES = 64 * 1024
#: New sessions a user may start: a burst of ``SESSION_CREATE_BURST``, refilled at one per
#: ``SESSION_CREATE_PERIOD_S`` seconds (a token bucket). Returning the live session is free.
SESSION_CREATE_BURST = 10
SESSION_CREATE_PERIOD_S = 6.0
#: Frames per second read from one user's connections together (all sides, HTTP requests
#: included), and the burst above that rate (about 1,000 streamed chunks a second per user
#: leaves room for the others; a flood of tens of thousands is read at this pace).
USER_FRAME_RATE = 2000.0
USER_FRAME_BURST = 2000.0


@attrs.define(weakref_slot=True)
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up (sans-IO: the caller waits).

    :meth:`take` always spends, and may go into debt, so that callers sharing a bucket
    queue up behind each other; :meth:`try_take` spends only a whole token that is there.
    """

    rate: float
    burst: float
    tokens: float = attrs.field()
    stamp: float = attrs.field(factory=trio.current_time)

    @tokens.default
    def _full(self) -> float:
        return self.burst

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float) -> float:
        """Spend one token at trio time ``now``; the seconds to wait before going on."""
        self._refill(now)
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def try_take(self, now: float) -> float:
        """Spend one token if there is one (0.0); else spend nothing and say how long
        until there is one."""
        self._refill(now)
        if self.tokens < 1:
            return (1 - self.tokens) / self.rate
        self.tokens -= 1
        return 0.0

    def is_full(self, now: float) -> bool:
        """True when the bucket is full again at ``now`` (its state can be forgotten)."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


def check_header_limits(headers: Any) -> None:
    """Raise ApiError 431 when a request has too many headers or one that is too long."""
    items = list(headers.items())  # werkzeug Headers: every pair, repeats included
    if len(items) > MAX_REQUEST_HEADERS:
        raise ApiError(431, "headers_too_large", f"more than {MAX_REQUEST_HEADERS} request headers")
    for name, value in items:
        if len(name) + len(value) > MAX_HEADER_BYTES:
            raise ApiError(
                431,
                "headers_too_large",
                f"header {name[:40]!r} is over {MAX_HEADER_BYTES} bytes",
            )


def is_blob_upload(method: str, path: str) -> bool:
    """Whether ``method path`` (the gateway's own path) uploads a blob to Ollama."""
    return method == "POST" and path.startswith(BLOB_UPLOAD_PATH)


def blob_too_large(limit: int) -> ApiError:
    """The 413 of a blob upload over C2L_MAX_BLOB, and what to do instead."""
    return ApiError(
        413,
        "blob_too_large",
        f"blob over {limit} bytes (C2L_MAX_BLOB): upload it on the desktop itself, e.g. run"
        " `ollama create` there with the model file, instead of through the gateway",
    )


async def drain_body() -> None:
    """Read and drop what is left of the request's body (for at most a bounded time)."""
    with trio.move_on_after(REFUSED_BODY_DRAIN_S), contextlib.suppress(Exception):
        async for _ in request.body:
            pass


class PacedBody(TrioBody):
    """A request body that is read as it arrives and whose unread part is capped.

    Quart's connection receives a body as fast as the client sends it and keeps what
    the route has not read yet. For a blob upload, which the route passes on at the
    desktop's pace, :class:`PacedConnection` waits (:meth:`wait_for_room`) while more
    than ``BLOB_BUFFER_BYTES`` are unread, so the client is slowed by TCP instead of the
    gateway holding the blob.
    """

    def __init__(self, expected: int | None, limit: int | None) -> None:
        super().__init__(expected, limit)
        self._taken = trio.Event()

    async def __anext__(self) -> bytes:
        try:
            data: bytes = await super().__anext__()
            return data
        finally:
            self._taken.set()  # wakes the connection's wait_for_room
            self._taken = trio.Event()

    @property
    def unread(self) -> int:
        """Bytes received and not yet read by the route."""
        return len(self._data)

    async def wait_for_room(self, room: int = BLOB_BUFFER_BYTES) -> None:
        """Return once at most ``room`` bytes are unread (or the body failed)."""
        while self.unread > room and self._must_raise is None:
            await self._taken.wait()


class PacedConnection(TrioASGIHTTPConnection):
    """Quart-Trio's HTTP connection, receiving no further while a :class:`PacedBody` is full.

    (The handler ends the connection's task when it answers, as Quart-Trio's does; a
    client that goes away is seen once the route reads again.)
    """

    async def handle_messages(  # type: ignore[override]  # as Quart-Trio's own
        self, nursery: trio.Nursery, request: Any, receive: Any
    ) -> None:
        """Quart's loop (``quart.asgi.ASGIHTTPConnection.handle_messages``), paced."""
        body = request.body
        while True:
            message = await receive()
            if message["type"] == "http.request":
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body.set_complete()
                elif isinstance(body, PacedBody):
                    await body.wait_for_room()
            elif message["type"] == "http.disconnect":
                break
        nursery.cancel_scope.cancel()


def blob_request_class(base: type[Request], max_blob: int) -> type[Request]:
    """``base`` whose blob uploads may have bodies up to ``max_blob`` bytes.

    Quart fixes a request's body limit when it makes the request, from the app-wide
    ``MAX_CONTENT_LENGTH`` (1 MiB here); only ``POST /api/ollama/api/blobs/...`` gets the
    blob limit, every other route keeps 1 MiB. (Quart counts the bytes not yet read, and
    the blob route reads as it goes, so the route counts the total itself.) A body that
    declares more than ``max_blob`` is refused, and drained without a limit (it is dropped
    as it comes) so that the client hears why.
    """

    class BlobRequest(base):  # type: ignore[valid-type,misc]
        #: The blob limit when this request is a blob upload, else None.
        blob_limit: int | None = None

        def __init__(self, method: str, scheme: str, path: str, *args: Any, **kw: Any) -> None:
            if is_blob_upload(method, path):
                kw["max_content_length"] = max_blob
                self.blob_limit = max_blob
            super().__init__(method, scheme, path, *args, **kw)
            if self.blob_limit is None:
                return
            if (self.content_length or 0) > max_blob:
                self.body = self.body_class(None, None)  # refused, and drained
            else:
                self.body = PacedBody(self.content_length, max_blob)

    return BlobRequest


async def check_request_limits() -> None:
    """``before_request`` hook: header limits, and a declared body over the limit (413)."""
    check_header_limits(request.headers)
    blob_limit = getattr(request, "blob_limit", None)
    if blob_limit is not None:
        if request.content_length is not None and request.content_length > blob_limit:
            await drain_body()
            raise blob_too_large(blob_limit)
        return
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"request body over {MAX_BODY_BYTES} bytes")
