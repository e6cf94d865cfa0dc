"""Tenant isolation and container hardening, on real rootless Podman with real processes.

Two users, each with a real ``c2l desktop`` agent, behind one real ``c2l serve``:
another user's session id is 404 everywhere; the pods publish no port and the networks are
internal (no route out); the proxy's UNIX socket is in a directory no other host user can
enter and refuses anyone without the session secret; from inside user A's proxy container
no address of user B's pod answers (a listener started there for the test) while A keeps
working; the live proxy container is hardened as promised, and nothing was written into it
after a stream.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket

import wire
from c2lcore import user_hash
from desktop.testing import FakeOllama, make_tokens, serve_fake_ollama
from orchestrator import (
    ProxySpec,
    container_name,
    network_name,
    open_proxy_stream,
    pod_name,
    sessions_dir_path,
)
from orchestrator._podman import container_body
from proxy import SECRET_HEADER

from ._stack import (
    Stack,
    count,
    exec_in,
    labelled,
    pod_addresses,
    podman_client,
    podman_get,
    run_stack,
    wait_for_desktop,
)
from .conftest import PODMAN_URL
from .test_e2e_podman import TOKENS, chat

pytestmark = pytest.mark.podman

ALICE, BOB = "alice@tenant-a.example", "bob@tenant-b.example"

PROBE = """
import json, socket, sys
out = {}
for addr in sys.argv[1:]:
    try:
        if addr.startswith("unix:"):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(2)
            s.connect(addr[5:])
            s.close()
        else:
            host, port = addr.rsplit(":", 1)
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        out[addr] = "connected"
    except OSError as exc:
        out[addr] = type(exc).__name__
