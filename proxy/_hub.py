"""The routing core of a user's proxy: pairs web clients with the desktop agent.

One proxy process serves one user. Any number of web-client connections share the user's
desktop-agent connections; requests are multiplexed over them under ids the hub assigns,
so ids chosen by different clients (or by one client reusing an id after a stream ended)
never collide, and each answer goes back only to the connection that asked.

A user may connect several desktops at once (a laptop and a workstation, each with its
own models), each under its own name (DESIGN.md section 2). The hub learns each desktop's
models with a ``GET /api/tags`` of its own when the desktop connects, and again from
every listing a client asks for. A client's ``GET /api/tags`` or ``GET /v1/models`` goes
to every desktop and the answers are merged, each model once with the ``desktops`` that
have it; any other request goes to a desktop that has the model its body names (else to
any), the one with the fewest requests in flight. A desktop that drops errors only the
requests it was serving.

The hub is synchronous: a link's ``send`` only queues an encoded frame on its connection,
and the network shell (``_server``) writes the queues out and applies backpressure. So the
routing core neither blocks nor awaits, and it needs no event loop library at all.
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import attrs

import wire

log = logging.getLogger("c2l.proxy")

#: Queues one text frame for sending on a connection; never blocks.
Send = Callable[[str], None]

#: The listings answered by every desktop together: path -> (list field, model key field).
LISTINGS: dict[str, tuple[str, str]] = {
    "/api/tags": ("models", "name"),
    "/v1/models": ("data", "id"),
}
#: How long a listing waits for the desktops' answers; a desktop still silent is left out.
LISTING_TIMEOUT_S = 10.0
#: The largest answer of one desktop to a listing (a model list is a few kilobytes).
MAX_LISTING_BYTES = 4 * 1024 * 1024


def model_key(name: str) -> str:
    """Ollama's normalisation of a model name: a name without a tag means ``:latest``."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


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


@attrs.define(eq=False)
class Route:
    """One request in flight on a desktop: who asked, under which id, which desktop serves."""

    client: Link
    #: The client's own id of the request.
    cid: str
    #: The name of the desktop serving it.
    desktop: str


@attrs.define(eq=False)
class _Part:
    """One desktop's answer to a listing, as it arrives."""

    desktop: str
    status: int = 0
    start: wire.ResponseStart | None = None
    data: list[str] = attrs.field(factory=list)
    size: int = 0


@attrs.define(eq=False)
class _Listing:
    """A listing asked of every desktop at once, answered when all have (or time is up).

    ``client`` None: the hub's own look at a desktop's models (nobody to answer).
    """

    path: str
    client: Link | None
    cid: str
    deadline: float
    #: The desktops asked, in the hub's order (the merged answer keeps it).
    order: list[str]
    #: desktop-side id -> that desktop's answer so far, while it is awaited
    parts: dict[str, _Part] = attrs.field(factory=dict)
    #: desktop name -> its answer, parsed
    answers: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    #: The last failure of a desktop: the client's error when no desktop answered.
    failure: wire.Error | None = None
    #: A lone desktop's answer that is no listing (not 200, not a JSON object): it goes
    #: to the client as the desktop sent it, as it did before several desktops existed.
    verbatim: tuple[wire.ResponseStart, list[str]] | None = None


