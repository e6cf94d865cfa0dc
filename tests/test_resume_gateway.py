"""Resumable streams through the real gateway (Hypercorn, Quart-Trio) on a fake runtime
with real in-process proxies: a web client whose TCP connection is reset mid-answer
resumes on a new connection; a client's close frame cancels at once (the gateway passes
the difference on to the proxy, gateway._closes); another user's token is unknown.

The desktop is a plain WebSocket the test drives, so every ``cancel`` it gets is seen.
"""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

import wire
from c2lcore import Config
from gateway import RunningGateway, serve_gateway
from gateway._auth import DevIssuer
from orchestrator.testing import FakeRuntime, open_fake_runtime

WINDOW = 1.5


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(
        port=0,
        dev_key_path=tmp_path / "key.pem",
        podman_url="unix:///nonexistent",
        resume_window=WINDOW,
    )


@pytest.fixture
async def fake_runtime() -> AsyncIterator[FakeRuntime]:
    async with open_fake_runtime(run_proxies=True) as fake:
        yield fake


@pytest.fixture
async def gw(nursery: trio.Nursery, config: Config, fake_runtime: FakeRuntime) -> RunningGateway:
    running: RunningGateway = await nursery.start(
        functools.partial(serve_gateway, config, runtime=fake_runtime)
    )
    return running


@pytest.fixture
def issuer(config: Config) -> DevIssuer:
    return DevIssuer.load_or_create(config.dev_key_path)


def ws_url(gw: RunningGateway, side: str) -> str:
    return gw.url.replace("http://", "ws://") + f"/ws/{side}"


async def recv(conn: Any, timeout: float = 5) -> wire.Message:
    with trio.fail_after(timeout):
        return wire.decode(await conn.get_message())


async def send(conn: Any, msg: wire.Message) -> None:
    await conn.send_message(wire.encode(msg))


def reset(conn: trio_websocket.WebSocketConnection) -> None:
    """Cut ``conn``'s TCP connection with a reset: no close frame, no FIN."""
    sock = conn._stream.socket  # type: ignore[attr-defined]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def desktop_of(gw: RunningGateway, token: str) -> tuple[Any, str]:
    """A connected desktop (a raw bridge WebSocket) and its session id."""
    conn = await trio_websocket.connect_websocket_url(
        _nursery(),
        ws_url(gw, "bridge"),
        extra_headers=[(b"authorization", f"Bearer {token}".encode())],
    )
    ok = await recv(conn)
    assert isinstance(ok, wire.AuthOk)
    return conn, ok.session_id


_current: list[trio.Nursery] = []


def _nursery() -> trio.Nursery:
    return _current[-1]


async def client(gw: RunningGateway, token: str, session_id: str) -> Any:
    conn = await trio_websocket.connect_websocket_url(_nursery(), ws_url(gw, "stream"))
    await send(conn, wire.Auth(token, session_id, 0))
    assert await recv(conn) == wire.AuthOk(session_id)
    return conn


async def quiet(desktop: Any) -> None:
    """Nothing but the answer to a ping is queued for the desktop."""
    await send(desktop, wire.Ping(5.0))
    while True:
        msg = await recv(desktop)
        if msg == wire.Pong(5.0):
            return
        assert isinstance(msg, wire.Ping | wire.Pong), f"the desktop got {msg}"


async def asked(desktop: Any) -> wire.Request:
    while True:
        msg = await recv(desktop)
        if isinstance(msg, wire.Request):
            return msg
        assert isinstance(msg, wire.Ping | wire.Pong), msg


