"""The fake Kubernetes API over real HTTP: what two gateway processes share.

:func:`orchestrator.testing.serve_fake_kubernetes_http` serves the same
:class:`~orchestrator.testing.FakeKubernetes` as the in-process transport on 127.0.0.1, and
:func:`~orchestrator.testing.write_kubeconfig` points ``KUBECONFIG`` at it, so the runtime
is built the way ``c2l serve`` builds it (:meth:`KubernetesRuntime.from_env`). Real sockets,
so the real clock: the delays (grace period, backoff) are kept short instead.
"""

from __future__ import annotations

import itertools
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

import wire
from c2lcore import BackoffPolicy
from orchestrator import PROXY_SELECTOR, RuntimeObjectError, RuntimeUnavailable, pod_name
from orchestrator._k8s_objects import secret_name
from orchestrator._kubernetes import KubernetesRuntime, PodEvent, SessionPod
from orchestrator.testing import (
    FakeKubernetes,
    open_fake_kubernetes,
    serve_fake_kubernetes_http,
    write_kubeconfig,
)

UA, UB, UC = "a" * 16, "b" * 16, "c" * 16
IMAGE = "localhost/c2l-proxy:test"
TOKEN = "t0ken"


@asynccontextmanager
async def served(**kw: Any) -> AsyncIterator[tuple[FakeKubernetes, str]]:
    """A fake API served on 127.0.0.1 for the block; yield it and its URL."""
    async with open_fake_kubernetes(**kw) as fake, trio.open_nursery() as nursery:
        url = await nursery.start(serve_fake_kubernetes_http, fake, "127.0.0.1", 0, TOKEN)
        yield fake, url
        nursery.cancel_scope.cancel()


@pytest.fixture
def kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    """Write a KUBECONFIG for a served fake and point the environment at it."""

    def point_at(url: str) -> Path:
        path = tmp_path / "kubeconfig"
        write_kubeconfig(path, url, token=TOKEN)
        monkeypatch.setenv("KUBECONFIG", str(path))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        return path

    return point_at


@asynccontextmanager
async def replica(name: str, **kw: Any) -> AsyncIterator[KubernetesRuntime]:
    async with KubernetesRuntime.from_env(namespace="default", replica=name, **kw) as rt:
        yield rt


@asynccontextmanager
async def watching(rt: KubernetesRuntime) -> AsyncIterator[list[PodEvent]]:
    events: list[PodEvent] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.watch_pods, PROXY_SELECTOR, events.append)
        yield events
        nursery.cancel_scope.cancel()


async def create(rt: KubernetesRuntime, user: str, secret: str = "sek") -> SessionPod:
    return await rt.create_session(user_hash=user, session_id="s1", secret=secret, image=IMAGE)


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.01)


def kinds(events: list[PodEvent], user: str) -> list[str]:
    return [e.kind for e in events if e.state.user_hash == user]


async def test_a_runtime_from_kubeconfig_creates_lists_watches_and_removes(
    kubeconfig: Callable[[str], Path],
) -> None:
    with trio.fail_after(30):
        async with served() as (fake, url):
            kubeconfig(url)
            async with replica("gw-1") as rt, watching(rt) as events:
                assert rt.server == url
                made = await create(rt, UA)
                assert fake.names("pods") == [pod_name(UA)]
                assert fake.refused == []
                listed = await rt.list_labelled(PROXY_SELECTOR)
                assert (listed.pods, listed.secrets) == ((pod_name(UA),), (secret_name(UA),))
                ip = fake.assign_ip(pod_name(UA))
                fake.set_phase(pod_name(UA), "Running")
                fake.set_ready(pod_name(UA), True)
                assert await rt.wait_ready(UA, made.uid) == (ip, wire.PROXY_PORT)
                assert kinds(events, UA) == ["ready"]
                assert await rt.remove_session(UA)  # confirmed by the watch's DELETED
                assert kinds(events, UA) == ["ready", "deleting", "gone"]
                assert fake.names("pods") == []
                assert rt.address(UA) is None


async def test_a_wrong_token_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(30):
        async with served() as (_, url):
            write_kubeconfig(tmp_path / "config", url, token="wrong")
            monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
            monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            async with replica("gw-1") as rt:
                with pytest.raises(RuntimeObjectError, match="HTTP 401"):
                    await rt.ping()


async def test_two_replicas_share_one_served_fake(kubeconfig: Callable[[str], Path]) -> None:
    with trio.fail_after(30):
        async with served(auto_start=True, start_delay=0.05) as (fake, url):
            kubeconfig(url)
            async with (
                replica("gw-1") as one,
                replica("gw-2") as two,
                watching(one) as seen_by_one,
                watching(two) as seen_by_two,
            ):
                made = await create(one, UA, secret="s3cret")
                address = await two.wait_ready(UA)
                pod = fake.pod(pod_name(UA))
                assert pod is not None
                assert address == (pod["status"]["podIP"], wire.PROXY_PORT)
                state = two.state(UA)
                assert state is not None
                assert state.replica == "gw-1"
                assert "ready" in kinds(seen_by_two, UA)
                # the second replica's create adopts the first's pod (409), deletes nothing
                adopted = await create(two, UA, secret="other")
                assert (adopted.adopted, adopted.uid, adopted.secret) == (True, made.uid, "s3cret")
                await create(two, UB)
                await until(lambda: one.address(UB) is not None)
                assert fake.names("pods") == sorted([pod_name(UA), pod_name(UB)])
                assert fake.watches == 2
                assert "gone" not in kinds(seen_by_one, UA) + kinds(seen_by_two, UA)


