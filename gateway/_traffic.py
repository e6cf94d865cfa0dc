"""What the gateway counts and limits about the frames it relays, for both data paths.

A WebSocket client (``/ws/stream``, ``/ws/bridge``) and the HTTP tunnel (``/api/ollama``)
move ``wire`` frames between a client and the session's proxy. Both count them here in
the same way (messages and bytes by side and direction, errors by code, the session's
activity and byte counts, open connections), and both are paced by the user's frame
budget here.
"""

from __future__ import annotations

import contextlib
from typing import Any

import attrs
import trio

import wire
from orchestrator import Session

from ._limits import TokenBucket
from ._metrics import Metrics


def frame_type(frame: str) -> str | None:
    """The ``type`` of a relayed frame, cheaply: frames of wire.encode start with it."""
    if frame.startswith('{"type":"'):
        end = frame.find('"', 9)
        if end > 0:
            return frame[9:end]
    if len(frame) > 512:
        return None  # a big frame is request traffic whatever it claims; the proxy checks
    return wire.peek_type(frame)


@attrs.define(eq=False)
class Traffic:
    """The accounting and limits of one client's frames (side ``stream``, ``bridge`` or
    ``http``). ``in`` is towards the proxy, ``out`` from it.

    Request traffic is session activity; heartbeats (``ping`` in, ``pong`` out) are not.
    """

    metrics: Metrics
    side: str
    #: The user's frame budget, shared by all their connections (held while this lives).
    budget: TokenBucket
    _gauge: Any = attrs.field(init=False)
    _in: tuple[Any, Any] = attrs.field(init=False)
    _out: tuple[Any, Any] = attrs.field(init=False)
    _paced: Any = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        m = self.metrics
        self._gauge = m.connections.labels(self.side)
        self._in = (m.messages.labels(self.side, "in"), m.bytes.labels(self.side, "in"))
        self._out = (m.messages.labels(self.side, "out"), m.bytes.labels(self.side, "out"))
        self._paced = m.paced_seconds.labels(self.side)

    def client_opened(self) -> None:
        """A client connection (or HTTP request) of this side begins."""
        self._gauge.inc()

    def client_closed(self) -> None:
        self._gauge.dec()

    def attached(self, session: Session, delta: int = 1) -> None:
        """The client is (+1) or no longer is (-1) connected to ``session``'s proxy."""
        session.connected(self.side, delta)

    async def pace(self) -> None:
        """Wait as long as the user's frame budget says before taking the next frame.

        Over the budget, the user's sockets are read more slowly, so TCP slows the sender
        down; nothing is refused.
        """
        wait = self.budget.take(trio.current_time())
        if wait > 0:
            self._paced.inc(wait)  # c2l_frame_budget_wait_seconds: who is being slowed
            await trio.sleep(wait)

    def inbound(self, session: Session, frame: str, kind: str | None) -> None:
        """Count one frame on its way to the proxy."""
        session.relayed("in", len(frame), activity=kind != "ping")
        self._in[0].inc()
        self._in[1].inc(len(frame))

    def outbound(self, session: Session, frame: str, kind: str | None) -> None:
        """Count one frame of the proxy's on its way to the client."""
        if kind == "error":  # rare: worth a parse, for errors by code
            with contextlib.suppress(wire.ProtocolError):
                err = wire.decode(frame)
                if isinstance(err, wire.Error):
                    self.metrics.errors.labels(err.code).inc()
        session.relayed("out", len(frame), activity=kind != "pong")
        self._out[0].inc()
        self._out[1].inc(len(frame))
