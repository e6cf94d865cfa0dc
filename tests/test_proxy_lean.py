"""The trio-free proxy server: WebSocket framing, flow control, shutdown, its imports.

These drive the server with a raw wsproto client over a plain socket, so that each frame
(fragments, control frames, close frames) and the TCP receive window are under the test's
control, which a high-level client library hides.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)

import wire
from proxy import SECRET_HEADER, ProxyServer, run_proxy_server
from proxy._server import RECV_BYTES

SECRET = "lean-secret-0123456789"
ROOT = Path(__file__).resolve().parent.parent


class RawWS:
    """A WebSocket client that sends exactly the frames it is told to."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: collections.deque[Event] = collections.deque()
        self.eof = False

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def event(self, timeout: float = 5) -> Event:
        with trio.fail_after(timeout):
            while not self.pending:
                data = await self.stream.receive_some(65536)
                if not data:
                    self.eof = True
                    raise EOFError("the proxy closed the connection")
                self.ws.receive_data(data)
                self.pending.extend(self.ws.events())
        return self.pending.popleft()

    async def message(self) -> wire.Message:
        """The next text message, whole: a frame can arrive over several reads."""
        parts = []
        while True:
            event = await self.event()
            assert isinstance(event, TextMessage), event
            parts.append(event.data)
            if event.message_finished:
                return wire.decode("".join(parts))

    async def until_eof(self, timeout: float = 5) -> None:
        with trio.fail_after(timeout):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass  # a reset is an end too


@asynccontextmanager
async def raw_ws(port: int, path: str, rcvbuf: int | None = None) -> AsyncIterator[RawWS]:
    sock = trio.socket.socket()
    if rcvbuf is not None:
        # Before connect(), so that the TCP window is small from the start.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    conn = RawWS(stream)
    try:
        await conn.send(
            Request(
                host="127.0.0.1",
                target=path,
                extra_headers=[(SECRET_HEADER.encode(), SECRET.encode())],
            )
        )
        assert isinstance(await conn.event(), AcceptConnection)
        yield conn
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


@asynccontextmanager
async def open_server(**limits: Any) -> AsyncIterator[ProxyServer]:
    server = ProxyServer.bind("127.0.0.1", 0, secret=SECRET, **limits)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(run_proxy_server, server))
        yield server
        nursery.cancel_scope.cancel()


def req(rid: str) -> wire.Request:
    return wire.Request(rid, "POST", "/api/chat", {}, {"model": "m"})


async def wait_for(predicate: Any, timeout: float = 5) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_fragmented_messages_with_interleaved_ping_are_reassembled() -> None:
    async with open_server() as server, raw_ws(server.port, "/ws/stream") as client:
        frame = wire.encode(req("frag"))
        a, b, c = frame[:5], frame[5:20], frame[20:]
        await client.send(TextMessage(data=a, message_finished=False))
        # A control frame may come between the fragments of a message (RFC 6455 5.4).
        await client.send(Ping(payload=b"between"))
        await client.send(TextMessage(data=b, message_finished=False))
        await client.send(TextMessage(data=c, message_finished=True))
        pong = await client.event()
        assert isinstance(pong, Pong) and pong.payload == b"between"
        err = await client.message()
        assert isinstance(err, wire.Error)
        assert (err.id, err.code) == ("frag", wire.ErrorCode.DESKTOP_UNAVAILABLE)
        # a binary message, fragmented, is read as UTF-8 text too
        data = wire.encode(wire.Ping(7)).encode()
        await client.send(BytesMessage(data=data[:3], message_finished=False))
        await client.send(BytesMessage(data=data[3:], message_finished=True))
        assert await client.message() == wire.Pong(7)


async def test_a_message_over_the_limit_in_small_fragments_closes_with_1009() -> None:
    async with open_server() as server, raw_ws(server.port, "/ws/stream") as client:
        piece = "x" * (64 * 1024)
        sent = 0
        # every fragment is small; their sum is what the limit is about
        with contextlib.suppress(trio.BrokenResourceError):
            while sent <= wire.MAX_FRAME_BYTES + len(piece):
                await client.send(TextMessage(data=piece, message_finished=False))
                sent += len(piece)
        close = await client.event()
        assert isinstance(close, CloseConnection) and close.code == wire.CLOSE_TOO_BIG
        await client.send(close.response())
        await client.until_eof()


