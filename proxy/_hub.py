"""The routing core of a user's proxy: pairs web clients with the desktop agent.

One proxy process serves one user. Any number of web-client connections share the user's
single desktop-agent connection; requests are multiplexed over it under ids the hub
assigns, so ids chosen by different clients (or by one client reusing an id after a
stream ended) never collide, and each answer goes back only to the connection that asked.

The hub is synchronous: a link's ``send`` only queues an encoded frame on its connection,
and the network shell (``_server``) writes the queues out and applies backpressure. So the
routing core neither blocks nor awaits, and it needs no event loop library at all.
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import time
from collections.abc import Callable

import attrs

import wire

log = logging.getLogger("c2l.proxy")

#: Queues one text frame for sending on a connection; never blocks.
Send = Callable[[str], None]


@attrs.define(eq=False)
class Link:
    """One live WebSocket, seen by the hub as a function that queues a text frame."""

    name: str
    send: Send
    streams: wire.StreamTracker = attrs.field(factory=wire.StreamTracker)
    #: client-side id -> desktop-side id, for this link's open requests
    outbound: dict[str, str] = attrs.field(factory=dict)

    def emit(self, msg: wire.Message) -> None:
        """Queue ``msg``; a peer that is already closing drops it (its shell cleans up)."""
        self.send(wire.encode(msg))


@attrs.define
class Hub:
    """Request routing state of one user's proxy. Memory only; nothing is written anywhere."""

    desktop: Link | None = None
    clients: set[Link] = attrs.field(factory=set)
    #: desktop-side id -> (client link, client-side id)
    routes: dict[str, tuple[Link, str]] = attrs.field(factory=dict)
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    relayed: int = 0
    #: Monotonic time of the last request traffic (a client's request or cancel, a
    #: desktop's answer); heartbeats do not count. ``/health`` reports the idle time, so
    #: whichever gateway replica reaps idle sessions knows it (DESIGN.md section 6).
    last_active: float = attrs.field(factory=time.monotonic)
    #: Requests in flight at once over all of the user's connections; more are refused,
    #: so one runaway client cannot queue unbounded work on the user's desktop.
    max_inflight: int = wire.MAX_INFLIGHT_PER_SESSION
    #: Seconds a dropped client's requests are kept for a ``resume`` (C2L_RESUME_WINDOW).
    resume_window: float = wire.RESUME_WINDOW_S
    #: Bytes of chunks kept per request for a resume (the replay tail's bound).
    resume_max_bytes: int = wire.RESUME_MAX_BYTES
    #: desktop-side id -> the answer's resumable state (every request whose answer began)
    _streams: dict[str, _Stream] = attrs.field(factory=dict)
    #: resume token -> desktop-side id
    _tokens: dict[str, str] = attrs.field(factory=dict)
    #: Requests cancelled on the desktop because their detached buffer outgrew its bound.
    resume_overflows: int = 0
    #: The most bytes one detached request has kept at once so far (tests, /health).
    detached_peak_bytes: int = 0

    # ---- web clients -------------------------------------------------------------------

    def add_client(self, link: Link) -> None:
        """Register a web-client connection."""
        self.clients.add(link)

    def client_frame(self, link: Link, frame: str) -> None:
        """Handle one text frame from a web client."""
        try:
            msg = wire.decode(frame)
        except wire.ProtocolError as exc:
            link.emit(exc.to_message())
            return
        if isinstance(msg, wire.Request):
            self.last_active = time.monotonic()
            self._start_request(link, msg)
        elif isinstance(msg, wire.Cancel):
            self.last_active = time.monotonic()
            self._cancel(link, msg.id)
        elif isinstance(msg, wire.Resume):
            self.last_active = time.monotonic()
            self._resume(link, msg)
        elif isinstance(msg, wire.Ping):
            link.emit(wire.Pong(msg.timestamp))
        elif isinstance(msg, wire.Pong):
            pass
        else:
            link.emit(
                wire.Error(
                    wire.ErrorCode.BAD_MESSAGE,
                    f"a web client may send request, cancel, resume or ping, not {msg.TYPE!r}",
                    getattr(msg, "id", None),
                )
            )

    def _start_request(self, link: Link, req: wire.Request) -> None:
        inflight = len(self.routes) + self._detached_running()
        if inflight >= self.max_inflight and req.id not in link.streams:
            link.emit(
                wire.Error(
                    wire.ErrorCode.TOO_MANY_REQUESTS,
                    f"{self.max_inflight} requests are already in flight for this user:"
                    " wait for one to finish",
                    req.id,
                )
            )
            return
        try:
            link.streams.start(req)
        except wire.ProtocolError as exc:
            link.emit(exc.to_message())
            return
        desktop = self.desktop
        if desktop is None:
            link.streams.finish(req.id)
            link.emit(
                wire.Error(
                    wire.ErrorCode.DESKTOP_UNAVAILABLE,
                    "no desktop agent is connected for this user: start `c2l desktop`",
                    req.id,
                )
            )
            return
        did = f"r{next(self._ids)}"
        self.routes[did] = (link, req.id)
        link.outbound[req.id] = did
        self.relayed += 1
        desktop.emit(attrs.evolve(req, id=did))

    def _cancel(self, link: Link, rid: str) -> None:
        did = link.outbound.pop(rid, None)
        if did is None or not link.streams.finish(rid):
            link.emit(wire.Error(wire.ErrorCode.UNKNOWN_ID, f"no request {rid!r} in flight", rid))
            return
        self.routes.pop(did, None)
        self._forget(did)
        if self.desktop is not None:
            self.desktop.emit(wire.Cancel(did))

    def remove_client(self, link: Link, *, abrupt: bool = False) -> None:
        """Forget a closed web client.

        A clean close cancels its open requests on the desktop at once. An ``abrupt`` end
        (the connection broke, without a close) detaches the ones whose answer began
        instead: they run on and are kept for a ``resume`` for the resume window.
        """
        self.clients.discard(link)
        link.streams.drain()
        dids = list(link.outbound.values())
        link.outbound.clear()
        now = time.monotonic()
        for did in dids:
            self.routes.pop(did, None)
            stream = self._streams.get(did)
            if abrupt and stream is not None:
                stream.detach(now)
                continue
            self._forget(did)
            if self.desktop is not None:
                self.desktop.emit(wire.Cancel(did))

    # ---- desktop agent ----------------------------------------------------------------

    def set_desktop(self, link: Link) -> Link | None:
        """Make ``link`` the desktop connection; returns the one it replaces, if any."""
        old = self.desktop
        if old is not None:
            self.drop_desktop(old, "the desktop agent reconnected")
        self.desktop = link
        return old

    def desktop_frame(self, link: Link, frame: str) -> None:
        """Handle one text frame from the desktop agent."""
        try:
            msg = wire.decode(frame)
        except wire.ProtocolError as exc:
            link.emit(exc.to_message())
            return
        if isinstance(msg, wire.Ping):
            link.emit(wire.Pong(msg.timestamp))
            return
        if isinstance(msg, wire.Pong):
            return
        if isinstance(msg, wire.ResponseStart | wire.Chunk | wire.ResponseEnd | wire.Error):
            if msg.id is None:
                log.info(
                    "desktop reported an error: %s", msg.code if isinstance(msg, wire.Error) else ""
                )
                return
            route = self.routes.get(msg.id)
            if route is None:
                self._detached_frame(msg)  # or cancelled, or finished: dropped
                return
            self.last_active = time.monotonic()
            client, cid = route
            if isinstance(msg, wire.ResponseEnd | wire.Error):
                del self.routes[msg.id]
                client.outbound.pop(cid, None)
                client.streams.finish(cid)
                self._ended_attached(msg.id, msg)
            if isinstance(msg, wire.ResponseStart):
                # DESIGN.md section 5: the route; section 2: the resume token
                msg = attrs.evolve(msg, id=cid, route="cloud", resume=self._begin(msg))
                client.emit(msg)
            elif isinstance(msg, wire.Chunk):
                client.emit(self._numbered(msg, cid))
            else:
                client.emit(attrs.evolve(msg, id=cid))
            return
        link.emit(
            wire.Error(
                wire.ErrorCode.BAD_MESSAGE,
                f"a desktop agent may not send {msg.TYPE!r}",
                getattr(msg, "id", None),
            )
        )

    def drop_desktop(self, link: Link, why: str) -> None:
        """The desktop connection ended: every request in flight through it gets an error."""
        if self.desktop is not link:
            return
        self.desktop = None
        routes, self.routes = self.routes, {}
        for did in routes:
            self._forget(did)
        for stream in self._streams.values():
            if stream.end is None:  # a detached request: a resume hears what happened
                stream.end = wire.Error(
                    wire.ErrorCode.DESKTOP_UNAVAILABLE,
                    f"the desktop agent disconnected mid-stream ({why})",
                )
        for client, cid in routes.values():
            client.outbound.pop(cid, None)
            client.streams.finish(cid)
            client.emit(
                wire.Error(
                    wire.ErrorCode.DESKTOP_UNAVAILABLE,
                    f"the desktop agent disconnected mid-stream ({why})",
                    cid,
                )
            )

    def status(self) -> dict[str, object]:
        """Counters for /health (no user data)."""
        return {
            "desktop": self.desktop is not None,
            "clients": len(self.clients),
            "inflight": len(self.routes),
            "relayed": self.relayed,
            **self._resume_status(),
            # seconds without request traffic; 0 while a request is in flight
            "idle": 0.0 if self.routes else round(time.monotonic() - self.last_active, 1),
        }

    # ---- resumable streams (DESIGN.md section 2) -------------------------------------------
    #
    # Every answer whose ``response_start`` went out gets a _Stream: its token, its chunk
    # count and a replay tail of the chunks sent (bounded), because chunks already written
    # may be lost in flight when a TCP connection dies. A client that vanished without a
    # close leaves its streams detached: the desktop's frames are buffered in the tail for
    # the resume window, then the request is cancelled on the desktop and forgotten.

    def _begin(self, start: wire.ResponseStart) -> str:
        """Make the resumable state of the answer ``start`` begins; returns its token."""
        token = secrets.token_urlsafe(32)
        self._streams[start.id] = _Stream(start, token)
        self._tokens[token] = start.id
        return token

    def _numbered(self, chunk: wire.Chunk, cid: str) -> wire.Chunk:
        """Number an attached answer's chunk and keep it in the replay tail."""
        stream = self._streams.get(chunk.id)
        if stream is None:  # a chunk before response_start: a confused desktop
            return attrs.evolve(chunk, id=cid, seq=None)
        stream.add(chunk.data)
        stream.trim(self.resume_max_bytes)
        return wire.Chunk(cid, chunk.data, seq=stream.seq)

    def _ended_attached(self, did: str, end: wire.ResponseEnd | wire.Error) -> None:
        """An attached answer ended. Its stream lingers for the resume window, since
        the end (and chunks before it) may be lost in flight on a connection that is
        dying without the proxy knowing it yet; a resume from a new connection then still
        gets them. At most ``_MAX_LINGERING`` such streams are kept (oldest go first)."""
        stream = self._streams.get(did)
        if stream is None:
            return
        stream.end = end
        stream.detach(time.monotonic())
        stream.lingering = True
        lingering = [d for d, s in self._streams.items() if s.lingering]
        for old in lingering[: max(0, len(lingering) - _MAX_LINGERING)]:
            self._forget(old)

    def _detached_frame(self, msg: wire.Message) -> None:
        """The desktop's frame for a request no client holds now: buffer it (bounded)."""
        did = getattr(msg, "id", None)
        stream = self._streams.get(did) if isinstance(did, str) else None
        if stream is None or stream.detached_at is None or stream.end is not None:
            return
        self.last_active = time.monotonic()
        if isinstance(msg, wire.Chunk):
            stream.add(msg.data)
            # Chunks the old client was sent may go first; the unsent ones are the bound.
            stream.trim(self.resume_max_bytes, keep_after=stream.sent)
            self.detached_peak_bytes = max(self.detached_peak_bytes, stream.size)
            if stream.size > self.resume_max_bytes:
                log.info("a detached answer outgrew %d bytes: cancelled", self.resume_max_bytes)
                self.resume_overflows += 1
                self._forget(stream.start.id)
                if self.desktop is not None:
                    self.desktop.emit(wire.Cancel(stream.start.id))
        elif isinstance(msg, wire.ResponseEnd | wire.Error):
            stream.end = msg  # kept, with its tail, until the window passes

    def _resume(self, link: Link, msg: wire.Resume) -> None:
        """A client's ``resume``: the answer's start, the chunks after ``after``, then live."""
        did = self._tokens.get(msg.resume)
        stream = self._streams.get(did) if did is not None else None
        if stream is None or did is None or not stream.replayable(msg.after):
            link.emit(
                wire.Error(
                    wire.ErrorCode.RESUME_EXPIRED,
                    "that answer can no longer be resumed (unknown token, or its resume"
                    " window passed): send the request again",
                    msg.id,
                )
            )
            return
        try:
            link.streams.start_id(msg.id)
        except wire.ProtocolError as exc:
            link.emit(exc.to_message())
            return
        held = self.routes.pop(did, None)
        if held is not None:  # still attached to a half-open connection: it moves here
            old, old_cid = held
            old.outbound.pop(old_cid, None)
            old.streams.finish(old_cid)
        link.emit(attrs.evolve(stream.start, id=msg.id, route="cloud", resume=stream.token))
        for seq, data in stream.tail:
            if seq > msg.after:
                link.emit(wire.Chunk(msg.id, data, seq=seq))
        if stream.end is not None:
            link.streams.finish(msg.id)
            link.emit(attrs.evolve(stream.end, id=msg.id))
            self._forget(did)
            return
        stream.detached_at = None
        stream.sent = stream.seq
        self.routes[did] = (link, msg.id)
        link.outbound[msg.id] = did

    def _forget(self, did: str) -> None:
        stream = self._streams.pop(did, None)
        if stream is not None:
            self._tokens.pop(stream.token, None)

    def next_deadline(self) -> float | None:
        """Monotonic time of the next detached request's expiry (None: there is none)."""
        return self._resume_deadline()

    def expire(self, now: float) -> None:
        """Cancel on the desktop (and forget) the detached requests whose window passed."""
        self._expire_detached(now)

    def _resume_deadline(self) -> float | None:
        times = [s.detached_at for s in self._streams.values() if s.detached_at is not None]
        return min(times) + self.resume_window if times else None

    def _expire_detached(self, now: float) -> None:
        for did, stream in list(self._streams.items()):
            if stream.detached_at is None or now < stream.detached_at + self.resume_window:
                continue
            self._forget(did)
            if stream.end is None and self.desktop is not None:
                self.desktop.emit(wire.Cancel(did))

    def _detached_running(self) -> int:
        """Detached requests still running on the desktop (they count as in flight)."""
        return sum(1 for s in self._streams.values() if s.detached_at is not None and not s.end)

    def _resume_status(self) -> dict[str, int]:
        kept = [s for s in self._streams.values() if s.detached_at is not None]
        return {
            # requests held for a resume, and the bytes of chunks they keep
            "detached": sum(1 for s in kept if not s.lingering),
            "lingering": sum(1 for s in kept if s.lingering),
            "detached_bytes": sum(s.size for s in kept),
            "detached_peak_bytes": self.detached_peak_bytes,
            "resume_overflows": self.resume_overflows,
        }


