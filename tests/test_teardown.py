"""Shutdown removes the sessions' networks in one call, after their pods (issue 10, point 4).

On the in-memory runtime and trio's mock clock: :class:`FakeRuntime` ``removal_seconds``
makes every removal call take that long, one at a time, as Podman serialises them. Podman
4.3 makes each network removal a pass over all its containers, so a shutdown removes every
pod first and then this gateway's unused networks at once
(``ContainerRuntime.remove_unused_networks``), falling back to one by one for whatever that
call leaves; nothing labelled may be left either way, and nothing of another gateway is
touched.
"""

from __future__ import annotations

import pytest
import trio

from c2lcore import user_hash
from orchestrator import LABEL_REPLICA, Orchestrator, network_name, object_labels
from orchestrator.testing import FakeRuntime

from ._orch import make_config, running


async def _open_sessions(orch: Orchestrator, n: int) -> None:
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(orch.get_or_create, f"user-{i}")


async def test_shutdown_removes_the_networks_in_one_call_after_every_pod(
    autojump_clock: trio.abc.Clock,
) -> None:
    n = 50
    fake = FakeRuntime(removal_seconds=0.4)
    with trio.fail_after(3600):
        async with running(fake, make_config(max_sessions=1000)) as orch:
            await _open_sessions(orch, n)
            assert len(fake.networks) == n
            t0 = trio.current_time()
        took = trio.current_time() - t0
    assert fake.empty, fake.objects()
    assert fake.method_calls("remove_network") == []  # not one by one
    assert fake.method_calls("remove_unused_networks") == [f"{LABEL_REPLICA}={orch.replica}"]
    calls = [method for method, _ in fake.calls]
    bulk = calls.index("remove_unused_networks")
    assert calls.count("remove_pod") == n
    assert "remove_pod" not in calls[bulk:]  # every pod was gone first
    # n pod removals and one call for all networks, each 0.4 s, one at a time (one by one,
    # the networks alone would add another n * 0.4 s).
    assert took < (n + 5) * 0.4


async def test_shutdown_removes_networks_one_by_one_when_the_call_for_all_fails(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    n = 10
    fake = FakeRuntime(removal_seconds=0.4)
    fake.inject("remove_unused_networks", "fail", times=float("inf"))
    with trio.fail_after(3600):
        async with running(fake, make_config(max_sessions=1000)) as orch:
            await _open_sessions(orch, n)
    assert fake.empty, fake.objects()
    assert sorted(fake.method_calls("remove_network")) == sorted(
        network_name(user_hash(f"user-{i}")) for i in range(n)
    )
    assert "removing them one by one" in caplog.text


async def test_shutdown_removes_networks_one_by_one_when_the_call_for_all_hangs(
    autojump_clock: trio.abc.Clock,
) -> None:
    n = 5
    fake = FakeRuntime(removal_seconds=0.4)
    fake.inject("remove_unused_networks", "block")
    with trio.fail_after(3600):
        async with running(fake, make_config(max_sessions=1000)) as orch:
            await _open_sessions(orch, n)
    assert fake.empty, fake.objects()
    assert len(fake.method_calls("remove_network")) == n


async def test_a_slow_call_for_many_networks_is_waited_for_not_a_stall(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Podman's prune re-reads every remaining network's file per network it removes: 500
    # took 29.4 s here. 400 networks in 80 s: longer than a fixed 30 s bound and than the
    # shutdown's 60 s stall bound, but within the bound that grows with their number.
    n = 400
    fake = FakeRuntime(removal_seconds=0.4)
    fake.inject("remove_unused_networks", "delay", seconds=80)
    with trio.fail_after(3600):
        async with running(fake, make_config(max_sessions=1000), stall_timeout=60) as orch:
            await _open_sessions(orch, n)
    assert fake.empty, fake.objects()
    assert fake.method_calls("remove_network") == []


async def test_a_network_whose_pod_is_still_there_is_removed_after_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    # One pod cannot be removed at first: the call for all networks must leave its
    # network (in use), and the shutdown's final pass removes both.
    fake = FakeRuntime(removal_seconds=0.4)
    fake.inject("remove_pod", "fail")
    with trio.fail_after(3600):
        async with running(fake, make_config(max_sessions=1000)) as orch:
            await _open_sessions(orch, 5)
    assert fake.empty, fake.objects()


async def test_shutdown_never_removes_a_network_of_another_gateway(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Another gateway's network with no pod yet (one being made, say), created after this
    # gateway's start-up listing: only this gateway's own networks may go at shutdown.
    fake = FakeRuntime(removal_seconds=0.4)
    other = network_name("0" * 16)
    with trio.fail_after(3600):
        async with running(fake, make_config(max_sessions=1000)) as orch:
            await _open_sessions(orch, 3)
            await fake.create_network(other, object_labels("0" * 16, "s", "otherreplica"))
    assert list(fake.networks) == [other]
    assert not fake.pods


async def test_a_session_ended_while_serving_removes_its_own_network(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Serving, a network is never left for a later call (another session's network may be
    # about to get its pod): a deleted session's job removes it at once.
    fake = FakeRuntime()
    with trio.fail_after(60):
        async with running(fake, make_config()) as orch:
            session = await orch.get_or_create("alice")
            assert await orch.delete(session.user_hash, session.id)
            assert fake.method_calls("remove_network") == [network_name(session.user_hash)]
            assert fake.method_calls("remove_unused_networks") == []
            assert not fake.networks


async def test_every_network_of_a_shutdown_waits_for_the_call_for_all(
    autojump_clock: trio.abc.Clock,
) -> None:
    # On a runtime that removes at once, the first teardowns run before the shutdown
    # drains the queue: they too must leave their network for the call for all.
    fake = FakeRuntime()
    with trio.fail_after(600):
        async with running(fake, make_config(max_sessions=100)) as orch:
            await _open_sessions(orch, 20)
    assert fake.empty, fake.objects()
    assert fake.method_calls("remove_network") == []
    assert fake.method_calls("remove_unused_networks")
