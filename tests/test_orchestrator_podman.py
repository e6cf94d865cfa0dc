"""End-to-end tests of the orchestrator against the real rootless Podman REST service.

Needs the service (``C2L_PODMAN_URL``, default ``unix:///run/c2l/podman.sock``) and the
proxy image (``C2L_PROXY_IMAGE``, default ``localhost/c2l-proxy:latest``, made by
``c2l image build``). Skipped only when the socket does not answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from c2lcore import Config, user_hash
from orchestrator import (
    PROXY_SELECTOR,
    LabelledObjects,
    PodmanRuntime,
    SessionStartError,
    container_name,
    fallback_sessions_dir,
    network_name,
    object_labels,
    open_orchestrator,
    pod_name,
    proxy_get,
    remove_labelled,
)

from ._stack import C2L
from .conftest import PODMAN_URL, PROXY_IMAGE, free_port, need_podman

IMAGE = PROXY_IMAGE
MEMORY = 512 * 1024**2
CGROUP_V1_ROOTLESS = "Resource limits are not supported and ignored on cgroups V1 rootless"

pytestmark = pytest.mark.podman


@pytest.fixture(autouse=True)
def _podman_service() -> None:
    need_podman()  # a failure in CI, a skip elsewhere


def make_config(**kw: Any) -> Config:
    kw.setdefault("proxy_image", IMAGE)
    return Config(podman_url=PODMAN_URL, **kw)


@pytest.fixture
async def runtime() -> AsyncIterator[PodmanRuntime]:
    rt = PodmanRuntime(PODMAN_URL)
    try:
        # The image is a precondition, not something to skip over.
        await rt._request("GET", f"/images/{IMAGE}/json", what=f"find image {IMAGE}")
        yield rt
    finally:
        with trio.CancelScope(shield=True):
            await remove_labelled(rt)  # never leave anything for the next test
            await rt.aclose()


def timing(what: str, seconds: float) -> None:
    print(f"\n[timing] {what}: {seconds * 1000:.0f} ms")


def host_process_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


async def test_session_lifecycle_on_podman(runtime: PodmanRuntime) -> None:
    with trio.fail_after(90):
        async with open_orchestrator(make_config(), runtime) as orch:
            t0 = time.perf_counter()
            a = await orch.get_or_create("e2e|alice")
            timing("create to ready (first user)", time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = await orch.get_or_create("e2e|bob")
            timing("create to ready (second user)", time.perf_counter() - t0)
            ua, ub = user_hash("e2e|alice"), user_hash("e2e|bob")

            assert a.socket_path is not None
            code, body = await proxy_get(a.socket_path, "/health")
            assert code == 200
            assert json.loads(body)["status"] == "healthy"
            # the session directory: 0777 (the container's uid makes its socket there)
            # inside the sessions directory, 0700 and the Podman service user's own
            sock = Path(a.socket_path)
            assert stat.S_ISSOCK(os.lstat(sock).st_mode)
            assert stat.S_IMODE(os.lstat(sock.parent).st_mode) == 0o777
            root = os.lstat(sock.parent.parent)
            assert stat.S_IMODE(root.st_mode) == 0o700
            assert root.st_uid == os.stat(PODMAN_URL.removeprefix("unix://")).st_uid

            info = await runtime.inspect_container(container_name(ua))
            host = info["HostConfig"]
            assert info["Config"]["User"] == "1001:1001"
            assert host["ReadonlyRootfs"] is True
            # Podman 4.3 expands "ALL" into the list of default capabilities it dropped.
            assert "CAP_NET_RAW" in host["CapDrop"]
            assert "CAP_SETUID" in host["CapDrop"]
            assert "no-new-privileges" in host["SecurityOpt"]
            assert info["Config"]["Labels"]["cloudtolocalllm.session"] == a.id
            assert set(object_labels(ua, a.id).items()) <= set(info["Config"]["Labels"].items())
            binds = [m for m in info.get("Mounts") or [] if m.get("Type") != "tmpfs"]
            assert [(m["Type"], m["Source"], m["Destination"]) for m in binds] == [
                ("bind", str(sock.parent), "/run/c2l")
            ], binds
            assert "size=" in host["Tmpfs"]["/tmp"]
            # Resource limits: visible in inspect on cgroup v2 hosts; on rootless cgroup v1
            # Podman drops them at create and says so in the create answer.
            if host["Memory"]:
                assert host["Memory"] == MEMORY
                assert host["PidsLimit"] == 64
                assert (host["CpuQuota"], host["CpuPeriod"]) == (50_000, 100_000)
            else:
                assert any(CGROUP_V1_ROOTLESS in w for w in runtime.warnings[container_name(ua)])

            # What the kernel enforces on the proxy process, seen from the host.
            status = host_process_status(info["State"]["Pid"])
            assert status["NoNewPrivs"] == "1"
            assert int(status["CapEff"], 16) == 0
            assert int(status["CapPrm"], 16) == 0
            assert status["Uid"].split()[0] != "0"

            used = await orch.usage(a)
            print(f"\n[usage] proxy process: {used}")
            assert used.memory_bytes is not None
            assert 1_000_000 < used.memory_bytes < MEMORY
            assert used.cpu_seconds is not None
            assert used.cpu_seconds >= 0

            pod = await runtime.inspect_pod(pod_name(ua))
            assert not pod.get("InfraContainerID") and pod["NumContainers"] == 1  # no infra
            proxy = await runtime.inspect_container(container_name(ua))
            assert not (proxy["HostConfig"].get("PortBindings") or {})  # no port, no rootlessport
            assert list(proxy["NetworkSettings"]["Networks"]) == [network_name(ua)]

            net_a = await runtime.inspect_network(network_name(ua))
            net_b = await runtime.inspect_network(network_name(ub))
            assert net_a["options"]["isolate"] == "true"
            assert net_b["options"]["isolate"] == "true"
            assert net_a["internal"] is True and net_b["internal"] is True
            assert net_a["subnets"][0]["subnet"] != net_b["subnets"][0]["subnet"]
            assert net_a["labels"]["cloudtolocalllm.user"] == ua

            t0 = time.perf_counter()
            assert await orch.delete(ua, a.id)
            timing("teardown (delete)", time.perf_counter() - t0)
            left = await runtime.list_labelled(f"cloudtolocalllm.user={ua}")
            assert not left, left
            assert sock.parent.name not in os.listdir(sock.parent.parent)  # its directory went
            assert b.state == "ready"
            t0 = time.perf_counter()
        timing("teardown (orchestrator exit, one session)", time.perf_counter() - t0)
        assert await runtime.list_labelled(PROXY_SELECTOR) == LabelledObjects()


@pytest.mark.parametrize("after", [0.0, 0.02, 0.06, 0.12, 0.2, 0.35])
async def test_cancelling_mid_creation_leaves_nothing(runtime: PodmanRuntime, after: float) -> None:
    with trio.fail_after(60):
        with trio.move_on_after(after):
            async with open_orchestrator(make_config(), runtime) as orch:
                await orch.get_or_create("e2e|carol")
                await trio.sleep_forever()
        assert await runtime.list_labelled(PROXY_SELECTOR) == LabelledObjects()


async def test_leftovers_are_removed_at_start(runtime: PodmanRuntime) -> None:
    uh = "f" * 16
    labels = object_labels(uh, "from-an-earlier-run")
    await runtime.create_network(network_name(uh), labels)
    await runtime.create_network("c2l-test-not-ours", {"app": "other"})
    try:
        await runtime.create_pod(
            pod_name(uh),
            network=network_name(uh),
            labels=labels,
        )
        from orchestrator import ProxySpec

        await runtime.create_container(
            ProxySpec(container_name(uh), pod_name(uh), IMAGE, labels, {"C2L_PROXY_SECRET": "x"})
        )
        await runtime.start_pod(pod_name(uh))
        found = await runtime.list_labelled(PROXY_SELECTOR)
        assert container_name(uh) in found.containers
        assert pod_name(uh) in found.pods
        assert network_name(uh) in found.networks
        with trio.fail_after(30):
            t0 = time.perf_counter()
            async with open_orchestrator(make_config(), runtime) as orch:
                while not orch.sweep.done:  # removed in the background
                    await trio.sleep(0.05)
                timing("leftover removal at start (1 pod)", time.perf_counter() - t0)
                assert orch.sweep.removed == 1
                assert await runtime.list_labelled(PROXY_SELECTOR) == LabelledObjects()
                assert orch.sessions() == []
        # Objects without the project's label are not touched.
        assert (await runtime.inspect_network("c2l-test-not-ours"))["name"] == "c2l-test-not-ours"
    finally:
        await runtime.remove_network("c2l-test-not-ours")


async def test_missing_image_fails_cleanly(runtime: PodmanRuntime) -> None:
    with trio.fail_after(30):
        config = make_config(proxy_image="localhost/c2l-no-such-image:none")
        async with open_orchestrator(config, runtime) as orch:
            with pytest.raises(SessionStartError, match="c2l-no-such-image"):
                await orch.get_or_create("e2e|dave")
            assert await runtime.list_labelled(PROXY_SELECTOR) == LabelledObjects()


async def test_unreachable_socket_names_the_fix() -> None:
    from orchestrator import RuntimeUnavailable

    rt = PodmanRuntime("unix:///nonexistent/podman.sock")
    try:
        with trio.fail_after(10), pytest.raises(RuntimeUnavailable, match="c2l doctor"):
            await rt.ping()
    finally:
        await rt.aclose()


async def test_a_second_gateway_refuses_and_the_first_ones_sessions_live_on(
    runtime: PodmanRuntime, tmp_path: Path
) -> None:
    from ._stack import run_stack

    with run_stack(tmp_path / "first") as first:
        token = first.token("e2e|two-gateways")
        with trio.fail_after(120):
            async with httpx.AsyncClient(base_url=first.url, timeout=60) as http:
                auth = {"Authorization": f"Bearer {token}"}
                r = await http.post("/api/streaming/create", headers=auth)
                assert r.status_code == 200, r.text
                session = r.json()
                before = await runtime.list_labelled(PROXY_SELECTOR)
                assert before.pods
                second = await trio.run_process(
                    [*C2L, "serve", "--port", str(free_port())],
                    env={**first.env, "XDG_CONFIG_HOME": str(tmp_path / "second")},
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                err = second.stderr.decode()
                assert second.returncode == 1, err
                lines = [line for line in err.splitlines() if line.startswith("c2l serve:")]
                assert len(lines) == 1, err
                assert f"pid {first.proc.pid}" in lines[0]
                assert "replica" in lines[0] and "C2L_PODMAN_URL" in lines[0]
                await trio.sleep(2)  # had it swept anything, it would be gone by now
                assert await runtime.list_labelled(PROXY_SELECTOR) == before
                r = await http.get("/api/streaming/status", headers=auth)
                assert r.status_code == 200, r.text
                assert r.json()["sessionId"] == session["sessionId"]
                assert r.json()["state"] == "ready"
        replica = first.log.read_text().split("gateway replica ", 1)[1].split()[0]
        info = await runtime.inspect_container(container_name(user_hash("e2e|two-gateways")))
        assert info["Config"]["Labels"]["cloudtolocalllm.replica"] == replica


class Relay:
    """A unix socket at ``path`` relaying to the Podman socket ``target``, in threads (the
    gateway under test is a subprocess, and run_stack blocks the event loop); after
    :meth:`cut`, every connection is broken and new ones are refused: Podman is gone."""

    def __init__(self, path: Path, target: str) -> None:
        self.path = path
        self.target = target
        self.conns: list[socket.socket] = []
        self.gone = False
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                if self.gone:
                    client.close()
                    return
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(self.target)
                self.conns += [client, upstream]
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self.gone = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


async def test_podman_gone_at_shutdown_exits_1_with_one_line_naming_what_is_left(
    runtime: PodmanRuntime, tmp_path: Path
) -> None:
    from ._stack import run_stack

    relay = tmp_path / "relay.sock"
    podman = Relay(relay, PODMAN_URL.removeprefix("unix://"))
    env = {"C2L_PODMAN_URL": f"unix://{relay}", "C2L_METRICS_ADDR": f"127.0.0.1:{free_port()}"}
    with run_stack(tmp_path, env=env) as stack, trio.fail_after(120):
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
            for i in range(3):
                auth = {"Authorization": f"Bearer {stack.token(f'e2e|gone-{i}')}"}
                r = await http.post("/api/streaming/create", headers=auth)
                assert r.status_code == 200, r.text
        podman.cut()
        stack.proc.send_signal(signal.SIGTERM)
        rc = await trio.to_thread.run_sync(stack.proc.wait, 100)
    log = stack.log.read_text()
    assert rc == 1, log[-3000:]
    lines = [line for line in log.splitlines() if line.startswith("c2l serve:")]
    lines = [line for line in lines if "answers at" not in line]  # the start-up note
    assert len(lines) == 1, log[-3000:]
    assert "the objects of 3 sessions are left" in lines[0]
    assert "3 pods" in lines[0] and "cloudtolocalllm.proxy=true" in lines[0]
    assert f"podman --url unix://{relay} network rm -f" in lines[0]
    assert "c2l serve" in lines[0]
    assert len((await runtime.list_labelled(PROXY_SELECTOR)).pods) == 3  # as it said
    # ... and their session directories, which no later gateway on this relay sweeps
    left = fallback_sessions_dir(f"unix://{relay}")
    assert len(os.listdir(left)) == 3
    shutil.rmtree(left)
