"""Which gateway owns a container runtime: a replica id and a lock held for the process's life.

Every object a gateway makes carries ``cloudtolocalllm.replica=<its replica id>``. A live
gateway holds an exclusive ``flock`` on a lock file derived from the runtime's URL (next
to the Podman socket when that directory is writable, else under the runtime or
configuration directory) for as long as its process lives; the kernel drops the lock when
the process ends, however it ends (SIGKILL included). So a gateway that holds the lock
knows that no other gateway on this host uses the service: every labelled object that is
not its own is a leftover of a gateway that is no longer running. A second gateway finds
the lock taken and refuses to start before it sends the runtime a single request.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
from pathlib import Path

import attrs

from c2lcore import config_dir

from ._errors import GatewayRunning


def new_replica_id() -> str:
    """A fresh id for one gateway instance (48 random bits, hex)."""
    return secrets.token_hex(6)


def replica_lock_path(runtime_url: str) -> Path:
    """The lock file every gateway on the runtime at ``runtime_url`` agrees on.

    ``unix:///run/c2l/podman.sock`` gives ``/run/c2l/podman.sock.c2l-gateway.lock`` when
    that directory is writable (or the file is there already); otherwise, and for TCP
    URLs, ``gateway-<hash of the URL>.lock`` under ``$XDG_RUNTIME_DIR/c2l`` or the
    configuration directory.
    """
    if runtime_url.startswith("unix://"):
        socket = Path(runtime_url.removeprefix("unix://"))
        beside = socket.with_name(socket.name + ".c2l-gateway.lock")
        if beside.exists() or os.access(socket.parent, os.W_OK):
            return beside
    digest = hashlib.sha256(runtime_url.encode()).hexdigest()[:16]
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime_dir) / "c2l" if runtime_dir and os.access(runtime_dir, os.W_OK) else None
    return (base or config_dir()) / f"gateway-{digest}.lock"


@attrs.define(eq=False)
class ReplicaLock:
    """The held lock; :meth:`release` (or the process's end) gives it up."""

    path: Path
    replica: str
    _fd: int = attrs.field(repr=False)

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _holder(fd: int) -> str:
    """Who holds the lock, from the file's contents, as words for one line."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (
            f"pid {int(info['pid'])}, replica {info['replica']}, "
            f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['started']))}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown: it is still starting"


def acquire_replica_lock(path: Path, replica: str, runtime_url: str) -> ReplicaLock:
    """Take the lock at ``path`` for ``replica`` without waiting.

    Raises :class:`GatewayRunning`, naming the holder (pid, replica, start time), when
    another live gateway holds it.
    """
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError:
        # Another user's lock file: a shared lock needs only read access, and the holder
        # is named from what it wrote.
        writable = False
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise GatewayRunning(
            f"another gateway ({holder}) uses the container runtime at {runtime_url}: stop"
            " it first, or give this one a runtime of its own with C2L_PODMAN_URL"
            f" (lock file {path})"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    if writable:
        info = {"replica": replica, "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
    return ReplicaLock(path, replica, fd)
