"""Unit tests of the orchestrator against the in-memory FakeRuntime (no Podman)."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from c2lcore import user_hash
from orchestrator import (
    Orchestrator,
    RuntimeObjectError,
    RuntimeUnavailable,
    Session,
    SessionGone,
    SessionStartError,
    ShuttingDown,
    TooManySessions,
    container_name,
    network_name,
    object_labels,
    open_orchestrator,
    pod_name,
    proxy_get,
)
from orchestrator._podman import container_body
from orchestrator.testing import FakeRuntime, open_fake_runtime

from ._orch import make_config, running, until

ALICE, BOB = "auth0|alice", "auth0|bob"
UA, UB = user_hash(ALICE), user_hash(BOB)
CREATE_CALLS = ["create_network", "create_pod", "create_container", "start_pod"]


async def test_create_makes_isolated_hardened_objects(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    with trio.fail_after(5):
        async with running(fake) as orch:
            s = await orch.get_or_create(ALICE)
            labels = object_labels(UA, s.id, orch.replica)
            assert labels == {
                "cloudtolocalllm.proxy": "true",
                "cloudtolocalllm.user": UA,
                "cloudtolocalllm.session": s.id,
                "cloudtolocalllm.replica": orch.replica,
            }
            net = fake.networks[f"c2l-net-{UA}"]
            assert net.labels == labels
            assert net.options == {"isolate": "true"}
            assert net.internal  # no egress, no published port
            pod = fake.pods[f"c2l-pod-{UA}"]
            assert pod.network == net.name
            assert pod.labels == labels
            assert pod.started
            spec = fake.containers[f"c2l-proxy-{UA}"]
            assert spec.pod == pod.name
            assert spec.image == "localhost/c2l-proxy:latest"
            assert dict(spec.labels) == labels
            assert spec.user == "1001:1001"
            assert spec.read_only
            assert spec.cap_drop == ("ALL",)
            assert spec.no_new_privileges
            assert spec.memory == 512 * 1024**2
            assert (spec.cpu_quota, spec.cpu_period) == (50_000, 100_000)
            assert spec.pids_limit == 64
            assert 0 < spec.tmpfs_size <= 64 * 1024**2
            assert spec.stop_timeout <= 2
            assert dict(spec.env) == {
                "C2L_PROXY_SECRET": s.secret,
                "C2L_SESSION_ID": s.id,
                "C2L_USER_HASH": UA,
                "C2L_PROXY_MEMORY": str(512 * 1024**2),
                "C2L_RESUME_WINDOW": "30",
            }
            assert spec.socket_dir == str(orch.dirs.path(UA))
            assert s.state == "ready"
            assert s.socket_path == f"{spec.socket_dir}/proxy.sock"
            assert s.user_hash == UA
            assert len(s.id) >= 22
            assert len(s.secret) >= 43
            assert orch.get(UA) is s
            assert orch.sessions() == [s]
            shown = repr(s) + repr(s.as_dict())
            assert s.secret not in shown
            assert ALICE not in shown
            assert s.as_dict()["sessionId"] == s.id


def test_podman_container_body_carries_the_hardening() -> None:
    from orchestrator import ProxySpec

    spec = ProxySpec(
        name="c2l-proxy-x",
        pod="c2l-pod-x",
        image="img",
        labels={"a": "b"},
        env={"C2L_PROXY_SECRET": SECRET},
        memory=512 * 1024**2,
        cpus=0.5,
        pids_limit=64,
    )
    body = container_body(spec)
    assert body["user"] == "1001:1001"
    assert body["read_only_filesystem"] is True
    assert body["cap_drop"] == ["ALL"]
    assert body["no_new_privileges"] is True
    assert body["resource_limits"] == {
        "memory": {"limit": 536870912},
        "cpu": {"quota": 50000, "period": 100000},
        "pids": {"limit": 64},
    }
    assert [m["type"] for m in body["mounts"]] == ["tmpfs"]
    assert any(o.startswith("size=") for o in body["mounts"][0]["options"])
    assert "volumes" not in body
    assert body["env"] == {"C2L_PROXY_SECRET": SECRET}  # the container gets it ...
    assert SECRET not in repr(spec) and SECRET not in str(spec)  # ... nothing shows it


#: A value that cannot turn up by chance in a repr or a log line.
SECRET = "s3cret-VALUE-8f2c6d0e4b1a9753"


async def test_the_secret_never_appears_in_a_log_or_repr(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import httpx

    from orchestrator import PodmanRuntime, ProxySpec

    caplog.set_level(logging.DEBUG)  # every logger: ours, httpx, httpcore
    bodies: list[bytes] = []

    def podman(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(201, json={"Id": "x", "Warnings": ["a warning"]})

    labels = object_labels(UA, "sid", "replica")
    spec = ProxySpec(container_name(UA), pod_name(UA), "img", labels, {"C2L_PROXY_SECRET": SECRET})
    rt = PodmanRuntime("unix:///nonexistent/podman.sock")
    await rt._api.http.aclose()
    rt._api.http = httpx.AsyncClient(
        transport=httpx.MockTransport(podman), base_url="http://podman/v4.0.0/libpod"
    )
    try:
        await rt.create_container(spec)
    finally:
        await rt.aclose()
    assert SECRET.encode() in bodies[0]  # sent to Podman, where it belongs
    assert "a warning" in caplog.text  # the create was logged ...
    assert SECRET not in caplog.text  # ... without the secret
    for shown in (repr(spec), str(spec), repr(rt.warnings)):
        assert SECRET not in shown


async def test_concurrent_creates_for_one_user_share_one_session(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRuntime()
    fake.inject("create_pod", "delay", seconds=1.0)
    got: list[Session] = []

    async def create(orch: Orchestrator) -> None:
        got.append(await orch.get_or_create(ALICE))

    with trio.fail_after(10):
        async with running(fake) as orch:
            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(create, orch)
            assert len(got) == 5
            assert len({id(s) for s in got}) == 1
            assert fake.method_calls("create_network") == [network_name(UA)]
            assert len(orch.sessions()) == 1


async def test_two_users_get_two_sessions(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    with trio.fail_after(5):
        async with running(fake) as orch:
            a = await orch.get_or_create(ALICE)
            b = await orch.get_or_create(BOB)
            assert a is not b
            assert a.id != b.id
            assert a.secret != b.secret
            assert a.socket_path != b.socket_path
            assert sorted(fake.networks) == sorted([network_name(UA), network_name(UB)])
            assert fake.networks[network_name(UA)].subnet != fake.networks[network_name(UB)].subnet
            assert sorted(fake.containers) == sorted([container_name(UA), container_name(UB)])
            assert await orch.get_or_create(ALICE) is a


async def test_delete_tears_down_and_forgets(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    with trio.fail_after(5):
        async with running(fake) as orch:
            s = await orch.get_or_create(ALICE)
            assert await orch.delete(UA, s.id)
            assert fake.empty
            assert orch.get(UA) is None
            assert orch.sessions() == []
            assert s.ended.is_set()
            assert (s.state, s.end_reason) == ("ended", "deleted")
            # The removals ran in dependency order; the pod takes its container with it.
            removals = [m for m, _ in fake.calls if m.startswith("remove_")]
            assert removals == ["remove_pod", "remove_network"]
            again = await orch.get_or_create(ALICE)
            assert again.id != s.id
            assert not await orch.delete(UA, s.id)  # the old id is gone


async def test_delete_of_another_users_session_is_refused(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    with trio.fail_after(5):
        async with running(fake) as orch:
            a = await orch.get_or_create(ALICE)
            b = await orch.get_or_create(BOB)
            before = fake.objects()
            assert not await orch.delete(UB, a.id)
            assert not await orch.delete(UA, b.id)
            assert not await orch.delete(UA, "no-such-id")
            assert not await orch.delete("0" * 16, a.id)
            assert fake.objects() == before
            assert a.state == b.state == "ready"
            assert not fake.method_calls("remove_container")


async def test_crash_in_one_session_ends_only_that_session(
    autojump_clock: trio.abc.Clock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_watch = Orchestrator._watch

    async def watch(self: Orchestrator, session: Session) -> None:
        if session.user_hash == UA:
            await trio.sleep(5)
            raise ValueError("boom")
        await real_watch(self, session)

    monkeypatch.setattr(Orchestrator, "_watch", watch)
    fake = FakeRuntime()
    with trio.fail_after(30):
        async with running(fake) as orch:
            a = await orch.get_or_create(ALICE)
            b = await orch.get_or_create(BOB)
            await a.ended.wait()
            assert a.end_reason == "error: boom"
            assert orch.get(UA) is None
            assert orch.get(UB) is b
            assert b.state == "ready"
            assert sorted(fake.containers) == [container_name(UB)]
            assert sorted(fake.networks) == [network_name(UB)]
            # The orchestrator still serves the crashed user.
            a2 = await orch.get_or_create(ALICE)
            assert a2.state == "ready"
            assert a2.id != a.id
            monkeypatch.setattr(Orchestrator, "_watch", real_watch)
    assert "crashed" in caplog.text


async def test_a_session_task_ends_before_the_sessions_teardown_begins(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRuntime()
    seen: list[str] = []

    async def task(session: Session) -> None:
        try:
            seen.append("started")
            await trio.sleep_forever()
        finally:
            # What the runtime had been asked to remove when the task let go: nothing.
            seen.append(f"ended; removals so far {fake.method_calls('remove_pod')}")

    with trio.fail_after(5):
        async with running(fake) as orch:
            s = await orch.get_or_create(ALICE)
            s.start_soon(task, s)
            await trio.testing.wait_all_tasks_blocked()
            assert seen == ["started"]
            assert await orch.delete(UA, s.id)
            assert seen == ["started", "ended; removals so far []"]
            # An ended session runs nothing new; nor does one that is ending.
            with pytest.raises(SessionGone):
                s.start_soon(task, s)
            b = await orch.get_or_create(BOB)
            orch.end_nowait(UB, b.id)
            with pytest.raises(SessionGone):
                b.start_soon(task, b)
    assert fake.empty


async def test_a_session_that_is_starting_runs_no_task(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    fake.inject("start_pod", "delay", seconds=5)
    with trio.fail_after(30):
        async with running(fake) as orch, trio.open_nursery() as nursery:
            nursery.start_soon(orch.get_or_create, ALICE)
            await trio.sleep(1)
            starting = orch.get(UA)
            assert starting is not None and starting.state == "starting"
            with pytest.raises(SessionGone):
                starting.start_soon(trio.sleep_forever)


async def test_a_crash_in_a_session_task_ends_only_that_session(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    async def crash() -> None:
        await trio.sleep(3)
        raise ValueError("boom")

    fake = FakeRuntime()
    with trio.fail_after(30):
        async with running(fake) as orch:
            a = await orch.get_or_create(ALICE)
            b = await orch.get_or_create(BOB)
            a.start_soon(crash)
            b.start_soon(trio.sleep_forever)
            await a.ended.wait()
            assert a.end_reason == "error: boom"
            assert orch.get(UB) is b and b.state == "ready"
            assert sorted(fake.pods) == [pod_name(UB)]
    assert "crashed" in caplog.text and "ValueError: boom" in caplog.text


async def test_waiting_for_a_session_ends_when_the_orchestrator_shuts_down(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRuntime()
    raised: list[BaseException] = []

    async def wait() -> None:
        try:
            await orch.wait_ready(UA)
        except ShuttingDown as exc:
            raised.append(exc)

    with trio.fail_after(30):
        async with running(fake) as orch:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                await orch.aclose()
            with pytest.raises(ShuttingDown):
                await orch.wait_ready(UB)
            with pytest.raises(ShuttingDown):
                await orch.get_or_create(BOB)
    assert len(raised) == 1


async def test_start_failure_of_one_user_leaves_others_alone(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRuntime()
    with trio.fail_after(5):
        async with running(fake) as orch:
            a = await orch.get_or_create(ALICE)
            fake.inject("create_container", "fail")
            with pytest.raises(SessionStartError, match=UB):
                await orch.get_or_create(BOB)
            assert a.state == "ready"
            assert orch.get(UB) is None
            assert sorted(fake.networks) == [network_name(UA)]
            assert sorted(fake.pods) == [pod_name(UA)]


async def test_exit_tears_everything_down(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    with trio.fail_after(5):
        async with running(fake) as orch:
            sessions = [await orch.get_or_create(f"user-{i}") for i in range(3)]
            assert len(fake.containers) == 3
        assert fake.empty
        for s in sessions:
            assert s.ended.is_set()
            assert (s.state, s.end_reason) == ("ended", "shutdown")


async def test_aclose_tears_down_and_refuses_new_sessions(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    with trio.fail_after(5):
        async with running(fake) as orch:
            s = await orch.get_or_create(ALICE)
            await orch.aclose()
            assert fake.empty
            assert s.end_reason == "shutdown"
            with pytest.raises(Exception, match="shutting down"):
                await orch.get_or_create(BOB)


async def test_leftovers_of_an_earlier_run_are_removed_at_start(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRuntime()
    from orchestrator import ProxySpec

    for uh in ("a" * 16, "b" * 16):
        labels = object_labels(uh, "old")
        await fake.create_network(network_name(uh), labels)
        await fake.create_pod(
            pod_name(uh),
            network=network_name(uh),
            labels=labels,
        )
        spec = ProxySpec(container_name(uh), pod_name(uh), "img", labels, {})
        await fake.create_container(spec)
    await fake.create_network("someone-elses-net", {"app": "other"})
    fake.calls.clear()
    with trio.fail_after(5):
        async with running(fake) as orch:
            assert fake.calls[0] == ("ping", "")
            # Removed in the background (tests/test_sweep.py: while the gateway serves).
            await until(lambda: orch.sweep.done)
            assert sorted(fake.networks) == ["someone-elses-net"]
            assert not fake.pods
            assert not fake.containers
            assert orch.sessions() == []
            assert orch.sweep.removed == 2


async def test_unreachable_runtime_fails_fast() -> None:
    fake = FakeRuntime(available=False)
    with trio.fail_after(5), pytest.raises(RuntimeUnavailable, match="c2l doctor"):
        async with running(fake):
            pass  # pragma: no cover


@pytest.mark.parametrize("method", CREATE_CALLS)
async def test_runtime_failure_at_each_step_leaves_nothing(
    autojump_clock: trio.abc.Clock, method: str
) -> None:
    fake = FakeRuntime()
    fake.inject(method, "fail")
    with trio.fail_after(60):
        async with running(fake) as orch:
            with pytest.raises(SessionStartError, match="injected failure"):
                await orch.get_or_create(ALICE)
            assert fake.empty
            assert orch.sessions() == []
            # And the user can try again.
            assert (await orch.get_or_create(ALICE)).state == "ready"


def _blocking_probe(blocked: trio.Event) -> Callable[[str], Any]:
    async def probe(socket_path: str) -> bool:
        blocked.set()
        await trio.sleep_forever()
        return False  # pragma: no cover

    return probe


#: Every await point of creation: each runtime call, hanging before or after it took
#: effect, or taking effect late after its caller gave up; and the readiness probe.
CREATION_POINTS = (
    [(m, a) for m in CREATE_CALLS for a in ("block", "block_after")]
    + [(m, "late") for m in ("create_network", "create_pod", "create_container")]
    + [("probe", "block")]
)


@pytest.mark.parametrize("how", ["caller-cancelled", "deleted", "shutdown", "outer-cancelled"])
@pytest.mark.parametrize(("method", "action"), CREATION_POINTS)
async def test_cancellation_at_every_await_point_of_creation_leaves_nothing(
    autojump_clock: trio.abc.Clock, method: str, action: str, how: str
) -> None:
    # The fake's nursery (a server's, in effect) owns what a "late" call finishes.
    async with open_fake_runtime() as fake:
        await _cancel_at_a_creation_point(fake, method, action, how)


async def _cancel_at_a_creation_point(
    fake: FakeRuntime, method: str, action: str, how: str
) -> None:
    probe_blocked = trio.Event()
    kw: dict[str, Any] = {}
    if method == "probe":
        kw["probe"] = _blocking_probe(probe_blocked)
    else:
        fake.inject(method, action, seconds=2.0)  # type: ignore[arg-type]

    def reached() -> bool:
        return probe_blocked.is_set() if method == "probe" else bool(fake.method_calls(method))

    errors: list[BaseException] = []
    session: Session | None = None

    async def creator(orch: Orchestrator, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
                await orch.get_or_create(ALICE)
            except SessionStartError as exc:
                errors.append(exc)

    with trio.fail_after(120):
        with trio.CancelScope() as outer:
            async with running(fake, **kw) as orch, trio.open_nursery() as nursery:
                scope = await nursery.start(creator, orch)
                await until(reached)
                await trio.testing.wait_all_tasks_blocked()
                session = orch.get(UA)
                assert session is not None
                assert session.state == "starting"
                if how == "caller-cancelled":
                    scope.cancel()
                    await session.ended.wait()
                    assert session.end_reason == "abandoned"
                elif how == "deleted":
                    assert await orch.delete(UA, session.id)
                    assert session.end_reason == "deleted"
                elif how == "shutdown":
                    nursery.cancel_scope.cancel()
                    await orch.aclose()
                    assert session.end_reason == "shutdown"
                else:
                    outer.cancel()
                    await trio.sleep_forever()
                await session.ended.wait()
                assert orch.sessions() == []
        assert session is not None
        assert session.ended.is_set()
        await trio.sleep(10)  # whatever the runtime finishes late has landed by now
        assert fake.empty, fake.objects()
        if how == "deleted":
            assert len(errors) == 1
            assert "deleted" in str(errors[0])


async def test_teardown_runs_through_a_slow_runtime(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    with trio.fail_after(60):
        async with running(fake, teardown_timeout=10) as orch:
            s = await orch.get_or_create(ALICE)
            for m in ("remove_container", "remove_pod", "remove_network"):
                fake.inject(m, "delay", seconds=2.0)
            t0 = trio.current_time()
            assert await orch.delete(UA, s.id)
            assert 4 <= trio.current_time() - t0 < 5  # pod (with its container), network
            assert fake.empty


async def test_teardown_is_bounded_when_the_runtime_hangs(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="c2l.orchestrator")
    fake = FakeRuntime()
    with trio.fail_after(600):
        async with running(fake, teardown_timeout=5) as orch:
            s = await orch.get_or_create(ALICE)
            fake.inject("remove_pod", "block")
            t0 = trio.current_time()
            assert await orch.delete(UA, s.id)
            assert trio.current_time() - t0 == pytest.approx(5, abs=0.1)
            assert s.state == "ended"
            assert orch.get(UA) is None
            assert "still being removed after 5 s" in caplog.text
            # The hung call is given up on (no removal finished for a minute) and retried.
            await until(lambda: fake.empty, step=1)
            assert fake.method_calls("remove_pod") == [pod_name(UA)] * 2


async def test_shutdown_removes_what_outlasted_teardown_bounds(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="c2l.orchestrator")
    fake = FakeRuntime()
    with trio.fail_after(60):
        async with running(fake, teardown_timeout=1) as orch:
            a = await orch.get_or_create(ALICE)
            b = await orch.get_or_create(BOB)
            # Both teardowns outlast their bound, as hundreds do in a congested Podman.
            fake.inject("remove_pod", "delay", seconds=5.0, times=2)
            assert await orch.delete(UA, a.id)
            assert await orch.delete(UB, b.id)
            assert "still being removed after 1 s" in caplog.text
            assert fake.pods
    assert fake.empty, fake.objects()


async def test_shutdown_retries_removals_that_failed(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeRuntime()
    with trio.fail_after(60):
        async with running(fake) as orch:
            for sub in (ALICE, BOB):
                await orch.get_or_create(sub)
            fake.inject("remove_pod", "fail", times=2)  # both fail as the gateway stops
    assert fake.empty, fake.objects()
    assert len(fake.method_calls("remove_pod")) == 4


async def test_shutdown_removes_what_it_finds_labelled_as_its_own(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeRuntime()
    with trio.fail_after(60):
        async with running(fake) as orch:
            await until(lambda: orch.sweep.listed)  # what is made from now on is no leftover
            # An object no session knows of (say a create that landed after its teardown).
            await fake.create_network("c2l-net-stray", object_labels("stray", "x", orch.replica))
            await fake.create_network("c2l-net-other", object_labels("other", "x", "another"))
    assert sorted(fake.networks) == ["c2l-net-other"]  # never another replica's
    assert "left by teardowns" in caplog.text


async def test_each_removal_is_attempted_when_an_earlier_one_fails(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = FakeRuntime()
    with trio.fail_after(5):
        async with running(fake) as orch:
            s = await orch.get_or_create(ALICE)
            fake.inject("remove_container", "fail")
            assert await orch.delete(UA, s.id)
            assert fake.method_calls("remove_pod") == [pod_name(UA)]
            assert fake.method_calls("remove_network") == [network_name(UA)]
            assert fake.empty  # the pod removal took the container with it


async def test_probe_that_never_succeeds_fails_the_start(autojump_clock: trio.abc.Clock) -> None:
    async def never(socket_path: str) -> bool:
        await trio.lowlevel.checkpoint()
        return False

    fake = FakeRuntime()
    with trio.fail_after(60):
        async with running(fake, probe=never, start_timeout=3) as orch:
            t0 = trio.current_time()
            with pytest.raises(SessionStartError, match=r"did not become ready within 3 s"):
                await orch.get_or_create(ALICE)
            assert trio.current_time() - t0 == pytest.approx(3, abs=0.1)
            assert fake.empty
            assert orch.sessions() == []


async def test_probe_that_raises_fails_the_start(autojump_clock: trio.abc.Clock) -> None:
    async def broken(socket_path: str) -> bool:
        raise RuntimeObjectError("probe exploded")

    fake = FakeRuntime()
    with trio.fail_after(60):
        async with running(fake, probe=broken) as orch:
            with pytest.raises(SessionStartError, match="probe exploded"):
                await orch.get_or_create(ALICE)
            assert fake.empty


async def test_max_sessions_refuses_with_retry_after(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    with trio.fail_after(5):
        async with running(fake, make_config(max_sessions=2)) as orch:
            await orch.get_or_create("u1")
            await orch.get_or_create("u2")
            calls = len(fake.calls)
            with pytest.raises(TooManySessions, match="C2L_MAX_SESSIONS") as info:
                await orch.get_or_create("u3")
            assert info.value.retry_after > 0
            assert len(fake.calls) == calls  # nothing was attempted
            assert len(orch.sessions()) == 2
            # An existing user still gets their session.
            assert (await orch.get_or_create("u1")).state == "ready"


async def test_concurrent_starts_are_capped(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    fake.inject("create_network", "delay", seconds=1.0, times=10)
    with trio.fail_after(30):
        async with running(fake, max_concurrent_starts=2) as orch:
            t0 = trio.current_time()
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(orch.get_or_create, f"user-{i}")
            # 6 starts, 2 at a time, 1 s each.
            assert trio.current_time() - t0 == pytest.approx(3, abs=0.1)
            assert len(orch.sessions()) == 6


async def test_idle_session_ends_and_touch_keeps_it(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeRuntime()
    config = make_config(idle_timeout=60.0, health_interval=1000.0)
    with trio.fail_after(600):
        async with running(fake, config) as orch:
            a = await orch.get_or_create(ALICE)
            b = await orch.get_or_create(BOB)
            for _ in range(5):
                await trio.sleep(30)
                b.touch()
            assert a.ended.is_set()
            assert a.end_reason == "idle"
            assert b.state == "ready"
            await b.ended.wait()
            assert b.end_reason == "idle"
            assert fake.empty


async def test_failing_health_checks_end_the_session(autojump_clock: trio.abc.Clock) -> None:
    healthy = True

    async def probe(socket_path: str) -> bool:
        await trio.lowlevel.checkpoint()
        return healthy

    fake = FakeRuntime()
    with trio.fail_after(600):
        async with running(fake, make_config(health_interval=10.0), probe=probe) as orch:
            s = await orch.get_or_create(ALICE)
            await trio.sleep(35)
            assert s.state == "ready"
            healthy = False
            t0 = trio.current_time()
            await s.ended.wait()
            assert s.end_reason == "unhealthy"
            assert 20 <= trio.current_time() - t0 <= 31
            assert fake.empty


async def test_logs_name_the_user_hash_never_sub_or_secret(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="c2l.orchestrator")
    fake = FakeRuntime()
    with trio.fail_after(5):
        async with running(fake) as orch:
            s = await orch.get_or_create(ALICE)
            await orch.delete(UA, s.id)
    assert UA in caplog.text
    assert "ready at" in caplog.text
    assert "ended (deleted)" in caplog.text
    assert ALICE not in caplog.text
    assert s.secret not in caplog.text


async def test_fake_runtime_runs_real_proxies() -> None:
    with trio.fail_after(20):
        async with (
            open_fake_runtime(run_proxies=True) as fake,
            open_orchestrator(make_config(), fake) as orch,
        ):
            s = await orch.get_or_create(ALICE)
            assert s.socket_path is not None
            status, body = await proxy_get(s.socket_path, "/health")
            assert status == 200 and json.loads(body)["status"] == "healthy"
            assert await orch.delete(UA, s.id)
            assert fake.empty
            assert not Path(s.socket_path).parent.exists()  # its directory went


async def test_usage_is_empty_without_a_process(autojump_clock: trio.abc.Clock) -> None:
    from orchestrator import Usage

    fake = FakeRuntime()
    with trio.fail_after(5):
        async with running(fake) as orch:
            s = await orch.get_or_create(ALICE)
            assert await orch.usage(s) == Usage(None, None)
            await orch.delete(UA, s.id)
            assert await orch.usage(s) == Usage(None, None)  # gone: still no error


# -- issue 9: one backoff, tracebacks for bugs, no ownerless tasks -------------------------


class _TimedFake(FakeRuntime):
    """Records when each ``watch_exits`` call begins."""

    stamps: list[float]

    async def watch_exits(self, *args: Any, **kw: Any) -> None:
        self.stamps.append(trio.current_time())
        await super().watch_exits(*args, **kw)


async def test_exit_watch_backs_off_to_its_cap_and_starts_over_after_a_long_stream(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = _TimedFake()
    fake.stamps = []
    with trio.fail_after(600):
        async with running(fake) as orch:
            await orch.get_or_create(ALICE)
            await until(lambda: fake.exit_watchers == 1)
            fake.available = False  # every retry fails at once
            broken = trio.current_time()
            fake.break_exit_watchers()
            await trio.sleep(60)
            fails = [broken, *fake.stamps[1:]]
            gaps = [round(b - a, 6) for a, b in itertools.pairwise(fails)]
            # 0.5 s doubling, capped at 10 s (no jitter: exactly these)
            assert gaps[:7] == [0.5, 1, 2, 4, 8, 10, 10]
            fake.available = True
            await until(lambda: fake.exit_watchers == 1)
            await trio.sleep(40)  # a stream that lasted: the next retry is the first step
            before = len(fake.stamps)
            broken = trio.current_time()
            fake.break_exit_watchers()
            await until(lambda: len(fake.stamps) > before)
            assert round(fake.stamps[-1] - broken, 6) == 0.5


async def test_an_unexpected_error_while_starting_is_logged_with_its_traceback(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeRuntime()
    with trio.fail_after(30):
        async with running(fake) as orch:
            # expected: the runtime refused; one line, no traceback
            fake.inject("create_container", "fail")
            with pytest.raises(SessionStartError):
                await orch.get_or_create(ALICE)
            # a bug (not an OrchestratorError): logged with its traceback
            fake.inject("create_container", "fail", exc=ValueError("a bug"))
            with pytest.raises(SessionStartError, match="a bug"):
                await orch.get_or_create(BOB)
    started = [r for r in caplog.records if "failed to start" in r.getMessage()]
    assert [r.levelno for r in started] == [logging.WARNING, logging.ERROR], started
    refused, bug = started
    assert refused.exc_info is None
    assert "injected failure" in refused.getMessage()
    assert bug.exc_info is not None and isinstance(bug.exc_info[1], ValueError)


async def test_late_runtime_work_is_owned_by_the_fakes_nursery(
    autojump_clock: trio.abc.Clock,
) -> None:
    labels = object_labels(UA, "sid", "replica")
    with trio.fail_after(30):
        # No owner, no late work (it used to run as an ownerless system task).
        bare = FakeRuntime()
        bare.inject("create_network", "late", seconds=1.0)
        with pytest.raises(RuntimeError, match="open_fake_runtime"):
            await bare.create_network("n0", labels)
        async with open_fake_runtime() as fake:
            fake.inject("create_network", "late", seconds=1.0)
            with trio.move_on_after(0.1):
                await fake.create_network("n1", labels)
            assert "n1" not in fake.networks
            await trio.sleep(2)  # the caller gave up; the "server" finished anyway
            assert "n1" in fake.networks
            fake.inject("create_network", "late", seconds=5.0)
            with trio.move_on_after(0.1):
                await fake.create_network("n2", labels)
        # Work still pending when the fake's block ended was ended with it.
        await trio.sleep(10)
        assert "n2" not in fake.networks


async def test_a_failed_start_is_not_retried(autojump_clock: trio.abc.Clock) -> None:
    """No host port is picked any more (the proxy listens on a UNIX socket), so no start
    failure is worth making the pod again: each fails its session once, leaving nothing."""
    fake = FakeRuntime()
    fake.inject("start_pod", "fail")
    with trio.fail_after(60):
        async with running(fake) as orch:
            with pytest.raises(SessionStartError, match="injected failure"):
                await orch.get_or_create(ALICE)
            assert len(fake.method_calls("create_pod")) == 1
            clash = RuntimeObjectError("bind: address already in use")
            fake.inject("start_pod", "fail", exc=clash, times=3)
            with pytest.raises(SessionStartError, match="address already in use"):
                await orch.get_or_create(BOB)
            assert len(fake.method_calls("create_pod")) == 1 + 1
            assert orch.sessions() == []
            assert orch.dirs.list() == []  # no session directory left either
        assert fake.empty
