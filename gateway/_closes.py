"""How a web client's WebSocket ended: with a close frame (clean) or without (it vanished).

Resumable streams (DESIGN.md section 2) hinge on it: a client that closed cleanly is done,
and the proxy cancels its requests at once; a client whose connection broke (a phone
changing networks, a laptop asleep) may come back, and the proxy keeps its answers for the
resume window. The gateway tells the proxy which by how it ends the line link: a
``!close`` line for a clean close, the end of the stream for a vanished client.

Hypercorn 0.18 reports every end of a WebSocket it did not close itself to the app as
``websocket.disconnect`` with code 1006, a close frame from the client included, so the
two cannot be told apart through ASGI. :func:`install` fixes that in Hypercorn's
WebSocket stream (once per process): when the client's close frame has been received (the
wsproto connection is closing or closed), the disconnect says 1000. The ASGI middleware
:class:`PeerCloseRecorder` then notes the disconnect's code in the connection's scope,
where :func:`client_closed_cleanly` reads it.
"""

from __future__ import annotations

import logging
from typing import Any, Final

log = logging.getLogger("c2l.gateway")

#: The scope key under which the middleware notes the client's disconnect code.
SCOPE_KEY: Final = "c2l.peer_close"
#: The code of a WebSocket that ended without a close frame.
CLOSE_LOST: Final = 1006

_installed = False


def install() -> None:
    """Make Hypercorn report a client's close frame as a disconnect with code 1000."""
    global _installed
    if _installed:
        return
    try:
        from hypercorn.protocol.events import StreamClosed
        from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
        from wsproto.connection import ConnectionState
    except ImportError:  # another server: nothing to fix here
        return
    original = WSStream.handle
    if getattr(original, "_c2l_peer_close", False):
        _installed = True
        return

    async def handle(self: Any, event: Any) -> None:
        if (
            isinstance(event, StreamClosed)
            and not self.closed
            and getattr(self, "app_put", None) is not None
            and self.state == ASGIWebsocketState.CONNECTED
            and getattr(self, "connection", None) is not None
            and self.connection.state in (ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED)
        ):
            # The client sent its close frame (Hypercorn has answered it): a clean end.
            self.closed = True
            await self.app_put({"type": "websocket.disconnect", "code": 1000})
            return
        await original(self, event)

    handle._c2l_peer_close = True  # type: ignore[attr-defined]
    WSStream.handle = handle  # type: ignore[method-assign]
    _installed = True


class PeerCloseRecorder:
    """ASGI middleware: notes a WebSocket client's disconnect code in its scope."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "websocket":
            await self.app(scope, receive, send)
            return

        async def recording_receive() -> Any:
            event = await receive()
            if isinstance(event, dict) and event.get("type") == "websocket.disconnect":
                scope[SCOPE_KEY] = int(event.get("code") or CLOSE_LOST)
            return event

        await self.app(scope, recording_receive, send)


def client_closed_cleanly(scope: Any) -> bool:
    """Whether the client of the WebSocket ``scope`` ended it with a close frame."""
    code = scope.get(SCOPE_KEY) if isinstance(scope, dict) else None
    return code is not None and code != CLOSE_LOST
