"""The parts the gateway is built from (issue 9 points 2 and 4): the token bucket on the
mock clock, the orchestrator's session events that the gateway waits on, the audit
observer, and one heartbeat per connection."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

import wire
from c2lcore import Config, user_hash
from gateway import RunningGateway, serve_gateway
from gateway._audit import AuditObserver, SessionObservers
from gateway._auth import DevIssuer
from gateway._errors import ApiError, CreationRateLimited, session_error
from gateway._limits import TokenBucket
from orchestrator import (
    OrchestratorError,
    RuntimeUnavailable,
    Session,
    SessionStartError,
    TooManySessions,
)
from orchestrator.testing import FakeRuntime, open_fake_runtime

from ._orch import running

ALICE = "alice@example.com"
UA = user_hash(ALICE)


# -- TokenBucket ------------------------------------------------------------------------


async def test_token_bucket_refuses_without_debt_on_the_mock_clock(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The session-creation budget: a burst of 3, then one per 6 s; a refusal spends nothing.
    bucket = TokenBucket(rate=1 / 6, burst=3.0)
    now = trio.current_time()
    assert [bucket.try_take(now) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take(now) == pytest.approx(6.0)
    assert bucket.try_take(now) == pytest.approx(6.0)  # refused twice: still 6 s, no debt
    await trio.sleep(2)
    assert bucket.try_take(trio.current_time()) == pytest.approx(4.0)
    await trio.sleep(4)
    assert bucket.try_take(trio.current_time()) == 0.0
    assert not bucket.is_full(trio.current_time())
    assert bucket.is_full(trio.current_time() + 18)


async def test_token_bucket_take_queues_callers_behind_each_other(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The frame budget: take() always spends, so concurrent readers wait in turn.
    bucket = TokenBucket(rate=10.0, burst=1.0)
    now = trio.current_time()
    assert [bucket.take(now) for _ in range(4)] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    await trio.sleep(0.3)
    assert bucket.take(trio.current_time()) == pytest.approx(0.1)


# -- errors: one table --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status", "code", "retry"),
    [
        (CreationRateLimited("slow down", retry_after=2.2), 429, "rate_limited", "3"),
        (TooManySessions("full", retry_after=0.1), 429, "too_many_sessions", "1"),
        (RuntimeUnavailable("podman gone"), 503, "runtime_unavailable", None),
        (SessionStartError("no start"), 503, "proxy_unavailable", None),
        (OrchestratorError("shutting down"), 503, "proxy_unavailable", None),
    ],
)
def test_orchestrator_errors_map_to_http(
    exc: OrchestratorError, status: int, code: str, retry: str | None
) -> None:
    err = session_error(exc)
    assert isinstance(err, ApiError)
    assert (err.status, err.code, err.message) == (status, code, str(exc))
    assert err.headers.get("Retry-After") == retry


# -- session events -----------------------------------------------------------------------


async def test_wait_ready_wakes_on_the_orchestrators_event(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Whoever starts the session (here the orchestrator's own API, not the gateway), a
    # waiter wakes when it is ready: at once, not at a re-check some seconds later.
    fake = FakeRuntime()
    woke: list[tuple[Session, float]] = []
    with trio.fail_after(30):
        async with running(fake) as orch, trio.open_nursery() as nursery:

            async def waiter() -> None:
                session = await orch.wait_ready(UA)
                woke.append((session, trio.current_time()))

            nursery.start_soon(waiter)
            await trio.sleep(20)  # nothing to wake for meanwhile
            assert woke == []
            session = await orch.get_or_create(ALICE)
            ready_at = trio.current_time()
            await trio.testing.wait_all_tasks_blocked()
            assert [s for s, _ in woke] == [session]
            assert woke[0][1] == ready_at
            assert orch._readiness == {}  # no event left behind
            # Ending: the reason is known (and said) before the teardown finishes.
            assert not session.ending.is_set()
            orch.end_nowait(UA, session.id, "deleted")
            assert session.ending.is_set() and session.end_reason == "deleted"
            await session.ended.wait()


async def test_a_cancelled_waiter_leaves_no_event_behind(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    with trio.fail_after(30):
        async with running(fake) as orch:
            with trio.move_on_after(1):
                await orch.wait_ready(UA)
            assert orch._readiness == {}


# -- the audit trail as a session observer ------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def session_admitted(self, session: Session) -> None:
        self.events.append("admitted")

    def session_ready(self, session: Session, seconds: float) -> None:
        self.events.append("ready")

    def session_ended(self, session: Session) -> None:
        self.events.append("ended")


class _Broken:
    def session_admitted(self, session: Session) -> None:
        raise RuntimeError("observer bug")

    def session_ready(self, session: Session, seconds: float) -> None:
        pass

    def session_ended(self, session: Session) -> None:
        pass


async def test_observers_are_told_in_order_and_one_failing_keeps_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, last = _Recorder(), _Recorder()
    group = SessionObservers(first, _Broken(), last)
    session = Session(user_hash=UA)
    group.session_admitted(session)
    group.session_ready(session, 0.1)
    group.session_ended(session)
    assert first.events == last.events == ["admitted", "ready", "ended"]
    assert "observer bug" in caplog.text and "Traceback" in caplog.text


async def test_audit_observer_writes_created_and_destroyed_for_sessions_handed_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="c2l.audit")
    audit = AuditObserver()
    never = Session(user_hash=UA)  # a start that failed: never handed out, no lines
    never.end_reason = "start failed: boom"
    audit.session_admitted(never)
    audit.session_ended(never)
    assert caplog.records == []
    session = Session(user_hash=UA)
    session.ready_seconds = 0.2
    audit.session_ready(session, 0.2)
    session.end_reason = "idle"
    audit.session_ended(session)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert '"event":"session_created"' in lines[0] and session.id in lines[0]
    assert '"event":"session_destroyed"' in lines[1] and '"reason":"idle"' in lines[1]
    assert UA not in "".join(lines)  # keyed, never the plain hash


# -- one heartbeat per connection ----------------------------------------------------------


async def _gateway(
    nursery: trio.Nursery, tmp_path: Path, fake: FakeRuntime, **kw: Any
) -> tuple[RunningGateway, DevIssuer]:
    config = Config(
        port=0,
        dev_key_path=tmp_path / "key.pem",
        podman_url="unix:///nonexistent",
        idle_timeout=600,
        **kw,
    )
    gw: RunningGateway = await nursery.start(functools.partial(serve_gateway, config, runtime=fake))
    return gw, DevIssuer.load_or_create(config.dev_key_path)


@pytest.mark.parametrize("side", ["bridge", "stream"])
async def test_a_client_that_pings_by_itself_is_never_pinged(
    nursery: trio.Nursery, tmp_path: Path, side: str
) -> None:
    # The desktop agent pings more often than the gateway's interval: the gateway hears
    # it and sends no pings of its own (one heartbeat per connection, not two), while a
    # silent client is still pinged (and dropped: tests/test_connections.py).
    async with open_fake_runtime(run_proxies=True) as fake:
        gw, issuer = await _gateway(nursery, tmp_path, fake, heartbeat_interval=0.3)
        url = gw.url.replace("http://", "ws://") + f"/ws/{side}"
        auth = [(b"Authorization", f"Bearer {issuer.sign(ALICE)}".encode())]
        kinds: list[str | None] = []
        with trio.fail_after(30):
            async with trio_websocket.open_websocket_url(url, extra_headers=auth) as ws:
                assert isinstance(wire.decode(await ws.get_message()), wire.AuthOk)
                async with trio.open_nursery() as inner:

                    async def read() -> None:
                        while True:
                            kinds.append(wire.peek_type(await ws.get_message()))

                    inner.start_soon(read)
                    for n in range(15):  # 1.5 s: five of the gateway's intervals
                        await ws.send_message(wire.encode(wire.Ping(n)))
                        await trio.sleep(0.1)
                    inner.cancel_scope.cancel()
        assert kinds.count("pong") >= 10, kinds
        assert "ping" not in kinds, kinds

        # ...and a client that stops talking is pinged after one interval.
        with trio.fail_after(30):
            async with trio_websocket.open_websocket_url(url, extra_headers=auth) as ws:
                assert isinstance(wire.decode(await ws.get_message()), wire.AuthOk)
                assert wire.peek_type(await ws.get_message()) == "ping"
        nursery.cancel_scope.cancel()
