"""The orchestrator on Kubernetes: what only Kubernetes has, over the in-process fake API.

The session model itself (create, shared creates, delete, idle, death, shutdown, a creation
stopped at every step) runs once for both runtimes in ``test_session_model.py``; here are
the pod address, adoption across replicas, the sweep of a replica's own pods, a failed
start and the NetworkPolicy against the pods as made.

``KubernetesSessions`` gives the orchestrator the runtime it drives on Podman, over
``KubernetesRuntime``; the fake API server validates every object it receives against the
official schemas and simulates a kubelet (a new pod runs, gets an IP, turns ready). The
proxies themselves do not run here (``ready_probe``); they do in the end-to-end tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from c2lcore import user_hash
from orchestrator import (
    LABEL_REPLICA,
    Orchestrator,
    SessionStartError,
    open_kubernetes_sessions,
    open_orchestrator,
    pod_name,
)
from orchestrator._kubernetes import KubernetesRuntime
from orchestrator.testing import FakeKubernetes, open_fake_kubernetes

from ._orch import make_config, ready_probe, until

ALICE, BOB = "alice", "bob"


@pytest.fixture
async def fake() -> AsyncIterator[FakeKubernetes]:
    async with open_fake_kubernetes(auto_start=True, start_delay=0.05) as fake:
        yield fake


@asynccontextmanager
async def replica(
    fake: FakeKubernetes, name: str = "gw-1", **kw: Any
) -> AsyncIterator[Orchestrator]:
    k8s = KubernetesRuntime.with_transport(fake.transport(), replica=name)
    config = kw.pop("config", None) or make_config()
    kw.setdefault("probe", ready_probe)
    async with open_kubernetes_sessions(k8s) as runtime:
        async with open_orchestrator(config, runtime, replica=name, **kw) as orch:
            yield orch


def pods(fake: FakeKubernetes) -> list[str]:
    return fake.names("pods")


def labels_of(fake: FakeKubernetes, pod: str) -> dict[str, str]:
    meta = fake.objects[("pods", "default", pod)]["metadata"]
    return dict(meta["labels"])


async def test_a_session_is_one_pod_reached_by_its_ip(fake: FakeKubernetes) -> None:
    with trio.fail_after(10):
        async with replica(fake) as orch:
            session = await orch.get_or_create(ALICE)
            pod = pod_name(user_hash(ALICE))
            assert pods(fake) == [pod]
            assert session.address is not None
            assert session.address[0].startswith("10.0.0.")
            assert session.target == session.address
            assert labels_of(fake, pod)[LABEL_REPLICA] == "gw-1"
            assert fake.names("secrets") == [f"c2l-secret-{user_hash(ALICE)}"]
            assert await orch.delete(session.user_hash, session.id)
            await until(lambda: not pods(fake))
        assert fake.names("secrets") == []


async def test_a_second_replica_adopts_the_pod_and_never_deletes_it(fake: FakeKubernetes) -> None:
    with trio.fail_after(15):
        async with replica(fake, "gw-1") as one:
            first = await one.get_or_create(ALICE)
            async with replica(fake, "gw-2") as two:
                second = await two.get_or_create(ALICE)
                # one proxy, reached by both replicas, with the secret it was made with
                assert pods(fake) == [pod_name(user_hash(ALICE))]
                assert second.address == first.address
                assert second.secret == first.secret
                await two.delete(second.user_hash, second.id)
                await trio.sleep(0.3)
                assert pods(fake) == [pod_name(user_hash(ALICE))]
                await two.get_or_create(BOB)  # gw-2's own session
            # gw-2 stopped: its own pod is gone, gw-1's is not
            assert pods(fake) == [pod_name(user_hash(ALICE))]
            assert one.get(first.user_hash) is first
            assert first.state == "ready"


async def test_a_session_on_another_replicas_pod_ends_when_that_pod_goes(
    fake: FakeKubernetes,
) -> None:
    with trio.fail_after(15):
        async with replica(fake, "gw-1") as one, replica(fake, "gw-2") as two:
            mine = await one.get_or_create(ALICE)
            adopted = await two.get_or_create(ALICE)
            await one.delete(mine.user_hash, mine.id)
            await adopted.ended.wait()  # its proxy is gone: clients reconnect
            assert pods(fake) == []


async def test_a_replica_sweeps_only_its_own_leftovers(fake: FakeKubernetes) -> None:
    with trio.fail_after(15):
        k8s = KubernetesRuntime.with_transport(fake.transport(), replica="gw-old")
        async with k8s:
            await k8s.create_session(
                user_hash=user_hash(ALICE), session_id="s" * 32, secret="x", image="i"
            )
        k8s = KubernetesRuntime.with_transport(fake.transport(), replica="gw-1")
        async with k8s:
            await k8s.create_session(
                user_hash=user_hash(BOB), session_id="t" * 32, secret="y", image="i"
            )
        # gw-1 restarts with the same id (its container restarted in the same pod)
        async with replica(fake, "gw-1"):
            await until(lambda: pod_name(user_hash(BOB)) not in pods(fake))
            assert pods(fake) == [pod_name(user_hash(ALICE))]  # another replica's: left


async def test_a_start_that_fails_leaves_nothing(fake: FakeKubernetes) -> None:
    with trio.fail_after(10):
        async with replica(fake) as orch:
            await until(lambda: orch.sweep.listed)  # the start's sweep listed (calls made)
            fake.fail(len(fake.calls))  # the next API call (the Secret's create) fails
            with pytest.raises(SessionStartError):
                await orch.get_or_create(ALICE)
            await until(lambda: not pods(fake) and not fake.names("secrets"))
            assert (await orch.get_or_create(ALICE)).state == "ready"


async def test_the_network_policy_selects_the_pods_the_runtime_makes(fake: FakeKubernetes) -> None:
    """The shipped NetworkPolicy's selectors against a pod as the runtime really made it."""
    from orchestrator._k8s_objects import deployment_manifests

    from .test_k8s_manifests import _selects

    with trio.fail_after(10):
        async with replica(fake) as orch:
            session = await orch.get_or_create(ALICE)
            pod = fake.objects[("pods", "default", pod_name(session.user_hash))]
    objects = deployment_manifests()
    policy = next(
        o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "c2l-proxy"
    )
    gateway = next(o for o in objects if o["kind"] == "Deployment")
    labels = pod["metadata"]["labels"]
    assert _selects(policy["spec"]["podSelector"], labels)
    assert policy["spec"]["egress"] == []
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert _selects(peer["podSelector"], gateway["spec"]["template"]["metadata"]["labels"])
    assert not _selects(peer["podSelector"], labels)  # a proxy cannot reach another


async def test_resource_figures_come_from_the_metrics_api_where_it_exists(
    fake: FakeKubernetes,
) -> None:
    with trio.fail_after(10):
        async with replica(fake) as orch:
            session = await orch.get_or_create(ALICE)
            # No metrics-server: no figures, and no error.
            assert (await orch.usage_all())[session.id].as_dict() == {
                "memoryBytes": None,
                "cpuSeconds": None,
            }
            fake.set_metrics(pod_name(session.user_hash), memory="20Mi", cpu="3m")
            usage = (await orch.usage_all())[session.id]
            assert usage.memory_bytes == 20 * 1024**2
            assert usage.cpu_cores is not None
            assert abs(usage.cpu_cores - 0.003) < 1e-9


def test_quantities() -> None:
    from decimal import Decimal

    from orchestrator._kubernetes import quantity

    assert quantity("20Mi") == 20 * 1024**2
    assert quantity("1.5Gi") == Decimal("1.5") * 1024**3
    assert quantity("3m") == Decimal("0.003")
    assert quantity("123456n") == Decimal("0.000123456")
    assert quantity("2k") == 2000
    assert quantity("2") == 2