async def test_a_watch_whose_client_goes_away_is_released() -> None:
    with trio.fail_after(30):
        async with served() as (fake, url), httpx2.AsyncClient(trust_env=False) as client:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            watch = f"{url}/api/v1/namespaces/default/pods?watch=true"
            async with client.stream("GET", watch, headers=headers) as response:
                assert response.status_code == 200
                assert response.headers.get("transfer-encoding") == "chunked"
                assert fake.watches == 1
                fake.add(
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {"name": "p", "labels": {"app": "x"}},
                        "spec": {"containers": [{"name": "c", "image": "i"}]},
                    }
                )
                lines = response.aiter_lines()
                assert '"ADDED"' in await lines.__anext__()  # streamed before the body ends
                fake.set_phase("p", "Running")
                assert '"MODIFIED"' in await lines.__anext__()
                await lines.aclose()
            # the client closed the stream (and with it the connection): the fake lets go
            await until(lambda: fake.watches == 0)
            # the server still answers, on a new connection
            answer = await client.get(f"{url}/api/v1/namespaces/default/pods", headers=headers)
            assert [p["metadata"]["name"] for p in answer.json()["items"]] == ["p"]


async def test_an_outage_drops_open_watches_and_new_requests() -> None:
    with trio.fail_after(30):
        async with served() as (fake, url), httpx2.AsyncClient(trust_env=False) as client:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            pods = f"{url}/api/v1/namespaces/default/pods"
            async with client.stream("GET", f"{pods}?watch=true", headers=headers) as response:
                assert fake.watches == 1
                fake.set_down(True)
                assert fake.watches == 0
                # dropped mid-body, not ended cleanly (that would be a watch's timeout)
                with pytest.raises(httpx2.RemoteProtocolError):
                    await response.aread()
            with pytest.raises(httpx2.RemoteProtocolError, match="without sending a response"):
                await client.get(pods, headers=headers)
            assert len(fake.refused_at) == 1
            fake.set_down(False)
            assert (await client.get(pods, headers=headers)).json()["items"] == []


async def test_a_runtimes_watch_cancelled_leaves_no_watcher(
    kubeconfig: Callable[[str], Path],
) -> None:
    with trio.fail_after(30):
        async with served() as (fake, url):
            kubeconfig(url)
            async with replica("gw-1") as rt:
                async with watching(rt):
                    await until(lambda: fake.watches == 1)
                await until(lambda: fake.watches == 0)


async def test_an_outage_drops_the_watch_which_backs_off_and_resumes(
    kubeconfig: Callable[[str], Path],
) -> None:
    policy = BackoffPolicy(base=0.1, factor=2.0, cap=10.0, jitter=False)
    with trio.fail_after(30):
        async with served(auto_start=True, start_delay=0.05) as (fake, url):
            kubeconfig(url)
            async with replica("gw-1", backoff_policy=policy) as rt, watching(rt) as events:
                await create(rt, UA)
                await rt.wait_ready(UA)
                fake.set_down(True)
                down_at = trio.current_time()
                assert fake.watches == 0
                fake.force_delete("pods", pod_name(UA))  # while the API is away
                with pytest.raises(RuntimeUnavailable, match="not reachable"):
                    await rt.ping()
                await until(lambda: len(fake.refused_at) >= 4)
                # the ping's refusal, then the watch's list attempts after 0.1, 0.3, 0.7 s
                attempts = sorted(t - down_at for t in fake.refused_at)[1:4]
                assert attempts[0] >= 0.1
                gaps = [b - a for a, b in itertools.pairwise(attempts)]
                assert gaps[0] >= 0.2 * 0.95
                assert gaps[1] >= 0.4 * 0.95
                assert "gone" not in kinds(events, UA)
                fake.set_down(False)
                await until(lambda: "gone" in kinds(events, UA))
                await until(lambda: fake.watches == 1)
                await create(rt, UB)
                await rt.wait_ready(UB)


CHILD = textwrap.dedent(
    """
    import trio
    from orchestrator import PROXY_SELECTOR
    from orchestrator._kubernetes import KubernetesRuntime

    async def main():
        async with KubernetesRuntime.from_env(namespace="default") as rt:
            print(*(await rt.list_labelled(PROXY_SELECTOR)).pods)

    trio.run(main)
    """
)


async def test_another_process_lists_the_pods_through_the_kubeconfig(
    kubeconfig: Callable[[str], Path],
) -> None:
    with trio.fail_after(60):
        async with served() as (fake, url):
            path = kubeconfig(url)
            async with replica("gw-1") as rt:
                await create(rt, UA)
                await create(rt, UB)
            calls = len(fake.calls)
            env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
            env["KUBECONFIG"] = str(path)
            child = await trio.run_process(
                [sys.executable, "-c", CHILD], env=env, capture_stdout=True, capture_stderr=True
            )
            assert child.stdout.decode().split() == [pod_name(UA), pod_name(UB)]
            # it asked this fake: a list of pods and one of secrets, over HTTP
            assert [c[0] for c in fake.calls[calls:]] == ["GET", "GET"]