async def test_a_reset_client_resumes_through_the_gateway_and_a_close_frame_cancels(
    nursery: trio.Nursery, gw: RunningGateway, issuer: DevIssuer
) -> None:
    _current.append(nursery)
    token = issuer.sign("erin")
    desktop, sid = await desktop_of(gw, token)
    web = await client(gw, token, sid)
    await send(web, wire.Request("q1", "POST", "/api/chat", {}, {"model": "m"}))
    fwd = await asked(desktop)
    await send(desktop, wire.ResponseStart(fwd.id, 200, {}))
    start = await recv(web)
    assert isinstance(start, wire.ResponseStart) and start.resume
    lines = [f'{{"n":{n}}}\n' for n in range(1, 11)]
    for data in lines[:3]:
        await send(desktop, wire.Chunk(fwd.id, data))
    got = [await recv(web) for _ in range(3)]
    reset(web)  # mid-answer, the TCP connection dies
    await trio.sleep(0.3)
    for data in lines[3:6]:
        await send(desktop, wire.Chunk(fwd.id, data))
    again = await client(gw, token, sid)
    last = got[-1]
    assert isinstance(last, wire.Chunk) and last.seq == 3
    await send(again, wire.Resume("r1", start.resume, last.seq))
    head = await recv(again)
    assert isinstance(head, wire.ResponseStart) and head.id == "r1"
    got += [await recv(again) for _ in range(3)]
    for data in lines[6:]:
        await send(desktop, wire.Chunk(fwd.id, data))
    await send(desktop, wire.ResponseEnd(fwd.id))
    got += [await recv(again) for _ in range(5)]
    chunks = [m for m in got if isinstance(m, wire.Chunk)]
    assert [c.data for c in chunks] == lines  # all of it, once, in order
    assert [c.seq for c in chunks] == list(range(1, 11))
    assert got[-1] == wire.ResponseEnd("r1")
    await quiet(desktop)  # the reset cancelled nothing

    # A client that closes with a close frame ends its requests at once (well within
    # the window): the desktop is told to cancel.
    await send(again, wire.Request("q2", "POST", "/api/chat", {}, {"model": "m"}))
    fwd2 = await asked(desktop)
    await send(desktop, wire.ResponseStart(fwd2.id, 200, {}))
    start2 = await recv(again)
    assert isinstance(start2, wire.ResponseStart) and start2.resume
    t0 = trio.current_time()
    await again.aclose(1000, "bye")
    assert await recv(desktop, timeout=WINDOW * 0.8) == wire.Cancel(fwd2.id)
    assert trio.current_time() - t0 < WINDOW * 0.8
    third = await client(gw, token, sid)
    await send(third, wire.Resume("r2", start2.resume, 0))
    err = await recv(third)
    assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.RESUME_EXPIRED
    await third.aclose()
    await desktop.aclose()
    _current.pop()


async def test_after_the_window_the_desktop_cancels_and_a_resume_expires(
    nursery: trio.Nursery, gw: RunningGateway, issuer: DevIssuer
) -> None:
    _current.append(nursery)
    token = issuer.sign("frank")
    desktop, sid = await desktop_of(gw, token)
    web = await client(gw, token, sid)
    await send(web, wire.Request("q1", "POST", "/api/chat", {}, {"model": "m"}))
    fwd = await asked(desktop)
    await send(desktop, wire.ResponseStart(fwd.id, 200, {}))
    start = await recv(web)
    assert isinstance(start, wire.ResponseStart) and start.resume
    reset(web)
    t0 = trio.current_time()
    msg = await recv(desktop, timeout=WINDOW + 5)
    while isinstance(msg, wire.Ping | wire.Pong):
        msg = await recv(desktop, timeout=WINDOW + 5)
    assert msg == wire.Cancel(fwd.id)
    assert trio.current_time() - t0 >= WINDOW * 0.8  # kept for the window first
    again = await client(gw, token, sid)
    await send(again, wire.Resume("r1", start.resume, 0))
    err = await recv(again)
    assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.RESUME_EXPIRED
    assert err.id == "r1"
    await again.aclose()
    await desktop.aclose()
    _current.pop()


async def test_another_users_token_is_unknown_and_nothing_leaks(
    nursery: trio.Nursery, gw: RunningGateway, issuer: DevIssuer
) -> None:
    _current.append(nursery)
    alice, mallory = issuer.sign("alice-r"), issuer.sign("mallory-r")
    desk_a, sid_a = await desktop_of(gw, alice)
    desk_m, sid_m = await desktop_of(gw, mallory)
    web_a = await client(gw, alice, sid_a)
    await send(web_a, wire.Request("q1", "POST", "/api/chat", {}, {"model": "m"}))
    fwd = await asked(desk_a)
    await send(desk_a, wire.ResponseStart(fwd.id, 200, {}))
    start = await recv(web_a)
    assert isinstance(start, wire.ResponseStart) and start.resume
    await send(desk_a, wire.Chunk(fwd.id, "alice's secret\n"))
    await recv(web_a)
    reset(web_a)  # alice's answer is now detached, waiting for her
    await trio.sleep(0.3)
    web_m = await client(gw, mallory, sid_m)
    await send(web_m, wire.Resume("steal", start.resume, 0))
    err = await recv(web_m)
    assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.RESUME_EXPIRED
    assert "secret" not in wire.encode(err)
    await send(web_m, wire.Ping(2.0))
    assert await recv(web_m) == wire.Pong(2.0)  # nothing else came
    # Alice herself still can.
    back = await client(gw, alice, sid_a)
    await send(back, wire.Resume("mine", start.resume, 0))
    assert isinstance(await recv(back), wire.ResponseStart)
    chunk = await recv(back)
    assert isinstance(chunk, wire.Chunk) and chunk.data == "alice's secret\n"
    for conn in (web_m, back, desk_a, desk_m):
        await conn.aclose()
    _current.pop()
