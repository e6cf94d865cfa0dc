"""The per-user proxy: pairing, multiplexing, cancellation, errors, secret, health."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

import wire
from proxy import SECRET_HEADER, serve_proxy

SECRET = "test-secret-0123456789"


@pytest.fixture
async def proxy_port(nursery: trio.Nursery) -> int:
    port: int = await nursery.start(functools.partial(serve_proxy, "127.0.0.1", 0, secret=SECRET))
    return port


@asynccontextmanager
async def ws(port: int, path: str, secret: str = SECRET) -> AsyncIterator[Any]:
    async with trio_websocket.open_websocket(
        "127.0.0.1", port, path, use_ssl=False, extra_headers=[(SECRET_HEADER, secret)]
    ) as conn:
        yield conn


async def recv(conn: Any) -> wire.Message:
    with trio.fail_after(5):
        return wire.decode(await conn.get_message())


async def send(conn: Any, msg: wire.Message) -> None:
    await conn.send_message(wire.encode(msg))


def req(rid: str) -> wire.Request:
    return wire.Request(rid, "POST", "/api/chat", {}, {"model": "m"})


async def test_health_needs_no_secret(proxy_port: int) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{proxy_port}/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "healthy"
    assert "timestamp" in body
    assert body["desktop"] is False


@pytest.mark.parametrize("secret", [None, "", "wrong-secret"])
async def test_websocket_without_the_secret_is_refused(proxy_port: int, secret: str | None) -> None:
    # A raw upgrade request: trio-websocket's client leaks its socket on a rejection.
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    if secret is not None:
        headers[SECRET_HEADER] = secret
    async with httpx.AsyncClient() as client:
        for path in ("/ws/stream", "/ws/bridge"):
            r = await client.get(f"http://127.0.0.1:{proxy_port}{path}", headers=headers)
            assert r.status_code == 403
            assert r.json() == {"error": "forbidden"}


async def test_request_without_desktop_gets_desktop_unavailable(proxy_port: int) -> None:
    async with ws(proxy_port, "/ws/stream") as client:
        await send(client, req("1"))
        err = await recv(client)
        assert isinstance(err, wire.Error)
        assert (err.id, err.code) == ("1", wire.ErrorCode.DESKTOP_UNAVAILABLE)
        # the id is free again: the stream ended with the error
        await send(client, req("1"))
        assert isinstance(await recv(client), wire.Error)


async def test_two_clients_same_ids_see_only_their_own_chunks(proxy_port: int) -> None:
    async with (
        ws(proxy_port, "/ws/bridge") as desktop,
        ws(proxy_port, "/ws/stream") as a,
        ws(proxy_port, "/ws/stream") as b,
    ):
        await send(a, req("1"))
        await send(b, req("1"))
        first, second = await recv(desktop), await recv(desktop)
        assert isinstance(first, wire.Request) and isinstance(second, wire.Request)
        assert first.id != second.id
        for d in (first, second):
            await send(desktop, wire.ResponseStart(d.id, 200, {}))
        for n in range(5):
            for d in (first, second):
                await send(desktop, wire.Chunk(d.id, json.dumps({"n": n, "for": d.id})))
        for d in (first, second):
            await send(desktop, wire.ResponseEnd(d.id))
        for conn in (a, b):
            start = await recv(conn)
            assert isinstance(start, wire.ResponseStart) and start.resume
            assert start == wire.ResponseStart("1", 200, {}, "cloud", resume=start.resume)
            chunks = [await recv(conn) for _ in range(5)]
            assert all(isinstance(c, wire.Chunk) and c.id == "1" for c in chunks)
            data = [json.loads(c.data) for c in chunks if isinstance(c, wire.Chunk)]
            assert [d["n"] for d in data] == list(range(5))
            assert [c.seq for c in chunks if isinstance(c, wire.Chunk)] == [1, 2, 3, 4, 5]
            assert len({d["for"] for d in data}) == 1
            assert await recv(conn) == wire.ResponseEnd("1")


async def test_cancel_and_client_disconnect_reach_the_desktop(proxy_port: int) -> None:
    async with ws(proxy_port, "/ws/bridge") as desktop:
        async with ws(proxy_port, "/ws/stream") as client:
            await send(client, req("x"))
            fwd = await recv(desktop)
            assert isinstance(fwd, wire.Request)
            await send(client, wire.Cancel("x"))
            assert await recv(desktop) == wire.Cancel(fwd.id)
            # late frames for a cancelled request are dropped, not delivered
            await send(desktop, wire.Chunk(fwd.id, "{}"))
            await send(client, wire.Ping(1.0))
            assert await recv(client) == wire.Pong(1.0)
            await send(client, req("y"))
            fwd2 = await recv(desktop)
            assert isinstance(fwd2, wire.Request)
        # client went away with "y" in flight
        assert await recv(desktop) == wire.Cancel(fwd2.id)


async def test_desktop_drop_mid_stream_errors_every_request(proxy_port: int) -> None:
    async with ws(proxy_port, "/ws/stream") as a, ws(proxy_port, "/ws/stream") as b:
        async with ws(proxy_port, "/ws/bridge") as desktop:
            await send(a, req("1"))
            await send(b, req("2"))
            d1, d2 = await recv(desktop), await recv(desktop)
            assert isinstance(d1, wire.Request) and isinstance(d2, wire.Request)
            await send(desktop, wire.ResponseStart(d1.id, 200, {}))
            await send(desktop, wire.Chunk(d1.id, "{}"))
            assert isinstance(await recv(a), wire.ResponseStart)
            assert isinstance(await recv(a), wire.Chunk)
        for conn, rid in ((a, "1"), (b, "2")):
            err = await recv(conn)
            assert isinstance(err, wire.Error)
            assert (err.id, err.code) == (rid, wire.ErrorCode.DESKTOP_UNAVAILABLE)


async def test_bad_input_gets_errors_and_the_connection_stays_up(proxy_port: int) -> None:
    async with ws(proxy_port, "/ws/bridge") as desktop, ws(proxy_port, "/ws/stream") as client:
        cases = [
            ("{oops", wire.ErrorCode.BAD_JSON),
            ('{"type":"warp","id":"9"}', wire.ErrorCode.UNKNOWN_TYPE),
            ('{"type":"request","id":"9"}', wire.ErrorCode.MISSING_FIELD),
            (wire.encode(wire.Chunk("9", "{}")), wire.ErrorCode.BAD_MESSAGE),
            (wire.encode(wire.Cancel("nope")), wire.ErrorCode.UNKNOWN_ID),
        ]
        for frame, code in cases:
            await client.send_message(frame)
            err = await recv(client)
            assert isinstance(err, wire.Error) and err.code == code, (frame, err)
        await send(client, req("dup"))
        await recv(desktop)
        await send(client, req("dup"))
        err = await recv(client)
        assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.DUPLICATE_ID
        await desktop.send_message("garbage")
        err = await recv(desktop)
        assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.BAD_JSON
        await send(client, wire.Ping(2))
        assert await recv(client) == wire.Pong(2)


async def test_oversized_frame_closes_with_1009(proxy_port: int) -> None:
    async with ws(proxy_port, "/ws/stream") as client:
        await client.send_message("x" * (wire.MAX_FRAME_BYTES + 10))
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as info:
            await client.get_message()
        assert info.value.reason.code == wire.CLOSE_TOO_BIG


async def test_new_desktop_replaces_the_old_one(proxy_port: int) -> None:
    async with ws(proxy_port, "/ws/bridge") as old, ws(proxy_port, "/ws/stream") as client:
        async with ws(proxy_port, "/ws/bridge") as new:
            with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed):
                await old.get_message()
            await send(client, req("1"))
            assert isinstance(await recv(new), wire.Request)


async def test_health_reports_idle_time_of_request_traffic_only(proxy_port: int) -> None:
    """Whichever gateway replica reaps idle sessions reads the idle time here (DESIGN.md 6)."""

    async def idle() -> float:
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{proxy_port}/health")
        value: float = r.json()["idle"]
        return value

    async with ws(proxy_port, "/ws/bridge") as desktop, ws(proxy_port, "/ws/stream") as web:
        await trio.sleep(0.3)
        assert await idle() >= 0.2
        await send(web, req("a"))
        forwarded = await recv(desktop)
        assert isinstance(forwarded, wire.Request)
        await trio.sleep(0.3)
        assert await idle() == 0.0  # a request in flight is activity, however long it takes
        await send(desktop, wire.ResponseEnd(forwarded.id))
        assert await recv(web) == wire.ResponseEnd("a")
        await send(web, wire.Ping(1))  # heartbeats are not activity
        assert await recv(web) == wire.Pong(1)
        await trio.sleep(0.3)
        assert 0.2 <= await idle() < 1.0
