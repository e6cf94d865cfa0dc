"""Sessions: one rootless Podman network + pod + proxy container per user.

The network is internal (no NAT, no egress) and the pod publishes no port: the proxy
listens on a UNIX socket in the session's own host directory, bind-mounted into its
container (:mod:`._sockets`). The directory is made before the container and removed
after the pod, in the same removal job.

Each session runs as its own task, inside its own cancel scope, in a nursery the
:class:`Orchestrator` owns. Whatever ends a session (delete, idle timeout, failed health
checks, a crash in the session task, gateway shutdown) cancels that scope, and the task's
``finally`` block hands the pod and network to the :class:`~orchestrator._janitor.Janitor`,
whose few workers remove them (Podman serialises removals anyway), shielded from
cancellation, each call bounded. A stopping gateway waits until the janitor is done for as
long as the runtime makes progress; a starting one removes the leftovers of gateways that
are no longer running in the background, while it serves.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import attrs
import trio

from c2lcore import Backoff, BackoffPolicy, Config, user_hash
from wire import SECRET_ENV

from ._errors import (
    ObjectsLeft,
    OrchestratorError,
    RuntimeObjectError,
    SessionStartError,
    ShuttingDown,
    TooManySessions,
)
from ._janitor import Janitor, Job, SweepProgress, by_owner
from ._replica import acquire_replica_lock, new_replica_id
from ._runtime import (
    LABEL_REPLICA,
    PROXY_SELECTOR,
    ContainerExit,
    ContainerRuntime,
    LabelledObjects,
    PlacesProxies,
    ProxySpec,
    ReportsUsage,
    container_name,
    network_name,
    object_labels,
    pod_name,
)
from ._session import Session
from ._sockets import (
    ProxyTarget,
    SessionDirs,
    fallback_sessions_dir,
    http_health_probe,
    proxy_get,
    reachable_by,
)

logger = logging.getLogger("c2l.orchestrator")

T = TypeVar("T")

#: ``probe(target)`` answers True once the proxy listening there (its socket path, or its
#: pod's address) is ready.
Probe = Callable[[ProxyTarget], Awaitable[bool]]

#: Consecutive failed health probes after which a ready session is ended.
HEALTH_FAILURES = 3
#: The end reason of a session whose proxy container stopped running.
PROXY_EXITED = "proxy_exited"
#: The end reason of a start that found no free start slot within ``admission_timeout``.
BUSY = "busy"
#: Retries of the runtime's event stream: 0.5 s doubling to 10 s, from 0.5 s again after a
#: stream that lasted 30 s. No jitter: one gateway, one stream.
EXIT_WATCH_BACKOFF = BackoffPolicy(base=0.5, factor=2.0, cap=10.0, reset_after=30.0, jitter=False)
#: Listings of leftovers at start: this many attempts, 1 s then 2 s apart.
SWEEP_LIST_ATTEMPTS = 3
SWEEP_LIST_BACKOFF = BackoffPolicy(base=1.0, factor=2.0, cap=10.0, jitter=False)


class SessionObserver(Protocol):
    """Told about session lifecycle events (the gateway's metrics implement this)."""

    def session_admitted(self, session: Session) -> None:
        """A new session was admitted and starts now."""

    def session_ready(self, session: Session, seconds: float) -> None:
        """The session became ready ``seconds`` after admission."""

    def session_ended(self, session: Session) -> None:
        """The session is torn down; ``session.end_reason`` says why."""


class _NoObserver:
    def session_admitted(self, session: Session) -> None:
        pass

    def session_ready(self, session: Session, seconds: float) -> None:
        pass

    def session_ended(self, session: Session) -> None:
        pass


async def remove_labelled(runtime: ContainerRuntime, label: str = PROXY_SELECTOR) -> int:
    """Remove every container, pod and network carrying ``label``; return how many.

    Containers go first, then pods, then networks, so nothing is removed while still in
    use. Each removal is attempted even if others fail; the first failure is re-raised.
    """
    found = await runtime.list_labelled(label)
    errors: list[Exception] = []
    limiter = trio.CapacityLimiter(8)

    async def remove(fn: Callable[[str], Awaitable[None]], name: str) -> None:
        async with limiter:
            try:
                await fn(name)
            except Exception as exc:
                logger.warning("could not remove leftover %s: %s", name, exc)
                errors.append(exc)

    for names, fn in (
        (found.containers, runtime.remove_container),
        (found.pods, runtime.remove_pod),
        (found.networks, runtime.remove_network),
    ):
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(remove, fn, name)
    if errors:
        # A failure that left nothing behind (the object went with another) is no failure.
        still = await runtime.list_labelled(label)
        if still.containers or still.pods or still.networks:
            raise errors[0]
    return len(found.containers) + len(found.pods) + len(found.networks)


@attrs.frozen
class Usage:
    """Resource use of one session's proxy process; None where it could not be read."""

    memory_bytes: int | None = None
    cpu_seconds: float | None = None
    #: CPU in use now, in cores (Kubernetes' metrics API reports a rate, not a total).
    cpu_cores: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """``{"memoryBytes", "cpuSeconds"}`` (and ``cpuCores`` where known) for APIs."""
        out: dict[str, Any] = {"memoryBytes": self.memory_bytes, "cpuSeconds": self.cpu_seconds}
        if self.cpu_cores is not None:
            out["cpuCores"] = self.cpu_cores
        return out


def _read_proc_usage(pid: int) -> Usage:
    memory: int | None = None
    cpu: float | None = None
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                memory = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    try:
        # Fields after the parenthesised command name; utime and stime are 14th and 15th.
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        pass
    return Usage(memory, cpu)


@attrs.define(eq=False)
class Orchestrator:
    """The live sessions of one gateway. Make one with :func:`open_orchestrator`."""

    config: Config
    runtime: ContainerRuntime
    _nursery: trio.Nursery
    _probe: Probe
    #: The sessions directory: one directory per session, holding its proxy's socket.
    dirs: SessionDirs
    start_timeout: float = 30.0
    teardown_timeout: float = 10.0
    call_timeout: float = 10.0
    probe_interval: float = 0.05
    retry_after: float = 30.0
    #: How long a start waits for one of the ``limiter``'s slots before it answers "busy".
    admission_timeout: float = 10.0
    #: End sessions on idle timeout, failed health checks and proxy exits (from ``config``).
    watch: bool = True
    observer: SessionObserver = attrs.field(factory=_NoObserver)
    #: A shutdown gives up on the removals only after the runtime made no progress at all
    #: for this long (so it waits as long as the work takes, not a fixed time).
    stall_timeout: float = 60.0
    #: This gateway instance: every object it makes carries ``cloudtolocalllm.replica``.
    replica: str = attrs.field(factory=new_replica_id)
    _limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(4))
    _sessions: dict[str, Session] = attrs.field(factory=dict)
    #: user hash -> set when that user next has a ready session (see :meth:`wait_ready`)
    _readiness: dict[str, trio.Event] = attrs.field(factory=dict)
    _closed: bool = False
    _janitor: Janitor = attrs.field(
        default=attrs.Factory(
            lambda self: Janitor(
                self.runtime, self.dirs, network_label=f"{LABEL_REPLICA}={self.replica}"
            ),
            takes_self=True,
        )
    )
    _shutdown_running: trio.Event | None = None
    _shutdown_finished: bool = False
    _left: ObjectsLeft | None = None
    _left_reported: bool = False

    # -- public API --------------------------------------------------------------

    async def get_or_create(self, sub: str) -> Session:
        """The user's live session, started if there is none; returns once it is ready.

        Concurrent calls for one user share one session. Raises :class:`TooManySessions`
        at ``config.max_sessions`` and :class:`SessionStartError` when the proxy cannot be
        started (in which case nothing of it is left). If every caller waiting for a
        starting session is cancelled, the start is abandoned and torn down.
        """
        uh = user_hash(sub)
        while True:
            if self._closed:
                raise ShuttingDown("the orchestrator is shutting down")
            session = self._sessions.get(uh)
            if session is None:
                session = self._admit(uh)
            elif session.state in ("stopping", "ended"):
                # The user's previous session still holds the pod names: let it finish.
                await session.ended.wait()
                continue
            return await self._wait_ready(session)

    async def wait_ready(self, user_hash: str) -> Session:
        """Wait until the user has a ready session that is not ending (started by others).

        Waits on the user's readiness event, which every session of the user sets when it
        becomes ready: no re-checking on a timer. Raises :class:`ShuttingDown` once the
        orchestrator is shutting down (no session will be ready again).
        """
        while True:
            if self._closed:
                raise ShuttingDown("the orchestrator is shutting down")
            session = self._sessions.get(user_hash)
            if session is not None and session.state == "ready" and session.end_reason is None:
                return session
            event = self._readiness.setdefault(user_hash, trio.Event())
            try:
                await event.wait()
            finally:
                # the last waiter of a user gone: forget the event (no waiting list grows)
                idle = not event.statistics().tasks_waiting and not event.is_set()
                if idle and self._readiness.get(user_hash) is event:
                    del self._readiness[user_hash]

    def get(self, user_hash: str) -> Session | None:
        """The user's session (in any state but ended), or None."""
        return self._sessions.get(user_hash)

    def sessions(self) -> list[Session]:
        """Every session not yet ended."""
        return list(self._sessions.values())

    def end_nowait(self, user_hash: str, session_id: str, reason: str = "deleted") -> bool:
        """Start tearing the session down without waiting; False if the user has no such id."""
        session = self._sessions.get(user_hash)
        if session is None or session.id != session_id:
            return False
        session._end(reason)
        return True

    async def delete(self, user_hash: str, session_id: str, reason: str = "deleted") -> bool:
        """Tear the user's session ``session_id`` down and wait until it is gone.

        Returns False (and touches nothing) when ``user_hash`` has no session with that id,
        e.g. when it is another user's.
        """
        session = self._sessions.get(user_hash)
        if not self.end_nowait(user_hash, session_id, reason):
            return False
        assert session is not None
        await session.ended.wait()
        return True

    async def usage(self, session: Session) -> Usage:
        """Memory (PSS) and CPU time of the session's proxy process, read from ``/proc``.

        Rootless cgroup v1 hosts answer libpod stats with 409, so this reads the proxy's
        process from the host instead; fields are None where that is not possible (the
        process is gone, another user's /proc is unreadable, or the fake runtime).
        """
        if session.pid is None and session.state == "ready":
            try:
                session.pid = await self.runtime.container_pid(container_name(session.user_hash))
            except OrchestratorError:
                return Usage()
        if session.pid is None or session.state != "ready":
            return Usage()
        return await trio.to_thread.run_sync(_read_proc_usage, session.pid)

    async def usage_all(self) -> dict[str, Usage]:
        """:meth:`usage` of every live session, by session id (one thread hop in all; on a
        runtime that reports usage itself, one call to it)."""
        sessions = self.sessions()
        if isinstance(self.runtime, ReportsUsage):
            figures: dict[str, tuple[int | None, float | None]] = {}
            with trio.move_on_after(5):
                try:
                    figures = await self.runtime.usage_by_user()
                except OrchestratorError as exc:
                    logger.info("resource figures unavailable: %s", exc)
            return {
                s.id: Usage(memory_bytes=figures[s.user_hash][0], cpu_cores=figures[s.user_hash][1])
                if s.user_hash in figures
                else Usage()
                for s in sessions
            }
        for session in sessions:
            if session.pid is None and session.state == "ready":
                with trio.move_on_after(2):
                    await self.usage(session)
        pids = {s.id: s.pid for s in sessions if s.pid is not None and s.state == "ready"}

        def read() -> dict[str, Usage]:
            return {sid: _read_proc_usage(pid) for sid, pid in pids.items()}

        found = await trio.to_thread.run_sync(read)
        return {s.id: found.get(s.id, Usage()) for s in sessions}

    @property
    def sweep(self) -> SweepProgress:
        """Progress of the background removal of leftovers of earlier gateways."""
        return self._janitor.sweep

    def removals_pending(self) -> int:
        """Sessions (live ones' teardowns and leftovers) whose objects are being removed."""
        return len(self._janitor.pending())

    async def aclose(self, reason: str = "shutdown") -> None:
        """Refuse new sessions, end every session and wait until all their objects are gone.

        Waits as long as the runtime makes progress (:attr:`stall_timeout` bounds a wait
        with none). Raises :class:`ObjectsLeft`, naming what is left and how to remove it,
        when something could not be removed. Safe to call more than once.
        """
        left = await self._shutdown(reason)
        if left is not None:
            self._left_reported = True
            raise left

    async def _shutdown(self, reason: str) -> ObjectsLeft | None:
        while self._shutdown_running is not None:  # another task is at it
            await self._shutdown_running.wait()
        if self._shutdown_finished:
            return self._left
        # A cancelled attempt (aclose() in a cancelled scope) is redone by the next one:
        # open_orchestrator's exit always makes one, shielded.
        self._shutdown_running = trio.Event()
        self._closed = True
        # Before the sessions end: their teardowns' networks then all go in one call.
        self._janitor.begin_closing()
        for waiting in self._readiness.values():  # their wait_ready() raises ShuttingDown
            waiting.set()
        try:
            t0 = trio.current_time()
            sessions = self.sessions()
            for session in sessions:
                session._end(reason)
            # Ended sessions hand their objects to the janitor at once; a start in flight
            # lands within its (shielded, bounded) runtime call first.
            with trio.move_on_after(self.call_timeout + 5):
                for session in sessions:
                    await session.ended.wait()
            # A sweep still listing the runtime queues its leftovers in a moment: they go too.
            with trio.move_on_after(self.call_timeout):
                await self._janitor.wait_listed()
            pending = self.removals_pending()
            if pending:
                logger.info("shutdown: removing the objects of %d sessions", pending)
            drained = await self._janitor.drain(self.stall_timeout)
            if drained:
                drained = await self._final_pass()
            self._left = self._objects_left(drained)
            if self._left is None and (sessions or pending):
                logger.info(
                    "shutdown: %d sessions ended, every object removed in %.1f s",
                    len(sessions),
                    trio.current_time() - t0,
                )
            self._shutdown_finished = True
        finally:
            running, self._shutdown_running = self._shutdown_running, None
            if running is not None:
                running.set()
        return self._left

    async def _final_pass(self) -> bool:
        """List what is still labelled as this gateway's and remove it; retry failures."""
        found = None
        try:
            with trio.fail_after(self.call_timeout):
                found = await self.runtime.list_labelled(f"{LABEL_REPLICA}={self.replica}")
        except Exception as exc:  # a TooSlowError too
            logger.warning("shutdown: could not list what is left: %s", exc)
        if found:
            logger.warning(
                "shutdown: %d objects were left by teardowns: removing them",
                len(found.containers) + len(found.pods) + len(found.networks),
            )
            for uh, names in by_owner(found).items():
                self._janitor.remove(uh, names, leftover=False)
        self._janitor.retry_failed()
        return await self._janitor.drain(self.stall_timeout)

    def _objects_left(self, drained: bool) -> ObjectsLeft | None:
        jobs: list[Job] = self._janitor.pending() + self._janitor.failed()
        if not jobs:
            return None
        kinds = {"pod": 0, "container": 0, "network": 0, "dir": 0}
        for job in jobs:
            for kind, _ in job.names:
                kinds[kind] += 1
        url = str(getattr(self.runtime, "url", "") or "")
        where = f"the container runtime at {url}" if url else "the container runtime"
        errors = [job.error for job in jobs if job.error]
        if drained:
            why = f"could not remove them ({errors[0] if errors else 'no reason given'})"
        else:
            why = f"made no progress for {self.stall_timeout:g} s"
        remote = f" --url {url}" if url.startswith("unix://") else ""
        return ObjectsLeft(
            f"{where} {why}: the objects of {len(jobs)} sessions are left, labelled"
            f" {PROXY_SELECTOR} ({kinds['pod']} pods with their containers,"
            f" {kinds['container']} containers, {kinds['network']} networks, and"
            f" {kinds['dir']} directories in {self.dirs.root}); the next"
            " `c2l serve` on this runtime removes them in the background, or remove them"
            f" now with: podman{remote} network rm -f $(podman{remote} network ls -q"
            f" --filter label={PROXY_SELECTOR}) (`c2l doctor` checks the runtime)"
        )

    async def _sweep(self) -> None:
        """List the runtime once and queue the removal of every leftover found.

        Run at start, in the background: whatever is labelled then was made by gateways
        that are no longer running (this one made nothing yet, and the replica lock says
        no other one is live). New sessions wait for the listing (a leftover may carry
        their names), not for the removals.
        """
        found = None
        dirs: list[str] = []
        try:
            try:
                dirs = self.dirs.list()
            except OSError as exc:
                logger.warning("listing leftover session directories failed: %s", exc)
            backoff = Backoff(SWEEP_LIST_BACKOFF)
            for attempt in range(1, SWEEP_LIST_ATTEMPTS + 1):
                try:
                    # Shielded (and bounded): a stop right now still gets the leftovers.
                    with trio.CancelScope(shield=True), trio.fail_after(self.call_timeout):
                        found = await self.runtime.list_labelled(PROXY_SELECTOR)
                    break
                except Exception as exc:  # a TooSlowError too
                    logger.warning("listing leftovers failed (attempt %d): %s", attempt, exc)
                    if attempt < SWEEP_LIST_ATTEMPTS:
                        await trio.sleep(backoff.next_delay())
        finally:
            if found is not None or dirs:
                self._janitor.sweep_found(found or LabelledObjects(), dirs)
            self._janitor.listed()

    def container_exited(self, exit_: ContainerExit) -> None:
        """The runtime reports that a proxy container stopped: end its session at once."""
        for session in self.sessions():
            if container_name(session.user_hash) != exit_.name:
                continue
            if exit_.session_id and exit_.session_id != session.id:
                continue  # a previous session's container going away
            if session.state in ("starting", "ready") and session.end_reason is None:
                logger.warning(
                    "session %s of user %s: proxy exited (code %s)",
                    session.id,
                    session.user_hash,
                    exit_.exit_code,
                )
                session._end(PROXY_EXITED)

    def reap_idle(self) -> list[Session]:
        """End every ready session idle for ``config.idle_timeout``; returns them."""
        now = trio.current_time()
        reaped = []
        for session in self.sessions():
            idle_for = now - session.last_activity_trio
            if session.state == "ready" and idle_for >= self.config.idle_timeout:
                logger.info(
                    "session %s of user %s idle for %.0f s: ending it",
                    session.id,
                    session.user_hash,
                    idle_for,
                )
                session._end("idle")
                reaped.append(session)
        return reaped

    async def serve_reaper(self) -> None:
        """End idle sessions every ``config.cleanup_interval`` seconds, forever."""
        while True:
            await trio.sleep(self.config.cleanup_interval)
            self.reap_idle()

    async def serve_exit_watch(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the runtime's container exits forever, reconnecting when it goes away.

        Reports ready at once: a runtime without an event stream still has the health
        poll, and a gateway must not refuse to start because events are unavailable.
        """
        task_status.started()
        backoff = Backoff(EXIT_WATCH_BACKOFF)
        while True:
            opened = trio.current_time()
            failure: Exception | None = None
            try:
                await self.runtime.watch_exits(PROXY_SELECTOR, self.container_exited)
            except (OrchestratorError, OSError) as exc:
                failure = exc
            backoff.connection_lasted(trio.current_time() - opened)
            delay = backoff.next_delay()
            if failure is not None:
                logger.warning("container exit watch: %s; retrying in %.1f s", failure, delay)
            await trio.sleep(delay)

    # -- internals ---------------------------------------------------------------

    def _admit(self, uh: str) -> Session:
        # Sessions still tearing down count: their pods still hold memory and locks.
        if len(self._sessions) >= self.config.max_sessions:
            raise TooManySessions(
                f"{len(self._sessions)} sessions are live, the limit is "
                f"{self.config.max_sessions} (C2L_MAX_SESSIONS)",
                retry_after=self.retry_after,
            )
        session = Session(user_hash=uh)
        self._sessions[uh] = session
        self.observer.session_admitted(session)
        self._nursery.start_soon(self._run_session, session, name=f"session-{uh}")
        return session

    async def _wait_ready(self, session: Session) -> Session:
        session._waiters += 1
        try:
            await session._settled.wait()
        finally:
            session._waiters -= 1
            if session._waiters == 0 and session.state == "starting":
                session._end("abandoned")
        if session.state != "ready" and session.end_reason == BUSY:
            raise TooManySessions(
                f"{self._limiter.total_tokens:g} sessions are starting and more wait:"
                f" no start slot within {self.admission_timeout:g} s",
                retry_after=max(1.0, self.admission_timeout / 2),
            )
        if session.state != "ready":
            raise SessionStartError(
                f"the proxy of user {session.user_hash} could not start: {session.end_reason}"
            )
        return session

    async def _call(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        # A runtime call that creates something is never abandoned half way: the server
        # would finish it after our teardown looked, and the object would leak. So it runs
        # shielded (bounded by call_timeout) and cancellation lands right before or after.
        await trio.lowlevel.checkpoint_if_cancelled()
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(self.call_timeout):
                    result = await fn(*args)
            except trio.TooSlowError:
                raise RuntimeObjectError(
                    f"{what} got no answer within {self.call_timeout:g} s"
                ) from None
        return result

    async def _start(self, session: Session) -> None:
        uh = session.user_hash
        labels = object_labels(uh, session.id, self.replica)
        pod = pod_name(uh)
        cfg = self.config
        spec = ProxySpec(
            name=container_name(uh),
            pod=pod,
            image=cfg.proxy_image,
            labels=labels,
            env={
                SECRET_ENV: session.secret,
                "C2L_SESSION_ID": session.id,
                "C2L_USER_HASH": uh,
                # The proxy lowers its own address space to this (the container's limit
                # has to leave room for the OCI runtime's init: ProxySpec.address_space).
                "C2L_PROXY_MEMORY": str(cfg.proxy_memory),
                # How long the proxy keeps a dropped client's answers for a resume.
                "C2L_RESUME_WINDOW": f"{cfg.resume_window:g}",
            },
            memory=cfg.proxy_memory,
            cpus=cfg.proxy_cpus,
            pids_limit=cfg.proxy_pids_limit,
            socket_dir=str(self.dirs.path(uh)),
            network=network_name(uh),
        )
        # A leftover of an earlier gateway, or this user's previous session, may still hold
        # the names: wait (at the front of the removal queue) until they are free.
        with trio.move_on_after(self.start_timeout) as waited:
            await self._janitor.wait_clear(uh)
        if waited.cancelled_caught:
            raise SessionStartError(
                f"the earlier objects of user {uh} were not removed within {self.start_timeout:g} s"
            )
        acquired = False
        with trio.move_on_after(self.admission_timeout):
            await self._limiter.acquire_on_behalf_of(session)
            acquired = True
        if not acquired:
            session._end(BUSY)
            raise SessionStartError(f"no start slot within {self.admission_timeout:g} s")
        try:
            with trio.fail_after(self.start_timeout):
                await self._create_and_probe(session, spec, labels)
        except trio.TooSlowError:
            raise SessionStartError(
                f"the proxy did not become ready within {self.start_timeout:g} s"
            ) from None

    async def _create_and_probe(
        self, session: Session, spec: ProxySpec, labels: dict[str, str]
    ) -> None:
        uh = session.user_hash
        net, pod = network_name(uh), pod_name(uh)
        try:
            # The directory first: the container's bind mount needs it. Removed by the
            # teardown's job like the pod and network, whatever happens from here on.
            try:
                self.dirs.create(uh)
            except OSError as exc:
                raise SessionStartError(
                    f"cannot make the session directory {self.dirs.path(uh)}: {exc}"
                ) from None
            session.socket_path = self.dirs.socket_path(uh)
            await self._call(f"creating network {net}", self.runtime.create_network, net, labels)
            await self._call(
                f"creating pod {pod}",
                functools.partial(self.runtime.create_pod, pod, network=net, labels=labels),
            )
            await self._call(f"creating container {spec.name}", self.runtime.create_container, spec)
            await self._call(f"starting pod {pod}", self.runtime.start_pod, pod)
        finally:
            self._limiter.release_on_behalf_of(session)
        if isinstance(self.runtime, PlacesProxies):
            # A runtime that places proxies itself (Kubernetes) says where, once its pod
            # is ready; a pod adopted from another replica comes with that one's secret.
            session.address = await self.runtime.proxy_address(uh)
            adopted = self.runtime.adopted(uh)
            if adopted is not None:
                session.id, session.secret = adopted
        target = session.target
        assert target is not None
        # Polling is the point here: readiness is a property of another process.
        while not await self._probe(target):  # noqa: ASYNC110
            await trio.sleep(self.probe_interval)

    async def _watch(self, session: Session) -> None:
        # Idle sessions are ended by the reaper (serve_reaper), proxy exits by the exit
        # watch; this task polls the proxy's /health every health_interval.
        if not self.watch:
            await trio.sleep_forever()
        interval = self.config.health_interval
        failures = 0
        while True:
            await trio.sleep(interval)
            ok = False
            with trio.move_on_after(min(interval, 5.0)):
                try:
                    ok = await self._probe(session.target or "")
                    if ok and isinstance(self.runtime, PlacesProxies):
                        await self._sync_idle(session)
                except Exception as exc:
                    logger.warning("health probe of user %s failed: %s", session.user_hash, exc)
            failures = 0 if ok else failures + 1
            if failures:
                logger.warning(
                    "session %s of user %s: health check failed (%d of %d)",
                    session.id,
                    session.user_hash,
                    failures,
                    HEALTH_FAILURES,
                )
            if failures >= HEALTH_FAILURES:
                session._end("unhealthy")
                await trio.sleep_forever()  # the cancel lands here

    async def _sync_idle(self, session: Session) -> None:
        """Take the request traffic other replicas relayed into account (Kubernetes).

        A user's clients may reach the proxy through any replica, so this replica's own
        count of traffic is not the whole story: the proxy reports its idle time on
        ``/health``, and a more recent activity there counts here too, so the reaper
        never ends a session that is busy through another replica.
        """
        target = session.target
        if target is None:
            return
        try:
            status, body = await proxy_get(target, "/health")
            idle = float(json.loads(body)["idle"]) if status == 200 else None
        except (OSError, ValueError, KeyError, TypeError):
            return
        if idle is None or idle < 0:
            return
        seen = trio.current_time() - idle
        if seen > session.last_activity_trio:
            session.last_activity_trio = seen
            session.last_activity = time.time() - idle

    async def _run_session(self, session: Session) -> None:
        uh = session.user_hash
        t0 = trio.current_time()
        try:
            with session._scope:
                await self._start(session)
                session.state = "ready"
                session.touch()
                session.ready_seconds = trio.current_time() - t0
                self.observer.session_ready(session, session.ready_seconds)
                session._settled.set()
                ready = self._readiness.pop(uh, None)
                if ready is not None:
                    ready.set()
                logger.info(
                    "session %s of user %s ready at %s in %.3f s",
                    session.id,
                    uh,
                    session.target,
                    trio.current_time() - t0,
                )
                try:
                    # The session's own tasks (Session.start_soon) live in this nursery:
                    # the session's end cancels them, and teardown waits until they are done.
                    async with trio.open_nursery() as tasks:
                        session._tasks = tasks
                        await self._watch(session)
                finally:
                    session._tasks = None
        except Exception as group:
            # One error out of the session's nursery arrives as a group of one.
            exc = _sole(group)
            if isinstance(exc, OrchestratorError):
                # Expected: the runtime refused or did not answer, or a bound ran out; the
                # message says which. One line, and the caller gets a SessionStartError.
                # Only this session ends; the orchestrator and other sessions carry on.
                if session.state == "starting":
                    logger.warning("session %s of user %s failed to start: %s", session.id, uh, exc)
                    session._end(f"start failed: {exc}")
                else:
                    logger.warning("session %s of user %s failed: %s", session.id, uh, exc)
                    session._end(f"error: {exc}")
            # A bug: logged with its traceback, so that it does not pass for a busy runtime.
            elif session.state == "starting":
                logger.exception("session %s of user %s failed to start", session.id, uh)
                session._end(f"start failed: {exc}")
            else:
                logger.exception("session %s of user %s crashed", session.id, uh)
                session._end(f"error: {exc}")
        finally:
            with trio.CancelScope(shield=True):
                await self._teardown(session)

    async def _teardown(self, session: Session) -> None:
        uh = session.user_hash
        session.state = "stopping"
        t0 = trio.current_time()
        job = self._janitor.remove(
            uh,
            (("pod", pod_name(uh)), ("network", network_name(uh)), ("dir", uh)),
            leftover=False,
        )
        if not self._closed:
            # Someone may wait (a delete); past the bound the removal goes on in the
            # background, and the user's next start waits for it.
            with trio.move_on_after(self.teardown_timeout):
                await job.finished.wait()
        if job.state == "done":
            outcome = f"teardown complete in {trio.current_time() - t0:.3f} s"
        elif job.state == "failed":
            outcome = f"teardown FAILED ({job.error}): retried at shutdown"
        elif self._closed:
            outcome = "removal queued"
        else:
            outcome = (
                f"its objects are still being removed after {self.teardown_timeout:g} s"
                " (in the background)"
            )
        session._end("cancelled")  # a reason is known by now (the first one stays)
        session.state = "ended"
        if self._sessions.get(uh) is session:
            del self._sessions[uh]
        log = logger.warning if job.state == "failed" else logger.info
        log("session %s of user %s ended (%s); %s", session.id, uh, session.end_reason, outcome)
        session._settled.set()
        session.ended.set()
        try:
            self.observer.session_ended(session)
        except Exception:
            logger.exception("session observer failed")


def _sole(exc: Exception) -> Exception:
    """The one exception inside nested groups of one (else ``exc`` itself)."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _test_sweep_delay() -> float:
    """``C2L_TEST_SWEEP_DELAY``: seconds added before each leftover's removal.

    For tests only (tests/test_scale_podman.py): it makes "a new user is served while the
    sweep still runs" certain however fast the runtime removes. Not a setting to use.
    """
    text = os.environ.get("C2L_TEST_SWEEP_DELAY", "")
    try:
        return max(0.0, min(float(text), 60.0)) if text else 0.0
    except ValueError:
        logger.warning("C2L_TEST_SWEEP_DELAY=%r is not a number of seconds: ignored", text)
        return 0.0


@asynccontextmanager
async def open_orchestrator(
    config: Config,
    runtime: ContainerRuntime,
    *,
    probe: Probe | None = None,
    start_timeout: float = 30.0,
    teardown_timeout: float = 10.0,
    max_concurrent_starts: int = 4,
    admission_timeout: float = 10.0,
    watch: bool = True,
    observer: SessionObserver | None = None,
    stall_timeout: float = 60.0,
    lock_path: Path | None = None,
    sessions_dir: Path | None = None,
    replica: str | None = None,
) -> AsyncIterator[Orchestrator]:
    """Run an :class:`Orchestrator` for the duration of the ``async with`` block.

    With ``lock_path`` (see :func:`~orchestrator._replica.replica_lock_path`), first takes
    the replica lock there, or raises :class:`~orchestrator.GatewayRunning` naming the live
    gateway that holds it, before touching the runtime. Then it is handed out at once, and
    every object labelled ``cloudtolocalllm.proxy=true`` then (leftovers of gateways no
    longer running) is removed in the background; a new session of a user whose leftover
    is still there waits only for that user's removal. On exit, every session ends and
    every object is removed, for as long as the runtime makes progress (``stall_timeout``
    bounds a wait without any); :class:`~orchestrator.ObjectsLeft` says what is left if
    that fails. Each session's directory (its proxy's socket) is made under
    ``sessions_dir`` (see :func:`~orchestrator._sockets.sessions_dir_path`), which is
    created ``0700`` for the runtime's user (:meth:`ContainerRuntime.service_owner`; the
    fallback directory if that user cannot reach it), and leftover directories there are
    swept with the runtime's leftovers; without it, under a private temporary directory
    removed on exit (tests, the fake runtime). ``probe`` decides when a started proxy is
    ready (default: ``GET /health`` on its socket answers 200). With ``watch``, a reaper
    ends idle sessions every ``config.cleanup_interval``, each session's proxy is
    health-checked every ``config.health_interval``, and the runtime's event stream ends a
    session as soon as its proxy container exits. At most ``max_concurrent_starts``
    sessions are created at once; a start that waits ``admission_timeout`` for a slot
    fails with :class:`TooManySessions`. ``replica`` is this gateway's id on every object
    it makes (a new random one unless the deployment names it: ``C2L_REPLICA_ID``).
    """
    # The id a deployment gives this replica (Kubernetes: its pod's name), else a new one.
    replica = replica or new_replica_id()
    url = str(getattr(runtime, "url", "") or config.podman_url)
    with _replica_lock(lock_path, replica, url):
        await runtime.ping()
        owner = await runtime.service_owner()
        # The runtime's user mounts the session directories: it must reach them (it would
        # not beside a socket that relays to the service from a directory of root's).
        if sessions_dir and owner and not reachable_by(sessions_dir.parent, owner[0]):
            logger.info("the runtime's user cannot reach %s: using another", sessions_dir)
            sessions_dir = fallback_sessions_dir(url)
        with _session_dirs(sessions_dir, owner) as dirs:
            dirs.prepare()
            async with _serve_orchestrator(
                config,
                runtime,
                dirs,
                probe=probe,
                start_timeout=start_timeout,
                teardown_timeout=teardown_timeout,
                watch=watch,
                admission_timeout=admission_timeout,
                observer=observer,
                stall_timeout=stall_timeout,
                replica=replica,
                max_concurrent_starts=max_concurrent_starts,
            ) as orch:
                yield orch


@asynccontextmanager
async def _serve_orchestrator(
    config: Config,
    runtime: ContainerRuntime,
    dirs: SessionDirs,
    *,
    probe: Probe | None,
    start_timeout: float,
    teardown_timeout: float,
    watch: bool,
    admission_timeout: float,
    observer: SessionObserver | None,
    stall_timeout: float,
    replica: str,
    max_concurrent_starts: int,
) -> AsyncIterator[Orchestrator]:
    """The orchestrator's nursery, its background tasks and its shutdown (see above)."""
    async with trio.open_nursery() as nursery:
        orch = Orchestrator(
            config,
            runtime,
            nursery,
            probe or http_health_probe,
            dirs,
            start_timeout=start_timeout,
            teardown_timeout=teardown_timeout,
            watch=watch,
            admission_timeout=admission_timeout,
            observer=observer or _NoObserver(),
            stall_timeout=stall_timeout,
            replica=replica,
            limiter=trio.CapacityLimiter(max_concurrent_starts),
        )
        async with _serving(orch, nursery):
            yield orch
    # Raised out here, not inside the nursery (which would wrap it in a group).
    if orch._left is not None:
        raise orch._left


@contextmanager
def _replica_lock(lock_path: Path | None, replica: str, runtime_url: str) -> Iterator[None]:
    """Hold the replica lock at ``lock_path`` (if any) for the block."""
    if lock_path is None:
        yield
        return
    lock = acquire_replica_lock(lock_path, replica, runtime_url)
    logger.info("gateway replica %s holds %s", replica, lock_path)
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _session_dirs(
    sessions_dir: Path | None, owner: tuple[int, int] | None
) -> Iterator[SessionDirs]:
    """The sessions directory for the block: ``sessions_dir`` (removed on exit if empty;
    what a failed shutdown left in it stays for the next gateway's sweep), or a private
    temporary one removed on exit."""
    if sessions_dir is not None:
        try:
            yield SessionDirs(sessions_dir, owner)
        finally:
            with contextlib.suppress(OSError):  # not empty, or not there
                sessions_dir.rmdir()
        return
    temporary = Path(tempfile.mkdtemp(prefix="c2l-sessions-"))
    try:
        yield SessionDirs(temporary, owner)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


@asynccontextmanager
async def _serving(orch: Orchestrator, nursery: trio.Nursery) -> AsyncIterator[None]:
    """Run ``orch``'s background tasks in ``nursery`` for the block; on the way out (shielded)
    end every session and remove every object, then stop the janitor.

    The result of that shutdown is ``orch._left``; the caller raises it. If the block raised,
    the block's exception goes on and what is left is logged (unless already reported).
    """
    orch._janitor.leftover_delay = _test_sweep_delay()
    # The janitor's workers are shielded: only janitor.stop() below ends them.
    nursery.start_soon(orch._janitor.serve, name="janitor")
    background = trio.CancelScope()

    async def watchers() -> None:
        with background:
            async with trio.open_nursery() as inner:
                inner.start_soon(orch.serve_reaper)
                await inner.start(orch.serve_exit_watch)

    nursery.start_soon(orch._sweep, name="sweep")
    if orch.watch:
        nursery.start_soon(watchers)
    body_raised = False
    try:
        yield
    except BaseException:
        body_raised = True
        raise
    finally:
        background.cancel()
        try:
            with trio.CancelScope(shield=True):
                left = await orch._shutdown("shutdown")
            if left is not None and body_raised and not orch._left_reported:
                logger.error("%s", left)  # the body's exception goes on
        finally:
            orch._janitor.stop()
            orch._janitor.listed()  # nobody may wait for a listing that never comes