def merge_listing(path: str, answers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The union of the desktops' listings: each model once, with ``desktops`` naming
    the desktops that have it, sorted (DESIGN.md section 2); the other fields of the first
    answer."""
    field, key = LISTINGS[path]
    merged: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for name, answer in answers.items():
        if not out:
            out = {k: v for k, v in answer.items() if k != field}
        items = answer.get(field)
        for item in items if isinstance(items, list) else ():
            if not isinstance(item, dict) or not isinstance(item.get(key), str):
                continue
            entry = merged.setdefault(model_key(item[key]), {**item, "desktops": []})
            if name not in entry["desktops"]:
                entry["desktops"].append(name)
    for entry in merged.values():
        entry["desktops"].sort()  # the same answer whichever desktop connected first
    out[field] = list(merged.values())
    return out


def _model_names(path: str, answer: dict[str, Any]) -> frozenset[str]:
    field, key = LISTINGS[path]
    items = answer.get(field)
    return frozenset(
        model_key(item[key])
        for item in (items if isinstance(items, list) else ())
        if isinstance(item, dict) and isinstance(item.get(key), str)
    )


@attrs.define
class Hub:
    """Request routing state of one user's proxy. Memory only; nothing is written anywhere."""

    #: The connected desktops by name; a newer agent of a name replaces the older one.
    desktops: dict[str, Link] = attrs.field(factory=dict)
    clients: set[Link] = attrs.field(factory=set)
    #: desktop-side id -> the request's route
    routes: dict[str, Route] = attrs.field(factory=dict)
    #: desktop name -> the normalised names of its models (absent: not known yet)
    models: dict[str, frozenset[str]] = attrs.field(factory=dict)
    _ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    #: desktop link -> its name
    _names: dict[Link, str] = attrs.field(factory=dict)
    #: listing id (a client's outbound entry) -> the listing in progress
    _listings: dict[str, _Listing] = attrs.field(factory=dict)
    #: desktop-side id of a listing's part -> its listing
    _parts: dict[str, _Listing] = attrs.field(factory=dict)
    listing_timeout_s: float = LISTING_TIMEOUT_S
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
    #: The streams no client holds, in the order they were detached (so the first is the
    #: next to expire): the server's loop asks for the next deadline at every turn, and
    #: this keeps that question O(1) however many answers are streaming.
    _detached: dict[str, _Stream] = attrs.field(factory=dict)
    #: Requests cancelled on the desktop because their detached buffer outgrew its bound.
    resume_overflows: int = 0
    #: The most bytes one detached request has kept at once so far (tests, /health).
    detached_peak_bytes: int = 0

    @property
    def desktop(self) -> Link | None:
        """A connected desktop (the first), or None: for callers that ask "any?"."""
        return next(iter(self.desktops.values()), None)

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
                    "a web client may send request, body, cancel, resume or ping,"
                    f" not {msg.TYPE!r}",
                    getattr(msg, "id", None),
                )
            )

    def _start_request(self, link: Link, req: wire.Request) -> None:
        busy = len(self.routes) + len(self._listings) + self._detached_running()
        if busy >= self.max_inflight and req.id not in link.streams:
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
        if not self.desktops:
            link.streams.finish(req.id)
            link.emit(
                wire.Error(
                    wire.ErrorCode.DESKTOP_UNAVAILABLE,
                    "no desktop agent is connected for this user: start `c2l desktop`",
                    req.id,
                )
            )
            return
        self.relayed += 1
        path = req.path.split("?", 1)[0]
        if req.method == "GET" and path in LISTINGS:
            lid = f"l{next(self._ids)}"
            link.outbound[req.id] = lid
            self._fan_out(lid, req, link, list(self.desktops))
            return
        name = self._pick(req)
        did = f"r{next(self._ids)}"
        self.routes[did] = Route(link, req.id, name)
        link.outbound[req.id] = did
        self.desktops[name].emit(attrs.evolve(req, id=did))

    def inflight(self, name: str) -> int:
        """Requests in flight on desktop ``name``."""
        return sum(1 for route in self.routes.values() if route.desktop == name)

    def _pick(self, req: wire.Request) -> str:
        """The desktop for ``req``: of those that have the model its body names (Ollama's
        normalisation), the one with the fewest requests in flight.

        A request that names no model a desktop has (``/api/ps``, a blob upload, ``/api/create``
        or ``/api/pull`` of a new model) goes to the home desktop, the first by name, not
        to the least busy one: the steps of one task (``HEAD`` and ``POST`` of a blob, then
        the ``create`` that uses it) must meet on one desktop.
        """
        model = req.body.get("model") if isinstance(req.body, dict) else None
        having: list[str] = []
        if isinstance(model, str) and model:
            key = model_key(model)
            having = [n for n in self.desktops if key in self.models.get(n, ())]
        if not having:
            return min(self.desktops)
        load = collections.Counter(route.desktop for route in self.routes.values())
        return min(having, key=lambda n: (load[n], n))

    def _body(self, link: Link, piece: wire.Body) -> None:
        """Pass a piece of a streamed request body to the desktop, under its desktop id.

        The hub keeps nothing of it: the piece is queued on the desktop's connection like
        any frame, and the shell stops reading the clients while that queue is full, so a
        large upload moves at the desktop's pace and is never held whole here. Whether
        the piece fits its request (streamed, not after the last) is the desktop's check.
        """
        did = link.outbound.get(piece.id)
        route = self.routes.get(did) if did is not None else None
        desktop = self.desktops.get(route.desktop) if route is not None else None
        if did is None or desktop is None:
            link.emit(
                wire.Error(
                    wire.ErrorCode.UNKNOWN_ID, f"no request {piece.id!r} in flight", piece.id
                )
            )
            return
        desktop.emit(attrs.evolve(piece, id=did))

    def _cancel(self, link: Link, rid: str) -> None:
        did = link.outbound.pop(rid, None)
        if did is None or not link.streams.finish(rid):
            link.emit(wire.Error(wire.ErrorCode.UNKNOWN_ID, f"no request {rid!r} in flight", rid))
            return
        self._drop_stream(did)
        self._forget(did)

    def _forget(self, did: str) -> None:
        """A client no longer wants request ``did``: cancel it on its desktop(s)."""
        route = self.routes.pop(did, None)
        if route is not None:
            desktop = self.desktops.get(route.desktop)
            if desktop is not None:
                desktop.emit(wire.Cancel(did))
            return
        listing = self._listings.pop(did, None)
        if listing is not None:
            self._drop_parts(listing)

    def remove_client(self, link: Link, *, abrupt: bool = False) -> None:
        """Forget a closed web client.

        A clean close cancels its open requests on their desktops at once. An ``abrupt``
        end (the connection broke, without a close) detaches the ones whose answer began
        instead: they run on and are kept for a ``resume`` for the resume window.
        """
        self.clients.discard(link)
        link.streams.drain()
        dids = list(link.outbound.values())
        link.outbound.clear()
        now = time.monotonic()
        for did in dids:
            stream = self._streams.get(did)
            if abrupt and stream is not None and did in self.routes:
                del self.routes[did]
                self._detach(did, stream, now)
                continue
            self._drop_stream(did)
            self._forget(did)

    # ---- desktop agents ----------------------------------------------------------------

    def set_desktop(self, link: Link, name: str = wire.DEFAULT_DESKTOP_NAME) -> Link | None:
        """Make ``link`` the desktop ``name``; returns the one of that name it replaces.

        Desktops of other names stay. Once there is a choice (two desktops or more), the
        hub asks each desktop whose models it does not know yet for them; a lone desktop
        is asked nothing the client did not ask (its models are learnt from the listings
        the clients ask for), so one desktop sees exactly the traffic it always did.
        """
        old = self.desktops.get(name)
        if old is not None:
            self.drop_desktop(old, "the desktop agent reconnected")
        self.desktops[name] = link
        self._names[link] = name
        if len(self.desktops) > 1:
            asked = {
                part.desktop
                for listing in self._listings.values()
                if listing.client is None
                for part in listing.parts.values()
            }
            unknown = [n for n in self.desktops if n not in self.models and n not in asked]
            if unknown:
                ask = wire.Request("", "GET", "/api/tags", {"accept": "application/json"})
                self._fan_out(f"l{next(self._ids)}", ask, None, unknown)
        return old

    def desktop_frame(self, link: Link, frame: str) -> None:
        """Handle one text frame from a desktop agent."""
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
                if msg.id in self._parts:
                    self._listing_frame(msg.id, msg)
                else:
                    self._detached_frame(msg)  # or cancelled, or finished: dropped
                return
            self.last_active = time.monotonic()
            client, cid = route.client, route.cid
            if isinstance(msg, wire.ResponseEnd | wire.Error):
                del self.routes[msg.id]
                client.outbound.pop(cid, None)
                client.streams.finish(cid)
                self._ended_attached(msg.id, msg)
            if isinstance(msg, wire.ResponseStart):
                # DESIGN.md section 5: the route; section 2: the resume token
                token = self._begin(msg, route.desktop)
                client.emit(attrs.evolve(msg, id=cid, route="cloud", resume=token))
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
        """A desktop connection ended: every request in flight through it gets an error.

        Only that desktop's: the requests other desktops serve go on.
        """
        name = self._names.pop(link, None)
        if name is None or self.desktops.get(name) is not link:
            return
        del self.desktops[name]
        self.models.pop(name, None)
        for stream in self._streams.values():
            if stream.desktop == name and stream.end is None and stream.detached_at is not None:
                # a detached request: a resume hears what happened
                stream.end = wire.Error(
                    wire.ErrorCode.DESKTOP_UNAVAILABLE,
                    f"the desktop agent disconnected mid-stream ({why})",
                )
        for did, route in list(self.routes.items()):
            if route.desktop != name:
                continue
            del self.routes[did]
            self._drop_stream(did)
            route.client.outbound.pop(route.cid, None)
            route.client.streams.finish(route.cid)
            route.client.emit(
                wire.Error(
                    wire.ErrorCode.DESKTOP_UNAVAILABLE,
                    f"the desktop agent disconnected mid-stream ({why})",
                    route.cid,
                )
            )
        for did, listing in list(self._parts.items()):
            part = listing.parts.get(did)
            if part is not None and part.desktop == name:
                self._part_failed(
                    listing,
                    did,
                    wire.Error(
                        wire.ErrorCode.DESKTOP_UNAVAILABLE,
                        f"the desktop agent disconnected ({why})",
                    ),
                )

    def desktops_status(self) -> list[dict[str, Any]]:
        """The connected desktops for ``GET /desktops``: name, models, requests in flight."""
        return [
            {
                "name": name,
                "models": sorted(self.models.get(name, ())),
                "inflight": self.inflight(name),
            }
            for name in self.desktops
        ]

    # ---- resumable streams (DESIGN.md section 2) -------------------------------------------
    #
    # Every answer whose ``response_start`` went out gets a _Stream: its token, its chunk
    # count and a replay tail of the chunks sent (bounded), because chunks already written
    # may be lost in flight when a TCP connection dies. A client that vanished without a
    # close leaves its streams detached: the desktop's frames are buffered in the tail for
    # the resume window, then the request is cancelled on the desktop and forgotten.

    def _begin(self, start: wire.ResponseStart, desktop: str) -> str:
        """Make the resumable state of the answer ``start`` begins; returns its token."""
        # secrets.token_urlsafe(32), without the module: it imports random (about 70 kB
        # per proxy, DESIGN.md section 4's memory budget).
        token = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")
        self._streams[start.id] = _Stream(start, token, desktop)
        self._tokens[token] = start.id
        return token

    def _numbered(self, chunk: wire.Chunk, cid: str) -> wire.Chunk:
        """Number an attached answer's chunk and keep it in the replay tail."""
        stream = self._streams.get(chunk.id)
        if stream is None:  # a chunk before response_start: a confused desktop
            return attrs.evolve(chunk, id=cid, seq=None)
        stream.add(chunk)
        stream.trim(self.resume_max_bytes)
        return attrs.evolve(chunk, id=cid, seq=stream.seq)

    def _ended_attached(self, did: str, end: wire.ResponseEnd | wire.Error) -> None:
        """An attached answer ended. Its stream lingers for the resume window, since
        the end (and chunks before it) may be lost in flight on a connection that is
        dying without the proxy knowing it yet; a resume from a new connection then still
        gets them. At most ``_MAX_LINGERING`` such streams are kept (oldest go first)."""
        stream = self._streams.get(did)
        if stream is None:
            return
        stream.end = end
        self._detach(did, stream, time.monotonic())
        stream.lingering = True
        lingering = [d for d, s in self._detached.items() if s.lingering]
        for old in lingering[: max(0, len(lingering) - _MAX_LINGERING)]:
            self._drop_stream(old)

    def _detached_frame(self, msg: wire.Message) -> None:
        """The desktop's frame for a request no client holds now: buffer it (bounded)."""
        did = getattr(msg, "id", None)
        stream = self._streams.get(did) if isinstance(did, str) else None
        if stream is None or stream.detached_at is None or stream.end is not None:
            return
        self.last_active = time.monotonic()
        if isinstance(msg, wire.Chunk):
            stream.add(msg)
            # Chunks the old client was sent may go first; the unsent ones are the bound.
            stream.trim(self.resume_max_bytes, keep_after=stream.sent)
            self.detached_peak_bytes = max(self.detached_peak_bytes, stream.size)
            if stream.size > self.resume_max_bytes:
                log.info("a detached answer outgrew %d bytes: cancelled", self.resume_max_bytes)
                self.resume_overflows += 1
                self._drop_stream(stream.start.id)
                self._cancel_on(stream.desktop, stream.start.id)
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
            held.client.outbound.pop(held.cid, None)
            held.client.streams.finish(held.cid)
        link.emit(attrs.evolve(stream.start, id=msg.id, route="cloud", resume=stream.token))
        for seq, chunk in stream.tail:
            if seq > msg.after:
                link.emit(attrs.evolve(chunk, id=msg.id, seq=seq))
        if stream.end is not None:
            link.streams.finish(msg.id)
            link.emit(attrs.evolve(stream.end, id=msg.id))
            self._drop_stream(did)
            return
        stream.detached_at = None
        self._detached.pop(did, None)
        stream.lingering = False
        stream.sent = stream.seq
        self.routes[did] = Route(link, msg.id, stream.desktop)
        link.outbound[msg.id] = did

    def _drop_stream(self, did: str) -> None:
        """Forget the resumable state of request ``did`` (its token is unknown from now)."""
        stream = self._streams.pop(did, None)
        if stream is not None:
            self._tokens.pop(stream.token, None)
            self._detached.pop(did, None)

    def _detach(self, did: str, stream: _Stream, now: float) -> None:
        """No client holds ``stream`` from ``now`` on: its resume window starts."""
        stream.detached_at = now
        self._detached.pop(did, None)  # to the end of the order: it expires last
        self._detached[did] = stream

    def _cancel_on(self, desktop: str, did: str) -> None:
        """Cancel request ``did`` on desktop ``desktop``, if it is still connected."""
        link = self.desktops.get(desktop)
        if link is not None:
            link.emit(wire.Cancel(did))

    # ---- listings: one request to every desktop, one merged answer ---------------------

    def _fan_out(self, lid: str, req: wire.Request, client: Link | None, names: list[str]) -> None:
        """Send ``req`` (a listing, as the client asked it: query, headers) to desktops
        ``names``, under an id of its own on each."""
        path = req.path.split("?", 1)[0]
        deadline = time.monotonic() + self.listing_timeout_s
        listing = _Listing(path, client, req.id, deadline, names)
        self._listings[lid] = listing
        for name in names:
            did = f"r{next(self._ids)}"
            listing.parts[did] = _Part(name)
            self._parts[did] = listing
            self.desktops[name].emit(attrs.evolve(req, id=did))

    def _listing_frame(self, did: str, msg: wire.Message) -> None:
        listing = self._parts[did]
        part = listing.parts[did]
        if isinstance(msg, wire.ResponseStart):
            part.status = msg.status
            part.start = msg
        elif isinstance(msg, wire.Chunk):
            part.size += len(msg.data)
            part.data.append(msg.data)
            if part.size > MAX_LISTING_BYTES:
                self._cancel_part(did, part)
                self._part_failed(
                    listing, did, wire.Error(wire.ErrorCode.TOO_LARGE, "the listing is too large")
                )
        elif isinstance(msg, wire.Error):
            self._part_failed(listing, did, msg)
        elif isinstance(msg, wire.ResponseEnd):
            try:
                answer = json.loads("".join(part.data)) if part.status == 200 else None
            except ValueError:
                answer = None
            if not isinstance(answer, dict) and len(listing.order) == 1 and part.start:
                listing.verbatim = (part.start, part.data)
                del listing.parts[did]
                del self._parts[did]
                self._maybe_done(listing)
                return
            if not isinstance(answer, dict):
                self._part_failed(
                    listing,
                    did,
                    wire.Error(
                        wire.ErrorCode.UPSTREAM_ERROR,
                        f"the desktop's Ollama answered {listing.path} with HTTP {part.status}",
                    ),
                )
                return
            self.models[part.desktop] = _model_names(listing.path, answer)
            listing.answers[part.desktop] = answer
            del listing.parts[did]
            del self._parts[did]
            self._maybe_done(listing)

    def _cancel_part(self, did: str, part: _Part) -> None:
        desktop = self.desktops.get(part.desktop)
        if desktop is not None:
            desktop.emit(wire.Cancel(did))

    def _part_failed(self, listing: _Listing, did: str, error: wire.Error) -> None:
        part = listing.parts.pop(did)
        del self._parts[did]
        log.info(
            "desktop %s left out of a listing of %s: %s", part.desktop, listing.path, error.code
        )
        listing.failure = error
        self._maybe_done(listing)

    def _drop_parts(self, listing: _Listing) -> None:
        for did, part in listing.parts.items():
            self._parts.pop(did, None)
            self._cancel_part(did, part)
        listing.parts.clear()

    def _maybe_done(self, listing: _Listing) -> None:
        if listing.parts:
            return
        lid = next((k for k, v in self._listings.items() if v is listing), None)
        if lid is not None:
            del self._listings[lid]
        client, cid = listing.client, listing.cid
        if client is None or client.outbound.get(cid) != lid:
            return  # the hub's own look, or the client went
        self.last_active = time.monotonic()
        del client.outbound[cid]
        client.streams.finish(cid)
        if not listing.answers and listing.verbatim is not None:
            start, data = listing.verbatim
            client.emit(attrs.evolve(start, id=cid, route="cloud"))
            for piece in data:
                client.emit(wire.Chunk(cid, piece))
            client.emit(wire.ResponseEnd(cid))
            return
        if not listing.answers:
            client.emit(
                attrs.evolve(listing.failure, id=cid)
                if listing.failure is not None
                else wire.Error(wire.ErrorCode.DESKTOP_UNAVAILABLE, "no desktop answered", cid)
            )
            return
        ordered = {n: listing.answers[n] for n in listing.order if n in listing.answers}
        body = json.dumps(merge_listing(listing.path, ordered))
        client.emit(wire.ResponseStart(cid, 200, {"content-type": "application/json"}, "cloud"))
        client.emit(wire.Chunk(cid, body))
        client.emit(wire.ResponseEnd(cid))

    # ---- timers (called by the server's loop) ------------------------------------------

    def next_deadline(self) -> float | None:
        """The monotonic time at which :meth:`expire` has something to do, or None."""
        due = [t for t in (self._listing_deadline(), self._resume_deadline()) if t is not None]
        return min(due, default=None)

    def expire(self, now: float) -> None:
        """Act on the deadlines that have passed by ``now``: listings whose desktops are
        late, detached requests whose resume window passed."""
        self._expire_listings(now)
        self._expire_detached(now)

    def _listing_deadline(self) -> float | None:
        return min((listing.deadline for listing in self._listings.values()), default=None)

    def _expire_listings(self, now: float) -> None:
        for listing in [v for v in self._listings.values() if v.deadline <= now]:
            late = sorted({part.desktop for part in listing.parts.values()})
            if late:
                log.warning(
                    "desktop(s) %s left out of a listing of %s: no answer within %g s",
                    ", ".join(late),
                    listing.path,
                    self.listing_timeout_s,
                )
                listing.failure = wire.Error(
                    wire.ErrorCode.DESKTOP_UNAVAILABLE,
                    f"the desktop did not answer {listing.path} in time",
                )
            self._drop_parts(listing)
            self._maybe_done(listing)

    def status(self) -> dict[str, object]:
        """Counters for /health (no user data)."""
        return {
            "desktop": bool(self.desktops),
            "desktops": len(self.desktops),
            "clients": len(self.clients),
            "inflight": len(self.routes),
            "relayed": self.relayed,
            **self._resume_status(),
            # seconds without request traffic; 0 while a request is in flight
            "idle": 0.0 if self.routes else round(time.monotonic() - self.last_active, 1),
        }

    def _resume_deadline(self) -> float | None:
        first = next(iter(self._detached.values()), None)
        if first is None or first.detached_at is None:
            return None
        return first.detached_at + self.resume_window

    def _expire_detached(self, now: float) -> None:
        while self._detached:
            did, stream = next(iter(self._detached.items()))
            if stream.detached_at is not None and now < stream.detached_at + self.resume_window:
                return  # the others were detached later
            self._drop_stream(did)
            if stream.end is None:
                self._cancel_on(stream.desktop, did)

    def _detached_running(self) -> int:
        """Detached requests still running on the desktop (they count as in flight)."""
        return sum(1 for s in self._detached.values() if not s.end)

    def _resume_status(self) -> dict[str, int]:
        kept = list(self._detached.values())
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


