"""Session lifecycle: idle reaper, health, proxy exits, admission, heartbeats, parked agents.

Orchestrator logic runs on trio's MockClock against the fake runtime. The gateway tests
use the real clock with short settings (a MockClock would jump over real socket waits),
real in-process proxies and real WebSocket clients.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

import wire
from c2lcore import Config, user_hash
from gateway import RunningGateway, serve_gateway
from gateway._auth import DevIssuer
from orchestrator import SessionStartError, TooManySessions, container_name
from orchestrator.testing import FakeRuntime, open_fake_runtime

from ._orch import make_config, running, until

ALICE = "auth0|alice"
UA = user_hash(ALICE)


# -- idle reaper (MockClock) -------------------------------------------------------------


async def test_reaper_ends_idle_sessions_on_its_interval(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    config = make_config(idle_timeout=100.0, cleanup_interval=40.0, health_interval=1e6)
    with trio.fail_after(1000):
        async with running(fake, config) as orch:
            t0 = trio.current_time()
            s = await orch.get_or_create(ALICE)
            await s.ended.wait()
            elapsed = trio.current_time() - t0
            assert s.end_reason == "idle"
            # The reaper looks at 40, 80, 120 s: idle from 100 s, so culled at 120 s,
            # not the moment it went idle (nothing polls per session).
            assert elapsed == pytest.approx(120, abs=1)
            assert fake.empty
            assert orch.get(UA) is None


async def test_request_traffic_keeps_a_session_and_heartbeats_do_not(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRuntime()
    config = make_config(idle_timeout=60.0, cleanup_interval=10.0, health_interval=1e6)
    with trio.fail_after(2000):
        async with running(fake, config) as orch:
            busy = await orch.get_or_create(ALICE)
            quiet = await orch.get_or_create("auth0|bob")
            t0 = trio.current_time()
            for _ in range(30):  # 300 s of traffic
                await trio.sleep(10)
                busy.relayed("out", 100)  # a chunk: request traffic
                quiet.relayed("in", 30, activity=False)  # a ping
                quiet.relayed("out", 30, activity=False)  # its pong
            assert busy.state == "ready"
            assert quiet.end_reason == "idle"
            assert quiet.bytes_in == quiet.bytes_out > 0  # counted, just not activity
            await busy.ended.wait()
            assert 60 <= trio.current_time() - t0 - 300 <= 75


async def test_failing_health_checks_end_with_unhealthy(autojump_clock: trio.abc.Clock) -> None:
    healthy = True

    async def probe(socket_path: str) -> bool:
        await trio.lowlevel.checkpoint()
        return healthy

    fake = FakeRuntime()
    config = make_config(health_interval=5.0, idle_timeout=1e6)
    with trio.fail_after(600):
        async with running(fake, config, probe=probe) as orch:
            s = await orch.get_or_create(ALICE)
            await trio.sleep(60)
            assert s.state == "ready"
            healthy = False
            t0 = trio.current_time()
            await s.ended.wait()
            assert s.end_reason == "unhealthy"
            assert 10 <= trio.current_time() - t0 <= 15  # the third failed probe
            assert fake.empty


# -- proxy exits ---------------------------------------------------------------------------


async def test_proxy_exit_ends_the_session_at_once(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    config = make_config(health_interval=30.0)
    with trio.fail_after(60):
        async with running(fake, config) as orch:
            s = await orch.get_or_create(ALICE)
            await until(lambda: fake.exit_watchers == 1)
            t0 = trio.current_time()
            fake.kill_container(container_name(UA))
            await s.ended.wait()
            assert s.end_reason == "proxy_exited"
            assert trio.current_time() - t0 < 1  # the event, not the 30 s health poll
            assert fake.empty
            fresh = await orch.get_or_create(ALICE)
            assert fresh.id != s.id
            assert fresh.state == "ready"


async def test_an_old_sessions_exit_does_not_end_the_new_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    from orchestrator._runtime import ContainerExit

    fake = FakeRuntime()
    with trio.fail_after(60):
        async with running(fake, make_config()) as orch:
            s = await orch.get_or_create(ALICE)
            orch.container_exited(ContainerExit(container_name(UA), "an-older-session-id", 0))
            await trio.sleep(1)
            assert s.state == "ready"


async def test_exit_watch_reconnects_when_the_runtime_stream_breaks(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRuntime()
    with trio.fail_after(120):
        async with running(fake, make_config()) as orch:
            s = await orch.get_or_create(ALICE)
            await until(lambda: fake.exit_watchers == 1)
            fake.available = False
            fake.break_exit_watchers()
            await trio.sleep(5)
            assert fake.exit_watchers == 0  # retrying with backoff
            assert s.state == "ready"  # a broken event stream ends no session
            fake.available = True
            await until(lambda: fake.exit_watchers == 1)
            fake.kill_container(container_name(UA))
            await s.ended.wait()
            assert s.end_reason == "proxy_exited"


# -- admission -----------------------------------------------------------------------------


async def test_burst_of_creates_finishes_without_errors_or_leaks(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRuntime()
    fake.inject("create_network", "delay", seconds=0.3, times=1000)
    ready: list[str] = []
    with trio.fail_after(120):
        async with running(fake, make_config(), max_concurrent_starts=4) as orch:

            async def create(i: int) -> None:
                ready.append((await orch.get_or_create(f"burst-{i}")).id)

            async with trio.open_nursery() as nursery:
                for i in range(60):
                    nursery.start_soon(create, i)
            assert len(set(ready)) == 60
            assert len(fake.containers) == 60
        assert fake.empty


async def test_starts_beyond_the_wait_bound_answer_busy(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    fake.inject("create_network", "delay", seconds=4.0, times=1000)
    outcomes: list[str] = []
    with trio.fail_after(120):
        async with running(
            fake, make_config(), max_concurrent_starts=2, admission_timeout=5.0
        ) as orch:

            async def create(i: int) -> None:
                try:
                    await orch.get_or_create(f"user-{i}")
                    outcomes.append("ok")
                except TooManySessions as exc:
                    outcomes.append("busy" if exc.retry_after >= 1 else "no retry-after")

            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(create, i)
            # Slots free at 4 s and 8 s: starts 1-4 get one within 5 s, 5-6 do not.
            assert sorted(outcomes) == ["busy"] * 2 + ["ok"] * 4
            assert len(orch.sessions()) == 4
        assert fake.empty


async def test_max_sessions_answers_too_many(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    with trio.fail_after(60):
        async with running(fake, make_config(max_sessions=3)) as orch:
            for i in range(3):
                await orch.get_or_create(f"u{i}")
            with pytest.raises(TooManySessions):
                await orch.get_or_create("u4")
            fake.inject("start_pod", "fail")
            s = orch.sessions()[0]
            await orch.delete(s.user_hash, s.id)
            with pytest.raises(SessionStartError):  # not a 429: the start itself failed
                await orch.get_or_create("u5")


# -- through the gateway (real clock, short settings) -------------------------------------


@pytest.fixture
async def fake_runtime() -> AsyncIterator[FakeRuntime]:
    async with open_fake_runtime(run_proxies=True) as fake:
        yield fake


FAST = {"idle_timeout": 1.2, "cleanup_interval": 0.2, "heartbeat_interval": 0.25}


async def start_gateway(
    nursery: trio.Nursery, tmp_path: Path, fake: FakeRuntime, **kw: Any
) -> tuple[RunningGateway, DevIssuer]:
    config = Config(
        port=0, dev_key_path=tmp_path / "key.pem", podman_url="unix:///nonexistent", **kw
    )
    gw: RunningGateway = await nursery.start(functools.partial(serve_gateway, config, runtime=fake))
    return gw, DevIssuer.load_or_create(config.dev_key_path)


def ws_url(gw: RunningGateway, side: str) -> str:
    return gw.url.replace("http://", "ws://") + f"/ws/{side}"


async def next_message(ws: trio_websocket.WebSocketConnection, *, skip_pings: bool = True) -> Any:
    """The next message that is not a heartbeat (pings are answered, as clients must)."""
    while True:
        msg = wire.decode(await ws.get_message())
        if isinstance(msg, wire.Ping) and skip_pings:
            await ws.send_message(wire.encode(wire.Pong(msg.timestamp)))
            continue
        return msg


async def drain_until_closed(ws: trio_websocket.WebSocketConnection) -> None:
    """Read (and drop) messages until the gateway closes the connection."""
    with pytest.raises(trio_websocket.ConnectionClosed):
        await _drain(ws)


async def _drain(ws: trio_websocket.WebSocketConnection) -> None:
    while True:
        await ws.get_message()


async def open_client(gw: RunningGateway, token: str, side: str = "stream") -> Any:
    return trio_websocket.open_websocket_url(
        ws_url(gw, side), extra_headers=[(b"Authorization", f"Bearer {token}".encode())]
    )


async def test_heartbeats_alone_do_not_keep_a_session_and_idle_is_a_normal_close(
    nursery: trio.Nursery, tmp_path: Path, fake_runtime: FakeRuntime
) -> None:
    gw, issuer = await start_gateway(nursery, tmp_path, fake_runtime, **FAST)
    token = issuer.sign(ALICE)
    with trio.fail_after(15):
        async with await open_client(gw, token) as ws:
            hello = await next_message(ws)
            assert isinstance(hello, wire.AuthOk)
            t0 = trio.current_time()
            codes: list[str] = []
            pongs = 0

            async def ping_often() -> None:
                while True:
                    await ws.send_message(wire.encode(wire.Ping(1)))
                    await trio.sleep(0.1)

            async with trio.open_nursery() as inner:
                inner.start_soon(ping_often)
                try:
                    while True:  # answer every heartbeat and ping ourselves: no requests
                        msg = await next_message(ws)
                        pongs += isinstance(msg, wire.Pong)
                        if isinstance(msg, wire.Error):
                            codes.append(msg.code)
                            idle_at = trio.current_time()
                except trio_websocket.ConnectionClosed as exc:
                    close_code = exc.reason.code
                inner.cancel_scope.cancel()
            assert pongs > 5
            assert codes == [wire.ErrorCode.SESSION_IDLE]
            assert close_code == wire.CLOSE_NORMAL
            # Not before the idle timeout; the upper bound is generous (a busy host): if
            # heartbeats counted as activity the session would never idle at all.
            assert 1.2 <= idle_at - t0 <= 10.0
        # The close is sent as the session starts ending; it is listed until its teardown
        # is done (the fake's takes milliseconds), so the status is read until it is gone.
        async with httpx.AsyncClient(base_url=gw.url) as http:
            with trio.fail_after(5):
                while True:
                    r = await http.get(
                        "/api/streaming/status", headers={"Authorization": f"Bearer {token}"}
                    )
                    if r.status_code == 404:
                        break
                    assert r.status_code == 200
                    await trio.sleep(0.05)
        assert fake_runtime.empty


async def test_silent_desktop_is_dropped_and_in_flight_requests_fail(
    nursery: trio.Nursery, tmp_path: Path, fake_runtime: FakeRuntime
) -> None:
    gw, issuer = await start_gateway(
        nursery, tmp_path, fake_runtime, heartbeat_interval=0.3, idle_timeout=60
    )
    token = issuer.sign(ALICE)
    with trio.fail_after(20):
        async with await open_client(gw, token, "bridge") as desk:
            assert isinstance(await next_message(desk), wire.AuthOk)
            async with await open_client(gw, token) as web:
                assert isinstance(await next_message(web), wire.AuthOk)
                await web.send_message(wire.encode(wire.Request("q", "POST", "/api/chat")))
                req = await desk.get_message()
                assert wire.peek_type(req) == "request"
                # The desktop now says nothing at all, not even pongs (a frozen process).
                t0 = trio.current_time()
                err = await next_message(web)
                detected = trio.current_time() - t0
                assert isinstance(err, wire.Error)
                assert err.code == wire.ErrorCode.DESKTOP_UNAVAILABLE
                assert err.id == "q"
                # Two intervals of silence, noticed at a heartbeat tick: about 0.6-0.9 s,
                # bounded generously for a busy host (without the heartbeat: never).
                assert detected <= 8
            await drain_until_closed(desk)


async def test_parked_agent_is_attached_to_the_next_session_by_itself(
    nursery: trio.Nursery, tmp_path: Path, fake_runtime: FakeRuntime
) -> None:
    gw, issuer = await start_gateway(nursery, tmp_path, fake_runtime, **FAST)
    token = issuer.sign(ALICE)
    auth = {"Authorization": f"Bearer {token}"}
    with trio.fail_after(20):
        async with await open_client(gw, token, "bridge") as desk:
            first = await next_message(desk)
            assert isinstance(first, wire.AuthOk)
            # the session idles out; the agent stays connected (answering heartbeats)
            async with trio.open_nursery() as inner:

                async def answer_heartbeats() -> None:
                    while True:
                        msg = await next_message(desk)
                        if isinstance(msg, wire.Request):
                            await desk.send_message(
                                wire.encode(wire.ResponseStart(msg.id, 200, {}))
                            )
                            await desk.send_message(wire.encode(wire.ResponseEnd(msg.id)))

                inner.start_soon(answer_heartbeats)
                async with httpx.AsyncClient(base_url=gw.url) as http:
                    while (
                        await http.get("/api/streaming/status", headers=auth)
                    ).status_code == 200:
                        await trio.sleep(0.1)
                    assert fake_runtime.empty  # no container while the agent is parked
                    await trio.sleep(1.0)  # parked through several heartbeats
                    r = await http.post("/api/streaming/create", headers=auth)
                    assert r.status_code == 200
                    assert r.json()["sessionId"] != first.session_id
                # a web client of the new session reaches the agent, which did nothing
                async with await open_client(gw, token) as web:
                    assert isinstance(await next_message(web), wire.AuthOk)
                    for _ in range(50):
                        await web.send_message(wire.encode(wire.Request("x", "GET", "/api/tags")))
                        answer = await next_message(web)
                        if isinstance(answer, wire.ResponseStart):
                            break
                        await trio.sleep(0.1)  # the agent is being attached
                    assert isinstance(answer, wire.ResponseStart)
                inner.cancel_scope.cancel()
