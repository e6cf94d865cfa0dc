"""The Kubernetes runtime (lightkube under trio) against the in-process fake API server.

No cluster runs here: :class:`orchestrator.testing.FakeKubernetes` answers lightkube through
an injected transport and validates every object it receives against the official schemas
(strict), so what these tests accept a real API server would too, as far as the schemas go.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import kubernetes_validate
import pytest
import trio
import trio.testing

import wire
from c2lcore import BackoffPolicy
from orchestrator import (
    LABEL_REPLICA,
    PROXY_SELECTOR,
    RuntimeObjectError,
    RuntimeUnavailable,
    _k8s_objects,
    pod_name,
)
from orchestrator._k8s_objects import SECRET_KEY, secret_name
from orchestrator._kubernetes import KubernetesRuntime, PodEvent, SessionPod
from orchestrator.testing import FakeKubernetes, open_fake_kubernetes

UA, UB, UC = "a" * 16, "b" * 16, "c" * 16
IMAGE = "localhost/c2l-proxy:test"


@asynccontextmanager
async def runtime(
    fake: FakeKubernetes, replica: str = "gw-1", **kw: Any
) -> AsyncIterator[KubernetesRuntime]:
    async with KubernetesRuntime.with_transport(fake.transport(), replica=replica, **kw) as rt:
        yield rt


@asynccontextmanager
async def watching(
    rt: KubernetesRuntime,
) -> AsyncIterator[list[PodEvent]]:
    """Run ``rt``'s pod watch for the block; yield the events it reports."""
    events: list[PodEvent] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.watch_pods, PROXY_SELECTOR, events.append)
        yield events
        nursery.cancel_scope.cancel()


async def create(
    rt: KubernetesRuntime, user: str, session: str = "s1", secret: str = "sek"
) -> SessionPod:
    return await rt.create_session(user_hash=user, session_id=session, secret=secret, image=IMAGE)


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.01)


def kinds(events: list[PodEvent], user: str) -> list[str]:
    return [e.kind for e in events if e.state.user_hash == user]


def received(obj: dict[str, Any]) -> dict[str, Any]:
    """An object as a client would send it (what the server adds removed)."""
    obj = copy.deepcopy(obj)
    obj.pop("status", None)
    for key in ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp"):
        obj["metadata"].pop(key, None)
    obj["metadata"].pop("deletionGracePeriodSeconds", None)
    return obj


async def test_create_makes_a_valid_pod_and_a_secret_owned_by_it() -> None:
    with trio.fail_after(30):
        async with open_fake_kubernetes() as fake, runtime(fake) as rt:
            made = await create(rt, UA, secret="s3cret")
            assert not made.adopted
            assert made.secret == "s3cret"
            assert fake.refused == []
            pod = fake.objects[("pods", "default", pod_name(UA))]
            secret = fake.objects[("secrets", "default", secret_name(UA))]
            for version in ("1.34.0", "1.36.0"):
                for obj in (pod, secret):
                    kubernetes_validate.validate(received(obj), version, strict=True)
            assert pod["metadata"]["uid"] == made.uid
            assert pod["metadata"]["labels"][LABEL_REPLICA] == "gw-1"
            assert secret["metadata"]["ownerReferences"] == [
                {"apiVersion": "v1", "kind": "Pod", "name": pod_name(UA), "uid": made.uid}
            ]
            assert base64.b64decode(secret["data"][SECRET_KEY]).decode() == "s3cret"
            (env,) = [
                e for e in pod["spec"]["containers"][0]["env"] if e["name"] == wire.SECRET_ENV
            ]
            assert env["valueFrom"]["secretKeyRef"] == {"name": secret_name(UA), "key": SECRET_KEY}


