"""The proxy's network shell: plain HTTP for /health, WebSocket for the two sides.

The gateway is the only intended peer. Every WebSocket upgrade must carry the session's
secret (``X-C2L-Proxy-Secret``), which the orchestrator gives the container at creation,
so another process on the host that finds the published port cannot attach to the user's
session. ``GET /health`` carries no user data and needs no secret.
"""

from __future__ import annotations

import datetime
import functools
import hmac
import json
import logging
import signal
from typing import Any, NoReturn

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

import wire

from ._hub import Hub, Link

log = logging.getLogger("c2l.proxy")

SECRET_HEADER = "x-c2l-proxy-secret"
MAX_HEAD_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 10.0


class _Prebuffered(trio.abc.Stream):
    """A stream whose first bytes were already read, while sniffing the request head."""

    def __init__(self, stream: trio.abc.Stream, head: bytes) -> None:
        self._stream = stream
        self._head = head

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._head:
            data, self._head = self._head, b""
            return data
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


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


def _http(status: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode() + data


@attrs.define
class ProxyServer:
    """One user's proxy: the :class:`Hub` behind an HTTP/WebSocket listener."""

    secret: str
    hub: Hub = attrs.field(factory=Hub)
    _websockets: dict[Link, WebSocketConnection] = attrs.field(factory=dict)

    def _health(self) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC).isoformat()
        return {"status": "healthy", "timestamp": now, **self.hub.status()}

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one TCP connection from the gateway (or the orchestrator's health probe)."""
        try:
            await self._handle(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def _handle(self, stream: trio.SocketStream) -> None:
        raw = b""
        with trio.move_on_after(HEAD_TIMEOUT_S):
            while b"\r\n\r\n" not in raw and len(raw) < MAX_HEAD_BYTES:
                data = await stream.receive_some(4096)
                if not data:
                    return
                raw += data
        head = _parse_head(raw) if b"\r\n\r\n" in raw else None
        if head is None:
            await stream.send_all(_http("400 Bad Request", {"error": "bad_request"}))
            return
        upgrade = head.headers.get("upgrade", "").lower() == "websocket"
        if not upgrade:
            if head.method == "GET" and head.path == "/health":
                await stream.send_all(_http("200 OK", self._health()))
            else:
                await stream.send_all(_http("404 Not Found", {"error": "not_found"}))
            return
        given = head.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.secret.encode()):
            log.warning("refused a WebSocket without the session secret on %s", head.path)
            await stream.send_all(_http("403 Forbidden", {"error": "forbidden"}))
            return
        if head.path not in ("/ws/stream", "/ws/bridge"):
            await stream.send_all(_http("404 Not Found", {"error": "not_found"}))
            return
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(
                nursery,
                _Prebuffered(stream, raw),
                max_message_size=wire.MAX_FRAME_BYTES,
            )
            ws = await request.accept()
            try:
                if head.path == "/ws/bridge":
                    await self._desktop(ws)
                else:
                    await self._client(ws)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await ws.aclose()
            nursery.cancel_scope.cancel()

    async def _client(self, ws: WebSocketConnection) -> None:
        link = Link(f"client{id(ws):x}", ws.send_message)
        self.hub.add_client(link)
        try:
            while True:
                frame = await ws.get_message()
                if isinstance(frame, bytes):
                    frame = frame.decode("utf-8", "replace")
                await self.hub.client_frame(link, frame)
        except ConnectionClosed:
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self.hub.remove_client(link)

    async def _desktop(self, ws: WebSocketConnection) -> None:
        link = Link(f"desktop{id(ws):x}", ws.send_message)
        old = await self.hub.set_desktop(link)
        self._websockets[link] = ws
        if old is not None and old in self._websockets:
            with trio.move_on_after(1):
                await self._websockets[old].aclose(wire.CLOSE_NORMAL, "replaced by a newer agent")
        try:
            while True:
                frame = await ws.get_message()
                if isinstance(frame, bytes):
                    frame = frame.decode("utf-8", "replace")
                await self.hub.desktop_frame(link, frame)
        except ConnectionClosed:
            pass
        finally:
            self._websockets.pop(link, None)
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self.hub.drop_desktop(link, "connection closed")


async def serve_proxy(
    host: str,
    port: int,
    *,
    secret: str,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve one user's proxy on ``host:port`` until cancelled; reports the bound port."""
    if not secret:
        raise ValueError("the proxy needs a session secret (C2L_PROXY_SECRET)")
    server = ProxyServer(secret)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(trio.serve_listeners, server.handle, listeners))
        log.info("proxy listening on %s:%d", host, bound)
        task_status.started(bound)
        await trio.sleep_forever()
    raise AssertionError("unreachable")


async def _main(host: str, port: int, secret: str) -> None:
    # PID 1 in a container ignores SIGTERM unless it handles it (DESIGN.md section 3):
    # stop at once so that pod teardown is not held to the stop timeout.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(serve_proxy, host, port, secret=secret))
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main() -> int:
    """Entry point of ``python3 -m proxy`` inside the container."""
    import os

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    secret = os.environ.get("C2L_PROXY_SECRET", "")
    if not secret:
        log.error("C2L_PROXY_SECRET is not set: the orchestrator starts this container")
        return 2
    os.environ.pop("C2L_PROXY_SECRET", None)
    host = os.environ.get("C2L_PROXY_HOST", "0.0.0.0")
    port = int(os.environ.get("C2L_PROXY_PORT", "8080"))
    trio.run(_main, host, port, secret)
    return 0