def _size(chunk: wire.Chunk) -> int:
    """The bytes a chunk's payload takes (text or base64) as a resume buffer counts them."""
    data = chunk.data
    text = len(data) if data.isascii() else len(data.encode("utf-8", "replace"))
    return text + len(chunk.data_base64 or "")


@attrs.define(eq=False)
class _Stream:
    """One answer's resumable state: its start, token, chunk count and replay tail."""

    start: wire.ResponseStart
    token: str
    #: The name of the desktop serving it.
    desktop: str
    #: The last ``seq`` stamped.
    seq: int = 0
    #: (seq, chunk) of the latest chunks, oldest first; ``size`` their payloads' bytes.
    tail: collections.deque[tuple[int, wire.Chunk]] = attrs.field(factory=collections.deque)
    size: int = 0
    #: The last ``seq`` handed to a client connection (the rest was buffered detached).
    sent: int = 0
    #: Since when no client holds it (None: attached).
    detached_at: float | None = None
    #: The answer's end (``response_end`` or ``error``), once the desktop sent it.
    end: wire.ResponseEnd | wire.Error | None = None
    #: It ended while attached and is only kept for a late resume.
    lingering: bool = False

    def add(self, chunk: wire.Chunk) -> None:
        self.seq += 1
        if self.detached_at is None:
            self.sent = self.seq
        self.tail.append((self.seq, chunk))
        self.size += _size(chunk)

    def trim(self, limit: int, keep_after: int | None = None) -> None:
        """Drop the oldest chunks while over ``limit`` bytes (never past ``keep_after``)."""
        while self.size > limit and self.tail:
            if keep_after is not None and self.tail[0][0] > keep_after:
                return
            _, chunk = self.tail.popleft()
            self.size -= _size(chunk)

    def replayable(self, after: int) -> bool:
        """Whether every chunk after ``after`` is still here."""
        oldest = self.tail[0][0] if self.tail else self.seq + 1
        return oldest - 1 <= after <= self.seq
