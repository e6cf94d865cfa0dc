"""State every gateway replica needs (DESIGN.md section 6): keys and tunnel registrations.

On Kubernetes they live in Secrets of the namespace, so a second replica sees what the
first stored: here two runtimes (two replicas) over one in-process fake API server, which
validates every object it receives. On one host (``LocalState``) the same interface keeps
keys in 0600 files and records in memory.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from orchestrator._kubernetes import KubernetesRuntime
from orchestrator._shared import LABEL_STATE, KubernetesState, LocalState, SharedState
from orchestrator.testing import FakeKubernetes, open_fake_kubernetes

USER = "0123456789abcdef"


@pytest.fixture
async def fake() -> AsyncIterator[FakeKubernetes]:
    async with open_fake_kubernetes() as fake:
        yield fake


def replica(fake: FakeKubernetes, name: str) -> KubernetesRuntime:
    return KubernetesRuntime.with_transport(fake.transport(), replica=name)


async def test_a_second_replica_sees_what_the_first_stored(fake: FakeKubernetes) -> None:
    async with replica(fake, "gw-1") as one, replica(fake, "gw-2") as two:
        first, second = KubernetesState(one), KubernetesState(two)
        made: list[bytes] = []

        def make() -> bytes:
            made.append(secrets.token_bytes(32))
            return made[-1]

        key = await first.key("audit-hmac-key", make)
        assert await second.key("audit-hmac-key", make) == key
        assert made == [key]  # made once, by the first replica to ask
        assert await second.key("direct-jwt-key", lambda: b"pem") == b"pem"
        assert await first.key("direct-jwt-key", make) == b"pem"

        reg = {"url": "https://desk.example.net", "provider": "url", "healthy": True}
        await first.put("tunnel", USER, reg, time.time() + 60)
        assert await second.get("tunnel", USER) == reg
        renewed = {**reg, "healthy": False}
        await second.put("tunnel", USER, renewed, time.time() + 60)  # a renewal, via the other
        assert await first.get("tunnel", USER) == renewed
        assert await first.get("tunnel", "fedcba9876543210") is None
        assert await second.delete("tunnel", USER) is True
        assert await first.get("tunnel", USER) is None
        assert await first.delete("tunnel", USER) is False
    names = fake.names("secrets")
    assert names == ["c2l-key-audit-hmac-key", "c2l-key-direct-jwt-key"]
    for name in names:
        labels = fake.objects[("secrets", "default", name)]["metadata"]["labels"]
        assert labels[LABEL_STATE] == "key"


async def test_two_replicas_racing_for_a_key_end_up_with_the_same_one(
    fake: FakeKubernetes,
) -> None:
    async with replica(fake, "gw-1") as one, replica(fake, "gw-2") as two:
        got: list[bytes] = []

        async def ask(rt: KubernetesRuntime) -> None:
            got.append(await KubernetesState(rt).key("race", lambda: secrets.token_bytes(16)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, one)
            nursery.start_soon(ask, two)
    assert len(got) == 2
    assert got[0] == got[1]


async def test_an_expired_record_reads_as_missing_and_is_removed(fake: FakeKubernetes) -> None:
    async with replica(fake, "gw-1") as one, replica(fake, "gw-2") as two:
        await KubernetesState(one).put(
            "tunnel", USER, {"url": "https://x.example"}, time.time() + 0.3
        )
        assert await KubernetesState(two).get("tunnel", USER) is not None
        await trio.sleep(0.4)
        assert await KubernetesState(two).get("tunnel", USER) is None
    assert fake.names("secrets") == []


@pytest.mark.parametrize("bad", ["Upper", "under_score", "x" * 60])
async def test_names_that_are_no_kubernetes_name_are_refused(
    fake: FakeKubernetes, bad: str
) -> None:
    async with replica(fake, "gw-1") as one:
        with pytest.raises(ValueError, match="DNS-1123"):
            await KubernetesState(one).put("tunnel", bad, {}, time.time() + 60)


async def test_local_state_keeps_keys_in_private_files_and_records_in_memory(
    tmp_path: Path,
) -> None:
    state: SharedState = LocalState(tmp_path / "state")
    key = await state.key("audit-hmac-key", lambda: b"k1")
    assert await state.key("audit-hmac-key", lambda: b"k2") == key == b"k1"
    assert await LocalState(tmp_path / "state").key("audit-hmac-key", lambda: b"k3") == b"k1"
    mode = stat.S_IMODE(os.stat(tmp_path / "state" / "audit-hmac-key").st_mode)
    assert mode == 0o600
    await state.put("tunnel", USER, {"url": "u"}, time.time() + 0.2)
    assert await state.get("tunnel", USER) == {"url": "u"}
    await trio.sleep(0.3)
    assert await state.get("tunnel", USER) is None
    await state.put("tunnel", USER, {"url": "u"}, time.time() + 60)
    assert await state.delete("tunnel", USER) is True
    assert await state.delete("tunnel", USER) is False
