"""Connections from the gateway to a session's proxy.

:func:`open_upstream` dials the proxy (its UNIX socket, presenting the session's secret). A web
client or desktop agent gets a proxy connection of its own, because the proxy's per-client
backpressure and slow-reader handling depend on seeing each client. The HTTP tunnel
(``/api/ollama``) instead shares one :class:`HttpUpstream` per session for all its HTTP
requests, multiplexed by request ids that the upstream generates; it is opened on the
session's first HTTP request and closed when the session ends (or the proxy drops it).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import itertools
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, Final

import attrs
import trio

import wire
from orchestrator import Session, open_proxy_stream

from ._traffic import Traffic, frame_type

log = logging.getLogger("c2l.gateway")

PROXY_CONNECT_TIMEOUT_S: Final = 10.0
#: Messages buffered for one HTTP request before the shared upstream waits for its client.
REQUEST_QUEUE: Final = 16
#: How long the shared upstream waits for one HTTP client that does not read its answer
#: before that request alone is dropped (cancelled upstream), so the others move on.
SLOW_HTTP_CLIENT_S: Final = 10.0
#: Bytes read from the proxy at once (a burst of chunks is split into lines in one go).
RECEIVE_BYTES: Final = 64 * 1024
#: The longest answer to the link's upgrade that is read.
MAX_HANDSHAKE_BYTES: Final = 16 * 1024
#: The close code of a link the proxy ended without a ``!close`` line (WebSocket's 1006).
CLOSE_LOST: Final = 1006
#: How long the ``!close`` line of a client that closed cleanly may take to be written.
CLOSE_LINE_TIMEOUT_S: Final = 1.0


class ProxyUnreachable(Exception):
    """The session's proxy could not be dialled, or refused the link (message says why)."""


@attrs.frozen
class CloseReason:
    """How a link ended: the WebSocket close code the proxy gave (or 1006), and why."""

    code: int
    reason: str


class ProxyClosed(Exception):
    """The link to the proxy is closed; ``reason`` says how (as the proxy put it)."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(f"{reason.code} {reason.reason}")
        self.reason = reason


@attrs.define(eq=False)
class ProxyLink:
    """One connection to a session's proxy, upgraded to the line link (:mod:`wire._link`).

    One task at a time reads (:meth:`get_message`); any number may write
    (:meth:`send_message` takes a lock, so frames never interleave). A write that is
    cancelled half-way leaves the link unusable: later writes raise :class:`ProxyClosed`.
    """

    stream: trio.abc.Stream
    _reader: wire.LineReader = attrs.field(
        factory=lambda: wire.LineReader(wire.MAX_FRAME_BYTES + 1024)
    )
    _pending: collections.deque[str] = attrs.field(factory=collections.deque)
    _send_lock: trio.StrictFIFOLock = attrs.field(factory=trio.StrictFIFOLock)
    _broken: bool = False
    #: Set when the proxy's side ended (its ``!close`` line, or the end of the stream),
    #: or when the gateway closed the link.
    closed: CloseReason | None = None

    async def get_message(self) -> str:
        """The proxy's next message; :class:`ProxyClosed` once it has no more."""
        if self._pending:
            await trio.lowlevel.checkpoint()
        while not self._pending:
            if self.closed is not None:
                raise ProxyClosed(self.closed)
            await self._fill()
        line = self._pending.popleft()
        if wire.is_control(line):
            close = wire.parse_close(line)
            self.closed = CloseReason(*close) if close else CloseReason(CLOSE_LOST, line[:80])
            self._pending.clear()
            raise ProxyClosed(self.closed)
        return line

    async def _fill(self) -> None:
        try:
            data = await self.stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.closed = self.closed or CloseReason(CLOSE_LOST, "the proxy connection ended")
            return
        self._feed(data)

    def _feed(self, data: bytes | bytearray) -> None:
        """Queue the lines ``data`` completes; a line over the limit ends the link (1009)."""
        try:
            self._pending.extend(self._reader.feed(data))
        except wire.LineTooLong:
            self.closed = CloseReason(wire.CLOSE_TOO_BIG, "the proxy sent a line too long")

    async def send_message(self, frame: str) -> None:
        """Write one message (whole, whatever else writes at the same time)."""
        await self.send_message_raw(wire.link_line(frame))

    async def close_cleanly(self, code: int = wire.CLOSE_NORMAL) -> None:
        """Tell the proxy with a ``!close`` line that the client closed cleanly (its
        requests are cancelled at once); bounded and shielded, as it runs on the way out.
        A link that just ends means a client that vanished: its answers are kept for a
        resume (DESIGN.md section 2)."""
        if self.closed is not None or self._broken:
            return
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_LINE_TIMEOUT_S
            with contextlib.suppress(ProxyClosed):
                await self.send_message_raw(wire.close_line(code, "client closed"))

    async def send_message_raw(self, data: bytes) -> None:
        """Write ``data`` (a whole line already) as :meth:`send_message` does."""
        async with self._send_lock:
            if self._broken or self.closed is not None:
                raise ProxyClosed(self.closed or CloseReason(CLOSE_LOST, "the link broke"))
            done = False
            try:
                await self.stream.send_all(data)
                done = True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ProxyClosed(
                    self.closed or CloseReason(CLOSE_LOST, "the proxy connection ended")
                ) from None
            finally:
                self._broken = not done

    async def aclose(self) -> None:
        """Close the link (at once: the proxy sees the end of the stream)."""
        if self.closed is None:
            self.closed = CloseReason(wire.CLOSE_NORMAL, "closed by the gateway")
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