@pytest.mark.parametrize(
    ("path", "value", "refused_by"),
    [
        # a misspelt field: lightkube's model would drop it, the runtime refuses it first
        (("securityContext", "readOnlyRootFileSystem"), True, "lightkube"),
        # a value the model keeps but the official schema refuses: the fake answers 422
        (("resources", "limits", "memory"), {"a": 1}, "fake"),
    ],
)
async def test_an_invalid_pod_is_refused_and_creation_leaves_nothing(
    autojump_clock: trio.abc.Clock,
    monkeypatch: pytest.MonkeyPatch,
    path: tuple[str, ...],
    value: object,
    refused_by: str,
) -> None:
    real = _k8s_objects.session_pod

    def broken(**kw: Any) -> dict[str, Any]:
        pod = real(**kw)
        node = pod["spec"]["containers"][0]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return pod

    monkeypatch.setattr("orchestrator._kubernetes.session_pod", broken)
    with trio.fail_after(30):
        async with open_fake_kubernetes() as fake, runtime(fake) as rt:
            with pytest.raises(RuntimeObjectError) as info:
                await create(rt, UA)
            if refused_by == "fake":
                assert info.value.status == 422
                assert "Pod is invalid" in str(info.value)
                assert len(fake.refused) == 1
            else:
                assert path[-1] in str(info.value)
                assert fake.refused == []
            await trio.sleep(5)
            assert fake.objects == {}  # the Secret made first is deleted again


async def test_a_second_create_adopts_the_live_pod_and_deletes_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(30):
        async with (
            open_fake_kubernetes(auto_start=True) as fake,
            runtime(fake, "gw-1") as one,
            runtime(fake, "gw-2") as two,
            watching(two) as events,
        ):
            first = await create(one, UA, "s1", "first-secret")
            second = await create(two, UA, "s2", "second-secret")
            assert second.adopted
            assert (second.uid, second.session_id, second.secret) == (
                first.uid,
                "s1",
                "first-secret",
            )
            assert not any(method == "DELETE" for method, _, _ in fake.calls)
            pod = fake.objects[("pods", "default", pod_name(UA))]
            assert "deletionTimestamp" not in pod["metadata"]
            assert pod["metadata"]["labels"][LABEL_REPLICA] == "gw-1"
            # The adopting replica reaches the proxy from its own watch.
            assert await two.wait_ready(UA, second.uid) == (
                pod["status"]["podIP"],
                wire.PROXY_PORT,
            )
            assert "ready" in kinds(events, UA)