#: Answers that ended while attached kept at once for a late resume (the oldest go first).
_MAX_LINGERING = 16


def _size(data: str) -> int:
    return len(data) if data.isascii() else len(data.encode("utf-8", "replace"))


@attrs.define(eq=False)
class _Stream:
    """One answer's resumable state: its start, token, chunk count and replay tail."""

    start: wire.ResponseStart
    token: str
    #: The last ``seq`` stamped.
    seq: int = 0
    #: (seq, data) of the latest chunks, oldest first; ``size`` their bytes.
    tail: collections.deque[tuple[int, str]] = attrs.field(factory=collections.deque)
    size: int = 0
    #: The last ``seq`` handed to a client connection (the rest was buffered detached).
    sent: int = 0
    #: Since when no client holds it (None: attached).
    detached_at: float | None = None
    #: The answer's end (``response_end`` or ``error``), once the desktop sent it.
    end: wire.ResponseEnd | wire.Error | None = None
    #: It ended while attached and is only kept for a late resume.
    lingering: bool = False

    def add(self, data: str) -> None:
        self.seq += 1
        if self.detached_at is None:
            self.sent = self.seq
        self.tail.append((self.seq, data))
        self.size += _size(data)

    def trim(self, limit: int, keep_after: int | None = None) -> None:
        """Drop the oldest chunks while over ``limit`` bytes (never past ``keep_after``)."""
        while self.size > limit and self.tail:
            if keep_after is not None and self.tail[0][0] > keep_after:
                return
            _, data = self.tail.popleft()
            self.size -= _size(data)

    def detach(self, now: float) -> None:
        self.detached_at = now

    def replayable(self, after: int) -> bool:
        """Whether every chunk after ``after`` is still here."""
        oldest = self.tail[0][0] if self.tail else self.seq + 1
        return oldest - 1 <= after <= self.seq
