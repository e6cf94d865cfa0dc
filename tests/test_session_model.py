"""The orchestrator's session model, once, against both runtimes.

The same tests run on the Podman runtime's in-memory fake (``FakeRuntime``: network, pod,
container) and on the Kubernetes runtime (``KubernetesSessions`` over the in-process fake
API, which validates every object against the official schemas: one Pod and its Secret).
A :class:`Backend` says, for each, how to run an orchestrator on it, what is left, how a
proxy dies, and where creation can be stopped half way. The Podman-only details (network
options, the hardening of the container body, the janitor's batching) stay in
``test_orchestrator.py``; the Kubernetes-only ones (adoption across replicas, the sweep of
a replica's own pods) in ``test_orchestrator_k8s.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import attrs
import pytest
import trio
import trio.testing

from c2lcore import user_hash
from orchestrator import (
    Orchestrator,
    Session,
    SessionStartError,
    container_name,
    open_kubernetes_sessions,
    pod_name,
)
from orchestrator._kubernetes import KubernetesRuntime
from orchestrator.testing import (
    FakeKubernetes,
    FakeRuntime,
    open_fake_kubernetes,
    open_fake_runtime,
)

from ._orch import make_config, ready_probe, running, until

ALICE, BOB = "alice", "bob"
UA = user_hash(ALICE)


class Backend(Protocol):
    """One runtime under the shared tests."""

    def orchestrator(self, **kw: Any) -> AbstractAsyncContextManager[Orchestrator]: ...

    def empty(self) -> bool:
        """Nothing of any session is left in the runtime."""
        ...

    def live(self) -> int:
        """How many sessions' proxies the runtime holds."""
        ...

    def kill(self, uh: str) -> None:
        """The user's proxy dies (killed by the OOM killer, say)."""
        ...

    def block(self, point: str) -> Callable[[], bool]:
        """Stop the next creation at ``point`` (one of ``points``); says when reached."""
        ...

    def release(self) -> None:
        """Let a blocked creation go on (as a slow server finally answering)."""
        ...


@attrs.define
class PodmanBackend:
    fake: FakeRuntime
    points: tuple[str, ...] = ("create_network", "create_pod", "create_container", "start_pod")

    def orchestrator(self, **kw: Any) -> AbstractAsyncContextManager[Orchestrator]:
        return running(self.fake, **kw)

    def empty(self) -> bool:
        return self.fake.empty

    def live(self) -> int:
        return len(self.fake.pods)

    def kill(self, uh: str) -> None:
        self.fake.kill_container(container_name(uh))

    def block(self, point: str) -> Callable[[], bool]:
        self.fake.inject(point, "block", seconds=2.0)
        return lambda: bool(self.fake.method_calls(point))

    def release(self) -> None:
        pass  # the injected block ends by itself


@attrs.define
class KubernetesBackend:
    fake: FakeKubernetes
    #: The API calls of one creation: the Secret, the Pod, the Secret's owner.
    points: tuple[str, ...] = ("create secret", "create pod", "own secret")
    _holds: list[Any] = attrs.field(factory=list)

    @asynccontextmanager
    async def orchestrator(self, **kw: Any) -> AsyncIterator[Orchestrator]:
        kw.setdefault("probe", ready_probe)
        config = kw.pop("config", None) or make_config()
        k8s = KubernetesRuntime.with_transport(self.fake.transport(), replica="gw-1")
        async with open_kubernetes_sessions(k8s) as runtime:
            async with open_orchestrator_k8s(config, runtime, **kw) as orch:
                await until(lambda: orch.sweep.listed)  # its start-up calls are made
                yield orch

    def empty(self) -> bool:
        return not self.fake.names("pods") and not self.fake.names("secrets")

    def live(self) -> int:
        return len(self.fake.names("pods"))

    def kill(self, uh: str) -> None:
        self.fake.terminate(pod_name(uh), 137, reason="OOMKilled")

    def block(self, point: str) -> Callable[[], bool]:
        hold = self.fake.hold(len(self.fake.calls) + self.points.index(point))
        self._holds.append(hold)
        return hold.reached.is_set

    def release(self) -> None:
        for hold in self._holds:
            hold.release()


