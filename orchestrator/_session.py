"""One user's live proxy, as the gateway sees it."""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeAlias

import attrs
import trio

from ._errors import SessionGone

SessionState: TypeAlias = Literal["starting", "ready", "stopping", "ended"]


def new_session_id() -> str:
    """An unguessable session id (128 bits), in hex: valid in a URL, as a Podman label and
    as a Kubernetes label value (which may not start or end with ``-`` or ``_``, as 6 % of
    ``token_urlsafe`` ids would)."""
    return secrets.token_hex(16)


def new_secret() -> str:
    """The per-session secret the gateway presents to the proxy (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


@attrs.define(eq=False)
class Session:
    """One user's proxy pod while it lives.

    Created by :meth:`Orchestrator.get_or_create`; ``socket_path`` (the host path of the
    proxy's UNIX socket) is set once its session directory exists, ``state`` moves
    ``starting -> ready -> stopping -> ended`` (or straight to ``stopping`` when the start
    fails), and ``ended`` is set once teardown finished. The user's ``sub`` is never
    stored: only its hash is.
    """

    user_hash: str
    id: str = attrs.field(factory=new_session_id)
    secret: str = attrs.field(factory=new_secret, repr=False)
    #: The proxy's UNIX socket on the host (connect with ``open_proxy_stream``).
    socket_path: str | None = None
    #: The proxy's pod address and port, where the runtime gives one (Kubernetes).
    address: tuple[str, int] | None = None
    state: SessionState = "starting"
    created: float = attrs.field(factory=time.time)
    #: Wall-clock time of the last request traffic (for display).
    last_activity: float = attrs.field(factory=time.time)
    #: trio clock time of the last request traffic (for idle timeouts).
    last_activity_trio: float = attrs.field(factory=trio.current_time)
    end_reason: str | None = None
    #: Seconds from admission to ready (None until ready).
    ready_seconds: float | None = None
    #: Bytes and messages the gateway relayed: "in" is towards the proxy, "out" from it.
    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    #: Live gateway connections by side ("stream", "bridge", "http").
    connections: dict[str, int] = attrs.field(factory=dict)
    #: Host pid of the proxy process once known (for /proc figures).
    pid: int | None = attrs.field(default=None, repr=False)
    #: Set once the session must end (``end_reason`` is known); its teardown follows.
    ending: trio.Event = attrs.field(factory=trio.Event, repr=False)
    #: Set once the session is torn down and gone from the orchestrator.
    ended: trio.Event = attrs.field(factory=trio.Event, repr=False)
    _settled: trio.Event = attrs.field(factory=trio.Event, repr=False)  # ready or ended
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, repr=False)
    _waiters: int = attrs.field(default=0, repr=False)
    #: The session's own nursery while it is ready (see :meth:`start_soon`).
    _tasks: trio.Nursery | None = attrs.field(default=None, repr=False)

    @property
    def target(self) -> str | tuple[str, int] | None:
        """Where to dial the proxy (``open_proxy_stream``): its address, else its socket."""
        return self.address if self.address is not None else self.socket_path

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str = "") -> None:
        """Run ``fn(*args)`` as a task of this session's own, in its nursery.

        The task is cancelled when the session ends, and has finished before the session's
        teardown begins: it never outlives the proxy it talks to. An error escaping it is
        a bug, which ends this session (logged with its traceback) and no other. Raises
        :class:`SessionGone` unless the session is ready and not ending.
        """
        if self._tasks is None or self.ending.is_set():
            raise SessionGone(f"session {self.id} is {self.state}: it runs no new tasks")
        self._tasks.start_soon(fn, *args, name=name or None)

    def touch(self) -> None:
        """Record request traffic now (heartbeats must not call this)."""
        self.last_activity = time.time()
        self.last_activity_trio = trio.current_time()

    def relayed(self, direction: str, nbytes: int, *, activity: bool = True) -> None:
        """Count one relayed message (``direction`` "in" or "out"); request traffic touches."""
        if direction == "in":
            self.bytes_in += nbytes
            self.messages_in += 1
        else:
            self.bytes_out += nbytes
            self.messages_out += 1
        if activity:
            self.touch()

    def connected(self, side: str, delta: int) -> None:
        """Count a gateway connection of ``side`` opening (+1) or closing (-1)."""
        self.connections[side] = max(0, self.connections.get(side, 0) + delta)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready description for APIs and logs; never the secret."""
        return {
            "sessionId": self.id,
            "userHash": self.user_hash,
            "state": self.state,
            "created": self.created,
            "lastActivity": self.last_activity,
            "endReason": self.end_reason,
            "readySeconds": self.ready_seconds,
            "connections": {side: n for side, n in self.connections.items() if n},
            "bytesIn": self.bytes_in,
            "bytesOut": self.bytes_out,
            "messagesIn": self.messages_in,
            "messagesOut": self.messages_out,
        }

    def _end(self, reason: str) -> None:
        # The first reason wins: a delete that races an idle timeout reports "deleted".
        if self.end_reason is None:
            self.end_reason = reason
        self.ending.set()
        self._scope.cancel()
