"""A real ``c2l serve`` on real rootless Podman, with extra flags (TLS) and its helpers.

Reuses the end-to-end tests' :class:`Stack`; adds ``c2l serve`` arguments, an optional
CA for HTTPS, and Podman REST helpers (exec in a container, inspect, diff, logs).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from gateway import DevIssuer

from ._podman import _demux
from .conftest import PODMAN_URL, PROXY_IMAGE, free_port, need_podman
from .test_e2e_podman import C2L, Stack, _stop

API = "/v4.0.0/libpod"


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
            _stop(agent)
        _stop(proc)


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
    """Every IP address Podman gave the pod (its infra container owns the netns)."""
    info = await podman_get(client, f"/pods/{pod}/json")
    infra = await podman_get(client, f"/containers/{info['InfraContainerID']}/json")
    nets = (infra.get("NetworkSettings") or {}).get("Networks") or {}
    addrs = []
    for net in nets.values():
        for key in ("IPAddress", "GlobalIPv6Address"):
            if net.get(key):
                addrs.append(net[key])
    return addrs