def open_orchestrator_k8s(config: Any, runtime: Any, **kw: Any) -> Any:
    from orchestrator import open_orchestrator

    return open_orchestrator(config, runtime, replica="gw-1", **kw)


@pytest.fixture(params=["podman", "kubernetes"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "podman":
        async with open_fake_runtime() as fake:
            yield PodmanBackend(fake)
    else:
        async with open_fake_kubernetes(auto_start=True, start_delay=0.05) as kube:
            yield KubernetesBackend(kube)


async def test_create_then_delete_leaves_nothing(
    backend: Backend, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        async with backend.orchestrator() as orch:
            session = await orch.get_or_create(ALICE)
            assert session.state == "ready"
            assert backend.live() == 1
            assert await orch.delete(session.user_hash, session.id)
            assert orch.get(UA) is None
            await until(backend.empty)


async def test_concurrent_creates_for_one_user_share_one_session(
    backend: Backend, autojump_clock: trio.abc.Clock
) -> None:
    got: list[Session] = []
    with trio.fail_after(60):
        async with backend.orchestrator() as orch:

            async def create() -> None:
                got.append(await orch.get_or_create(ALICE))

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(create)
            assert len({id(s) for s in got}) == 1
            await orch.get_or_create(BOB)
            assert backend.live() == 2
        assert backend.empty()  # the shutdown removed both


async def test_an_idle_session_ends(backend: Backend, autojump_clock: trio.abc.Clock) -> None:
    config = make_config(idle_timeout=5, cleanup_interval=1)
    with trio.fail_after(60):
        async with backend.orchestrator(config=config) as orch:
            session = await orch.get_or_create(ALICE)
            await trio.sleep(3)
            session.touch()  # traffic keeps it
            await trio.sleep(3)
            assert session.end_reason is None
            await session.ended.wait()
            assert session.end_reason == "idle"
            await until(backend.empty)


async def test_a_proxy_that_dies_ends_its_session_at_once(
    backend: Backend, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        async with backend.orchestrator() as orch:
            session = await orch.get_or_create(ALICE)
            other = await orch.get_or_create(BOB)
            backend.kill(session.user_hash)
            await session.ended.wait()
            assert session.end_reason == "proxy_exited"
            await until(lambda: backend.live() == 1)
            assert other.state == "ready"


async def test_shutdown_removes_every_session(
    backend: Backend, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        async with backend.orchestrator() as orch:
            sessions = [await orch.get_or_create(f"user{i}") for i in range(4)]
            await orch.aclose()
            assert all(s.ended.is_set() for s in sessions)
            assert backend.empty()


@pytest.mark.parametrize("how", ["caller-cancelled", "deleted", "shutdown"])
@pytest.mark.parametrize("point", [0, 1, 2, 3])
async def test_stopping_a_creation_at_every_step_leaves_nothing(
    backend: Backend, autojump_clock: trio.abc.Clock, point: int, how: str
) -> None:
    points: tuple[str, ...] = backend.points  # type: ignore[attr-defined]
    if point >= len(points):
        pytest.skip(f"this runtime creates a session in {len(points)} steps")
    errors: list[BaseException] = []

    async def creator(orch: Orchestrator, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
                await orch.get_or_create(ALICE)
            except SessionStartError as exc:
                errors.append(exc)

    with trio.fail_after(120):
        async with backend.orchestrator() as orch, trio.open_nursery() as nursery:
            reached = backend.block(points[point])
            scope = await nursery.start(creator, orch)
            await until(reached)
            await trio.testing.wait_all_tasks_blocked()
            session = orch.get(UA)
            assert session is not None
            assert session.state == "starting"
            if how == "caller-cancelled":
                scope.cancel()
            elif how == "deleted":
                assert await orch.delete(UA, session.id) or True
            backend.release()
            if how == "shutdown":
                await orch.aclose()
            await session.ended.wait()
            assert session.end_reason in ("abandoned", "deleted", "shutdown")
            assert orch.sessions() == []
        await trio.sleep(10)  # whatever the runtime finishes late has landed by now
        assert backend.empty()
