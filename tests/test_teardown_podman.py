"""The removal of a gateway's networks at once, on the real rootless Podman REST service.

A shutdown calls ``remove_unused_networks`` with this gateway's replica label after its
pods are gone (orchestrator/_janitor.py): Podman must remove exactly the unused networks
carrying that label, never one a container still uses, never another gateway's.
"""

from __future__ import annotations

import contextlib
import secrets

import pytest
import trio

from orchestrator import (
    LABEL_REPLICA,
    ObjectNotFound,
    PodmanRuntime,
    container_name,
    network_name,
    object_labels,
)

from .conftest import PODMAN_URL, PROXY_IMAGE, need_podman

pytestmark = pytest.mark.podman


@pytest.fixture(autouse=True)
def _podman_service() -> None:
    need_podman()  # a failure in CI, a skip elsewhere


async def test_unused_networks_of_this_gateway_go_at_once_and_nothing_else() -> None:
    mine, theirs = f"t{secrets.token_hex(5)}", f"t{secrets.token_hex(5)}"
    used, unused, other = (secrets.token_hex(8) for _ in range(3))
    rt = PodmanRuntime(PODMAN_URL)
    try:
        with trio.fail_after(120):
            for uh, replica in ((used, mine), (unused, mine), (other, theirs)):
                await rt.create_network(network_name(uh), object_labels(uh, "s", replica))
            # A container on the first network: in use, if not started (whether a session's
            # network is held by its pod's infra container or by the proxy itself).
            await rt._request(
                "POST",
                "/containers/create",
                what="create a container",
                body={
                    "name": container_name(used),
                    "image": PROXY_IMAGE,
                    "labels": object_labels(used, "s", mine),
                    "netns": {"nsmode": "bridge"},
                    "Networks": {network_name(used): {}},
                },
            )
            gone = await rt.remove_unused_networks(f"{LABEL_REPLICA}={mine}")
            assert gone == [network_name(unused)]
            await rt.inspect_network(network_name(used))  # still there
            await rt.inspect_network(network_name(other))
            with pytest.raises(ObjectNotFound):
                await rt.inspect_network(network_name(unused))
            # Nothing of it to remove: an empty answer, not an error.
            assert await rt.remove_unused_networks(f"{LABEL_REPLICA}={mine}") == []
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(60):
            with contextlib.suppress(Exception):
                await rt.remove_container(container_name(used))
            for uh in (used, unused, other):
                with contextlib.suppress(Exception):
                    await rt.remove_network(network_name(uh))
            await rt.aclose()
