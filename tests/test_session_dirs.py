"""The proxies' UNIX sockets: the sessions directory, its permissions, its clean-up, and a
gateway that follows no link a proxy may plant (Podman-free; the Podman side is in
tests/test_orchestrator_podman.py, tests/test_security_podman.py and
tests/test_faults_podman.py)."""

from __future__ import annotations

import functools
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import trio

import wire
from c2lcore import user_hash
from orchestrator import (
    ProxySpec,
    SessionDirs,
    container_name,
    network_name,
    object_labels,
    open_orchestrator,
    open_proxy_stream,
    pod_name,
    proxy_get,
)
from orchestrator.testing import FakeRuntime, open_fake_runtime
from proxy import serve_proxy_unix

from ._orch import make_config, running, until

ALICE = "alice@example.com"
UA = user_hash(ALICE)
PROBE = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""


def test_the_sessions_directory_is_private_and_a_session_directory_open(tmp_path: Path) -> None:
    owner = (65534, 65534) if os.geteuid() == 0 else None  # nobody, as a service user
    dirs = SessionDirs(tmp_path / "sessions", owner)
    (tmp_path / "sessions").mkdir(mode=0o755)  # an existing one is made private
    dirs.prepare()
    info = os.lstat(dirs.root)
    assert stat.S_IMODE(info.st_mode) == 0o700
    session = dirs.create(UA)
    assert session == dirs.root / UA
    assert stat.S_IMODE(os.lstat(session).st_mode) == 0o777  # whatever the umask
    if owner is not None:
        assert (info.st_uid, info.st_gid) == owner
        assert os.lstat(session).st_uid == owner[0]
    assert dirs.socket_path(UA) == str(session / wire.SOCKET_NAME)
    (session / "leftover").write_text("x")
    assert dirs.list() == [UA]
    dirs.create(UA)  # made again: empty
    assert os.listdir(session) == []
    dirs.remove(UA)
    dirs.remove(UA)  # missing is fine
    assert dirs.list() == []
    with pytest.raises(ValueError, match="not a user hash"):
        dirs.path("../etc")


def test_a_link_in_place_of_the_sessions_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "sessions").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        SessionDirs(tmp_path / "sessions").prepare()
    assert not (tmp_path / "elsewhere" / "x").exists()


async def test_a_proxy_socket_planted_as_a_link_is_not_followed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A compromised proxy owns its directory: it may replace its socket with a link to
    another user's socket (or the Podman socket). The gateway must not connect there."""
    mine, other = tmp_path / "a", tmp_path / "b"
    mine.mkdir()
    other.mkdir()
    target = str(other / wire.SOCKET_NAME)
    with trio.fail_after(10):
        await nursery.start(functools.partial(serve_proxy_unix, target, secret="s"))
        assert (await proxy_get(target))[0] == 200  # the other proxy answers ...
        planted = mine / wire.SOCKET_NAME
        planted.symlink_to(target)
        with pytest.raises(ConnectionRefusedError, match="not a socket"):
            await open_proxy_stream(str(planted))  # ... but not through the link
        with pytest.raises(ConnectionRefusedError, match="not a socket"):
            await proxy_get(str(planted))
        planted.unlink()
        planted.write_text("not a socket")
        with pytest.raises(ConnectionRefusedError, match="not a socket"):
            await open_proxy_stream(str(planted))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another host user")
async def test_another_host_user_cannot_reach_a_proxy_socket(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with (
            open_fake_runtime(run_proxies=True) as fake,
            open_orchestrator(make_config(), fake, sessions_dir=tmp_path / "sessions") as orch,
        ):
            s = await orch.get_or_create(ALICE)
            assert s.socket_path is not None
            assert (await proxy_get(s.socket_path))[0] == 200
            tried = await trio.run_process(
                ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                 sys.executable, "-c", PROBE, s.socket_path],
                capture_stdout=True, check=True,
            )  # fmt: skip
            assert tried.stdout.decode().strip() == "PermissionError"
            # The same socket, reached by its owner, answers: the refusal above is the
            # directory's doing.
            status, body = await proxy_get(s.socket_path)
            assert status == 200 and json.loads(body)["status"] == "healthy"


async def _leave_behind(fake: FakeRuntime, uh: str) -> None:
    labels = object_labels(uh, f"old-{uh}", "dead0replica")
    await fake.create_network(network_name(uh), labels)
    await fake.create_pod(pod_name(uh), network=network_name(uh), labels=labels)
    await fake.create_container(ProxySpec(container_name(uh), pod_name(uh), "img", labels, {}))


async def test_leftover_session_directories_are_swept_and_nothing_is_left_after_teardown(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    """What a SIGKILLed gateway leaves: objects with their directory, and a directory whose
    objects are gone already. The next gateway's sweep removes both; its own sessions'
    directories go with their teardown."""
    sessions = tmp_path / "sessions"
    old = SessionDirs(sessions)
    old.prepare()
    both, dir_only = "a" * 16, "b" * 16
    for uh in (both, dir_only):
        old.create(uh)
        (old.path(uh) / wire.SOCKET_NAME).write_text("a dead proxy's socket")
    fake = FakeRuntime()
    await _leave_behind(fake, both)
    with trio.fail_after(30):
        async with running(fake, sessions_dir=sessions) as orch:
            await until(lambda: orch.sweep.done)
            assert orch.sweep.removed == 2
            assert os.listdir(sessions) == []
            assert fake.empty
            s = await orch.get_or_create(ALICE)
            assert s.socket_path is not None
            assert os.listdir(sessions) == [UA]
            assert await orch.delete(UA, s.id)
            assert os.listdir(sessions) == []
            await orch.get_or_create(ALICE)  # and one that the shutdown removes
        assert sessions.name not in os.listdir(tmp_path)  # emptied, then removed on exit
        assert fake.empty


async def test_a_start_cancelled_at_any_point_leaves_no_directory(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    for method in ("create_network", "create_pod", "create_container", "start_pod"):
        fake = FakeRuntime()
        fake.inject(method, "block")
        with trio.fail_after(60):
            async with running(fake, sessions_dir=tmp_path / "s") as orch:
                with trio.move_on_after(1):
                    await orch.get_or_create(ALICE)
                await until(lambda: orch.sessions() == [])
                assert orch.dirs.list() == [], method
            assert fake.empty, method
