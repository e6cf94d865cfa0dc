"""The desktop agent: dials out to the gateway and serves tunnelled requests from Ollama.

``c2l desktop --gateway URL --token T`` connects to ``<gateway>/ws/bridge`` (the desktop is
behind NAT, so it always dials out), authenticates with an ``Authorization: Bearer``
header, and then serves the wire protocol: every ``request`` becomes an HTTP request to the
local Ollama whose answer streams back as ``response_start``, one ``chunk`` per NDJSON line
or SSE event, and ``response_end``. A ``cancel`` aborts the Ollama request, a dropped
connection cancels them all, and the agent reconnects with capped, jittered exponential
backoff, re-reading a token file that may have been refreshed in the meantime.

The pieces that need no I/O (URL derivation, body splitting; the backoff is
:class:`c2lcore.Backoff`, the header filters are :mod:`wire`'s) are plain objects so they
can be tested without a network.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import attrs
import httpx
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

import wire
from c2lcore import Backoff, BackoffPolicy

from ._direct import DEFAULT_DIRECT_PORT, DirectAuth, DirectEndpoint, serve_direct
from ._ollama import ALLOWED_PATH_PREFIXES as ALLOWED_PATH_PREFIXES
from ._ollama import BadPath as BadPath
from ._ollama import ollama_request_headers as _request_headers
from ._ollama import ollama_url as ollama_url
from ._ollama import safe_path as safe_path
from ._tunnels import TunnelManager, TunnelProvider, TunnelStatus

logger = logging.getLogger(__name__)

#: Where Ollama listens unless ``--ollama`` says otherwise.
DEFAULT_OLLAMA_URL: Final = "http://127.0.0.1:11434"
#: The gateway path the desktop agent connects to.
BRIDGE_PATH: Final = "/ws/bridge"

#: Longest piece of body text put in one ``chunk``. JSON escaping can grow text up to six
#: times (control characters), so this keeps every frame under ``wire.MAX_FRAME_BYTES``.
MAX_CHUNK_BYTES: Final = 128 * 1024
#: Pieces of a streamed request body (``body`` messages) queued for Ollama before the
#: reader waits for Ollama to take them: an upload moves at Ollama's pace and at most
#: this many pieces of it are held here.
UPLOAD_QUEUE: Final = 4


class AgentConfigError(ValueError):
    """A setting of the agent that cannot work; the message names it and the fix."""


class TokenError(Exception):
    """The token cannot be read (missing or empty token file)."""


# ----- configuration -------------------------------------------------------------------


def bridge_url(gateway_url: str) -> str:
    """The WebSocket URL of the gateway's desktop endpoint.

    ``https://host`` gives ``wss://host/ws/bridge`` and ``http://127.0.0.1:8080`` gives
    ``ws://127.0.0.1:8080/ws/bridge``; a path prefix is kept (a gateway behind
    ``https://host/c2l`` is reached at ``/c2l/ws/bridge``).
    """
    parts = urlsplit(gateway_url.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise AgentConfigError(
            f"--gateway {gateway_url!r} is not a gateway URL: use e.g. https://c2l.example.com"
            " or http://127.0.0.1:8080"
        )
    if parts.username or parts.password or parts.query:
        raise AgentConfigError(
            f"--gateway {parts.scheme}://{parts.hostname}...: give only scheme, host, port"
            " and path; the token goes in --token or --token-file, never in the URL"
        )
    path = parts.path.rstrip("/")
    if not path.endswith(BRIDGE_PATH):
        path += BRIDGE_PATH
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def _ollama_base(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AgentConfigError(f"--ollama {url!r} is not an HTTP URL such as {DEFAULT_OLLAMA_URL}")
    return url.strip().rstrip("/")


class TokenSource(Protocol):
    """Where the agent gets its bearer token before each connection attempt."""

    async def read(self) -> str:
        """The current token, or raise :class:`TokenError`."""
        ...

    def invalidate(self) -> None:
        """The gateway refused the token: read it afresh next time."""
        ...

    def describe(self) -> str:
        """Where the token comes from, for status lines (never the token)."""
        ...


@attrs.frozen(repr=False)
class StaticToken:
    """A token given on the command line."""

    token: str

    def __repr__(self) -> str:  # never let a token reach a log line
        return "StaticToken(<redacted>)"

    async def read(self) -> str:
        """The token."""
        return self.token.strip()

    def invalidate(self) -> None:
        """Nothing to re-read."""

    def describe(self) -> str:
        """For status lines."""
        return "--token"


@attrs.define(repr=False)
class TokenFile:
    """A token kept in a file that another program refreshes; re-read when it changes."""

    path: Path
    _token: str | None = None
    _stamp: tuple[int, int, int] | None = None

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r})"

    async def read(self) -> str:
        """The file's token, read again if the file changed (mtime, size or inode)."""
        tpath = trio.Path(self.path)
        try:
            st = await tpath.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._token is None or stamp != self._stamp:
                self._token = (await tpath.read_text(encoding="utf-8")).strip()
                self._stamp = stamp
        except OSError as exc:
            self._token = None
            raise TokenError(f"cannot read token file {self.path}: {exc.strerror}") from None
        if not self._token:
            raise TokenError(f"token file {self.path} is empty")
        return self._token

    def invalidate(self) -> None:
        """Forget the cached token so the next :meth:`read` reads the file."""
        self._token = None

    def describe(self) -> str:
        """For status lines."""
        return f"token file {self.path}"