print(json.dumps(out))
"""
#: A TCP listener on 0.0.0.0:8080 for a minute, started in B's container: something for A
#: to try to reach (the proxy itself listens on its UNIX socket only).
LISTEN = """
import socket, time
server = socket.create_server(("0.0.0.0", 8080))
time.sleep(60)
"""
#: Whether the container's network namespace has a default route (an internal network
#: gives none: nothing leaves the user's bridge).
ROUTES = """
lines = open("/proc/net/route").read().splitlines()[1:]
print(sum(1 for line in lines if line.split()[1] == "00000000"))
"""


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with run_stack(tmp_path) as s:
        yield s


@pytest.fixture
async def fake_ollama(nursery: trio.Nursery) -> FakeOllama:
    fake: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=0.01)
    )
    return fake


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _ws_error(url: str, first: str, headers: list[tuple[bytes, bytes]]) -> tuple[str, int]:
    async with trio_websocket.open_websocket_url(url, extra_headers=headers) as conn:
        await conn.send_message(first)
        msg = wire.decode(await conn.get_message())
        assert isinstance(msg, wire.Error), msg
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await conn.get_message()
        return msg.code, info.value.reason.code


async def _upgrade_status(path: str, resource: str, extra: bytes) -> int:
    """The HTTP status the proxy at the UNIX socket ``path`` answers a WebSocket upgrade."""
    stream = await open_proxy_stream(path)
    async with stream:
        await stream.send_all(
            f"GET {resource} HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n".encode()
            + extra
            + b"\r\n"
        )
        answer = await stream.receive_some(4096)
    return int(answer.split(b" ", 2)[1])


async def exec_detached(client: httpx.AsyncClient, container: str, cmd: list[str]) -> None:
    """Start ``cmd`` in ``container`` and return at once (``podman exec -d``)."""
    r = await client.post(f"/containers/{container}/exec", json={"Cmd": cmd})
    assert r.status_code == 201, r.text
    r = await client.post(f"/exec/{r.json()['Id']}/start", json={"Detach": True, "Tty": False})
    assert r.status_code in (200, 204), r.text


async def test_users_cannot_reach_each_other_and_the_proxy_is_hardened(
    stack: Stack, fake_ollama: FakeOllama
) -> None:
    for sub in (ALICE, BOB):
        stack.start_agent(sub, fake_ollama.url)
    alice_c, bob_c = container_name(user_hash(ALICE)), container_name(user_hash(BOB))
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http, podman_client() as pc:
        with trio.fail_after(120):
            sessions = {sub: await wait_for_desktop(http, stack.token(sub)) for sub in (ALICE, BOB)}
            a_id = sessions[ALICE]["sessionId"]
            bob = stack.token(BOB)

            # -- another user's session id is 404 on every HTTP and WebSocket endpoint --
            r = await http.delete(f"/api/streaming/{a_id}", headers=bearer(bob))
            assert r.status_code == 404 and r.json()["error"] == "not_found"
            r = await http.get("/api/streaming/status", headers=bearer(bob))
            assert r.json()["sessionId"] != a_id
            for side in ("stream", "bridge"):
                url = sessions[ALICE]["endpoint"].replace("/ws/stream", f"/ws/{side}")
                first = wire.encode(wire.Auth(bob, a_id))
                assert await _ws_error(url, first, []) == ("not_found", wire.CLOSE_POLICY)
            assert (
                await http.get("/api/streaming/status", headers=bearer(stack.token(ALICE)))
            ).json()["sessionId"] == a_id  # untouched

            # -- no published port, an internal network, and no route out --
            for sub in (ALICE, BOB):
                pod = await podman_get(pc, f"/pods/{pod_name(user_hash(sub))}/json")
                assert not pod.get("InfraContainerID") and pod["NumContainers"] == 1, pod
                proxy = await podman_get(pc, f"/containers/{pod['Containers'][0]['Id']}/json")
                assert not (proxy["HostConfig"].get("PortBindings") or {}), proxy["HostConfig"]
                net = await podman_get(pc, f"/networks/{network_name(user_hash(sub))}/json")
                assert net["internal"] is True and net["options"]["isolate"] == "true"
            code, out = await exec_in(pc, alice_c, ["python3", "-c", ROUTES])
            assert (code, out.strip()) == (0, "0"), out

            # -- the socket: in a directory only the Podman user (and root) can enter --
            sessions_root = sessions_dir_path(PODMAN_URL)
            alice_dir = sessions_root / user_hash(ALICE)
            sock = alice_dir / wire.SOCKET_NAME
            podman_owner = os.stat(PODMAN_URL.removeprefix("unix://")).st_uid
            info = os.lstat(sessions_root)
            assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == podman_owner
            assert stat.S_IMODE(os.lstat(alice_dir).st_mode) == 0o777
            assert stat.S_ISSOCK(os.lstat(sock).st_mode)
            if os.geteuid() == 0:
                # another host user (nobody) cannot even reach it
                denied = await trio.run_process(
                    ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                     sys.executable, "-c", PROBE, f"unix:{sock}"],
                    capture_stdout=True, check=True,
                )  # fmt: skip
                assert json.loads(denied.stdout) == {f"unix:{sock}": "PermissionError"}
            # ... and whoever reaches it gets nothing without the session secret
            for headers in (b"", SECRET_HEADER.encode() + b": guess\r\n"):
                for path in ("/ws/stream", "/ws/bridge"):
                    assert await _upgrade_status(str(sock), path, headers) == 403

            # -- network isolation, seen from inside alice's proxy container --
            bob_addrs = await pod_addresses(pc, pod_name(user_hash(BOB)))
            alice_addrs = await pod_addresses(pc, pod_name(user_hash(ALICE)))
            assert bob_addrs and alice_addrs
            assert not set(bob_addrs) & set(alice_addrs)
            await exec_detached(pc, bob_c, ["python3", "-c", LISTEN])
            targets = [f"{a}:8080" for a in bob_addrs if ":" not in a]
            assert targets
            with trio.fail_after(10):  # bob's listener is up: bob reaches it himself
                while True:
                    code, out = await exec_in(pc, bob_c, ["python3", "-c", PROBE, *targets])
                    if code == 0 and set(json.loads(out.strip()).values()) == {"connected"}:
                        break
                    await trio.sleep(0.2)
            own = [f"unix:{wire.SOCKET_DIR}/{wire.SOCKET_NAME}"]
            code, out = await exec_in(pc, alice_c, ["python3", "-c", PROBE, *targets, *own])
            assert code == 0, out
            result = json.loads(out.strip().splitlines()[-1])
            print("connects from inside the proxy of A:", result)
            for t in targets:
                assert result[t] != "connected", (t, result)
            for t in own:
                assert result[t] == "connected", (t, result)  # the probe itself works

            # -- alice's own proxy keeps working: a whole chat streams through it --
            got = await chat(
                sessions[ALICE], stack.token(ALICE), "alice's secret plan", fake_ollama
            )
            text = "".join(json.loads(c)["message"]["content"] for c in got.lines[:-1])
            assert text == "".join(make_tokens("alice's secret plan", TOKENS))

            # -- hardening of the live proxy, from podman inspect --
            info = await podman_get(pc, f"/containers/{alice_c}/json")
            host = info["HostConfig"]
            assert info["Config"]["User"] == "1001:1001"
            assert host["ReadonlyRootfs"] is True
            assert not info.get("EffectiveCaps"), info.get("EffectiveCaps")
            assert not info.get("BoundingCaps"), info.get("BoundingCaps")
            assert (
                "no-new-privileges" in " ".join(host.get("SecurityOpt") or [])
                or info.get("Config", {}).get("NoNewPrivs")
                or host.get("NoNewPrivileges")
            ), host.get("SecurityOpt")
            # the one bind mount: alice's session directory, nothing executable in it
            binds = [m for m in info.get("Mounts") or [] if m.get("Type") != "tmpfs"]
            assert [(m["Type"], m["Source"], m["Destination"]) for m in binds] == [
                ("bind", str(alice_dir), wire.SOCKET_DIR)
            ], binds
            assert binds[0]["RW"] is True
            assert {"nosuid", "nodev", "noexec"} <= set(binds[0].get("Options") or []), binds
            tmpfs = host.get("Tmpfs") or {}
            assert set(tmpfs) <= {"/tmp"}
            assert all("size=" in opts for opts in tmpfs.values()), tmpfs
            # the limits: enforced on cgroup v2; on rootless cgroup v1 Podman drops them
            # with a warning, so check they were asked for
            cgroup = (await podman_get(pc, "/info"))["host"]["cgroupVersion"]
            if cgroup == "v2":
                assert host["Memory"] == 512 * 1024**2
                assert host["CpuQuota"] == 50_000 and host["CpuPeriod"] == 100_000
                assert host["PidsLimit"] > 0
            else:
                log = stack.log.read_text()
                assert "Resource limits are not supported and ignored" in log
                body = container_body(ProxySpec("n", "p", "i", {}, {}))
                assert body["resource_limits"] == {
                    "memory": {"limit": 512 * 1024**2},
                    "cpu": {"quota": 50_000, "period": 100_000},
                    "pids": {"limit": 64},
                }

            # -- nothing was written into the container by the streams above --
            # Podman itself marks /etc changed in every container, even an idle one that
            # ran nothing (its /etc/hosts, /etc/resolv.conf and /etc/hostname mount
            # points); any file written by the proxy would show up as its own entry.
            changes = await podman_get(pc, f"/containers/{alice_c}/changes")
            assert [c for c in changes or [] if c != {"Path": "/etc", "Kind": 0}] == [], changes

            # -- and bob was never disturbed: his proxy still answers his own chat --
            got = await chat(sessions[BOB], bob, "bob's question", fake_ollama)
            assert len(got.lines) == TOKENS + 1

        # the proxy sees no tokens: bob's container environment holds no JWT either
        env = (await podman_get(pc, f"/containers/{bob_c}/json"))["Config"]["Env"]
        assert not any(bob in e for e in env)
    assert count(await labelled()) in (0, 6)
