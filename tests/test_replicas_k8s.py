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

import httpx
import trio

from c2lcore import Config
from gateway import RunningGateway, serve_gateway
from gateway._auth import DevIssuer
from orchestrator import open_kubernetes_sessions
from orchestrator._kubernetes import KubernetesRuntime
from orchestrator.testing import FakeKubernetes, open_fake_kubernetes

from .test_direct_gateway import FakeDirect, start_fake_direct


@asynccontextmanager
async def gateway_replica(
    nursery: trio.Nursery, fake: FakeKubernetes, name: str, tmp_path: Path
) -> AsyncIterator[RunningGateway]:
    config = Config(
        port=0,
        dev_key_path=tmp_path / "dev-key.pem",  # the test's token issuer, as an IdP would be
        metrics_addr="127.0.0.1:0",
        runtime="kubernetes",
        replica_id=name,
        allow_private_tunnels=True,
    )
    k8s = KubernetesRuntime.with_transport(fake.transport(), replica=name)
    async with open_kubernetes_sessions(k8s) as runtime:
        stop = trio.Event()
        running: RunningGateway = await nursery.start(
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
