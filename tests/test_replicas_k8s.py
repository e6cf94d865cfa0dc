"""Two gateway replicas on one Kubernetes API (the in-process fake): what they share.

Each replica is a real ``serve_gateway`` with the Kubernetes runtime over the same fake API
server (which validates every object it receives). What every replica needs lives in the
namespace's Secrets (DESIGN.md section 6): the audit key and the ``c2l-direct`` signing
key, made by the first replica, and the users' tunnel registrations. The proxies do not
run in the fake; the session tests of ``test_orchestrator_k8s.py`` cover their pods.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
import trio_websocket

import wire
from c2lcore import Config
from gateway import RunningGateway, serve_gateway
from gateway._auth import DevIssuer
from orchestrator import LABEL_REPLICA, open_kubernetes_sessions
from orchestrator._kubernetes import KubernetesRuntime
from orchestrator.testing import FakeKubernetes, open_fake_kubernetes

from ._kubelet import open_kubelet_fake
from .test_direct_gateway import FakeDirect, start_fake_direct


@asynccontextmanager
async def gateway_replica(
    nursery: trio.Nursery, fake: FakeKubernetes, name: str, tmp_path: Path, **settings: Any
) -> AsyncIterator[RunningGateway]:
    config = Config(
        **settings,
        port=0,
        dev_key_path=tmp_path / "dev-key.pem",  # the test's token issuer, as an IdP would be
        metrics_addr="127.0.0.1:0",
        runtime="kubernetes",
        replica_id=name,
        allow_private_tunnels=True,
    )
    k8s = KubernetesRuntime.with_transport(fake.transport(), replica=name)
    stop = trio.Event()
    # The gateway's nursery inside the runtime's: its shutdown (every session's pod
    # deleted) is over before the API client closes.
    async with open_kubernetes_sessions(k8s) as runtime, trio.open_nursery() as inner:
        running: RunningGateway = await inner.start(
            functools.partial(serve_gateway, config, runtime=runtime, shutdown=stop)
        )
        try:
            yield running
        finally:
            stop.set()


async def test_two_replicas_share_keys_and_tunnel_registrations(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with open_fake_kubernetes(auto_start=True) as fake:
        async with (
            gateway_replica(nursery, fake, "gw-1", tmp_path) as one,
            gateway_replica(nursery, fake, "gw-2", tmp_path) as two,
            httpx.AsyncClient(timeout=10) as http,
        ):
            # One c2l-direct key for the deployment, kept in a Secret, not per replica.
            keys = [
                (await http.get(f"{gw.url}/.well-known/c2l-jwks.json")).json() for gw in (one, two)
            ]
            assert keys[0] == keys[1]
            assert one.gateway.audit_key is not None
            assert one.gateway.audit_key == two.gateway.audit_key
            assert "c2l-key-direct-jwt-key" in fake.names("secrets")
            assert "c2l-key-audit-hmac-key" in fake.names("secrets")

            # A tunnel registered through one replica is used by the other.
            direct = FakeDirect(jwks_url=f"{two.url}/.well-known/c2l-jwks.json")
            tunnel = await start_fake_direct(nursery, direct)
            token = DevIssuer.load_or_create(tmp_path / "dev-key.pem").sign("dana")
            auth = {"Authorization": f"Bearer {token}"}
            r = await http.put(f"{one.url}/api/desktop/tunnel", json={"url": tunnel}, headers=auth)
            assert r.status_code == 200, r.text
            assert any(name.startswith("c2l-tunnel-") for name in fake.names("secrets"))
            seen = (await http.get(f"{two.url}/api/desktop/tunnel", headers=auth)).json()
            assert seen["url"] == tunnel
            with trio.fail_after(20):
                r = await http.post(
                    f"{two.url}/api/ollama/api/chat", json={"model": "m"}, headers=auth
                )
            assert r.status_code == 200, r.text
            assert r.headers["x-c2l-route"] == "direct"
            lines = [json.loads(line) for line in r.text.splitlines()]
            assert lines[-1] == {"done": True}
            # ...and removed through the other replica, it is gone for both.
            assert (
                await http.delete(f"{two.url}/api/desktop/tunnel", headers=auth)
            ).status_code == 204
            await trio.sleep(2.1)  # past the replicas' short read cache
            assert (
                await http.get(f"{one.url}/api/desktop/tunnel", headers=auth)
            ).status_code == 404


async def _first(ws: Any) -> wire.Message:
    with trio.fail_after(10):
        return wire.decode(await ws.get_message())


async def test_agent_on_one_replica_and_web_client_on_the_other_meet_in_one_proxy(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Each replica resolves the user's proxy from its watch and dials it by pod IP (a real
    proxy here, run by the fake's kubelet on 127.0.1.N:8080)."""
    async with open_kubelet_fake() as fake:
        async with (
            gateway_replica(nursery, fake, "gw-1", tmp_path) as one,
            gateway_replica(nursery, fake, "gw-2", tmp_path) as two,
        ):
            token = DevIssuer.load_or_create(tmp_path / "dev-key.pem").sign("dana")
            headers = [(b"authorization", f"Bearer {token}".encode())]
            bridge_url = one.url.replace("http://", "ws://") + "/ws/bridge"
            stream_url = two.url.replace("http://", "ws://") + "/ws/stream"
            async with trio_websocket.open_websocket_url(bridge_url, extra_headers=headers) as desk:
                assert isinstance(await _first(desk), wire.AuthOk)
                async with trio_websocket.open_websocket_url(
                    stream_url, extra_headers=headers
                ) as web:
                    assert isinstance(await _first(web), wire.AuthOk)
                    assert len(fake.names("pods")) == 1  # one proxy for the user
                    request = wire.Request("q1", "POST", "/api/chat", {}, {"model": "m"})
                    await web.send_message(wire.encode(request))
                    got = await _first(desk)
                    while not isinstance(got, wire.Request):
                        got = await _first(desk)
                    await desk.send_message(wire.encode(wire.ResponseStart(got.id, 200, {})))
                    for i in range(3):
                        await desk.send_message(wire.encode(wire.Chunk(got.id, f"line {i}\n")))
                    await desk.send_message(wire.encode(wire.ResponseEnd(got.id)))
                    start = await _first(web)
                    assert isinstance(start, wire.ResponseStart) and start.resume
                    assert start == wire.ResponseStart("q1", 200, {}, "cloud", resume=start.resume)
                    chunks = [await _first(web) for _ in range(3)]
                    assert [c.data for c in chunks if isinstance(c, wire.Chunk)] == [
                        "line 0\n",
                        "line 1\n",
                        "line 2\n",
                    ]
                    assert await _first(web) == wire.ResponseEnd("q1")
            owners = {
                fake.objects[("pods", "default", p)]["metadata"]["labels"][LABEL_REPLICA]
                for p in fake.names("pods")
            }
            assert owners <= {"gw-1", "gw-2"}
        assert fake.names("pods") == []  # both replicas stopped: each removed its own
        assert fake.proxies == {}


