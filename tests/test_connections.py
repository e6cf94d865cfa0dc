"""The gateway's WebSocket connections: relay races, replaced agents, heartbeats, close codes.

Each test drives a real gateway on the fake runtime with real in-process proxies and real
WebSocket clients, and each would fail with the bug it is named after: a frame racing the
proxy's close, two agents of one user pushing each other out forever, a heartbeat that
restarts at every re-attachment, close codes that do not say what happened.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Request, TextMessage

import proxy._trio_adapter
import wire
from c2lcore import Config, user_hash
from gateway import RunningGateway, serve_gateway
from gateway._auth import DevIssuer
from orchestrator import container_name, proxy_get
from orchestrator.testing import FakeRuntime, open_fake_runtime


@pytest.fixture
async def fake_runtime() -> AsyncIterator[FakeRuntime]:
    async with open_fake_runtime(run_proxies=True) as fake:
        yield fake


async def start_gateway(
    nursery: trio.Nursery, tmp_path: Path, fake: FakeRuntime, **kw: Any
) -> tuple[RunningGateway, DevIssuer]:
    kw.setdefault("idle_timeout", 600)
    config = Config(
        port=0, dev_key_path=tmp_path / "key.pem", podman_url="unix:///nonexistent", **kw
    )
    gw: RunningGateway = await nursery.start(functools.partial(serve_gateway, config, runtime=fake))
    return gw, DevIssuer.load_or_create(config.dev_key_path)


def ws_url(gw: RunningGateway, side: str) -> str:
    return gw.url.replace("http://", "ws://") + f"/ws/{side}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def connect(
    gw: RunningGateway, token: str, side: str, disconnect_timeout: float = 60.0
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    async with trio_websocket.open_websocket_url(
        ws_url(gw, side),
        extra_headers=[(b"Authorization", f"Bearer {token}".encode())],
        disconnect_timeout=disconnect_timeout,
    ) as ws:
        yield ws


async def next_message(ws: trio_websocket.WebSocketConnection) -> wire.Message:
    """The next message that is not a heartbeat (the gateway's pings are answered)."""
    while True:
        msg = wire.decode(await ws.get_message())
        if isinstance(msg, wire.Ping):
            await ws.send_message(wire.encode(wire.Pong(msg.timestamp)))
            continue
        return msg


async def close_of(
    ws: trio_websocket.WebSocketConnection,
    answer: bool = True,
    seen: list[wire.Message] | None = None,
) -> Any:
    """Read until the gateway closes ``ws``; its close reason (code and text).

    ``answer``: answer the gateway's pings (else say nothing at all); ``seen`` collects
    the messages read on the way.
    """
    try:
        while True:
            msg = await next_message(ws) if answer else wire.decode(await ws.get_message())
            if seen is not None:
                seen.append(msg)
    except trio_websocket.ConnectionClosed as exc:
        return exc.reason


async def proxy_sees_desktop(socket_path: str | None) -> None:
    assert socket_path is not None
    while not json.loads((await proxy_get(socket_path))[1])["desktop"]:
        await trio.sleep(0.02)


class RawClient:
    """A web client over a plain socket with a small receive window: it reads only when
    told to, so the gateway's and the proxy's buffers towards it really fill up."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: collections.deque[Event] = collections.deque()

    async def send_text(self, text: str) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=text)))

    async def event(self) -> Event:
        while not self.pending:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the gateway closed the connection without a close frame")
            self.ws.receive_data(data)
            self.pending.extend(self.ws.events())
        return self.pending.popleft()

    async def message(self) -> wire.Message:
        parts = []
        while True:
            event = await self.event()
            assert isinstance(event, TextMessage), event
            parts.append(event.data)
            if event.message_finished:
                return wire.decode("".join(parts))

    async def close_event(self) -> CloseConnection:
        """Read (and drop) everything up to the close frame."""
        while True:
            event = await self.event()
            if isinstance(event, CloseConnection):
                return event


@asynccontextmanager
async def raw_client(gw: RunningGateway, token: str) -> AsyncIterator[RawClient]:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect()
    await sock.connect(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])))
    stream = trio.SocketStream(sock)
    client = RawClient(stream)
    try:
        await stream.send_all(
            client.ws.send(
                Request(
                    host="127.0.0.1",
                    target="/ws/stream",
                    extra_headers=[(b"Authorization", f"Bearer {token}".encode())],
                )
            )
        )
        assert isinstance(await client.event(), AcceptConnection)
        yield client
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


# -- point 3: the relay race ----------------------------------------------------------------


async def test_frames_racing_the_proxys_close_never_drop_the_parked_desktop(
    nursery: trio.Nursery,
    tmp_path: Path,
    fake_runtime: FakeRuntime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The desktop sends all the time, so a frame is on its way up whenever the proxy
    # goes: every session end must park it, never drop it with an "unhandled error".
    gw, issuer = await start_gateway(nursery, tmp_path, fake_runtime)
    token = issuer.sign("racer")
    uh = user_hash("racer")
    with trio.fail_after(60):
        async with connect(gw, token, "bridge") as desk, trio.open_nursery() as inner:
            assert isinstance(await next_message(desk), wire.AuthOk)

            async def chatter() -> None:
                n = 0
                while True:
                    n += 1
                    await desk.send_message(wire.encode(wire.Ping(n)))
                    await trio.lowlevel.checkpoint()

            async def drain() -> None:
                while True:
                    await desk.get_message()

            inner.start_soon(chatter)
            inner.start_soon(drain)
            async with httpx.AsyncClient(base_url=gw.url) as http:
                for _ in range(8):
                    session = gw.gateway.orchestrator.get(uh)
                    assert session is not None
                    await proxy_sees_desktop(session.socket_path)
                    r = await http.delete(f"/api/streaming/{session.id}", headers=bearer(token))
                    assert r.status_code == 204
                    r = await http.post("/api/streaming/create", headers=bearer(token))
                    assert r.status_code == 200
            inner.cancel_scope.cancel()
    assert "unhandled" not in caplog.text.lower()
    assert "Traceback" not in caplog.text


# -- point 7: two agents of one user ----------------------------------------------------


async def test_a_replaced_agent_is_closed_with_4001_and_never_comes_back(
    nursery: trio.Nursery, tmp_path: Path, fake_runtime: FakeRuntime
) -> None:
    gw, issuer = await start_gateway(nursery, tmp_path, fake_runtime)
    token = issuer.sign("twins")
    with trio.fail_after(20):
        async with connect(gw, token, "bridge") as old:
            first = await next_message(old)
            assert isinstance(first, wire.AuthOk)
            async with connect(gw, token, "bridge") as new, trio.open_nursery() as inner:
                assert await next_message(new) == wire.AuthOk(first.session_id)
                got: list[wire.Message] = []

                async def serve_new() -> None:
                    while True:
                        msg = await next_message(new)
                        got.append(msg)
                        if isinstance(msg, wire.Request):
                            await new.send_message(wire.encode(wire.ResponseStart(msg.id, 200, {})))
                            await new.send_message(wire.encode(wire.ResponseEnd(msg.id)))

                inner.start_soon(serve_new)
                seen: list[wire.Message] = []
                reason = await close_of(old, seen=seen)
                assert (reason.code, reason.reason) == (
                    wire.CLOSE_REPLACED,
                    "replaced",
                )
                assert any(
                    isinstance(m, wire.Error) and m.code == wire.ErrorCode.DESKTOP_REPLACED
                    for m in seen
                )
                # The newer agent keeps the session: chats through it keep working, and
                # it is never pushed out (the old one does not come back).
                async with connect(gw, token, "stream") as web:
                    assert isinstance(await next_message(web), wire.AuthOk)
                    for i in range(10):
                        await web.send_message(
                            wire.encode(wire.Request(f"c{i}", "GET", "/api/tags"))
                        )
                        start = await next_message(web)
                        assert isinstance(start, wire.ResponseStart)
                        assert start == wire.ResponseStart(
                            f"c{i}", 200, {}, "cloud", resume=start.resume
                        )
                        assert await next_message(web) == wire.ResponseEnd(f"c{i}")
                        await trio.sleep(0.1)
                assert not any(isinstance(m, wire.Error) for m in got), got
                inner.cancel_scope.cancel()


async def test_the_agent_stops_when_another_agent_takes_over(
    nursery: trio.Nursery, tmp_path: Path, fake_runtime: FakeRuntime
) -> None:
    from desktop import AgentConfig, BackoffPolicy, StaticToken, serve_agent

    gw, issuer = await start_gateway(nursery, tmp_path, fake_runtime)
    token = issuer.sign("agents")
    lines: dict[str, list[str]] = {"a": [], "b": []}
    fast = BackoffPolicy(base=0.05, factor=2, cap=0.2, reset_after=30)

    def config() -> AgentConfig:
        return AgentConfig(
            gw.url, StaticToken(token), "http://127.0.0.1:9", backoff=fast, probe_ollama=False
        )

    with trio.fail_after(20):
        async with trio.open_nursery() as inner:
            a = await inner.start(
                functools.partial(serve_agent, config(), status=lines["a"].append)
            )
            await a.wait_until(lambda x: x.state == "connected")
            b = await inner.start(
                functools.partial(serve_agent, config(), status=lines["b"].append)
            )
            await b.wait_until(lambda x: x.state == "connected")
            await a.wait_until(lambda x: x.state == "stopped")
            assert b.state == "connected"
            await trio.sleep(1)  # a replaced agent does not retry
            assert a.connections == 1
            assert b.state == "connected" and b.connections == 1
            inner.cancel_scope.cancel()
    assert any("another desktop agent" in line for line in lines["a"]), lines["a"]
    assert not any("another desktop agent" in line for line in lines["b"])


async def test_a_silent_agent_is_dropped_even_when_it_is_re_attached_all_the_time(
    nursery: trio.Nursery, tmp_path: Path, fake_runtime: FakeRuntime
) -> None:
    # Sessions come and go faster than two heartbeat intervals: the silence of the
    # (frozen) agent must be counted across its re-attachments, not restart with each.
    gw, issuer = await start_gateway(nursery, tmp_path, fake_runtime, heartbeat_interval=2.0)
    gw.gateway.session_create_burst = 10_000  # not the rate limit's business here
    token = issuer.sign("frozen")
    uh = user_hash("frozen")
    with trio.fail_after(25):
        async with connect(gw, token, "bridge") as desk, trio.open_nursery() as inner:
            assert isinstance(wire.decode(await desk.get_message()), wire.AuthOk)
            t0 = trio.current_time()
            cycles = 0

            async def churn() -> None:
                nonlocal cycles
                async with httpx.AsyncClient(base_url=gw.url) as http:
                    while True:
                        session = gw.gateway.orchestrator.get(uh)
                        if session is not None:
                            await http.delete(f"/api/streaming/{session.id}", headers=bearer(token))
                        r = await http.post("/api/streaming/create", headers=bearer(token))
                        assert r.status_code == 200
                        cycles += 1
                        await trio.sleep(0.2)

            inner.start_soon(churn)
            reason = await close_of(desk, answer=False)  # reads, never answers
            dropped = trio.current_time() - t0
            inner.cancel_scope.cancel()
    assert cycles >= 3
    assert reason.code == wire.CLOSE_GOING_AWAY
    assert reason.reason == "heartbeat timeout"
    # two intervals of silence, noticed at a tick (4 s); generous for a busy machine,
    # while a heartbeat restarted at each re-attachment would never fire at all
    assert dropped < 15


# -- heartbeats (point 4) -----------------------------------------------------------------


async def test_a_silent_web_client_is_dropped_and_its_request_cancelled_on_the_desktop(
    nursery: trio.Nursery, tmp_path: Path, fake_runtime: FakeRuntime
) -> None:
    gw, issuer = await start_gateway(nursery, tmp_path, fake_runtime, heartbeat_interval=0.3)
    token = issuer.sign("ghost")
    with trio.fail_after(20):
        async with connect(gw, token, "bridge") as desk:
            assert isinstance(await next_message(desk), wire.AuthOk)
            async with connect(gw, token, "stream") as web:
                assert isinstance(await next_message(web), wire.AuthOk)
                await web.send_message(wire.encode(wire.Request("q", "POST", "/api/chat")))
                fwd = await next_message(desk)
                assert isinstance(fwd, wire.Request)
                # The web client now says nothing (no pongs); the desktop answers its pings.
                assert await next_message(desk) == wire.Cancel(fwd.id)
                reason = await close_of(web, answer=False)
                assert (reason.code, reason.reason) == (wire.CLOSE_GOING_AWAY, "heartbeat timeout")


# -- close codes (point 7, DESIGN.md section 2) ---------------------------------------------


async def test_a_proxy_that_dies_ends_the_web_clients_connection_with_4003(
    nursery: trio.Nursery, tmp_path: Path, fake_runtime: FakeRuntime
) -> None:
    gw, issuer = await start_gateway(nursery, tmp_path, fake_runtime)
    token = issuer.sign("crash")
    with trio.fail_after(20):
        async with connect(gw, token, "stream") as web:
            assert isinstance(await next_message(web), wire.AuthOk)
            fake_runtime.kill_container(container_name(user_hash("crash")))
            err = await next_message(web)
            assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.SESSION_ENDED
            reason = await close_of(web)
            assert (reason.code, reason.reason) == (wire.CLOSE_SESSION_ENDED, "session_ended")


async def test_a_web_client_too_slow_for_the_proxy_gets_4002_and_the_session_lives(
    nursery: trio.Nursery,
    tmp_path: Path,
    fake_runtime: FakeRuntime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Proxies that drop a client after 0.5 s above a small mark (15 s by default).
    monkeypatch.setattr(
        proxy._trio_adapter,
        "serve_proxy_unix",
        functools.partial(
            proxy._trio_adapter.serve_proxy_unix,
            high_water=16 * 1024,
            low_water=4 * 1024,
            slow_consumer_s=0.5,
            backlog_close_s=60,  # the time the test's client then takes to read it all
            send_buffer=8192,
        ),
    )
    gw, issuer = await start_gateway(nursery, tmp_path, fake_runtime, heartbeat_interval=60)
    token = issuer.sign("sloth")
    with trio.fail_after(60):
        async with (
            connect(gw, token, "bridge") as desk,
            raw_client(gw, token) as web,
            trio.open_nursery() as inner,
        ):
            assert isinstance(await next_message(desk), wire.AuthOk)
            assert isinstance(await web.message(), wire.AuthOk)
            await web.send_text(wire.encode(wire.Request("big", "POST", "/api/chat")))
            fwd = await next_message(desk)
            assert isinstance(fwd, wire.Request)
            pad = "p" * 60_000
            cancelled = trio.Event()

            async def flood() -> None:
                # Far more than every socket buffer on the way can hold; the proxy drops
                # the slow client and cancels its request, which ends the flood.
                await desk.send_message(wire.encode(wire.ResponseStart(fwd.id, 200, {})))
                for i in range(2000):
                    if cancelled.is_set():
                        return
                    line = json.dumps({"i": i, "pad": pad})
                    await desk.send_message(wire.encode(wire.Chunk(fwd.id, line)))

            async def desk_reader() -> None:
                while True:
                    if await next_message(desk) == wire.Cancel(fwd.id):
                        cancelled.set()

            inner.start_soon(flood)
            inner.start_soon(desk_reader)
            # The web client reads nothing until the proxy has given up on it, then
            # reads what was on its way, and then the close.
            await cancelled.wait()
            close = await web.close_event()
            assert (close.code, close.reason) == (wire.CLOSE_BACKLOG, "backlog")
            async with httpx.AsyncClient(base_url=gw.url) as http:
                status = await http.get("/api/streaming/status", headers=bearer(token))
                assert status.status_code == 200  # the session lives on
            inner.cancel_scope.cancel()


async def test_unhandled_errors_are_not_logged_on_a_client_that_just_goes(
    nursery: trio.Nursery,
    tmp_path: Path,
    fake_runtime: FakeRuntime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    gw, issuer = await start_gateway(nursery, tmp_path, fake_runtime)
    token = issuer.sign("leaver")
    with trio.fail_after(20):
        for side in ("stream", "bridge"):
            async with connect(gw, token, side) as ws:
                assert isinstance(await next_message(ws), wire.AuthOk)
        await trio.sleep(0.2)
    assert "Traceback" not in caplog.text


# -- one user's flood (point 7) -------------------------------------------------------------


async def test_frame_budget_on_the_mock_clock(autojump_clock: trio.abc.Clock) -> None:
    from gateway._limits import TokenBucket

    budget = TokenBucket(rate=100.0, burst=10.0)
    t0 = trio.current_time()
    waits = [budget.take(t0) for _ in range(12)]
    assert waits[:10] == [0.0] * 10  # the burst
    assert waits[10:] == pytest.approx([0.01, 0.02])  # then one per 1/rate, queued
    await trio.sleep(1)  # refilled, up to the burst only
    assert [budget.take(trio.current_time()) for _ in range(10)] == [0.0] * 10
    assert budget.take(trio.current_time()) > 0


async def test_one_users_flood_is_read_at_that_users_pace_and_others_stay_fast(
    nursery: trio.Nursery, tmp_path: Path, fake_runtime: FakeRuntime
) -> None:
    gw, issuer = await start_gateway(nursery, tmp_path, fake_runtime)
    gw.gateway.user_frame_rate = gw.gateway.user_frame_burst = 300.0
    good = issuer.sign("good")
    with trio.fail_after(60):
        async with (
            connect(gw, good, "bridge") as desk,
            connect(gw, issuer.sign("flooder"), "stream") as flood,
            trio.open_nursery() as inner,
        ):
            assert isinstance(await next_message(desk), wire.AuthOk)
            assert isinstance(await next_message(flood), wire.AuthOk)
            pongs = 0

            async def serve_good() -> None:
                while True:
                    msg = await next_message(desk)
                    if isinstance(msg, wire.Request):
                        await desk.send_message(wire.encode(wire.ResponseStart(msg.id, 200, {})))
                        await desk.send_message(wire.encode(wire.ResponseEnd(msg.id)))

            async def flood_send() -> None:
                n = 0
                while True:  # as fast as the gateway lets it: its sends block when it is full
                    n += 1
                    await flood.send_message(wire.encode(wire.Ping(n)))

            async def flood_read() -> None:
                nonlocal pongs
                while True:
                    if wire.peek_type(await flood.get_message()) == "pong":
                        pongs += 1

            inner.start_soon(serve_good)
            inner.start_soon(flood_send)
            inner.start_soon(flood_read)
            await trio.sleep(1)  # the flooder's burst is spent
            p0, t0 = pongs, trio.current_time()
            rtts = []
            async with connect(gw, good, "stream") as web:
                assert isinstance(await next_message(web), wire.AuthOk)
                for i in range(30):
                    start = trio.current_time()
                    await web.send_message(wire.encode(wire.Request(f"r{i}", "GET", "/api/tags")))
                    head = await next_message(web)
                    assert isinstance(head, wire.ResponseStart)
                    assert head == wire.ResponseStart(f"r{i}", 200, {}, "cloud", resume=head.resume)
                    assert await next_message(web) == wire.ResponseEnd(f"r{i}")
                    rtts.append(trio.current_time() - start)
            rate = (pongs - p0) / (trio.current_time() - t0)
            inner.cancel_scope.cancel()
    # The flood is read at the flooder's budget (without it: thousands a second here) ...
    assert rate < 300 * 1.5, rate
    # ... and the other user's round trips stay short (generous for a busy machine).
    rtts.sort()
    assert rtts[len(rtts) // 2] < 0.25, rtts


# -- a stopping gateway ------------------------------------------------------------------


async def test_a_stopping_gateway_closes_every_client_with_1001(
    nursery: trio.Nursery, tmp_path: Path, fake_runtime: FakeRuntime
) -> None:
    """Web clients, attached desktop agents and parked ones (whose session ended) all
    hear 1001 when the gateway stops, never a dropped TCP connection (1006)."""
    config = Config(port=0, dev_key_path=tmp_path / "key.pem", podman_url="unix:///nonexistent")
    stop = trio.Event()
    gw: RunningGateway = await nursery.start(
        functools.partial(serve_gateway, config, runtime=fake_runtime, shutdown=stop)
    )
    issuer = DevIssuer.load_or_create(config.dev_key_path)
    alice, bob = issuer.sign("alice"), issuer.sign("bob")
    with trio.fail_after(30):
        async with (
            connect(gw, alice, "bridge") as attached,
            connect(gw, alice, "stream") as web,
            connect(gw, bob, "bridge") as parked,
        ):
            for ws in (attached, web, parked):
                assert isinstance(await next_message(ws), wire.AuthOk)
            session = gw.gateway.orchestrator.get(user_hash("bob"))
            assert session is not None
            assert await gw.gateway.orchestrator.delete(user_hash("bob"), session.id)
            while gw.gateway.orchestrator.get(user_hash("bob")) is not None:
                await trio.sleep(0.01)
            stop.set()
            closes = {}
            for name, ws in (("attached", attached), ("web", web), ("parked", parked)):
                closes[name] = (await close_of(ws)).code
    assert closes == dict.fromkeys(("attached", "web", "parked"), wire.CLOSE_GOING_AWAY)


async def test_the_frame_budget_metric_counts_the_time_a_side_was_slowed(
    autojump_clock: trio.abc.Clock,
) -> None:
    from gateway._limits import TokenBucket
    from gateway._metrics import Metrics
    from gateway._traffic import Traffic

    metrics = Metrics()
    bucket = TokenBucket(10.0, 5.0)
    stream = Traffic(metrics, "stream", bucket)
    bridge = Traffic(metrics, "bridge", TokenBucket(10.0, 5.0))
    t0 = trio.current_time()
    for _ in range(25):  # 5 from the burst, then 20 at 10 a second
        await stream.pace()
    await bridge.pace()  # within its burst: never slowed
    assert trio.current_time() - t0 == pytest.approx(2.0)
    text = (await metrics.render()).decode()
    waited = {
        side: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        for side in ("stream", "bridge")
        if line.startswith(f'c2l_frame_budget_wait_seconds_total{{side="{side}"}}')
    }
    assert waited["stream"] == pytest.approx(2.0, rel=0.01)
    assert waited["bridge"] == 0.0
