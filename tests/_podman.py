"""Helpers for tests against the real rootless Podman REST service (``-m podman``).

Everything goes through the REST socket that the gateway uses (``C2L_PODMAN_URL``, as
exported by scripts/_setup.sh), so the tests see the same storage whether they run as
root (the c2lsvc service) or as a user with rootless Podman.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx
import trio

from c2lcore import default_podman_url

API = "/v4.0.0/libpod"


def podman_url() -> str:
    """The Podman REST socket under test."""
    return os.environ.get("C2L_PODMAN_URL") or default_podman_url()


@asynccontextmanager
async def open_podman() -> AsyncIterator[httpx.AsyncClient]:
    """An async httpx client on the Podman REST socket."""
    url = podman_url()
    if url.startswith("unix://"):
        transport = httpx.AsyncHTTPTransport(uds=url[len("unix://") :])
        client = httpx.AsyncClient(transport=transport, base_url="http://podman", timeout=60)
    else:
        client = httpx.AsyncClient(base_url=url, timeout=60)
    async with client:
        yield client


async def inspect_image(client: httpx.AsyncClient, tag: str) -> dict[str, Any] | None:
    """``podman image inspect`` of ``tag``, or None when it does not exist."""
    resp = await client.get(f"{API}/images/{quote(tag, safe='')}/json")
    if resp.status_code == 404:
        return None
    resp.raise_for_status()
    data: dict[str, Any] = resp.json()
    return data


def _demux(raw: bytes) -> tuple[bytes, bytes]:
    """Split Podman's multiplexed log stream (8-byte frame headers) into stdout, stderr."""
    out, err = bytearray(), bytearray()
    while len(raw) >= 8:
        stream, size = raw[0], struct.unpack(">I", raw[4:8])[0]
        (err if stream == 2 else out).extend(raw[8 : 8 + size])
        raw = raw[8 + size :]
    return bytes(out), bytes(err)


async def run_container(
    client: httpx.AsyncClient,
    image: str,
    command: Sequence[str],
    *,
    time_limit: float = 60.0,
    **spec: Any,
) -> tuple[int, str, str]:
    """Run ``command`` in a throwaway container of ``image``: (exit code, stdout, stderr).

    The container has no network and a read-only root filesystem, as the proxy does; it
    is removed afterwards even when the test is cancelled.
    """
    name = f"c2l-test-{secrets.token_hex(4)}"
    body = {
        "name": name,
        "image": image,
        "command": list(command),
        "read_only_filesystem": True,
        "netns": {"nsmode": "none"},
        "labels": {"io.c2l.test": "true"},
        **spec,
    }
    resp = await client.post(f"{API}/containers/create", json=body)
    assert resp.status_code == 201, resp.text
    cid = resp.json()["Id"]
    try:
        with trio.fail_after(time_limit):
            resp = await client.post(f"{API}/containers/{cid}/start")
            assert resp.status_code in (204, 304), resp.text
            resp = await client.post(
                f"{API}/containers/{cid}/wait", params={"condition": "exited"}, timeout=time_limit
            )
            resp.raise_for_status()
            code = int(resp.text.strip())
            logs = await client.get(
                f"{API}/containers/{cid}/logs", params={"stdout": "true", "stderr": "true"}
            )
            out, err = _demux(logs.content)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            await client.delete(f"{API}/containers/{cid}", params={"force": "true"})
    return code, out.decode(errors="replace"), err.decode(errors="replace")