async def test_traffic_through_another_replica_keeps_the_owners_session_alive(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The owner's reaper ends a session only when the proxy itself has been idle: the
    proxy reports its idle time on /health, and the owner's health check reads it."""
    fast = {"idle_timeout": 3.0, "cleanup_interval": 0.5, "health_interval": 0.5}
    async with open_kubelet_fake() as fake:
        async with (
            gateway_replica(nursery, fake, "gw-1", tmp_path, **fast) as one,
            gateway_replica(nursery, fake, "gw-2", tmp_path, **fast) as two,
        ):
            token = DevIssuer.load_or_create(tmp_path / "dev-key.pem").sign("dana")
            headers = [(b"authorization", f"Bearer {token}".encode())]
            # gw-1 makes the session's pod; then the user's agent and web client both come
            # through gw-2, so gw-1 relays nothing at all.
            async with httpx.AsyncClient(timeout=10) as http:
                auth = {"Authorization": f"Bearer {token}"}
                r = await http.post(f"{one.url}/api/streaming/create", headers=auth)
                assert r.status_code == 200, r.text
            owned = one.gateway.orchestrator.sessions()
            assert len(owned) == 1
            bridge_url = two.url.replace("http://", "ws://") + "/ws/bridge"
            stream_url = two.url.replace("http://", "ws://") + "/ws/stream"
            async with trio_websocket.open_websocket_url(bridge_url, extra_headers=headers) as desk:
                assert isinstance(await _first(desk), wire.AuthOk)
                async with trio_websocket.open_websocket_url(
                    stream_url, extra_headers=headers
                ) as web:
                    assert isinstance(await _first(web), wire.AuthOk)
                    for i in range(12):  # 6 s of requests through gw-2 only, twice the timeout
                        rid = f"q{i}"
                        request = wire.Request(rid, "POST", "/api/chat", {}, {"model": "m"})
                        await web.send_message(wire.encode(request))
                        got = await _first(desk)
                        while not isinstance(got, wire.Request):
                            got = await _first(desk)
                        await desk.send_message(wire.encode(wire.ResponseEnd(got.id)))
                        assert await _first(web) == wire.ResponseEnd(rid)
                        await trio.sleep(0.5)
                    assert owned[0].end_reason is None, owned[0].end_reason
                    # No traffic at all now: the owner's reaper ends it.
                    with trio.fail_after(15):
                        await owned[0].ended.wait()
                    assert owned[0].end_reason == "idle"
