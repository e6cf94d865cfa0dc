"""Removal at scale, on the in-memory runtime (no Podman), on trio's mock clock.

A gateway that stops leaves nothing labelled behind however many sessions it had and
however slowly the runtime removes them; one that starts with leftovers of a gateway
that is no longer running serves at once and removes them in the background; a second
gateway on the same runtime refuses to start and touches nothing (DESIGN.md section 2,
"Podman objects"). :class:`FakeRuntime` ``removal_seconds`` makes every removal take
that long, one at a time, the way Podman serialises them (about 0.4 s each, measured).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from c2lcore import user_hash
from orchestrator import (
    LABEL_REPLICA,
    GatewayRunning,
    ObjectsLeft,
    ProxySpec,
    RuntimeUnavailable,
    container_name,
    network_name,
    object_labels,
    pod_name,
)
from orchestrator.testing import FakeRuntime

from ._orch import make_config, running, until

ALICE, BOB = "auth0|alice", "auth0|bob"
UA, UB = user_hash(ALICE), user_hash(BOB)


async def leave_behind(fake: FakeRuntime, uh: str, replica: str = "dead0replica") -> None:
    """What a gateway killed with SIGKILL leaves of one session: network, pod, container."""
    labels = object_labels(uh, f"old-{uh}", replica)
    await fake.create_network(network_name(uh), labels)
    await fake.create_pod(
        pod_name(uh),
        network=network_name(uh),
        labels=labels,
    )
    await fake.create_container(ProxySpec(container_name(uh), pod_name(uh), "img", labels, {}))
    await fake.start_pod(pod_name(uh))


def leftover_users(n: int) -> list[str]:
    return [f"{i:016x}" for i in range(n)]


@pytest.mark.parametrize("n", [40, 300])
async def test_shutdown_leaves_nothing_however_slow_the_runtime(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture, n: int
) -> None:
    # 0.4 s per removal, one at a time: 300 sessions take minutes to remove, far past
    # any fixed per-session teardown bound. Only a runtime that makes no progress at all
    # may stop the shutdown short.
    fake = FakeRuntime(removal_seconds=0.4)
    with trio.fail_after(3600):
        async with running(fake, make_config(max_sessions=1000)) as orch:
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(orch.get_or_create, f"user-{i}")
            assert len(fake.pods) == n
            t0 = trio.current_time()
        took = trio.current_time() - t0
    assert fake.empty, fake.objects()
    assert took >= n * 0.4  # it really was slow: one removal at a time at least
    assert "INCOMPLETE" not in caplog.text


async def test_shutdown_on_an_unreachable_runtime_names_what_is_left(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeRuntime(removal_seconds=0.4)
    stopped_at: list[float] = []

    async def serve_then_lose_the_runtime() -> None:
        async with running(fake, make_config(max_sessions=1000)) as orch:
            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(orch.get_or_create, f"user-{i}")
            fake.available = False  # Podman goes away as the gateway stops
            stopped_at.append(trio.current_time())

    with trio.fail_after(3600), pytest.raises(ObjectsLeft) as info:
        await serve_then_lose_the_runtime()
    took = trio.current_time() - stopped_at[0]
    assert isinstance(info.value, RuntimeUnavailable)  # `c2l serve` makes it one line
    message = str(info.value)
    assert "\n" not in message
    assert "50 pods" in message
    assert "cloudtolocalllm.proxy=true" in message
    assert "c2l serve" in message and "podman" in message  # how to remove them
    assert took < 120  # it gave up: no progress at all, not one wait per session
    assert len(fake.pods) == 50


async def test_shutdown_waits_while_the_runtime_makes_progress(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Each removal takes 20 s, longer than any per-session bound, but they do finish.
    fake = FakeRuntime(removal_seconds=20)
    with trio.fail_after(3600):
        async with running(fake, make_config(max_sessions=100)) as orch:
            for i in range(5):
                await orch.get_or_create(f"user-{i}")
    assert fake.empty, fake.objects()


async def test_gateway_serves_while_leftovers_are_removed(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="c2l.orchestrator")
    fake = FakeRuntime()
    users = leftover_users(40)
    for uh in users:
        await leave_behind(fake, uh)
    fake.removal_seconds = 0.5  # 80 removals: at least 40 s, whatever the concurrency
    with trio.fail_after(600):
        async with running(fake) as orch:
            t0 = trio.current_time()
            s = await orch.get_or_create(BOB)
            ready = trio.current_time() - t0
            progress = orch.sweep
            assert progress.total == 40
            assert progress.remaining > 0, progress  # the sweep is still going on
            assert ready < 5
            assert s.state == "ready"
            assert fake.pods[pod_name(UB)].labels[LABEL_REPLICA] == orch.replica
            await until(lambda: orch.sweep.remaining == 0)
            assert orch.sweep.removed == 40
            assert sorted(fake.pods) == [pod_name(UB)]  # the live session is untouched
            assert s.state == "ready"
    assert "leftover" in caplog.text
    assert "removed 40 of 40" in caplog.text


@pytest.mark.parametrize("listed", ["first", "last"])
async def test_user_whose_leftover_is_being_removed_gets_a_fresh_session(
    autojump_clock: trio.abc.Clock, listed: str
) -> None:
    fake = FakeRuntime()
    users = leftover_users(30)
    # Listed first, its removal is under way when the user comes back; listed last, the
    # sweep would come to it last (the user's start moves it to the front).
    users.insert(0 if listed == "first" else len(users), UA)
    for uh in users:
        await leave_behind(fake, uh)
    fake.removal_seconds = 0.5
    with trio.fail_after(600):
        async with running(fake) as orch:
            s = await orch.get_or_create(ALICE)  # no name clash with the leftover
            assert s.state == "ready"
            assert orch.sweep.remaining > 0
            assert fake.pods[pod_name(UA)].labels["cloudtolocalllm.session"] == s.id
            assert fake.containers[container_name(UA)].env["C2L_PROXY_SECRET"] == s.secret
            await until(lambda: orch.sweep.remaining == 0)
            assert sorted(fake.pods) == [pod_name(UA)]  # the sweep left the new one alone
            assert s.state == "ready"


async def test_a_session_started_while_the_listing_is_slow_is_not_swept(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRuntime()
    await leave_behind(fake, UA)
    fake.inject("list_labelled", "delay", seconds=3.0)
    with trio.fail_after(600):
        async with running(fake) as orch:
            s = await orch.get_or_create(ALICE)
            b = await orch.get_or_create(BOB)
            await until(lambda: orch.sweep.listed and orch.sweep.remaining == 0)
            await trio.sleep(10)
            assert sorted(fake.pods) == sorted([pod_name(UA), pod_name(UB)])
            assert fake.pods[pod_name(UA)].labels["cloudtolocalllm.session"] == s.id
            assert s.state == b.state == "ready"


async def test_every_object_carries_this_gateways_replica_label(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRuntime()
    with trio.fail_after(5):
        async with running(fake) as orch, running(FakeRuntime()) as other:
            s = await orch.get_or_create(ALICE)
            assert orch.replica and orch.replica != other.replica
            assert len(orch.replica) >= 8
            labels = object_labels(UA, s.id, orch.replica)
            assert fake.networks[network_name(UA)].labels == labels
            assert fake.pods[pod_name(UA)].labels == labels
            assert dict(fake.containers[container_name(UA)].labels) == labels
            assert labels[LABEL_REPLICA] == orch.replica


async def test_a_second_gateway_on_the_same_runtime_refuses_and_touches_nothing(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    fake = FakeRuntime()
    lock = tmp_path / "podman.sock.c2l-gateway.lock"
    with trio.fail_after(300):
        async with running(fake, lock_path=lock) as first:
            a = await first.get_or_create(ALICE)
            b = await first.get_or_create(BOB)
            calls = len(fake.calls)
            before = fake.objects()
            with pytest.raises(GatewayRunning) as info:
                async with running(fake, lock_path=lock):
                    pass  # pragma: no cover
            message = str(info.value)
            assert "\n" not in message
            assert f"pid {os.getpid()}" in message
            assert first.replica in message
            assert len(fake.calls) == calls  # not even a ping
            assert fake.objects() == before
            await trio.sleep(60)
            assert a.state == b.state == "ready"
            assert fake.objects() == before
        assert fake.empty
        # Once the first is gone, the lock is free: a new gateway starts.
        async with running(fake, lock_path=lock) as third:
            assert third.replica != first.replica


async def test_removal_progress_is_counted_for_metrics(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    for uh in leftover_users(10):
        await leave_behind(fake, uh)
    fake.removal_seconds = 1.0
    with trio.fail_after(600):
        async with running(fake) as orch:
            await until(lambda: orch.sweep.listed)
            assert (orch.sweep.total, orch.sweep.removed) == (10, 0)
            assert orch.removals_pending() == 10
            await until(lambda: 0 < orch.sweep.removed < 10)
            assert orch.sweep.remaining == 10 - orch.sweep.removed - orch.sweep.failed
            await until(lambda: orch.sweep.done)
            assert (orch.sweep.removed, orch.sweep.remaining) == (10, 0)
            assert orch.removals_pending() == 0


async def test_sweep_progress_is_in_the_metrics(autojump_clock: trio.abc.Clock) -> None:
    from prometheus_client import generate_latest

    from gateway._metrics import Metrics

    def figure(text: str, name: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(name + " "))
        return float(line.split()[1])

    fake = FakeRuntime()
    for uh in leftover_users(6):
        await leave_behind(fake, uh)
    fake.removal_seconds = 1.0
    with trio.fail_after(600):
        async with running(fake) as orch:
            metrics = Metrics(orch)
            await until(lambda: orch.sweep.listed)
            text = generate_latest(metrics.registry).decode()  # no thread hop
            assert figure(text, "c2l_sweep_leftovers") == 6
            assert figure(text, "c2l_sweep_remaining") == 6
            assert figure(text, "c2l_removals_pending") == 6
            await until(lambda: orch.sweep.removed >= 2)
            text = generate_latest(metrics.registry).decode()  # no thread hop
            assert figure(text, "c2l_sweep_removed") == orch.sweep.removed
            assert figure(text, "c2l_sweep_remaining") == 6 - orch.sweep.removed
            await until(lambda: orch.sweep.done)
            text = generate_latest(metrics.registry).decode()  # no thread hop
            assert figure(text, "c2l_sweep_remaining") == 0
            assert figure(text, "c2l_sweep_removed") == 6


async def test_a_stop_during_the_listing_still_removes_the_leftovers(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRuntime()
    for uh in leftover_users(3):
        await leave_behind(fake, uh)
    fake.inject("list_labelled", "delay", seconds=3.0)
    with trio.fail_after(600):
        async with running(fake):
            pass  # stopped before the listing answered
    assert fake.empty, fake.objects()