def default_desktop_name() -> str:
    """The host name, as a desktop name (``c2l desktop --name``'s default).

    Characters a name may not hold become ``-`` and it is cut to 64, so any host's name
    works; an empty result is :data:`wire.DEFAULT_DESKTOP_NAME`.
    """
    host = socket.gethostname().split(".", 1)[0]
    name = "".join(c if wire.valid_desktop_name(c) else "-" for c in host)[: wire.MAX_DESKTOP_NAME]
    return name or wire.DEFAULT_DESKTOP_NAME


@attrs.frozen
class AgentConfig:
    """Everything the agent needs; ``gateway_url`` and ``ollama_url`` are checked here."""

    gateway_url: str
    token: TokenSource
    ollama_url: str = DEFAULT_OLLAMA_URL
    backoff: BackoffPolicy = attrs.field(factory=BackoffPolicy)
    #: Seconds to wait for the gateway's ``auth_ok`` after the upgrade.
    auth_timeout: float = 15.0
    #: Seconds for the TCP + TLS + WebSocket handshake.
    connect_timeout: float = 10.0
    #: A ping every this many seconds finds a dead connection behind NAT (shorter than the
    #: gateway's interval, 30 s by default, so the gateway hears the agent and never pings).
    heartbeat_interval: float = 20.0
    heartbeat_timeout: float = 20.0
    #: Requests served at once on one connection.
    max_in_flight: int = 256
    #: Check once at start that Ollama answers, and say so in a status line.
    probe_ollama: bool = True
    #: The direct endpoint's port on 127.0.0.1 (0: any free port); None: no direct
    #: endpoint. A tunnel or ``bridge=False`` needs one (DESIGN.md section 5).
    direct_port: int | None = None
    #: The tunnel that gives the direct endpoint a public URL, if any.
    tunnel: TunnelProvider | None = None
    #: False (``--no-bridge``): no ``/ws/bridge`` connection, only the direct route.
    bridge: bool = True
    #: Where the gateway's token configuration and key sets are cached (0600); None: the
    #: default, ``direct-auth.json`` in the config directory.
    auth_cache: Path | None = None
    #: Seconds between two health checks of the tunnel's public URL.
    tunnel_health_interval: float = 30.0
    #: This desktop's name (``--name``): a user's desktops are told apart by it, and a
    #: newer agent of the same name replaces the older one (DESIGN.md section 2).
    name: str = attrs.field(factory=default_desktop_name)

    def __attrs_post_init__(self) -> None:
        bridge_url(self.gateway_url)
        _ollama_base(self.ollama_url)
        if not wire.valid_desktop_name(self.name):
            raise AgentConfigError(
                f"--name {self.name[:80]!r}: a desktop name is 1-{wire.MAX_DESKTOP_NAME}"
                " characters of A-Z a-z 0-9 . _ -"
            )
        if self.direct_port is None and (self.tunnel is not None or not self.bridge):
            raise AgentConfigError(
                "a tunnel or --no-bridge needs the direct endpoint: give --direct-port"
                f" ({DEFAULT_DIRECT_PORT} by default)"
            )

    @property
    def bridge_url(self) -> str:
        """The WebSocket URL the agent dials."""
        return bridge_url(self.gateway_url)

    @property
    def ollama_base(self) -> str:
        """Ollama's base URL without a trailing slash."""
        return _ollama_base(self.ollama_url)