async def test_a_pod_being_deleted_is_not_adopted(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(30):
        async with open_fake_kubernetes() as fake, runtime(fake, "gw-1", delete_grace=30) as one:
            await create(one, UA)
            await one.remove_session(UA, confirm=False)
            await create(one, UB)  # another user is unaffected
            async with runtime(fake, "gw-2") as two:
                calls = len(fake.calls)
                with pytest.raises(RuntimeObjectError) as info:
                    await create(two, UA, "s2")
                assert info.value.status == 409
                # Only what this call made (its own Secret) is deleted again, no pod.
                deleted = [p for m, p, _ in fake.calls[calls:] if m == "DELETE"]
                assert deleted == [f"/api/v1/namespaces/default/secrets/{secret_name(UA)}"]
                pod = fake.objects[("pods", "default", pod_name(UA))]
                assert pod["metadata"]["labels"][LABEL_REPLICA] == "gw-1"


async def creator(
    rt: KubernetesRuntime,
    outcome: list[object],
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.CancelScope() as scope:
        task_status.started(scope)
        try:
            outcome.append(await create(rt, UA))
        except RuntimeObjectError as exc:
            outcome.append(exc)


@pytest.mark.parametrize("how", ["cancelled", "failed"])
async def test_cancellation_or_failure_at_every_call_of_creation_leaves_nothing(
    autojump_clock: trio.abc.Clock, how: str
) -> None:
    points = 0
    with trio.fail_after(300):
        for index in range(20):
            async with open_fake_kubernetes() as fake, runtime(fake) as rt:
                outcome: list[object] = []
                hold = fake.hold(index)
                if how == "failed":
                    fake.fail(index, 500)
                    hold.release()

                async with trio.open_nursery() as nursery:
                    scope = await nursery.start(creator, rt, outcome)
                    with trio.move_on_after(5):
                        await hold.reached.wait()
                    if not hold.reached.is_set():
                        # Creation made fewer calls than index: every point was covered.
                        assert outcome and not isinstance(outcome[0], Exception)
                        break
                    points += 1
                    if how == "cancelled":
                        scope.cancel()
                        hold.release()
                await trio.sleep(10)  # grace periods and garbage collection
                if how == "cancelled":
                    assert outcome == []
                else:
                    assert isinstance(outcome[0], RuntimeObjectError)
                assert fake.objects == {}, (index, fake.names("pods"), fake.names("secrets"))
    # The Secret, the Pod, the Secret's owner: at least three points of creation.
    assert points >= 3


async def test_remove_deletes_waits_for_deleted_and_is_idempotent(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(30):
        async with (
            open_fake_kubernetes(auto_start=True) as fake,
            runtime(fake, delete_grace=2) as rt,
            watching(rt) as events,
        ):
            made = await create(rt, UA)
            await rt.wait_ready(UA, made.uid)
            t0 = trio.current_time()
            assert await rt.remove_session(UA)
            # Confirmed by the watch: the pod is gone from the server, not just terminating.
            assert trio.current_time() - t0 >= 2
            assert fake.objects == {}
            assert kinds(events, UA)[-2:] == ["deleting", "gone"]
            assert rt.address(UA) is None
            assert await rt.remove_session(UA)  # missing is fine
            deletes = [p for m, p, q in fake.calls if m == "DELETE" and "pods" in p]
            assert len(deletes) == 2
            query = next(q for m, p, q in fake.calls if m == "DELETE" and "pods" in p)
            assert "gracePeriodSeconds=2" in query


async def test_the_watch_reports_readiness_address_oom_and_deletion(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(30):
        async with (
            open_fake_kubernetes() as fake,
            runtime(fake) as rt,
            watching(rt) as events,
        ):
            await create(rt, UA)
            name = pod_name(UA)
            await until(lambda: rt.state(UA) is not None)
            assert rt.address(UA) is None
            fake.set_phase(name, "Running")
            ip = fake.assign_ip(name)
            fake.set_ready(name, True)
            await until(lambda: "ready" in kinds(events, UA))
            assert rt.address(UA) == (ip, wire.PROXY_PORT)
            fake.set_ready(name, False)
            await until(lambda: "unready" in kinds(events, UA))
            fake.terminate(name, 137, reason="OOMKilled")
            await until(lambda: "died" in kinds(events, UA))
            died = next(e for e in events if e.kind == "died").state
            assert (died.exit_code, died.reason, died.phase) == (137, "OOMKilled", "Failed")
            assert rt.address(UA) is None
            assert await rt.remove_session(UA)
            assert kinds(events, UA) == ["ready", "unready", "died", "deleting", "gone"]


async def test_wait_ready_fails_when_the_proxy_dies_first(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(30):
        async with open_fake_kubernetes() as fake, runtime(fake) as rt, watching(rt):
            made = await create(rt, UA)
            async with trio.open_nursery() as nursery:
                errors: list[Exception] = []

                async def waiter() -> None:
                    try:
                        await rt.wait_ready(UA, made.uid)
                    except RuntimeObjectError as exc:
                        errors.append(exc)

                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                fake.terminate(pod_name(UA), 137, reason="OOMKilled")
            assert "OOMKilled" in str(errors[0])


async def test_410_gone_relists_at_once_and_the_watch_goes_on(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A backoff so long that only an immediate relist passes within the bound.
    slow = BackoffPolicy(base=1000.0, cap=1000.0, jitter=False)
    with trio.fail_after(60):
        async with (
            open_fake_kubernetes(auto_start=True) as fake,
            runtime(fake, backoff_policy=slow) as rt,
            watching(rt) as events,
        ):
            a, _b = await create(rt, UA), await create(rt, UB)
            await rt.wait_ready(UA, a.uid)
            lists_before = sum(1 for m, p, q in fake.calls if m == "GET" and p.endswith("/pods"))
            fake.compact()
            fake.end_watches()  # lightkube watches again from its last version: 410
            fake.force_delete("pods", pod_name(UB))  # meanwhile: only a new list shows it
            await until(lambda: "gone" in kinds(events, UB))
            lists = sum(1 for m, p, q in fake.calls if m == "GET" and p.endswith("/pods"))
            assert lists == lists_before + 1
            # and it goes on watching
            await create(rt, UC)
            await until(lambda: "ready" in kinds(events, UC))


async def test_an_api_outage_restarts_the_watch_with_backoff(
    autojump_clock: trio.abc.Clock,
) -> None:
    policy = BackoffPolicy(base=1.0, factor=2.0, cap=60.0, jitter=False)
    with trio.fail_after(120):
        async with (
            open_fake_kubernetes(auto_start=True) as fake,
            runtime(fake, backoff_policy=policy) as rt,
            watching(rt) as events,
        ):
            await create(rt, UA)
            await until(lambda: "ready" in kinds(events, UA))
            fake.set_down(True)
            down_at = trio.current_time()
            fake.force_delete("pods", pod_name(UA))  # happens while the API is away
            await trio.sleep(20)
            # list attempts 1, 3, 7, 15 s after the stream broke: 1 s, then doubling
            attempts = [t - down_at for t in fake.refused_at]
            assert attempts == pytest.approx([1.0, 3.0, 7.0, 15.0], abs=0.01)
            assert "gone" not in kinds(events, UA)
            fake.set_down(False)
            await until(lambda: "gone" in kinds(events, UA))
            await create(rt, UB)
            await until(lambda: "ready" in kinds(events, UB))


async def test_sweep_deletes_only_this_replicas_pods(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(30):
        async with (
            open_fake_kubernetes() as fake,
            runtime(fake, "gw-1") as one,
            runtime(fake, "gw-2") as two,
        ):
            await create(one, UA)
            await create(one, UB)
            await create(two, UC)
            assert sorted(await one.sweep()) == [pod_name(UA), pod_name(UB)]
            await trio.sleep(5)
            assert fake.names("pods") == [pod_name(UC)]
            assert fake.names("secrets") == [secret_name(UC)]
            assert (
                "deletionTimestamp"
                not in fake.objects[("pods", "default", pod_name(UC))]["metadata"]
            )
            listed = await two.list_labelled(PROXY_SELECTOR)
            assert (listed.pods, listed.secrets) == ((pod_name(UC),), (secret_name(UC),))
            with pytest.raises(ValueError, match="replica"):
                await KubernetesRuntime.with_transport(fake.transport()).sweep()


def gateway_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "c2l-gateway"}},
        "spec": {"containers": [{"name": "gateway", "image": "localhost/c2l:test"}]},
    }


async def test_a_replica_that_disappears_has_its_sessions_garbage_collected(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(30):
        async with open_fake_kubernetes(auto_start=True) as fake:
            fake.add(gateway_pod("gw-1"))
            fake.add(gateway_pod("gw-2"))
            async with (
                runtime(fake, "gw-1") as one,
                runtime(fake, "gw-2") as two,
                watching(two) as events,
            ):
                owner = await one.resolve_owner()
                assert owner is not None
                assert owner["uid"] == fake.objects[("pods", "default", "gw-1")]["metadata"]["uid"]
                await two.resolve_owner()
                await create(one, UA)
                await create(one, UB)
                await create(two, UC)
                await until(lambda: all(two.address(u) for u in (UA, UB, UC)))
                fake.force_delete("pods", "gw-1")  # its node died
                await until(lambda: {"gone"} <= set(kinds(events, UA)) & set(kinds(events, UB)))
                await trio.sleep(5)
                assert fake.names("pods") == sorted(["gw-2", pod_name(UC)])
                assert fake.names("secrets") == [secret_name(UC)]
                assert "gone" not in kinds(events, UC)
                assert two.address(UA) is None
                assert two.address(UC) is not None


async def test_ping_and_an_unreachable_api(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(30):
        async with open_fake_kubernetes() as fake, runtime(fake) as rt:
            await rt.ping()
            fake.set_down(True)
            with pytest.raises(RuntimeUnavailable, match="not reachable"):
                await rt.ping()
            with pytest.raises(RuntimeUnavailable):
                await create(rt, UA)
            fake.set_down(False)
            assert fake.objects == {}


def test_from_env_refuses_an_exec_plugin(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        """
apiVersion: v1
kind: Config
current-context: c
contexts: [{name: c, context: {cluster: k, user: u}}]
clusters: [{name: k, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {exec: {apiVersion: client.authentication.k8s.io/v1beta1,
  command: aws}}}]
"""
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(RuntimeUnavailable, match="exec plugin"):
        KubernetesRuntime.from_env(namespace="c2l")
