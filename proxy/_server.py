"""The proxy's network shell: plain HTTP for /health, the gateway's link for the two sides.

The gateway upgrades ``/ws/stream`` and ``/ws/bridge`` to its line link (``Upgrade:
c2l-lines``, :mod:`wire._link`: one message per line, no WebSocket framing to parse or
mask); the same paths also accept a WebSocket upgrade, for tools and tests that speak to a
proxy directly. Both carry the same messages to the same hub.

The gateway is the only intended peer. In a session's container the proxy listens on a
UNIX socket (``C2L_PROXY_SOCKET``) in a directory that the orchestrator bind-mounts from
the host, inside a directory only the Podman service user (and root) can enter: no port is
published, so no ``rootlessport`` process relays every byte and the user's network needs
no NAT. Every WebSocket upgrade must carry the session's secret (``X-C2L-Proxy-Secret``),
which the orchestrator gives the container at creation, so a process that reaches the
socket anyway cannot attach to the user's session. ``GET /health`` carries no user data
and needs no secret; ``GET /desktops`` (the connected desktops, their models and load)
needs it. A bridge upgrade names its desktop (``X-C2L-Desktop-Name``, ``default`` when
absent; a bad name is a 400). Without ``C2L_PROXY_SOCKET`` it listens on TCP (tests, by hand).

Why no trio here: one of these processes runs per user, and the design's memory target
(DESIGN.md section 4: at most 15 MB PSS per idle session, all processes) leaves the proxy
about 11 MB once conmon and the pause process are counted. Measured in the
image, ``import trio`` alone holds 14 MB of private memory (it pulls in ssl, email,
zipfile, importlib.metadata), the interpreter with ``selectors`` and wsproto 7.7 MB.
So this module is a single-threaded event loop on the standard library's ``selectors``
with non-blocking sockets, wsproto for the WebSocket protocol and :mod:`wire` for the
messages. It imports neither trio nor asyncio; ``_trio_adapter`` runs it in a worker
thread for in-process use (tests, the fake runtime).

Flow control: the hub only queues encoded frames on a connection's outgoing buffer. A
connection whose buffer holds more than ``high_water`` bytes stops the reading of every
peer that feeds it (the desktop feeds the web clients, the clients feed the desktop, and
each connection feeds itself with pongs and errors) until it drains below ``low_water``,
so a slow reader slows its producer through TCP instead of growing a queue. A connection
that stays above the mark for ``slow_consumer_s`` is dropped: one stalled browser tab must
not freeze the other tabs that share the user's desktop link forever. It is detached at
once (its requests are cancelled on the desktop like any client disconnect; a dropped
desktop errors every request in flight) and closed with 4002 ``backlog`` behind what is
already queued for it, so a reader that wakes up learns why (the gateway passes the code
on: the session is alive, reconnect); one that does not read it within
``backlog_close_s`` is cut off. A desktop replaced by a newer one is closed with 4001
``replaced``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hmac
import json
import logging
import os
import selectors
import signal
import socket
import stat
import time
from types import FrameType
from typing import Any

import attrs
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

import wire

from ._hub import Hub, Link

log = logging.getLogger("c2l.proxy")

SECRET_HEADER = wire.SECRET_HEADER
#: Largest HTTP request head (request line and headers) read before answering 400.
MAX_HEAD_BYTES = 16 * 1024
#: A peer has this long to send its whole request head (half-open or slowloris peers).
HEAD_TIMEOUT_S = 10.0
#: How long a closing connection may take to flush and to answer our close frame.
CLOSE_TIMEOUT_S = 1.0
#: How long a plain HTTP answer (health, 403, 404, 400) may take to be written out.
FLUSH_TIMEOUT_S = 5.0
#: Outgoing buffer above which the connection's producers stop being read ...
HIGH_WATER = 256 * 1024
#: ... and below which they are read again (hysteresis avoids flapping per frame).
LOW_WATER = 64 * 1024
#: A connection whose outgoing buffer stays above HIGH_WATER this long is dropped.
SLOW_CONSUMER_S = 15.0
#: How long a dropped slow reader then has to read what was queued and the 4002 close.
BACKLOG_CLOSE_S = 15.0
#: Connections served at once; the gateway needs a handful per user, so more is abuse.
MAX_CONNECTIONS = 512
#: How long the listener rests after accept() failed (out of file descriptors).
ACCEPT_RETRY_S = 0.1
#: Bytes read per recv(): big enough for a burst of chunks, small enough to bound the
#: overshoot past HIGH_WATER that one read can cause.
RECV_BYTES = 64 * 1024

_HEAD, _HTTP, _WS, _CLOSING, _DONE = range(5)
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


@attrs.frozen
class _Head:
    method: str
    path: str
    headers: dict[str, str]


def _parse_head(raw: bytes) -> _Head | None:
    try:
        text = raw.decode("latin-1")
        line, *rest = text.split("\r\n")
        method, target, _version = line.split(" ", 2)
    except ValueError:
        return None
    headers: dict[str, str] = {}
    for h in rest:
        if not h:
            break
        name, sep, value = h.partition(":")
        if not sep:
            return None
        headers[name.strip().lower()] = value.strip()
    return _Head(method, target.split("?", 1)[0], headers)


_LINK_ACCEPT = (
    f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: {wire.LINK_PROTOCOL}\r\n"
    "Connection: Upgrade\r\n\r\n"
).encode()


def _http(status: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data


@attrs.define(eq=False)
class _Conn:
    """One accepted connection (TCP or UNIX) and its state (touched by the loop only)."""

    sock: socket.socket
    phase: int = _HEAD
    #: When the current phase gives up (head read, HTTP flush, close handshake).
    deadline: float | None = None
    head: bytearray = attrs.field(factory=bytearray)
    out: bytearray = attrs.field(factory=bytearray)
    ws: WSConnection | None = None
    #: The gateway's link (``Upgrade: c2l-lines``): its reader, instead of ``ws``.
    lines: wire.LineReader | None = None
    link: Link | None = None
    desktop: bool = False
    #: The message being reassembled from its frames, and its size in bytes so far.
    text_parts: list[str] = attrs.field(factory=list)
    byte_parts: list[bytes] = attrs.field(factory=list)
    size: int = 0
    #: Since when ``out`` has been above the high-water mark (None: it is not).
    over_since: float | None = None
    #: The selector events currently registered (0: not registered).
    mask: int = 0
    #: A closing link has written its ``!close`` line and shut its sending side.
    shut: bool = False


@attrs.define(eq=False)
class ProxyServer:
    """One user's proxy: the :class:`Hub` behind a non-blocking HTTP/WebSocket listener.

    Build it with :meth:`bind`, run :meth:`serve_forever` in one thread, stop it from any
    thread (or a signal handler) with :meth:`stop`. Nothing here blocks except the
    selector's wait, which :meth:`stop` interrupts.
    """

    secret: str
    listener: socket.socket
    high_water: int = HIGH_WATER
    low_water: int = LOW_WATER
    slow_consumer_s: float = SLOW_CONSUMER_S
    backlog_close_s: float = BACKLOG_CLOSE_S
    head_timeout_s: float = HEAD_TIMEOUT_S
    #: SO_SNDBUF of accepted sockets; None keeps the kernel's autotuning (which lets a
    #: slow reader's socket soak up megabytes before the outgoing buffer sees any).
    send_buffer: int | None = None
    hub: Hub = attrs.field(factory=Hub)
    #: Connections whose readers are paused by backpressure right now (for tests, logs).
    paused: int = 0
    #: Connections dropped because they did not read their output in time.
    dropped_slow: int = 0
    #: The largest outgoing buffer of any connection so far, in bytes (tests, logs).
    peak_queued: int = 0
    _conns: set[_Conn] = attrs.field(factory=set, init=False)
    _links: dict[Link, _Conn] = attrs.field(factory=dict, init=False)
    _dirty: set[_Conn] = attrs.field(factory=set, init=False)
    _sel: selectors.BaseSelector = attrs.field(factory=selectors.DefaultSelector, init=False)
    _wake_r: socket.socket = attrs.field(init=False)
    _wake_w: socket.socket = attrs.field(init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    #: While set, the listener is not watched (accept() failed, e.g. out of descriptors).
    _accept_paused_until: float | None = attrs.field(default=None, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    #: The inode of the UNIX socket file we bound (None: TCP), removed again by close().
    _socket_file: int | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if not self.secret:
            raise ValueError("the proxy needs a session secret (C2L_PROXY_SECRET)")
        # A self-pipe: the only way another thread or a signal handler can interrupt the
        # selector's wait without the loop polling.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.listener.setblocking(False)
        self._sel.register(self.listener, _READ, "listen")
        self._sel.register(self._wake_r, _READ, "wake")

    @classmethod
    def bind(cls, host: str, port: int, *, secret: str, **limits: Any) -> ProxyServer:
        """Listen on ``host:port`` (port 0: any free port) and return the server."""
        if not secret:
            raise ValueError("the proxy needs a session secret (C2L_PROXY_SECRET)")
        # An ASCII host as bytes: a str would load the idna codec (and stringprep).
        family, kind, proto, _, addr = socket.getaddrinfo(
            host.encode() if host.isascii() else host,
            port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
            return cls(secret, sock, **limits)
        except BaseException:
            sock.close()
            raise

    @classmethod
    def bind_unix(cls, path: str, *, secret: str, **limits: Any) -> ProxyServer:
        """Listen on the UNIX socket ``path`` and return the server.

        A socket left at ``path`` (by a proxy that was killed) is replaced; anything else
        there is an error. The socket is made connectable by every user (0666): who may
        reach it is decided by the directories above it (the orchestrator's sessions
        directory is 0700), and every WebSocket needs the session secret anyway.
        """
        if not secret:
            raise ValueError("the proxy needs a session secret (C2L_PROXY_SECRET)")
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o666)
            sock.listen(128)
            server = cls(secret, sock, **limits)
            server._socket_file = os.lstat(path).st_ino
            return server
        except BaseException:
            sock.close()
            raise

    @property
    def port(self) -> int:
        """The TCP port the server listens on (0 on a UNIX socket)."""
        if self.listener.family == socket.AF_UNIX:
            return 0
        port: int = self.listener.getsockname()[1]
        return port

    @property
    def address(self) -> int | str:
        """What the server listens on: its TCP port, or its UNIX socket's path."""
        if self.listener.family == socket.AF_UNIX:
            path: str = self.listener.getsockname()
            return path
        return self.port

    def stop(self) -> None:
        """Make :meth:`serve_forever` return soon; safe from any thread or signal handler."""
        # OSError: already closed, or the pipe is full and a wake-up is pending anyway.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def close(self) -> None:
        """Close every connection, the listener and the selector (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns):
            conn.sock.close()
            conn.phase = _DONE
        self._conns.clear()
        self._links.clear()
        self._sel.close()
        if self.listener.family == socket.AF_UNIX:
            self._unlink_socket()
        self.listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _unlink_socket(self) -> None:
        """Remove our socket's file, unless another server's socket replaced it since."""
        with contextlib.suppress(OSError):
            path = self.listener.getsockname()
            if self._socket_file is not None and os.lstat(path).st_ino == self._socket_file:
                os.unlink(path)

    def serve_forever(self) -> None:
        """Serve until :meth:`stop`; closes everything on the way out."""
        if self._closed:
            raise RuntimeError("this proxy server is closed")
        try:
            while not self._stopping:
                for key, events in self._sel.select(self._timeout()):
                    data = key.data
                    if data == "listen":
                        self._accept()
                    elif data == "wake":
                        self._stopping = True
                    else:
                        conn: _Conn = data
                        if events & _WRITE and conn.phase != _DONE:
                            self._flush(conn)
                        if events & _READ and conn.phase != _DONE:
                            self._read(conn)
                self._expire(time.monotonic())
                self._update(time.monotonic())
        finally:
            self.close()

    # ---- the loop's steps --------------------------------------------------------------

    def _timeout(self) -> float | None:
        """Seconds until the earliest deadline; None (wait for I/O) when there is none."""
        soonest = self._accept_paused_until
        for conn in self._conns:
            over = conn.over_since if conn.phase == _WS else None  # closing: its deadline
            for when in (
                conn.deadline,
                None if over is None else over + self.slow_consumer_s,
            ):
                if when is not None and (soonest is None or when < soonest):
                    soonest = when
        hub_due = self.hub.next_deadline()
        if hub_due is not None and (soonest is None or hub_due < soonest):
            soonest = hub_due
        return None if soonest is None else max(0.0, soonest - time.monotonic())

    def _accept(self) -> None:
        for _ in range(64):  # a burst is accepted in one go, but cannot starve the others
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # E.g. EMFILE: keep serving the connections we have, and stop watching the
                # listener for a moment, or its pending connection would spin the loop.
                log.warning("accept failed: %s", exc)
                self._sel.unregister(self.listener)
                self._accept_paused_until = time.monotonic() + ACCEPT_RETRY_S
                return
            if len(self._conns) >= MAX_CONNECTIONS:
                sock.close()
                continue
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                # Frames are small and latency matters more than packet count; the loop
                # already coalesces what is queued in one iteration into one send().
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.send_buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
            conn = _Conn(sock, deadline=time.monotonic() + self.head_timeout_s)
            self._conns.add(conn)
            self._dirty.add(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._abort(conn, "connection reset", abrupt=True)
            return
        if not data:
            # No close frame or ``!close`` line came first: the client vanished (its
            # answers are kept for a resume, DESIGN.md section 2).
            self._abort(conn, "connection closed", abrupt=True)
        elif conn.phase == _HEAD:
            self._head_data(conn, data)
        elif conn.lines is not None:
            self._line_data(conn, data)
        elif conn.ws is not None and conn.ws.state is not ConnectionState.CLOSED:
            conn.ws.receive_data(data)
            self._ws_events(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._abort(conn, "connection reset", abrupt=True)
                return
            del conn.out[:sent]
            if conn.out:
                break  # a partial write: the kernel's buffer is full, wait for EVENT_WRITE
        if conn.out:
            return
        if conn.phase == _CLOSING and conn.lines is not None:
            # As a WebSocket close handshake does: the close line is out, so shut our side
            # and wait for the gateway to close its own (our read sees the end, or the
            # deadline passes). Closing at once could reset a TCP peer before it has read
            # the close line.
            if not conn.shut:
                conn.shut = True
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_WR)
            return
        if conn.phase == _HTTP or (
            conn.phase == _CLOSING and (conn.ws is None or conn.ws.state is ConnectionState.CLOSED)
        ):
            self._abort(conn, "done")

    def _expire(self, now: float) -> None:
        self.hub.expire(now)
        for conn in list(self._conns):
            if conn.phase == _DONE:
                continue
            over = conn.over_since
            if conn.phase == _WS and over is not None and now - over >= self.slow_consumer_s:
                log.warning(
                    "dropping %s: it read too little of its %d queued bytes for %.0f s",
                    conn.link.name if conn.link else "a connection",
                    len(conn.out),
                    self.slow_consumer_s,
                )
                self.dropped_slow += 1
                self._close(conn, wire.CLOSE_BACKLOG, "backlog", self.backlog_close_s)
            elif conn.deadline is not None and now >= conn.deadline:
                if conn.phase == _HEAD:
                    # As before: an incomplete head (slow or half-open peer) gets a 400.
                    self._respond(conn, "400 Bad Request", {"error": "bad_request"})
                else:
                    self._abort(conn, "timed out")

    def _update(self, now: float) -> None:
        """Write what the last iteration queued, then set each connection's interest."""
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self._sel.register(self.listener, _READ, "listen")
        for conn in list(self._dirty):
            if conn.phase != _DONE and conn.out:
                self._flush(conn)
        self._dirty.clear()
        # Every desktop feeds every client and the other way round: any client over its
        # mark pauses the desktops, any desktop over its mark pauses the clients.
        clients_over = desktops_over = False
        for conn in self._conns:
            size = len(conn.out)
            if size > self.peak_queued:
                self.peak_queued = size
            if conn.over_since is None and size >= self.high_water:
                conn.over_since = now
            elif conn.over_since is not None and size <= self.low_water:
                conn.over_since = None
            if conn.over_since is not None and conn.link is not None:
                if conn.desktop:
                    desktops_over = True
                else:
                    clients_over = True
        paused = 0
        for conn in list(self._conns):
            reading = conn.phase in (_HEAD, _WS, _CLOSING)
            if conn.phase == _WS and (
                conn.over_since is not None or (clients_over if conn.desktop else desktops_over)
            ):
                reading = False
                paused += 1
            mask = (_READ if reading else 0) | (_WRITE if conn.out else 0)
            if mask == conn.mask:
                continue
            if conn.mask == 0:
                self._sel.register(conn.sock, mask, conn)
            elif mask == 0:
                self._sel.unregister(conn.sock)
            else:
                self._sel.modify(conn.sock, mask, conn)
            conn.mask = mask
        self.paused = paused

    # ---- connection phases -------------------------------------------------------------

    def _respond(self, conn: _Conn, status: str, body: dict[str, Any]) -> None:
        conn.out += _http(status, body)
        conn.phase = _HTTP
        conn.deadline = time.monotonic() + FLUSH_TIMEOUT_S
        conn.head = bytearray()
        self._dirty.add(conn)

    def _abort(self, conn: _Conn, why: str, *, abrupt: bool = False) -> None:
        """Close the socket now and tell the hub the peer is gone (``abrupt``: without a
        close, so a client's answers are kept for a resume)."""
        if conn.phase == _DONE:
            return
        self._detach(conn, why, abrupt=abrupt)
        conn.phase = _DONE
        if conn.mask:
            self._sel.unregister(conn.sock)
            conn.mask = 0
        conn.sock.close()
        conn.out = bytearray()
        self._conns.discard(conn)
        self._dirty.discard(conn)

    def _detach(self, conn: _Conn, why: str, *, abrupt: bool = False) -> None:
        link, conn.link = conn.link, None
        if link is None:
            return
        self._links.pop(link, None)
        if conn.desktop:
            self.hub.drop_desktop(link, why)
        else:
            self.hub.remove_client(link, abrupt=abrupt)

    def _health(self) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC).isoformat()
        return {"status": "healthy", "timestamp": now, **self.hub.status()}

    def _has_secret(self, head: _Head) -> bool:
        """Whether ``head`` carries the session secret. Constant time: the comparison
        must not tell a prober how much of a guess is right."""
        given = head.headers.get(SECRET_HEADER, "")
        return hmac.compare_digest(given.encode(), self.secret.encode())

    def _desktops(self, conn: _Conn, head: _Head) -> None:
        """``GET /desktops``: the connected desktops, their models and load (the gateway's
        ``/api/streaming/desktop``). Model names are the user's data: the secret is needed."""
        if not self._has_secret(head):
            self._respond(conn, "403 Forbidden", {"error": "forbidden"})
            return
        self._respond(conn, "200 OK", {"desktops": self.hub.desktops_status()})

    def _head_data(self, conn: _Conn, data: bytes) -> None:
        conn.head += data
        end = conn.head.find(b"\r\n\r\n")
        if end < 0 or end + 4 > MAX_HEAD_BYTES:
            if end >= 0 or len(conn.head) >= MAX_HEAD_BYTES:
                self._respond(conn, "400 Bad Request", {"error": "bad_request"})
            return
        raw, conn.head = bytes(conn.head), bytearray()
        head = _parse_head(raw[: end + 4])
        if head is None:
            self._respond(conn, "400 Bad Request", {"error": "bad_request"})
            return
        upgrade = head.headers.get("upgrade", "").lower()
        if upgrade not in ("websocket", wire.LINK_PROTOCOL):
            if head.method == "GET" and head.path == "/health":
                self._respond(conn, "200 OK", self._health())
            elif head.method == "GET" and head.path == "/desktops":
                self._desktops(conn, head)
            else:
                self._respond(conn, "404 Not Found", {"error": "not_found"})
            return
        if not self._has_secret(head):
            log.warning("refused a WebSocket without the session secret on %s", head.path)
            self._respond(conn, "403 Forbidden", {"error": "forbidden"})
            return
        if head.path not in ("/ws/stream", "/ws/bridge"):
            self._respond(conn, "404 Not Found", {"error": "not_found"})
            return
        name = head.headers.get(wire.DESKTOP_NAME_HEADER, wire.DEFAULT_DESKTOP_NAME)
        if head.path == "/ws/bridge" and not wire.valid_desktop_name(name):
            self._respond(
                conn,
                "400 Bad Request",
                {
                    "error": "bad_request",
                    "message": "a desktop name is 1-64 characters of A-Z a-z 0-9 . _ -",
                },
            )
            return
        if upgrade == wire.LINK_PROTOCOL:
            conn.out += _LINK_ACCEPT
            conn.lines = wire.LineReader(wire.MAX_FRAME_BYTES)
            self._open_link(conn, head.path == "/ws/bridge", name)
            if len(raw) > end + 4:  # lines the gateway sent right after its head
                self._line_data(conn, raw[end + 4 :])
            return
        ws = WSConnection(ConnectionType.SERVER)
        try:
            # The whole buffer: frames the peer sent right after its head are kept.
            ws.receive_data(raw)
            accepted = any(isinstance(event, Request) for event in ws.events())
        except RemoteProtocolError:
            accepted = False
        if not accepted:
            self._respond(conn, "400 Bad Request", {"error": "bad_request"})
            return
        conn.out += ws.send(AcceptConnection())
        conn.ws = ws
        self._open_link(conn, head.path == "/ws/bridge", name)
        self._ws_events(conn)

    def _open_link(self, conn: _Conn, desktop: bool, name: str = wire.DEFAULT_DESKTOP_NAME) -> None:
        """The upgrade is accepted: ``conn`` joins the hub as desktop ``name`` or a client."""
        conn.phase = _WS
        conn.deadline = None
        conn.desktop = desktop
        link = Link(
            f"{'desktop' if conn.desktop else 'client'}{id(conn):x}",
            functools.partial(self._send_text, conn),
        )
        conn.link = link
        self._links[link] = conn
        self._dirty.add(conn)
        if conn.desktop:
            old = self.hub.set_desktop(link, name)
            old_conn = self._links.get(old) if old is not None else None
            if old_conn is not None:
                self._close(old_conn, wire.CLOSE_REPLACED, "replaced")
        else:
            self.hub.add_client(link)

    def _line_data(self, conn: _Conn, data: bytes) -> None:
        """Bytes of the gateway's link: every complete line is a frame for the hub."""
        assert conn.lines is not None
        if conn.phase != _WS:
            return  # closing: what the gateway still sends has no one to go to
        try:
            frames = conn.lines.feed(data)
        except wire.LineTooLong:
            self._close(conn, wire.CLOSE_TOO_BIG, "message too big")
            return
        for frame in frames:
            link = conn.link
            if link is None or conn.phase != _WS:
                return
            if not wire.is_control(frame):
                self._dispatch(conn, link, frame)
            elif wire.parse_close(frame) is not None:
                # The gateway's client closed cleanly: its requests are cancelled at once.
                # (A gateway link that just ends is a client that vanished.)
                self._abort(conn, "closed by the client")
                return

    def _dispatch(self, conn: _Conn, link: Link, frame: str) -> None:
        """One whole message from ``conn`` (WebSocket or line link) to the hub."""
        if conn.desktop:
            self.hub.desktop_frame(link, frame)
        else:
            self.hub.client_frame(link, frame)

    def _send_text(self, conn: _Conn, text: str) -> None:
        """The hub's ``Link.send``: queue one text frame (dropped once closing began)."""
        if conn.lines is not None:
            if conn.phase == _WS:
                conn.out += wire.link_line(text)
                self._dirty.add(conn)
            return
        ws = conn.ws
        if conn.phase == _WS and ws is not None and ws.state is ConnectionState.OPEN:
            conn.out += ws.send(TextMessage(data=text))
            self._dirty.add(conn)

    def _close(self, conn: _Conn, code: int, reason: str, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Start our side of the close handshake; the peer has ``timeout`` s to answer.

        A gateway link gets a ``!close`` line instead, and the socket closes once it is
        written (or after ``timeout``)."""
        if conn.phase == _WS and conn.lines is not None:
            self._detach(conn, reason)
            conn.out += wire.close_line(code, reason)
            conn.phase = _CLOSING
            conn.deadline = time.monotonic() + timeout
            self._dirty.add(conn)
            return
        ws = conn.ws
        if conn.phase != _WS or ws is None:
            return
        self._detach(conn, reason)
        conn.text_parts.clear()
        conn.byte_parts.clear()
        # In the _WS phase the WebSocket is OPEN (a peer's close moves it to _CLOSING).
        conn.out += ws.send(CloseConnection(code=code, reason=reason))
        conn.phase = _CLOSING
        conn.deadline = time.monotonic() + timeout
        self._dirty.add(conn)
        if not conn.out and ws.state is ConnectionState.CLOSED:
            self._abort(conn, reason)

    def _ws_events(self, conn: _Conn) -> None:
        ws = conn.ws
        assert ws is not None
        for event in ws.events():
            if conn.phase == _DONE:
                return
            if isinstance(event, TextMessage | BytesMessage):
                if conn.phase == _WS:
                    self._message_part(conn, event)
            elif isinstance(event, Ping):
                if ws.state is ConnectionState.OPEN:
                    conn.out += ws.send(event.response())
                    self._dirty.add(conn)
            elif isinstance(event, CloseConnection):
                self._peer_closed(conn, event)

    def _peer_closed(self, conn: _Conn, event: CloseConnection) -> None:
        ws = conn.ws
        assert ws is not None
        self._detach(conn, "connection closed")
        if ws.state is ConnectionState.REMOTE_CLOSING:
            conn.out += ws.send(event.response())  # echo the peer's close: handshake done
        elif ws.state is ConnectionState.OPEN:
            # wsproto reports a protocol violation (bad UTF-8, bad framing) as a close
            # event without a close frame: send ours with its code, then hang up.
            conn.out += ws.send(CloseConnection(code=event.code, reason=event.reason))
        conn.phase = _CLOSING
        conn.deadline = time.monotonic() + CLOSE_TIMEOUT_S
        self._dirty.add(conn)
        if not conn.out:
            self._abort(conn, "connection closed")

    def _message_part(self, conn: _Conn, event: TextMessage | BytesMessage) -> None:
        data = event.data
        if isinstance(data, str):
            conn.size += len(data) if data.isascii() else len(data.encode())
        else:
            conn.size += len(data)
        if conn.size > wire.MAX_FRAME_BYTES:
            self._close(conn, wire.CLOSE_TOO_BIG, "message too big")
            return
        if isinstance(data, str):
            conn.text_parts.append(data)
        else:
            conn.byte_parts.append(bytes(data))
        if not event.message_finished:
            return
        if conn.byte_parts:
            frame = b"".join(conn.byte_parts).decode("utf-8", "replace")
        else:
            frame = "".join(conn.text_parts)
        conn.text_parts.clear()
        conn.byte_parts.clear()
        conn.size = 0
        if conn.link is not None:
            self._dispatch(conn, conn.link, frame)


def _limit_address_space(memory: str) -> None:
    """Lower this process's RLIMIT_AS, soft and hard, to ``memory`` bytes (C2L_PROXY_MEMORY).

    The container's own limit is ``memory`` plus the reserve that runc's init needs (it
    runs under that limit before it execs us); from here on the proxy needs no reserve,
    so it holds itself to the memory setting. An rlimit needs no cgroups: it holds on
    rootless cgroup v1 hosts too, where Podman drops the memory limit.
    """
    import resource

    if not memory.isdigit():
        return
    limit = int(memory)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft == resource.RLIM_INFINITY or limit < soft:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    log.info("address space limited to %d MiB", limit // 1024**2)


def _resume_window(text: str) -> float:
    """``C2L_RESUME_WINDOW`` in seconds (the default when unset or not a number >= 0)."""
    try:
        value = float(text)
    except ValueError:
        return wire.RESUME_WINDOW_S
    return value if 0 <= value < 86400 else wire.RESUME_WINDOW_S


def main() -> int:
    """Entry point of ``python3 -m proxy`` inside the container."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    secret = os.environ.get(wire.SECRET_ENV, "")
    if not secret:
        log.error("%s is not set: the orchestrator starts this container", wire.SECRET_ENV)
        return 2
    os.environ.pop(wire.SECRET_ENV, None)
    _limit_address_space(os.environ.get("C2L_PROXY_MEMORY", ""))
    path = os.environ.get(wire.SOCKET_ENV, "")
    if path:
        server = ProxyServer.bind_unix(path, secret=secret)
        where = path
    else:
        host = os.environ.get("C2L_PROXY_HOST", "0.0.0.0")
        port = int(os.environ.get("C2L_PROXY_PORT") or wire.PROXY_PORT)
        server = ProxyServer.bind(host, port, secret=secret)
        where = f"{host}:{server.port}"
    server.hub.resume_window = _resume_window(os.environ.get("C2L_RESUME_WINDOW", ""))

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        server.stop()

    # PID 1 in a container ignores SIGTERM unless it handles it (DESIGN.md section 3):
    # stop at once so that pod teardown is not held to the stop timeout.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    log.info("proxy listening on %s", where)
    server.serve_forever()
    return 0