async def test_the_size_limit_counts_bytes_not_characters() -> None:
    # Under the limit in characters, over it in UTF-8 bytes (two bytes each).
    text = "\u00e9" * (wire.MAX_FRAME_BYTES // 2 + 64)
    assert len(text) < wire.MAX_FRAME_BYTES < len(text.encode())
    async with open_server() as server, raw_ws(server.port, "/ws/stream") as client:
        with contextlib.suppress(trio.BrokenResourceError):
            await client.send(TextMessage(data=text))
        close = await client.event()
        assert isinstance(close, CloseConnection) and close.code == wire.CLOSE_TOO_BIG


async def test_websocket_ping_gets_a_pong_with_its_payload() -> None:
    async with open_server() as server, raw_ws(server.port, "/ws/bridge") as desktop:
        await desktop.send(Ping(payload=b"are you there"))
        pong = await desktop.event()
        assert isinstance(pong, Pong) and pong.payload == b"are you there"
        assert server.hub.desktop is not None


async def test_close_handshake_started_by_the_peer() -> None:
    async with open_server() as server, raw_ws(server.port, "/ws/bridge") as desktop:
        await wait_for(lambda: server.hub.desktop is not None)
        await desktop.send(CloseConnection(code=wire.CLOSE_NORMAL, reason="bye"))
        echo = await desktop.event()
        assert isinstance(echo, CloseConnection) and echo.code == wire.CLOSE_NORMAL
        await desktop.until_eof()
        assert server.hub.desktop is None


async def test_close_handshake_started_by_the_proxy_is_bounded() -> None:
    async with open_server() as server:
        async with raw_ws(server.port, "/ws/bridge") as old:
            async with raw_ws(server.port, "/ws/bridge") as new:
                close = await old.event()
                assert isinstance(close, CloseConnection)
                assert (close.code, close.reason) == (wire.CLOSE_REPLACED, "replaced")
                # The old agent never answers: the proxy hangs up on its own, after
                # CLOSE_TIMEOUT_S (1 s); without that bound it would wait forever.
                await old.until_eof(timeout=15)
                async with raw_ws(server.port, "/ws/stream") as client:
                    await client.send(TextMessage(data=wire.encode(req("1"))))
                    assert isinstance(await new.message(), wire.Request)


async def test_slow_reader_gets_every_chunk_through_partial_writes_and_backpressure() -> None:
    n, size = 1500, 1024
    async with (
        open_server(
            high_water=32 * 1024, low_water=8 * 1024, slow_consumer_s=60, send_buffer=8192
        ) as server,
        trio_websocket.open_websocket(
            "127.0.0.1",
            server.port,
            "/ws/bridge",
            use_ssl=False,
            extra_headers=[(SECRET_HEADER, SECRET)],
        ) as desktop,
        raw_ws(server.port, "/ws/stream", rcvbuf=4096) as client,
        trio.open_nursery() as nursery,
    ):
        await client.send(TextMessage(data=wire.encode(req("big"))))
        with trio.fail_after(5):
            fwd = wire.decode(await desktop.get_message())
        assert isinstance(fwd, wire.Request)
        sent = trio.Event()

        async def produce() -> None:
            await desktop.send_message(wire.encode(wire.ResponseStart(fwd.id, 200, {})))
            for i in range(n):
                line = json.dumps({"i": i, "pad": "p" * size})
                await desktop.send_message(wire.encode(wire.Chunk(fwd.id, line)))
            await desktop.send_message(wire.encode(wire.ResponseEnd(fwd.id)))
            sent.set()

        nursery.start_soon(produce)
        # The client reads nothing: its queue passes the mark and the desktop is paused.
        await wait_for(lambda: server.paused >= 1)
        assert not sent.is_set()
        assert isinstance(await client.message(), wire.ResponseStart)
        for i in range(n):
            chunk = await client.message()
            assert isinstance(chunk, wire.Chunk) and chunk.id == "big"
            assert json.loads(chunk.data)["i"] == i
        assert await client.message() == wire.ResponseEnd("big")
        await wait_for(sent.is_set)
        await wait_for(lambda: server.paused == 0)
        assert server.dropped_slow == 0


async def test_a_client_that_never_reads_pauses_the_desktop_and_caps_its_queue() -> None:
    # Without the pause, the proxy reads on from the desktop and the stuck client's queue
    # grows with everything the desktop sends (megabytes); with it, the queue stops at
    # the high-water mark plus at most what one read of the desktop brings.
    high = 32 * 1024
    async with (
        open_server(
            high_water=high, low_water=8 * 1024, slow_consumer_s=60, send_buffer=8192
        ) as server,
        trio_websocket.open_websocket(
            "127.0.0.1",
            server.port,
            "/ws/bridge",
            use_ssl=False,
            extra_headers=[(SECRET_HEADER, SECRET)],
        ) as desktop,
        raw_ws(server.port, "/ws/stream", rcvbuf=4096) as client,
        trio.open_nursery() as nursery,
    ):
        await client.send(TextMessage(data=wire.encode(req("stuck"))))
        with trio.fail_after(5):
            fwd = wire.decode(await desktop.get_message())
        assert isinstance(fwd, wire.Request)

        async def produce() -> None:
            for _ in range(4000):  # 4 MB offered
                await desktop.send_message(wire.encode(wire.Chunk(fwd.id, "p" * 1024)))

        nursery.start_soon(produce)
        await wait_for(lambda: server.paused >= 1)  # the client's own queue passed the mark
        await trio.sleep(1)  # the desktop keeps offering all along
        assert server.peak_queued <= high + 2 * RECV_BYTES, server.peak_queued
        assert server.paused == 2  # the client, and the desktop that feeds it
        assert server.dropped_slow == 0
        nursery.cancel_scope.cancel()


async def test_a_reader_that_never_reads_is_dropped_and_its_request_cancelled() -> None:
    async with (
        open_server(
            high_water=16 * 1024,
            low_water=4 * 1024,
            slow_consumer_s=0.5,
            backlog_close_s=0.5,
            send_buffer=8192,
        ) as server,
        trio_websocket.open_websocket(
            "127.0.0.1",
            server.port,
            "/ws/bridge",
            use_ssl=False,
            extra_headers=[(SECRET_HEADER, SECRET)],
        ) as desktop,
        trio.open_nursery() as nursery,
    ):
        async with raw_ws(server.port, "/ws/stream", rcvbuf=4096) as stuck:
            await stuck.send(TextMessage(data=wire.encode(req("s"))))
            with trio.fail_after(5):
                fwd = wire.decode(await desktop.get_message())
            assert isinstance(fwd, wire.Request)

            async def produce() -> None:
                with trio.move_on_after(10):
                    for _ in range(2000):
                        chunk = wire.Chunk(fwd.id, "q" * 1024)
                        await desktop.send_message(wire.encode(chunk))

            nursery.start_soon(produce)
            # Dropping the stuck client cancels its request on the desktop and unpauses it.
            with trio.fail_after(10):
                while True:
                    msg = wire.decode(await desktop.get_message())
                    if msg == wire.Cancel(fwd.id):
                        break
            assert server.dropped_slow == 1
            await stuck.until_eof()
        # the desktop is served again: another client's request gets through
        async with raw_ws(server.port, "/ws/stream") as client:
            await client.send(TextMessage(data=wire.encode(req("next"))))
            with trio.fail_after(5):
                while not isinstance(wire.decode(await desktop.get_message()), wire.Request):
                    pass
        nursery.cancel_scope.cancel()


async def test_a_head_that_never_completes_gets_400_after_the_head_timeout() -> None:
    async with open_server(head_timeout_s=0.3) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line
            data = b""
            with trio.fail_after(10):  # 0.3 s; generous for a busy host, finite if it hangs
                while chunk := await stream.receive_some(4096):
                    data += chunk
        assert data.startswith(b"HTTP/1.1 400 ")


async def test_health_fields_and_unknown_paths() -> None:
    async with open_server() as server, httpx.AsyncClient() as http:
        health = (await http.get(f"http://127.0.0.1:{server.port}/health")).json()
        assert health["status"] == "healthy"
        assert {"timestamp", "desktop", "clients", "inflight"} <= health.keys()
        missing = await http.get(f"http://127.0.0.1:{server.port}/nope")
        assert missing.status_code == 404 and missing.json() == {"error": "not_found"}


async def test_cancelling_the_task_stops_the_server_and_its_thread_promptly() -> None:
    server = ProxyServer.bind("127.0.0.1", 0, secret=SECRET)
    port = server.port
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(run_proxy_server, server))
        async with raw_ws(port, "/ws/stream") as client:
            nursery.cancel_scope.cancel()
            # With no deadline pending, the loop would sleep in select() forever but for
            # the self-pipe: a generous bound still tells the difference on a busy host.
            with trio.CancelScope(shield=True):
                await client.until_eof(timeout=10)
    with pytest.raises(OSError, match=r"refused|connect"):
        await trio.open_tcp_stream("127.0.0.1", port)


