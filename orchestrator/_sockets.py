"""Where each session's proxy listens: a UNIX socket in a host directory of its own.

A session's pod publishes no port. The orchestrator makes a directory per session under
one *sessions directory* and bind-mounts it into the proxy container at
:data:`wire.SOCKET_DIR`; the proxy listens on :data:`wire.SOCKET_NAME` in it, and the
gateway connects to that socket's host path. So the user's network can be ``internal``
(no NAT, no egress, no port forwarding, hence no ``rootlessport`` process per pod relaying
every byte), and netavark has no NAT or port-forwarding rules to add and remove per
session (DESIGN.md section 3: those made start-up and teardown grow with the number of
live sessions).

Who can reach a socket:

- The sessions directory is ``0700`` and owned by the Podman service user (the host user
  its containers' root maps to, from Podman's ``/info``; the gateway's own user when that
  is who runs Podman), so no other host user can enter it; root, which the gateway runs
  as on a server, can.
- Each session's directory in it is ``0777``: the proxy runs as uid 1001 in the container,
  a subordinate uid on the host, which must create its socket there. It is safe because
  nobody but the service user and root can reach it through its parent, and a container
  sees only its own directory (the bind mount), never its parent or a neighbour's.
- The socket itself is ``0666`` (made so by the proxy) for the same reason, and every
  WebSocket upgrade needs the session secret anyway.

A proxy owns the contents of its directory, so the gateway (possibly root) never follows
a name there blindly: :func:`open_proxy_stream` opens the socket's path without following
a symbolic link, checks that it is a socket, and connects through that open file
(``/proc/self/fd/N``). A compromised proxy cannot point the gateway at another socket.

The orchestrator creates a session's directory before its container and removes it after
the pod, in the same removal job (shielded, like the pod and network); the sweep of a
starting gateway removes leftover directories with the other leftovers (the replica lock
says that nothing under the sessions directory belongs to a live gateway then).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from pathlib import Path
from typing import Final

import attrs
import trio

import wire
from c2lcore import config_dir

#: Mode of the sessions directory: its owner (the Podman service user) only.
SESSIONS_DIR_MODE: Final = 0o700
#: Mode of one session's directory (reachable only through the 0700 parent, see above).
SESSION_DIR_MODE: Final = 0o777
#: Largest answer :func:`proxy_get` reads (the proxy's /health is a few hundred bytes).
MAX_ANSWER_BYTES: Final = 64 * 1024
#: How long a health probe waits for the proxy's answer.
HEALTH_TIMEOUT_S: Final = 2.0


def sessions_dir_path(runtime_url: str) -> Path:
    """The sessions directory every gateway on the runtime at ``runtime_url`` agrees on.

    ``unix:///run/c2l/podman.sock`` gives ``/run/c2l/podman.sock.c2l-sessions`` when that
    directory is writable (or the sessions directory is there already), as for the replica
    lock (:func:`~orchestrator._replica.replica_lock_path`); otherwise, and for TCP URLs,
    :func:`fallback_sessions_dir`. The orchestrator moves to the latter when the runtime's
    user cannot reach the former (:func:`reachable_by`).
    """
    if runtime_url.startswith("unix://"):
        socket = Path(runtime_url.removeprefix("unix://"))
        beside = socket.with_name(socket.name + ".c2l-sessions")
        if beside.exists() or os.access(socket.parent, os.W_OK):
            return beside
    return fallback_sessions_dir(runtime_url)


def fallback_sessions_dir(runtime_url: str) -> Path:
    """``sessions-<hash of the URL>``: as root under ``/run/c2l-sessions`` (which any
    service user can pass through), else under ``$XDG_RUNTIME_DIR/c2l`` or the
    configuration directory (the gateway's own user runs Podman then)."""
    digest = hashlib.sha256(runtime_url.encode()).hexdigest()[:16]
    if os.geteuid() == 0:
        return Path("/run/c2l-sessions") / f"sessions-{digest}"
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime_dir) / "c2l" if runtime_dir and os.access(runtime_dir, os.W_OK) else None
    return (base or config_dir()) / f"sessions-{digest}"


def reachable_by(path: Path, uid: int) -> bool:
    """Whether ``uid`` may pass through ``path`` and every directory above it."""
    if uid == 0:
        return True
    for part in (path, *path.parents):
        try:
            info = os.stat(part)
        except OSError:
            return False
        mine = info.st_uid == uid and info.st_mode & stat.S_IXUSR
        if not (mine or info.st_mode & stat.S_IXOTH):
            return False
    return True


