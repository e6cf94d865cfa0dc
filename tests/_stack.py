"""Real processes on real rootless Podman for the end-to-end tests.

:func:`run_stack` runs ``c2l serve`` (with extra flags, e.g. TLS) and ``c2l desktop``
agents as subprocesses; with it come the helpers the end-to-end test modules share
(labelled objects, waiting for a desktop) and Podman REST helpers (exec in a container,
inspect, diff, logs).
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio_websocket

import wire
from gateway import DevIssuer
from orchestrator import PROXY_SELECTOR, LabelledObjects, PodmanRuntime

from ._podman import _demux
from .conftest import PODMAN_URL, PROXY_IMAGE, free_port, need_podman

API = "/v4.0.0/libpod"
C2L = [sys.executable, "-m", "c2l"]


@attrs.define
class Stack:
    """A running ``c2l serve`` and the desktop agents started against it."""

    url: str
    proc: subprocess.Popen[bytes]
    issuer: DevIssuer
    env: dict[str, str]
    tmp: Path
    log: Path
    agents: dict[str, subprocess.Popen[bytes]] = attrs.field(factory=dict)

    def token(self, sub: str) -> str:
        return self.issuer.sign(sub)

    def start_agent(self, sub: str, ollama_url: str, token: str | None = None) -> None:
        """``c2l desktop`` for ``sub`` (with ``token``, else one of the dev issuer)."""
        token_file = self.tmp / f"{sub}.token"
        token_file.write_text(token or self.token(sub))
        token_file.chmod(0o600)
        argv = [*C2L, "desktop", "--gateway", self.url, "--token-file", str(token_file)]
        with open(self.tmp / f"agent-{sub}.log", "wb") as out:
            self.agents[sub] = subprocess.Popen(
                [*argv, "--ollama", ollama_url],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )


def stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> int:
    """SIGTERM ``proc`` (waking it first if frozen) and wait; SIGKILL after ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            return -9
    return proc.returncode


async def labelled(selector: str = PROXY_SELECTOR) -> LabelledObjects:
    """The Podman objects carrying ``selector`` (by default, every session's)."""
    async with PodmanRuntime(PODMAN_URL) as rt:
        return await rt.list_labelled(selector)


def count(objs: LabelledObjects) -> int:
    return len(objs.containers) + len(objs.pods) + len(objs.networks)


async def wait_for_desktop(http: httpx.AsyncClient, token: str) -> dict[str, Any]:
    """Create the user's session (if the agent has not yet) and wait for the agent on it."""
    with trio.fail_after(60):
        while True:
            r = await http.post(
                "/api/streaming/create", headers={"Authorization": f"Bearer {token}"}
            )
            assert r.status_code == 200, r.text
            session: dict[str, Any] = r.json()
            async with trio_websocket.open_websocket_url(session["endpoint"]) as ws:
                await ws.send_message(wire.encode(wire.Auth(token, session["sessionId"])))
                assert isinstance(wire.decode(await ws.get_message()), wire.AuthOk)
                await ws.send_message(wire.encode(wire.Request("probe", "GET", "/api/tags")))
                msg = wire.decode(await ws.get_message())
            if isinstance(msg, wire.ResponseStart):
                return session
            await trio.sleep(0.2)


@contextlib.contextmanager
def run_stack(
    tmp_path: Path,
    *serve_args: str,
    scheme: str = "http",
    verify: ssl.SSLContext | bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """``c2l serve`` as a subprocess; stopped (SIGTERM) with its agents on exit."""
    need_podman()
    full_env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "C2L_PODMAN_URL": PODMAN_URL,
        "C2L_PROXY_IMAGE": PROXY_IMAGE,
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    issuer = DevIssuer.load_or_create(tmp_path / "config" / "c2l" / "dev-jwt-key.pem")
    port = free_port()
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*C2L, "serve", "--port", str(port), *serve_args],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    host = "localhost" if scheme == "https" else "127.0.0.1"
    s = Stack(f"{scheme}://{host}:{port}", proc, issuer, full_env, tmp_path, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{s.url}/health", timeout=1, verify=verify).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gateway did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield s
    finally:
        for agent in s.agents.values():
            stop(agent)
        stop(proc)
        print(log.read_text()[-4000:])  # shown by pytest when the test failed


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """``c2l serve`` on the embedded defaults, against the Podman under test."""
    with run_stack(tmp_path) as s:
        yield s


def podman_client() -> httpx.AsyncClient:
    """An httpx client on the Podman REST socket under test."""
    transport = httpx.AsyncHTTPTransport(uds=PODMAN_URL.removeprefix("unix://"))
    return httpx.AsyncClient(transport=transport, base_url="http://podman" + API, timeout=60)


async def podman_get(client: httpx.AsyncClient, path: str, **params: str) -> Any:
    r = await client.get(path, params=params)
    r.raise_for_status()
    return r.json()


async def exec_in(client: httpx.AsyncClient, container: str, cmd: list[str]) -> tuple[int, str]:
    """``podman exec`` through the REST API: (exit code, stdout + stderr)."""
    r = await client.post(
        f"/containers/{container}/exec",
        json={"AttachStdout": True, "AttachStderr": True, "Cmd": cmd},
    )
    assert r.status_code == 201, r.text
    eid = r.json()["Id"]
    r = await client.post(f"/exec/{eid}/start", json={"Detach": False, "Tty": False})
    out, err = _demux(r.content)
    info = await podman_get(client, f"/exec/{eid}/json")
    return int(info["ExitCode"]), (out + err).decode(errors="replace")


async def container_logs(client: httpx.AsyncClient, container: str) -> str:
    r = await client.get(f"/containers/{container}/logs", params={"stdout": "1", "stderr": "1"})
    r.raise_for_status()
    out, err = _demux(r.content)
    return (out + err).decode(errors="replace")


async def pod_addresses(client: httpx.AsyncClient, pod: str) -> list[str]:
    """Every IP address Podman gave the pod's containers (the proxy owns its netns: the
    pod has no infra container)."""
    info = await podman_get(client, f"/pods/{pod}/json")
    nets: dict[str, Any] = {}
    for member in info.get("Containers") or ():
        container = await podman_get(client, f"/containers/{member['Id']}/json")
        for name, net in ((container.get("NetworkSettings") or {}).get("Networks") or {}).items():
            nets[f"{member['Id']}/{name}"] = net
    addrs = []
    for net in nets.values():
        for key in ("IPAddress", "GlobalIPv6Address"):
            if net.get(key):
                addrs.append(net[key])
    return addrs
