"""Shared test helpers: the real rootless Podman service and the proxy image."""

from __future__ import annotations

import os
import socket

import httpx
import pytest

from c2lcore import DEFAULT_IMAGE, SERVICE_SOCKET

PODMAN_URL = os.environ.get("C2L_PODMAN_URL") or f"unix://{SERVICE_SOCKET}"
PROXY_IMAGE = os.environ.get("C2L_PROXY_IMAGE") or DEFAULT_IMAGE


def podman_answers() -> bool:
    """Whether the Podman REST service at :data:`PODMAN_URL` answers ``_ping``."""
    if not PODMAN_URL.startswith("unix://"):
        return True
    try:
        transport = httpx.HTTPTransport(uds=PODMAN_URL.removeprefix("unix://"))
        with httpx.Client(transport=transport, timeout=3) as client:
            return client.get("http://podman/v4.0.0/libpod/_ping").status_code == 200
    except (httpx.HTTPError, OSError):
        return False


def need_podman() -> None:
    """Skip when no Podman service answers, except in CI, where that is a failure."""
    if podman_answers():
        return
    why = f"podman socket {PODMAN_URL} does not answer: run scripts/test.sh (it starts it)"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