# ----- body splitting ------------------------------------------------------------------


def _utf8_cut(buf: bytes | bytearray, limit: int) -> int:
    """Largest cut <= limit that does not split a UTF-8 sequence."""
    cut = limit
    while cut > 0 and (buf[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut or limit


@attrs.define
class BodySplitter:
    """Turns a response body, as it arrives, into the ``data`` of ``chunk`` messages.

    ``lines`` mode (NDJSON) cuts after each ``\\n``, ``events`` mode (SSE) after each blank
    line; ``raw`` mode passes pieces on as they come. Each piece keeps its terminator, so
    the concatenated chunks are exactly Ollama's body. Nothing is held back longer than it
    takes to see the end of a line, and no piece is over :data:`MAX_CHUNK_BYTES`.
    """

    mode: str = "raw"
    max_bytes: int = MAX_CHUNK_BYTES
    _buf: bytearray = attrs.field(factory=bytearray)
    _decoder: codecs.IncrementalDecoder = attrs.field(
        factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    @classmethod
    def for_response(cls, content_type: str) -> BodySplitter:
        """The splitter for a response's ``Content-Type``."""
        kind = wire.media_type(content_type)
        if kind in wire.NDJSON_MEDIA_TYPES:
            return cls("lines")
        if kind == wire.SSE_MEDIA_TYPE:
            return cls("events")
        return cls("raw")

    def _end(self) -> int:
        """Length of the first complete line/event in the buffer, or 0."""
        if self.mode == "lines":
            i = self._buf.find(b"\n")
            return i + 1 if i >= 0 else 0
        ends = [(i, len(sep)) for sep in (b"\n\n", b"\r\n\r\n") if (i := self._buf.find(sep)) >= 0]
        if not ends:
            return 0
        i, n = min(ends)
        return i + n

    def feed(self, data: bytes) -> list[str]:
        """The complete pieces that ``data`` finishes."""
        if self.mode == "raw":
            text = self._decoder.decode(data)
            return [text[i : i + self.max_bytes] for i in range(0, len(text), self.max_bytes)]
        self._buf += data
        out = []
        while end := self._end():
            out.append(bytes(self._buf[:end]).decode("utf-8", errors="replace"))
            del self._buf[:end]
        while len(self._buf) > self.max_bytes:  # a giant line: pass it on in parts
            cut = _utf8_cut(self._buf, self.max_bytes)
            out.append(bytes(self._buf[:cut]).decode("utf-8", errors="replace"))
            del self._buf[:cut]
        return out

    def flush(self) -> list[str]:
        """Whatever is left at the end of the body (a last line without ``\\n``)."""
        if self.mode == "raw":
            text = self._decoder.decode(b"", final=True)
        else:
            text = bytes(self._buf).decode("utf-8", errors="replace")
            self._buf.clear()
        return [text] if text else []


def _close_text(reason: Any) -> str:
    if reason is None:
        return "connection lost"
    text = f"closed by gateway with code {reason.code} ({reason.name})"
    return f"{text}: {reason.reason}" if reason.reason else text


# ----- the agent -----------------------------------------------------------------------

StatusCallback = Callable[[str], None]


def _log_status(line: str) -> None:
    logger.info("%s", line)


#: Messages queued for the writer before senders wait (and most merged into one batch).
OUTGOING_QUEUE: Final = 64


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def coalesce(batch: list[_Outgoing]) -> list[_Outgoing]:
    """``batch`` with each request's chunks that follow one another merged into one chunk.

    DESIGN.md section 2 lets a ``chunk`` carry several complete lines. Per request, order
    is kept: a chunk is merged into the request's previous chunk only if no other message
    of that request came between them, and only up to :data:`MAX_CHUNK_BYTES` of data.
    Messages of different requests may move relative to each other (they are independent).
    """
    if len(batch) < 2:
        return batch
    out: list[_Outgoing] = []
    #: every merged chunk: its index in ``out`` and its parts
    merged: list[tuple[int, list[str]]] = []
    #: request id -> (its open chunk in ``merged``, that chunk's size in bytes)
    open_chunks: dict[str, tuple[int, int]] = {}
    for stream, msg in batch:
        if isinstance(msg, wire.Chunk) and msg.data_base64 is None:
            size = _utf8_len(msg.data)
            held = open_chunks.get(msg.id)
            if held is not None and held[1] + size <= MAX_CHUNK_BYTES:
                merged[held[0]][1].append(msg.data)
                open_chunks[msg.id] = (held[0], held[1] + size)
                continue
            open_chunks[msg.id] = (len(merged), size)
            merged.append((len(out), [msg.data]))
        else:
            rid = getattr(msg, "id", None)
            if isinstance(rid, str):
                open_chunks.pop(rid, None)  # what follows this message must stay after it
        out.append((stream, msg))
    for at, parts in merged:
        if len(parts) > 1:
            stream, msg = out[at]
            assert isinstance(msg, wire.Chunk)
            out[at] = (stream, wire.Chunk(msg.id, "".join(parts)))
    return out


@attrs.define(eq=False)
class _Stream:
    """One request being served; frames of a cancelled stream are dropped by the writer."""

    id: str
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    cancelled: bool = False
    #: Where the pieces of a streamed request body go, until its last piece.
    upload: trio.MemorySendChannel[bytes] | None = None
    #: Bytes of the streamed body received so far.
    uploaded: int = 0


#: A message for the writer, with the request it belongs to (None: the connection's own).
_Outgoing: TypeAlias = "tuple[_Stream | None, wire.Message]"


@attrs.define(eq=False)
class _Link:
    """One authenticated connection to the gateway and the requests it carries."""

    agent: DesktopAgent
    ws: WebSocketConnection
    send_channel: trio.MemorySendChannel[_Outgoing]
    nursery: trio.Nursery
    tracker: wire.StreamTracker
    streams: dict[str, _Stream] = attrs.field(factory=dict)
    reason: str | None = None
    #: The gateway's close code, when it closed the connection with one.
    code: int | None = None
    #: Set by the next frame from the gateway (the heartbeat waits on it).
    heard: trio.Event = attrs.field(factory=trio.Event)

    def close(self, reason: str, closed: Any = None) -> None:
        """End this connection (first reason wins) and everything running on it.

        ``closed`` is the gateway's close reason (trio-websocket's), if it sent one.
        """
        if self.reason is None:
            self.reason = reason
            self.code = closed.code if closed is not None else None
        self.nursery.cancel_scope.cancel()

    async def send(self, stream: _Stream | None, msg: wire.Message) -> None:
        """Queue ``msg`` for the single writer; frames never interleave."""
        await self.send_channel.send((stream, msg))

    async def writer(self, receive_channel: trio.MemoryReceiveChannel[_Outgoing]) -> None:
        """The only task that writes to the WebSocket.

        It sends what is queued as it comes; when it is behind (several messages queued),
        it sends each request's consecutive chunks as one (:func:`coalesce`), so a busy
        connection carries fewer, larger frames, and an idle one holds nothing back.
        """
        async with receive_channel:
            async for first in receive_channel:
                batch = [first]
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    while len(batch) < OUTGOING_QUEUE:
                        batch.append(receive_channel.receive_nowait())
                for stream, msg in coalesce(batch):
                    if stream is not None and stream.cancelled:
                        continue  # queued before the cancel arrived: nothing more for that id
                    try:
                        await self.ws.send_message(wire.encode(msg))
                    except ConnectionClosed as exc:
                        self.close(_close_text(exc.reason), exc.reason)
                        return

    async def heartbeat(self) -> None:
        """Pings find a connection that died without a close (NAT, sleep).

        They are ``wire`` pings, which the gateway sees: they are this connection's only
        heartbeat (the gateway pings only a client it has not heard for its own interval).
        Any frame from the gateway answers one.
        """
        config = self.agent.config
        while True:
            await trio.sleep(config.heartbeat_interval)
            heard = self.heard = trio.Event()
            with trio.move_on_after(config.heartbeat_timeout) as waited:
                await self.send(None, wire.Ping(time.time() * 1000))
                await heard.wait()
            if waited.cancelled_caught:
                self.close(f"no answer to ping within {config.heartbeat_timeout:g} s")
                return

    async def reader(self) -> None:
        """Dispatch the gateway's messages until the connection ends."""
        while True:
            try:
                frame = await self.ws.get_message()
            except ConnectionClosed as exc:
                if exc.reason is not None and exc.reason.code == wire.CLOSE_POLICY:
                    self.agent.config.token.invalidate()
                self.close(_close_text(exc.reason), exc.reason)
                return
            self.heard.set()
            try:
                msg = wire.decode(frame)
            except wire.ProtocolError as exc:
                logger.debug("bad frame from gateway: %s", exc.message)
                await self.send(None, exc.to_message())
                continue
            await self.dispatch(msg)

    async def dispatch(self, msg: wire.Message) -> None:
        """Act on one message from the gateway."""
        if isinstance(msg, wire.Request):
            try:
                self.tracker.start(msg)
            except wire.ProtocolError as exc:
                await self.send(None, exc.to_message())
                return
            stream = _Stream(msg.id)
            self.streams[msg.id] = stream
            pieces: trio.MemoryReceiveChannel[bytes] | None = None
            if msg.body_stream:
                stream.upload, pieces = trio.open_memory_channel[bytes](UPLOAD_QUEUE)
            self.nursery.start_soon(self.serve_request, msg, stream, pieces)
        elif isinstance(msg, wire.Body):
            await self.body_piece(msg)
        elif isinstance(msg, wire.Cancel):
            cancelled = self.streams.pop(msg.id, None)
            if cancelled is not None:
                self.tracker.finish(msg.id)
                cancelled.cancelled = True
                cancelled.scope.cancel()
        elif isinstance(msg, wire.Ping):
            await self.send(None, wire.Pong(msg.timestamp))
        elif isinstance(msg, wire.Pong):
            pass
        elif isinstance(msg, wire.AuthOk):
            self.agent._connected(msg.session_id)
        elif isinstance(msg, wire.Error):
            about = f" (request {msg.id})" if msg.id else ""
            self.agent._status(f"gateway says {msg.code}{about}: {msg.message}")
        else:
            await self.send(
                None,
                wire.Error(
                    wire.ErrorCode.BAD_MESSAGE,
                    f"the desktop does not accept {msg.TYPE!r} messages",
                    getattr(msg, "id", None),
                ),
            )

    async def body_piece(self, piece: wire.Body) -> None:
        """Pass a piece of a streamed request body on to the Ollama request that reads it.

        Waiting here while Ollama is slower than the sender stops this connection's reader,
        so the gateway and the proxy stop sending too: nothing holds the whole body. A
        piece for no such request, for one that streams no body or after the last piece,
        or beyond :data:`wire.MAX_STREAMED_BODY_BYTES`, gets an ``error``.
        """
        stream = self.streams.get(piece.id)
        if stream is None:
            # Also the tail of a body whose request Ollama has already answered.
            message = f"no request {piece.id!r} in flight"
            await self.send(None, wire.Error(wire.ErrorCode.UNKNOWN_ID, message, piece.id))
            return
        upload = stream.upload
        if upload is None:
            # The sender and this agent disagree about the body: the request ends here
            # (the error ends it on the proxy too), the connection goes on.
            stream.cancelled = True
            stream.scope.cancel()
            message = f"request {piece.id!r} streams no body, or its last piece came already"
            await self.send(None, wire.Error(wire.ErrorCode.BAD_MESSAGE, message, piece.id))
            return
        data = piece.data()
        stream.uploaded += len(data)
        if stream.uploaded > wire.MAX_STREAMED_BODY_BYTES:
            stream.upload = None
            upload.close()
            message = f"request body over {wire.MAX_STREAMED_BODY_BYTES} bytes"
            stream.cancelled = True  # nothing more of its answer goes out ...
            stream.scope.cancel()
            # ... but this error, which is not tied to the stream, does.
            await self.send(None, wire.Error(wire.ErrorCode.TOO_LARGE, message, piece.id))
            return
        try:
            if data:
                await upload.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            stream.upload = None  # the request ended before reading its whole body
            return
        if piece.last:
            stream.upload = None
            upload.close()

    async def serve_request(
        self,
        req: wire.Request,
        stream: _Stream,
        pieces: trio.MemoryReceiveChannel[bytes] | None = None,
    ) -> None:
        """Forward one request to Ollama and stream the answer back."""
        try:
            with stream.scope:
                await self._forward(req, stream, pieces)
        except trio.BrokenResourceError:
            pass  # the writer is gone: the connection is closing
        finally:
            if pieces is not None:
                pieces.close()  # a piece still on its way finds the request gone
            if stream.upload is not None:
                stream.upload.close()
                stream.upload = None
            if self.streams.get(req.id) is stream:
                del self.streams[req.id]
                self.tracker.finish(req.id)

    async def _forward(
        self,
        req: wire.Request,
        stream: _Stream,
        pieces: trio.MemoryReceiveChannel[bytes] | None = None,
    ) -> None:
        base = self.agent.config.ollama_base
        try:
            url = ollama_url(base, req.path)
        except BadPath as exc:
            await self.send(stream, wire.Error(wire.ErrorCode.BAD_PATH, str(exc), req.id))
            return
        started = False
        kwargs: dict[str, Any] = {}
        if req.body is not None:
            kwargs["json"] = req.body
        elif req.body_base64 is not None:
            kwargs["content"] = base64.b64decode(req.body_base64)
        elif pieces is not None:
            kwargs["content"] = pieces  # read by httpx piece by piece as they come
        try:
            async with self.agent.client.stream(
                req.method, url, headers=_request_headers(req.headers), **kwargs
            ) as resp:
                headers = wire.response_headers(resp.headers.multi_items())
                await self.send(stream, wire.ResponseStart(req.id, resp.status_code, headers))
                started = True
                content_type = resp.headers.get("content-type", "")
                if not wire.is_text_media(wire.media_type(content_type)):
                    # Bytes, byte for byte: one base64 chunk per piece as it arrives.
                    async for data in resp.aiter_bytes(MAX_CHUNK_BYTES):
                        encoded = base64.b64encode(data).decode("ascii")
                        await self.send(stream, wire.Chunk(req.id, data_base64=encoded))
                else:
                    splitter = BodySplitter.for_response(content_type)
                    async for data in resp.aiter_bytes():
                        for piece in splitter.feed(data):
                            await self.send(stream, wire.Chunk(req.id, piece))
                    for piece in splitter.flush():
                        await self.send(stream, wire.Chunk(req.id, piece))
            await self.send(stream, wire.ResponseEnd(req.id))
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            code = wire.ErrorCode.UPSTREAM_ERROR if started else wire.ErrorCode.OLLAMA_UNAVAILABLE
            message = (
                f"Ollama is not reachable at {base} ({exc or type(exc).__name__}): start it"
                " with `ollama serve` or pass the right --ollama URL"
            )
            await self.send(stream, wire.Error(code, message, req.id))
        except httpx.HTTPError as exc:
            message = f"Ollama at {base} failed on {req.method} {req.path}: "
            message += str(exc) or type(exc).__name__
            await self.send(stream, wire.Error(wire.ErrorCode.UPSTREAM_ERROR, message, req.id))


@attrs.define(eq=False)
class DesktopAgent:
    """A running agent: its configuration and its state, for status displays and tests.

    ``state`` is ``connecting``, ``connected``, ``disconnected`` or ``stopped`` (``off``
    without a bridge, ``--no-bridge``);
    ``session_id`` is the gateway session while connected; ``connections`` counts the
    authenticated connections so far.
    """

    config: AgentConfig
    client: httpx.AsyncClient
    status: StatusCallback = _log_status
    state: str = "stopped"
    session_id: str | None = None
    connections: int = 0
    last_error: str | None = None
    #: The close code of the last connection, when the gateway sent one.
    last_close_code: int | None = None
    backoff: Backoff = attrs.field(init=False)
    #: The direct endpoint while it serves (None without one), and the tunnel's state
    #: (``state`` ``off`` when none is configured).
    direct: DirectEndpoint | None = None
    tunnel: TunnelStatus = attrs.field(factory=TunnelStatus)
    _link: _Link | None = None
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self.backoff = Backoff(self.config.backoff)

    @property
    def in_flight(self) -> int:
        """Requests being served right now."""
        return len(self._link.streams) if self._link is not None else 0

    async def wait_until(self, predicate: Callable[[DesktopAgent], bool]) -> None:
        """Block until ``predicate(self)`` holds; re-checked at every state change."""
        while not predicate(self):
            await self._changed.wait()

    def _status(self, line: str) -> None:
        self.status(line)

    def _set_state(self, state: str) -> None:
        self.state = state
        self._changed.set()
        self._changed = trio.Event()

    def _connected(self, session_id: str) -> None:
        known = self.session_id is not None
        self.session_id = session_id
        self.connections += 0 if known else 1
        self._set_state("connected")
        verb = "attached to" if known else "connected as"
        self._status(
            f"desktop {self.config.name!r} {verb} session {session_id}"
            f" (serving Ollama at {self.config.ollama_base})"
        )

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff; until cancelled, or until the gateway
        says that another agent of the same user took over (close 4001: it stops)."""
        if self.config.probe_ollama:
            await self._probe_ollama()
        try:
            while True:
                self._set_state("connecting")
                self._status(f"connecting to {self.config.bridge_url}")
                opened = trio.current_time()
                self.last_close_code = None
                reason = await self._connect_once()
                lasted = trio.current_time() - opened
                self.last_error = reason
                self.session_id = None
                if self.last_close_code == wire.CLOSE_REPLACED:
                    # Two agents of one user would push each other out forever: the
                    # newer one has the session, this one stops (DESIGN.md section 2).
                    self._status(
                        "stopping: another desktop agent of this user took over as desktop"
                        f" {self.config.name!r} (close 4001 replaced); one agent per desktop"
                        " name serves at a time (give each desktop its own --name)"
                    )
                    return
                self._set_state("disconnected")
                self._status(f"disconnected: {reason}")
                self.backoff.connection_lasted(lasted)
                delay = self.backoff.next_delay()
                self._status(f"retrying in {delay:.1f} s")
                await trio.sleep(delay)
        finally:
            self.session_id = None
            self._set_state("stopped")

    async def _probe_ollama(self) -> None:
        """One status line about the local Ollama, the usual culprit when nothing answers."""
        base = self.config.ollama_base
        try:
            with trio.fail_after(3):
                resp = await self.client.get(f"{base}/api/version")
            version = resp.json().get("version", "?") if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError, trio.TooSlowError) as exc:
            self._status(
                f"warning: Ollama is not reachable at {base} ({type(exc).__name__}); requests"
                " will fail until it runs (`ollama serve`, or pass --ollama URL)"
            )
            return
        if version is None:
            self._status(f"warning: {base}/api/version answered HTTP {resp.status_code}")
        else:
            self._status(f"Ollama {version} at {base}")

    async def _connect_once(self) -> str:
        """One connection, from dialling to its end; returns why it ended."""
        token_source = self.config.token
        try:
            token = await token_source.read()
        except TokenError as exc:
            return str(exc)
        headers = [
            (b"Authorization", f"Bearer {token}".encode()),
            (wire.DESKTOP_NAME_HEADER.encode(), self.config.name.encode()),
        ]
        served: str | None = None
        try:
            async with open_websocket_url(
                self.config.bridge_url,
                extra_headers=headers,
                connect_timeout=self.config.connect_timeout,
                disconnect_timeout=2.0,
                max_message_size=wire.MAX_FRAME_BYTES,
            ) as ws:
                served = await self._serve_connection(ws)
            return served
        except ConnectionRejected as exc:
            if exc.status_code in (401, 403):
                token_source.invalidate()
                return (
                    f"authentication failed (HTTP {exc.status_code}): check the token"
                    f" ({token_source.describe()})"
                )
            return f"gateway refused the connection with HTTP {exc.status_code}"
        except HandshakeError as exc:
            if served is not None:
                return served  # e.g. a dead gateway never answered our close: why it ended
            cause = exc.__cause__ or exc
            return f"cannot reach {self.config.bridge_url}: {cause or type(cause).__name__}"
        except (OSError, trio.BrokenResourceError) as exc:
            if served is not None:
                return served
            return f"cannot reach {self.config.bridge_url}: {exc}"

    async def _serve_connection(self, ws: WebSocketConnection) -> str:
        auth_error = await self._authenticate(ws)
        if auth_error is not None:
            return auth_error
        send_channel, receive_channel = trio.open_memory_channel[_Outgoing](OUTGOING_QUEUE)
        async with trio.open_nursery() as nursery:
            link = _Link(
                self,
                ws,
                send_channel,
                nursery,
                wire.StreamTracker(max_open=self.config.max_in_flight),
            )
            self._link = link
            try:
                nursery.start_soon(link.writer, receive_channel)
                nursery.start_soon(link.heartbeat)
                await link.reader()
            finally:
                self._link = None
        self.last_close_code = link.code
        return link.reason or "connection lost"

    async def _authenticate(self, ws: WebSocketConnection) -> str | None:
        """Wait for ``auth_ok``; None on success, else why it failed."""
        refused: wire.Error | None = None
        with trio.move_on_after(self.config.auth_timeout):
            while True:
                try:
                    frame = await ws.get_message()
                except ConnectionClosed as exc:
                    code = exc.reason.code if exc.reason is not None else None
                    self.last_close_code = code
                    if refused is not None or code == wire.CLOSE_POLICY:
                        self.config.token.invalidate()
                        detail = refused.message if refused is not None else _close_text(exc.reason)
                        return (
                            f"authentication failed: {detail}"
                            f" (will re-read {self.config.token.describe()})"
                        )
                    return _close_text(exc.reason)
                try:
                    msg = wire.decode(frame)
                except wire.ProtocolError as exc:
                    return f"gateway sent an invalid frame before auth_ok: {exc.message}"
                if isinstance(msg, wire.AuthOk):
                    self._connected(msg.session_id)
                    return None
                if isinstance(msg, wire.Error):
                    refused = msg
                    self._status(f"gateway refused authentication: {msg.code}: {msg.message}")
                elif isinstance(msg, wire.Ping):
                    await ws.send_message(wire.encode(wire.Pong(msg.timestamp)))
        return f"no auth_ok from the gateway within {self.config.auth_timeout:g} s"


async def serve_agent(
    config: AgentConfig,
    *,
    status: StatusCallback = _log_status,
    task_status: trio.TaskStatus[DesktopAgent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the desktop agent until cancelled, or replaced by a newer agent of the user.

    ``task_status.started()`` gets the :class:`DesktopAgent` at once (before the first
    connection, which may take a while if the gateway is down); ``status`` receives one
    human-readable line per state change.
    """
    timeout = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None)
    limits = httpx.Limits(max_connections=config.max_in_flight, max_keepalive_connections=16)
    # trust_env=False: a desktop's HTTP_PROXY must not capture traffic to its own Ollama.
    # The gateway and the tunnel's public URL are reached as any HTTP client would
    # (through HTTPS_PROXY if one is set).
    async with (
        httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client,
        httpx.AsyncClient(timeout=httpx.Timeout(15.0)) as outside,
        trio.open_nursery() as nursery,
    ):
        agent = DesktopAgent(config, client, status)
        if config.direct_port is not None:
            await _start_direct(agent, outside, nursery)
        task_status.started(agent)
        if config.bridge:
            await agent.run()
        else:
            agent._set_state("off")
            status("bridge off (--no-bridge): serving only the direct route")
            if config.probe_ollama:
                await agent._probe_ollama()
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()  # replaced by another agent: the tunnel stops too


async def _start_direct(
    agent: DesktopAgent, outside: httpx.AsyncClient, nursery: trio.Nursery
) -> None:
    """Start the direct endpoint, and the tunnel manager if a tunnel is configured."""
    config = agent.config
    assert config.direct_port is not None
    auth = DirectAuth(config.gateway_url, config.token.read, outside)
    if config.auth_cache is not None:
        auth.cache_path = config.auth_cache
    endpoint = DirectEndpoint(auth, config.ollama_base, agent.client)
    agent.direct = await nursery.start(serve_direct, endpoint, config.direct_port)
    agent._status(f"direct endpoint on {endpoint.url} (tokens of this desktop's user only)")
    if config.tunnel is not None:
        manager = TunnelManager(
            config.tunnel,
            f"127.0.0.1:{endpoint.port}",
            config.gateway_url,
            config.token.read,
            endpoint.instance,
            outside,
            report=agent._status,
            status=agent.tunnel,
            health_interval=config.tunnel_health_interval,
            name=config.name,
        )
        nursery.start_soon(manager.run)


def _print_status(line: str) -> None:
    print(f"c2l desktop: {line}", flush=True)


def run_agent(config: AgentConfig) -> None:
    """Run the agent until Ctrl-C or SIGTERM (the blocking entry point of ``c2l desktop``).

    It also returns when another agent of the same user takes over, so that a supervisor
    restarting on failure does not bring it back. One status line per state change is
    printed.
    """

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for signum in signals:
                        _print_status(f"stopping ({signal.Signals(signum).name})")
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
                # Returns by itself only when another agent of the user took over.
                await serve_agent(config, status=_print_status)
                nursery.cancel_scope.cancel()

    trio.run(main)