async def _handshake(
    stream: trio.abc.Stream, side: str, secret: str, headers: Mapping[str, str] | None = None
) -> ProxyLink:
    """Upgrade ``stream`` to the line link of ``/ws/<side>`` (the secret in its header).

    ``headers`` go on the upgrade too (the desktop's name on a bridge); the caller has
    checked them (no line breaks)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    await stream.send_all(
        (
            f"GET /ws/{side} HTTP/1.1\r\nHost: proxy\r\nUpgrade: {wire.LINK_PROTOCOL}\r\n"
            f"Connection: Upgrade\r\n{wire.SECRET_HEADER}: {secret}\r\n{extra}\r\n"
        ).encode()
    )
    head = bytearray()
    while (end := head.find(b"\r\n\r\n")) < 0:
        if len(head) > MAX_HANDSHAKE_BYTES:
            raise ProxyUnreachable("the proxy's answer to the upgrade has no end")
        data = await stream.receive_some(4096)
        if not data:
            raise ProxyUnreachable("the proxy closed the connection during the upgrade")
        head += data
    status = bytes(head[: head.find(b"\r\n")]).decode("latin-1")
    if status.split(" ", 2)[1:2] != ["101"]:
        raise ProxyUnreachable(f"the proxy refused the link: {status[:120]}")
    link = ProxyLink(stream)
    if len(head) > end + 4:  # lines the proxy sent right after its answer
        link._feed(head[end + 4 :])
    return link


async def connect_link(
    session: Session, side: str, headers: Mapping[str, str] | None = None
) -> ProxyLink:
    """Dial the session's proxy socket and upgrade to the line link of ``side``.

    The socket path is opened without following a link
    (:func:`orchestrator.open_proxy_stream`); no port, no ``rootlessport`` in between.
    Raises :class:`ProxyUnreachable` when the proxy cannot be reached, refuses, or does
    not answer within ``PROXY_CONNECT_TIMEOUT_S``.
    """
    path = session.target
    if path is None:
        raise ProxyUnreachable("the session's proxy has no socket yet")
    try:
        with trio.fail_after(PROXY_CONNECT_TIMEOUT_S):
            stream = await open_proxy_stream(path)
            try:
                return await _handshake(stream, side, session.secret, headers)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
    except trio.TooSlowError:
        raise ProxyUnreachable(
            f"the proxy did not answer within {PROXY_CONNECT_TIMEOUT_S:g} s"
        ) from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise ProxyUnreachable(f"{path}: {exc}") from exc


@contextlib.asynccontextmanager
async def open_upstream(
    session: Session, side: str, headers: Mapping[str, str] | None = None
) -> AsyncIterator[ProxyLink]:
    """An ``async with`` link to the session's proxy (:func:`connect_link`), closed on
    the way out. No task runs behind it: the caller reads and writes."""
    link = await connect_link(session, side, headers)
    try:
        yield link
    finally:
        await link.aclose()


def _unavailable(rid: str) -> wire.Error:
    return wire.Error(wire.ErrorCode.PROXY_UNAVAILABLE, "the session's proxy is unavailable", rid)


@attrs.define(eq=False)
class HttpCall:
    """One HTTP request in flight over a session's :class:`HttpUpstream`.

    ``answer`` yields the proxy's messages for it (``response_start``, ``chunk``s, then
    ``response_end`` or ``error``) and ends after the last one. :meth:`close` must be
    called once the caller is done, complete or not: an unfinished request is cancelled
    upstream.
    """

    upstream: HttpUpstream
    id: str
    answer: trio.MemoryReceiveChannel[wire.Message]
    _closed: bool = False

    def close(self) -> None:
        """Let go of the request (never blocks): cancel it upstream if it is unfinished."""
        if self._closed:
            return
        self._closed = True
        self.answer.close()
        self.upstream._forget(self.id, cancel=True)
        self.upstream.traffic.attached(self.upstream.session, -1)
        self.upstream.traffic.client_closed()


@attrs.define(eq=False)
class HttpUpstream:
    """One proxy connection carrying every HTTP request of a session, by request id.

    :meth:`run` owns the connection: it dials, reads the proxy's frames into the channel
    of the request they answer, and ends when the proxy goes or the session ends, failing
    the requests still in flight. Writes go through :meth:`run`'s writers only, so a
    caller that is cancelled never leaves half a frame on the connection.
    """

    session: Session
    traffic: Traffic
    #: How long one client that reads nothing may hold the others up (then it is dropped).
    slow_client_s: float = SLOW_HTTP_CLIENT_S
    #: Set once the connection is up, or has failed or ended.
    _settled: trio.Event = attrs.field(factory=trio.Event)
    closed: bool = False
    #: request id -> where its answer goes
    _routes: dict[str, trio.MemorySendChannel[wire.Message]] = attrs.field(factory=dict)
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    _outgoing: tuple[trio.MemorySendChannel[str], trio.MemoryReceiveChannel[str]] = attrs.field(
        factory=lambda: trio.open_memory_channel[str](0)
    )
    #: request ids to cancel upstream; as many as there are requests, at most
    _cancels: tuple[trio.MemorySendChannel[str], trio.MemoryReceiveChannel[str]] = attrs.field(
        factory=lambda: trio.open_memory_channel[str](math.inf)
    )

    async def call(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: Any,
        *,
        body_base64: str | None = None,
        pieces: AsyncGenerator[bytes, None] | None = None,
    ) -> HttpCall:
        """Send one request; its answer arrives on the returned call's channel.

        ``body`` is JSON, ``body_base64`` any other body that fits a frame; ``pieces``
        streams a larger body (``bodyStream``): each piece (at most
        ``wire.BODY_PIECE_BYTES``) is sent as a ``body`` message when the link to the
        proxy takes it, so the upload moves at the desktop's pace and is not held here.
        An exception from ``pieces`` (e.g. a blob over the limit) cancels the request.
        """
        rid = f"h{next(self._ids)}"
        send, receive = trio.open_memory_channel[wire.Message](REQUEST_QUEUE)
        call = HttpCall(self, rid, receive)
        self.traffic.client_opened()
        self.traffic.attached(self.session, 1)
        self._routes[rid] = send
        req = wire.Request(rid, method, target, headers, body, body_base64, pieces is not None)
        frame = wire.encode(req)
        try:
            await self.traffic.pace()
            await self._settled.wait()
            if self.closed:
                raise trio.BrokenResourceError
            await self._outgoing[0].send(frame)
            if pieces is not None:
                await self._upload(rid, pieces)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._fail(rid)
        except BaseException:
            call.close()  # cancelled on the way: nothing of it stays
            raise
        finally:
            if pieces is not None:
                await pieces.aclose()  # whether or not any of it was sent
        return call

    async def _upload(self, rid: str, pieces: AsyncGenerator[bytes, None]) -> None:
        """Send a streamed body's pieces, then the empty last one.

        It stops early when the request is answered already (e.g. the desktop is gone, or
        Ollama refused at once): the rest would only come back as ``unknown_id``.
        """
        async with contextlib.aclosing(pieces):  # also when it stops early
            async for data in pieces:
                if rid not in self._routes:
                    return
                encoded = base64.b64encode(data).decode("ascii")
                await self.traffic.pace()
                await self._outgoing[0].send(wire.encode(wire.Body(rid, encoded)))
        if rid in self._routes:
            await self._outgoing[0].send(wire.encode(wire.Body(rid, "", last=True)))

    def _forget(self, rid: str, *, cancel: bool) -> None:
        out = self._routes.pop(rid, None)
        if out is None:
            return  # answered in full, or failed
        out.close()
        if cancel and not self.closed:
            log.debug("HTTP client of session %s left: cancelling %s", self.session.id, rid)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                self._cancels[0].send_nowait(rid)

    def _fail(self, rid: str) -> None:
        out = self._routes.pop(rid, None)
        if out is not None:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                out.send_nowait(_unavailable(rid))
            out.close()

    async def run(self) -> None:
        """Connect, then route the proxy's answers until the proxy or the session ends."""
        session = self.session
        try:
            async with trio.open_nursery() as nursery:
                try:
                    async with open_upstream(session, "stream") as ws:
                        self._settled.set()
                        nursery.start_soon(self._write, ws, self._outgoing[1], False)
                        nursery.start_soon(self._write, ws, self._cancels[1], True)
                        await self._route(ws)
                except (OSError, ProxyUnreachable, ProxyClosed) as exc:
                    log.info("HTTP upstream of session %s ended: %r", session.id, exc)
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            self._settled.set()
            self._outgoing[1].close()
            self._cancels[1].close()
            for rid in list(self._routes):
                self._fail(rid)

    async def _write(
        self,
        ws: ProxyLink,
        frames: trio.MemoryReceiveChannel[str],
        cancels: bool,
    ) -> None:
        with contextlib.suppress(ProxyClosed):  # _route hears it too
            async for item in frames:
                frame = wire.encode(wire.Cancel(item)) if cancels else item
                self.traffic.inbound(self.session, frame, "cancel" if cancels else "request")
                await ws.send_message(frame)

    async def _route(self, ws: ProxyLink) -> None:
        while True:
            frame = await ws.get_message()
            self.traffic.outbound(self.session, frame, frame_type(frame))
            try:
                msg = wire.decode(frame)
            except wire.ProtocolError as exc:
                log.info("bad frame from the proxy of session %s: %s", self.session.id, exc)
                continue
            rid = getattr(msg, "id", None)
            out = self._routes.get(rid) if isinstance(rid, str) else None
            if out is None or not isinstance(rid, str):
                # a pong, or the tail of a request its client left (cancelled already)
                if not isinstance(msg, wire.Pong | wire.Ping):
                    log.debug("proxy frame %s for no HTTP request (%s)", msg.TYPE, rid)
                continue
            await self._deliver(rid, out, msg)

    async def _deliver(
        self, rid: str, out: trio.MemorySendChannel[wire.Message], msg: wire.Message
    ) -> None:
        delivered = False
        with trio.move_on_after(self.slow_client_s):
            # (a client that left closed its channel: its call's close cancels it)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await out.send(msg)
            delivered = True
        if not delivered:
            log.info(
                "HTTP client of session %s read nothing for %g s: request dropped",
                self.session.id,
                self.slow_client_s,
            )
            self._forget(rid, cancel=True)
        elif isinstance(msg, wire.ResponseEnd | wire.Error):
            self._forget(rid, cancel=False)