@attrs.define(eq=False)
class SessionDirs:
    """The sessions directory: one directory per user's live session, named by user hash.

    The methods are plain file system calls on a directory or two (``/run`` is a tmpfs on
    the project's hosts): they run in the event loop, where they take microseconds, less
    than a hop to a worker thread would (and a thread would let trio's autojump clock
    in the tests jump past the orchestrator's deadlines meanwhile).
    """

    root: Path
    #: Who should own the directories (the Podman service user); None: whoever we are.
    owner: tuple[int, int] | None = None

    def prepare(self) -> None:
        """Create the sessions directory, or make an existing one ``0700`` and ours.

        Refuses (``OSError``) a symbolic link or anything but a directory at its path.
        """
        self.root.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            self.root.mkdir(mode=SESSIONS_DIR_MODE)
        info = os.lstat(self.root)
        if not stat.S_ISDIR(info.st_mode):
            raise NotADirectoryError(
                errno.ENOTDIR, f"the sessions directory {self.root} is not a directory"
            )
        self._own(self.root)
        os.chmod(self.root, SESSIONS_DIR_MODE)

    def _own(self, path: Path) -> None:
        if self.owner is not None and os.geteuid() == 0:
            os.chown(path, *self.owner, follow_symlinks=False)

    def path(self, user_hash: str) -> Path:
        """The directory of ``user_hash``'s session."""
        if not user_hash or "/" in user_hash or user_hash in (".", ".."):
            raise ValueError(f"not a user hash: {user_hash!r}")
        return self.root / user_hash

    def socket_path(self, user_hash: str) -> str:
        """The host path of the proxy's socket in ``user_hash``'s session directory."""
        return str(self.path(user_hash) / wire.SOCKET_NAME)

    def create(self, user_hash: str) -> Path:
        """Make ``user_hash``'s empty session directory (anything left there first goes)."""
        path = self.path(user_hash)
        self.remove(user_hash)
        path.mkdir()
        self._own(path)
        os.chmod(path, SESSION_DIR_MODE)  # not left to the umask
        return path

    def remove(self, user_hash: str) -> None:
        """Remove ``user_hash``'s session directory and what is in it; missing is fine."""
        path = self.path(user_hash)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            # rmtree never follows a link the proxy may have put inside.
            shutil.rmtree(path)
        else:
            path.unlink()

    def list(self) -> list[str]:
        """The user hashes that have a directory here (leftovers, at a gateway's start)."""
        try:
            return sorted(entry.name for entry in os.scandir(self.root))
        except FileNotFoundError:
            return []


#: Where a proxy listens: the host path of its UNIX socket (Podman), or its pod's
#: address and port (Kubernetes).
ProxyTarget = str | tuple[str, int]


async def open_proxy_stream(path: ProxyTarget) -> trio.SocketStream:
    """Connect to the proxy's UNIX socket at ``path``, following no symbolic link; or,
    for a ``(host, port)`` target (a pod on Kubernetes), over TCP.

    The path is opened with ``O_PATH | O_NOFOLLOW``, checked to be a socket, and connected
    to through ``/proc/self/fd/N``, so what is connected is the file that was checked (a
    proxy that swaps its socket for a link to another one is refused). Raises ``OSError``
    (``ConnectionRefusedError`` when the path is not a socket).
    """
    if isinstance(path, tuple):
        return await trio.open_tcp_stream(*path)
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"{path} is not a socket")
        return await trio.open_unix_socket(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


async def proxy_get(
    path: ProxyTarget, target: str = "/health", *, secret: str | None = None
) -> tuple[int, bytes]:
    """``GET target`` from the proxy at the UNIX socket ``path``: (status, body).

    Plain HTTP/1.1 with ``Connection: close``, which is all the proxy speaks outside
    WebSockets; no HTTP client (and no pooled connection per proxy) needed. Raises
    ``OSError`` when the proxy cannot be reached or answers something unreadable. Bound
    it with ``trio.move_on_after``. ``secret``: sent as the session's secret header (the
    proxy's ``/desktops`` needs it).
    """
    try:
        stream = await open_proxy_stream(path)
        async with stream:
            extra = f"{wire.SECRET_HEADER}: {secret}\r\n" if secret is not None else ""
            request = f"GET {target} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n{extra}\r\n"
            await stream.send_all(request.encode("ascii"))
            data = bytearray()
            while len(data) <= MAX_ANSWER_BYTES:
                chunk = await stream.receive_some(MAX_ANSWER_BYTES)
                if not chunk:
                    break
                data += chunk
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ConnectionResetError(errno.ECONNRESET, f"{path}: {exc!r}") from None
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise ConnectionAbortedError(
            errno.ECONNABORTED, f"{path}: not an HTTP answer: {head[:60]!r}"
        ) from None
    return status, body


async def http_health_probe(path: ProxyTarget) -> bool:
    """True when ``GET /health`` on the proxy's socket ``path`` answers 200 within
    :data:`HEALTH_TIMEOUT_S`; False while it cannot (no socket yet, refused, too slow)."""
    with trio.move_on_after(HEALTH_TIMEOUT_S):
        try:
            status, _ = await proxy_get(path, "/health")
        except OSError:
            return False
        return status == 200
    return False
