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

import itertools
import logging
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
        elif isinstance(msg, wire.Body):
            self.last_active = time.monotonic()
            self._body(link, msg)
        elif isinstance(msg, wire.Ping):
            link.emit(wire.Pong(msg.timestamp))
        elif isinstance(msg, wire.Pong):
            pass
        else:
            link.emit(
                wire.Error(
                    wire.ErrorCode.BAD_MESSAGE,
                    f"a web client may send request, body, cancel or ping, not {msg.TYPE!r}",
                    getattr(msg, "id", None),
                )
            )

    def _start_request(self, link: Link, req: wire.Request) -> None:
        if len(self.routes) >= self.max_inflight and req.id not in link.streams:
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

    def _body(self, link: Link, piece: wire.Body) -> None:
        """Pass a piece of a streamed request body to the desktop, under its desktop id.

        The hub keeps nothing of it: the piece is queued on the desktop's connection like
        any frame, and the shell stops reading the clients while that queue is full, so a
        large upload moves at the desktop's pace and is never held whole here. Whether
        the piece fits its request (streamed, not after the last) is the desktop's check.
        """
        did = link.outbound.get(piece.id)
        if did is None or self.desktop is None:
            link.emit(
                wire.Error(
                    wire.ErrorCode.UNKNOWN_ID, f"no request {piece.id!r} in flight", piece.id
                )
            )
            return
        self.desktop.emit(attrs.evolve(piece, id=did))

    def _cancel(self, link: Link, rid: str) -> None:
        did = link.outbound.pop(rid, None)
        if did is None or not link.streams.finish(rid):
            link.emit(wire.Error(wire.ErrorCode.UNKNOWN_ID, f"no request {rid!r} in flight", rid))
            return
        self.routes.pop(did, None)
        if self.desktop is not None:
            self.desktop.emit(wire.Cancel(did))

    def remove_client(self, link: Link) -> None:
        """Forget a closed web client; its open requests are cancelled on the desktop."""
        self.clients.discard(link)
        link.streams.drain()
        dids = list(link.outbound.values())
        link.outbound.clear()
        for did in dids:
            self.routes.pop(did, None)
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
                return  # cancelled or already finished: late frames are dropped
            self.last_active = time.monotonic()
            client, cid = route
            if isinstance(msg, wire.ResponseEnd | wire.Error):
                del self.routes[msg.id]
                client.outbound.pop(cid, None)
                client.streams.finish(cid)
            if isinstance(msg, wire.ResponseStart):
                client.emit(attrs.evolve(msg, id=cid, route="cloud"))  # DESIGN.md section 5
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
            # seconds without request traffic; 0 while a request is in flight
            "idle": 0.0 if self.routes else round(time.monotonic() - self.last_active, 1),
        }
