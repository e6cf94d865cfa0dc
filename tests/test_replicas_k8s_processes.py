"""Two ``c2l serve`` processes (two gateway replicas) over one fake Kubernetes API.

The fake API is served over real HTTP on 127.0.0.1 (``serve_fake_kubernetes_http``) and
reached through a KUBECONFIG; its kubelet runs each session pod's real proxy on a loopback
address of its own (``tests/_kubelet.py``). A user's desktop agent lands on one replica and
their web client on the other, and they stream through one proxy. Then the first replica
is killed with SIGKILL: it cannot clean up, its own pod goes (as the cluster would delete
it), the garbage collector removes the session pods it owned, the second replica's watch
sees them go, and its client hears that the session ended; a new session is then the second
replica's own, and its SIGTERM removes it.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

import wire
from gateway._auth import DevIssuer
from orchestrator.testing import serve_fake_kubernetes_http, write_kubeconfig

from ._kubelet import KubeletFake, open_kubelet_fake
from .conftest import free_port


def gateway_pod(name: str) -> dict[str, Any]:
    """A replica's own pod, as its Deployment would have made it (the sessions' owner)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "c2l-gateway"}},
        "spec": {"containers": [{"name": "gateway", "image": "localhost/c2l-gateway:test"}]},
    }


async def _serve(
    nursery: trio.Nursery, name: str, env: dict[str, str], tmp: Path
) -> tuple[trio.Process, str]:
    port = free_port()
    out = os.open(tmp / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "c2l", "serve", "--port", str(port)],
            env={**env, "C2L_REPLICA_ID": name},
            stdout=out,
            stderr=out,
        )
    finally:
        os.close(out)  # the child has its own
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=2) as http:
        with trio.fail_after(30):
            while True:
                try:
                    if (await http.get(f"{url}/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, (tmp / f"{name}.log").read_text()
                await trio.sleep(0.1)
    return proc, url


async def _next(ws: Any) -> wire.Message:
    with trio.fail_after(15):
        return wire.decode(await ws.get_message())


async def _stream_once(desk: Any, web: Any, rid: str) -> None:
    await web.send_message(wire.encode(wire.Request(rid, "POST", "/api/chat", {}, {})))
    got = await _next(desk)
    while not isinstance(got, wire.Request):
        got = await _next(desk)
    await desk.send_message(wire.encode(wire.ResponseStart(got.id, 200, {})))
    await desk.send_message(wire.encode(wire.Chunk(got.id, '{"done":true}\n')))
    await desk.send_message(wire.encode(wire.ResponseEnd(got.id)))
    start = await _next(web)
    assert isinstance(start, wire.ResponseStart) and start.resume
    assert start == wire.ResponseStart(rid, 200, {}, "cloud", resume=start.resume)
    assert await _next(web) == wire.Chunk(rid, '{"done":true}\n', seq=1)
    assert await _next(web) == wire.ResponseEnd(rid)


async def _drain(ws: Any) -> None:
    """Read until the connection closes (ConnectionClosed)."""
    while True:
        await ws.get_message()


def _session_pods(fake: KubeletFake) -> list[str]:
    return [p for p in fake.names("pods") if p.startswith("c2l-pod-")]


async def test_two_replica_processes_meet_in_one_proxy_and_survive_a_sigkill(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async with open_kubelet_fake(start_delay=0.05) as fake:
        api = await nursery.start(functools.partial(serve_fake_kubernetes_http, fake))
        kubeconfig = tmp_path / "kubeconfig"
        write_kubeconfig(kubeconfig, api, namespace="default")
        for name in ("gw-1", "gw-2"):
            fake.add(gateway_pod(name))
        issuer = DevIssuer.load_or_create(tmp_path / "config" / "c2l" / "dev-jwt-key.pem")
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "C2L_RUNTIME": "kubernetes",
            "C2L_K8S_NAMESPACE": "default",
            "XDG_CONFIG_HOME": str(tmp_path / "config"),  # the dev issuer both replicas use
            "C2L_METRICS_ADDR": "127.0.0.1:0",
            "PYTHONUNBUFFERED": "1",
        }
        one, url1 = await _serve(nursery, "gw-1", env, tmp_path)
        two, url2 = await _serve(nursery, "gw-2", env, tmp_path)
        try:
            headers = [(b"authorization", f"Bearer {issuer.sign('dana')}".encode())]
            bridge = url1.replace("http", "ws") + "/ws/bridge"
            stream = url2.replace("http", "ws") + "/ws/stream"
            async with trio_websocket.open_websocket_url(bridge, extra_headers=headers) as desk:
                assert isinstance(await _next(desk), wire.AuthOk)
                async with trio_websocket.open_websocket_url(stream, extra_headers=headers) as web:
                    assert isinstance(await _next(web), wire.AuthOk)
                    (pod,) = _session_pods(fake)
                    owner = fake.objects[("pods", "default", pod)]["metadata"]["ownerReferences"]
                    assert [o["name"] for o in owner] == ["gw-1"]
                    await _stream_once(desk, web, "q1")

                    # gw-1 dies without a word; the cluster deletes its pod, and the
                    # garbage collector the sessions it owned.
                    one.send_signal(signal.SIGKILL)
                    with trio.fail_after(10):
                        await one.wait()
                    fake.force_delete("pods", "gw-1")
                    with trio.fail_after(15):
                        while _session_pods(fake):
                            await trio.sleep(0.05)
                        # gw-2 saw the pod go: its client hears the session ended
                        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                            await _drain(web)
                        assert closed.value.reason.code == wire.CLOSE_SESSION_ENDED

            # The user comes back, all through gw-2: a session of gw-2's own.
            bridge2 = url2.replace("http", "ws") + "/ws/bridge"
            async with (
                trio_websocket.open_websocket_url(bridge2, extra_headers=headers) as desk,
                trio_websocket.open_websocket_url(stream, extra_headers=headers) as web,
            ):
                assert isinstance(await _next(desk), wire.AuthOk)
                assert isinstance(await _next(web), wire.AuthOk)
                (pod,) = _session_pods(fake)
                owner = fake.objects[("pods", "default", pod)]["metadata"]["ownerReferences"]
                assert [o["name"] for o in owner] == ["gw-2"]
                await _stream_once(desk, web, "q2")
            two.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                assert await two.wait() == 0
            assert _session_pods(fake) == []
        finally:
            for proc in (one, two):
                if proc.poll() is None:
                    proc.kill()
                    with trio.move_on_after(5):
                        await proc.wait()
