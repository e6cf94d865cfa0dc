"""Connections from the gateway to a session's proxy.

:func:`open_upstream` dials the proxy (its UNIX socket, presenting the session's secret). A web
client or desktop agent gets a proxy connection of its own, because the proxy's per-client
backpressure and slow-reader handling depend on seeing each client. The HTTP tunnel
(``/api/ollama``) instead shares one :class:`HttpUpstream` per session for all its HTTP
requests, multiplexed by request ids that the upstream generates; it is opened on the
session's first HTTP request and closed when the session ends (or the proxy drops it).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import AsyncIterator
from typing import Any, Final

import attrs
import trio
import trio_websocket

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


#: How long closing a proxy connection may take before it is cut.
PROXY_DISCONNECT_TIMEOUT_S: Final = 2.0


async def _connect(
    nursery: trio.Nursery, session: Session, side: str
) -> trio_websocket.WebSocketConnection:
    """Dial the session's proxy socket and do the WebSocket handshake (reader in ``nursery``)."""
    path = session.socket_path
    if path is None:
        raise trio_websocket.HandshakeError("the session's proxy has no socket yet")
    try:
        with trio.fail_after(PROXY_CONNECT_TIMEOUT_S):
            stream = await open_proxy_stream(path)
            try:
                return await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,
                    "proxy",
                    f"/ws/{side}",
                    extra_headers=[(wire.SECRET_HEADER.encode(), session.secret.encode())],
                    max_message_size=wire.MAX_FRAME_BYTES + 1024,
                )
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
    except trio.TooSlowError:
        raise trio_websocket.ConnectionTimeout from None
    except OSError as exc:
        raise trio_websocket.HandshakeError(f"{path}: {exc}") from exc


def _sole(
    group: BaseExceptionGroup[BaseException], user_error: BaseException | None
) -> BaseException:
    """The one exception to raise out of the upstream's nursery (as trio-websocket does)."""
    if len(group.exceptions) == 1:
        return group.exceptions[0]
    others = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    if user_error is not None and (user_error in others or not others):
        return user_error
    return others[0] if others else group.exceptions[0]


@contextlib.asynccontextmanager
async def open_upstream(
    session: Session, side: str
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """An ``async with`` WebSocket to the session's proxy, presenting the session secret.

    It dials the proxy's UNIX socket (``session.socket_path``, opened without following a
    link: :func:`orchestrator.open_proxy_stream`); no port, no ``rootlessport`` in between.
    Raises as ``trio_websocket.open_websocket`` does: :class:`trio_websocket.HandshakeError`
    (a :class:`~trio_websocket.ConnectionTimeout` after ``PROXY_CONNECT_TIMEOUT_S``) when
    the proxy cannot be reached or refuses, and the block's own exception unwrapped from
    the reader's nursery. The connection is closed on the way out, within
    ``PROXY_DISCONNECT_TIMEOUT_S``.
    """
    failure: BaseException | None = None
    user_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            connection = None
            try:
                connection = await _connect(nursery, session, side)
            except trio_websocket.HandshakeError as exc:
                failure = exc
                nursery.cancel_scope.cancel()  # a reader left half-way goes too
            if connection is not None:
                try:
                    yield connection
                except BaseException as exc:
                    user_error = exc
                    raise
                finally:
                    # Not shielded, as in trio_websocket.open_websocket: a cancelled relay
                    # does not wait for the proxy's close frame.
                    try:
                        with trio.move_on_after(PROXY_DISCONNECT_TIMEOUT_S):
                            await connection.aclose()
                    finally:
                        nursery.cancel_scope.cancel()  # the reader, if the close timed out
    except BaseExceptionGroup as group:
        raise _sole(group, user_error) from None
    if failure is not None:
        raise failure


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

    async def call(self, method: str, target: str, headers: dict[str, str], body: Any) -> HttpCall:
        """Send one request; its answer arrives on the returned call's channel."""
        rid = f"h{next(self._ids)}"
        send, receive = trio.open_memory_channel[wire.Message](REQUEST_QUEUE)
        call = HttpCall(self, rid, receive)
        self.traffic.client_opened()
        self.traffic.attached(self.session, 1)
        self._routes[rid] = send
        frame = wire.encode(wire.Request(rid, method, target, headers, body))
        try:
            await self.traffic.pace()
            await self._settled.wait()
            if self.closed:
                raise trio.BrokenResourceError
            await self._outgoing[0].send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._fail(rid)
        except BaseException:
            call.close()  # cancelled on the way: nothing of it stays
            raise
        return call

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
                except (
                    OSError,
                    trio_websocket.HandshakeError,
                    trio_websocket.ConnectionClosed,
                ) as exc:
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
        ws: trio_websocket.WebSocketConnection,
        frames: trio.MemoryReceiveChannel[str],
        cancels: bool,
    ) -> None:
        with contextlib.suppress(trio_websocket.ConnectionClosed):  # _route hears it too
            async for item in frames:
                frame = wire.encode(wire.Cancel(item)) if cancels else item
                self.traffic.inbound(self.session, frame, "cancel" if cancels else "request")
                await ws.send_message(frame)

    async def _route(self, ws: trio_websocket.WebSocketConnection) -> None:
        while True:
            frame = await ws.get_message()
            if isinstance(frame, bytes):
                frame = frame.decode("utf-8", "replace")
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