def _proxy_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("C2L_")}
    return {**env, "C2L_PROXY_HOST": "127.0.0.1", "C2L_PROXY_PORT": "0", **extra}


async def test_container_entry_point_exits_0_on_sigterm_and_never_imports_trio() -> None:
    with trio.fail_after(20):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-X", "importtime", "-m", "proxy"],
            cwd=ROOT,
            env=_proxy_env(C2L_PROXY_SECRET=SECRET),
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        log = b""
        while b"proxy listening on" not in log:
            data = await proc.stderr.receive_some(65536)
            assert data, log.decode()
            log += data
        line = next(x for x in log.decode().splitlines() if "proxy listening on" in x)
        port = int(line.rsplit(":", 1)[1])
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200
        async with raw_ws(port, "/ws/bridge"):
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
            elapsed = time.monotonic() - start
        while data := await proc.stderr.receive_some(65536):
            log += data
    assert code == 0
    assert elapsed < 10  # at once, not at a stop timeout (generous: a busy host)
    imported = {
        x.rsplit("|", 1)[1].strip()
        for x in log.decode().splitlines()
        if x.startswith("import time:")
    }
    assert {"proxy._server", "wsproto", "wire"} <= imported
    for heavy in ("trio", "asyncio", "ssl", "email", "idna", "outcome", "sniffio"):
        assert heavy not in imported, f"python -m proxy imports {heavy}"


async def test_container_entry_point_refuses_to_run_without_a_secret() -> None:
    with trio.fail_after(20):
        proc = await trio.run_process(
            [sys.executable, "-m", "proxy"],
            cwd=ROOT,
            env=_proxy_env(),
            capture_stderr=True,
            check=False,
        )
    assert proc.returncode == 2
    assert b"C2L_PROXY_SECRET" in proc.stderr
