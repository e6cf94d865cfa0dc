"""Removing runtime objects: every teardown and the sweep of leftovers, through one queue.

Podman serialises removals (about 0.4 s per session, measured, whatever the call count or
the concurrency beyond a few), so a thousand concurrent teardowns only queue inside
Podman until their fixed timeouts give up. Here every removal is a *job* (one user's
objects) in one queue, run by a few workers: teardowns of live sessions and removals a
new session waits for go first, leftovers of earlier gateways after them, and a shutdown
waits for the queue to empty for as long as the runtime makes progress. A job also removes
the session's host directory (its proxy's socket, :mod:`._sockets`), after the pod that
mounts it.

A shutdown removes the networks of this gateway's sessions in one call instead of one by
one: each job removes its pod, then waits ("parked") while the other pods go; once no pod
removal is left, one call removes every unused network labelled as this gateway's
(:meth:`ContainerRuntime.remove_unused_networks`) and the parked jobs go on, removing
whatever network that call did not, one by one as before, then the directory. Podman 4.3
makes every single network removal a pass over all its containers and the next operation a
re-read of every network's file, so one by one they cost more the more sessions are live
(measured in ../notes/TEARDOWN.md: 0.22 s per network at 175 live; 20 in one call 0.2 s).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal, TypeAlias

import attrs
import trio

from c2lcore import BackoffPolicy

from ._runtime import ContainerRuntime, LabelledObjects
from ._sockets import SessionDirs

logger = logging.getLogger("c2l.orchestrator")

#: "dir" is a session's host directory in the sessions directory, named by user hash.
Kind: TypeAlias = Literal["container", "pod", "network", "dir"]
JobState: TypeAlias = Literal["queued", "running", "parked", "done", "failed"]

#: Object name prefixes, by kind (DESIGN.md section 2): the suffix is the user hash.
PREFIXES: dict[Kind, str] = {
    "container": "c2l-proxy-",
    "pod": "c2l-pod-",
    "network": "c2l-net-",
    "dir": "",
}
#: Failures logged one by one; past that they are counted (a dead runtime fails them all).
_LOGGED_FAILURES = 3
#: Delays between the attempts of one removal job (no jitter: one gateway's own queue).
REMOVAL_RETRY = BackoffPolicy(base=2.0, factor=2.0, cap=10.0, jitter=False)


def owner(kind: Kind, name: str) -> str:
    """The user hash an object name belongs to (the name itself if it is not ours)."""
    prefix = PREFIXES[kind]
    return name.removeprefix(prefix) if name.startswith(prefix) else name


def by_owner(found: LabelledObjects, dirs: Iterable[str] = ()) -> dict[str, list[tuple[Kind, str]]]:
    """Labelled objects (and session directories, by user hash) grouped by user, each
    group in removal order.

    A pod goes first and takes its containers with it (a container alone is removed only
    when its pod is not listed); the network goes after it, once nothing uses it, and the
    session directory last, once no container mounts it.
    """
    groups: dict[str, list[tuple[Kind, str]]] = {}
    pods = {owner("pod", p) for p in found.pods}
    for kind, names in (
        ("pod", found.pods),
        ("container", found.containers),
        ("network", found.networks),
    ):
        for name in names:
            key = owner(kind, name)  # type: ignore[arg-type]
            if kind == "container" and key in pods:
                continue
            groups.setdefault(key, []).append((kind, name))  # type: ignore[arg-type]
    for name in dirs:
        groups.setdefault(name, []).append(("dir", name))
    return groups


@attrs.define
class SweepProgress:
    """The background removal of leftovers of gateways that are no longer running.

    Counted in sessions (one user's network, pod and container are one).
    """

    #: Leftover sessions found when the gateway started.
    total: int = 0
    removed: int = 0
    failed: int = 0
    #: The runtime was listed (until then, new sessions wait: they might clash).
    listed: bool = False

    @property
    def remaining(self) -> int:
        """Leftover sessions still to remove."""
        return self.total - self.removed - self.failed

    @property
    def done(self) -> bool:
        """Listed, and every leftover removed or given up on."""
        return self.listed and self.remaining == 0


@attrs.define(eq=False)
class Job:
    """The removal of one user's objects, in order."""

    user_hash: str
    names: tuple[tuple[Kind, str], ...]
    #: A leftover of an earlier gateway (counted in :class:`SweepProgress`).
    leftover: bool
    #: Someone waits for it: it goes before every job that is not.
    urgent: bool = True
    state: JobState = "queued"
    #: Index in :attr:`names` of the next object to remove (a parked job resumes there).
    step: int = 0
    #: Its network was already offered to a removal of all networks at once (or that was
    #: not possible): it is removed on its own, if still there.
    batched: bool = False
    #: Back from parked: the same attempt goes on.
    resuming: bool = False
    attempts: int = 0
    error: str = ""
    #: Set once the job is done or given up on.
    finished: trio.Event = attrs.field(factory=trio.Event, repr=False)


@attrs.define(eq=False)
class Janitor:
    """The removal queue and its workers (see the module docstring).

    Run :meth:`serve` in a nursery; it is shielded from outer cancellation (a removal must
    not be abandoned because the gateway is being cancelled) and ends when :meth:`stop`
    is called, which the owner does on its way out after :meth:`drain`.
    """

    runtime: ContainerRuntime
    #: Where the sessions' directories are (a job's "dir" names are user hashes there).
    dirs: SessionDirs | None = None
    #: Removals at once: Podman serialises them, so more only queue inside Podman.
    workers: int = 4
    #: Of which at most this many for leftovers nobody waits for while the gateway serves
    #: (starts need Podman too); all of them once it stops.
    leftover_workers: int = 2
    #: A runtime call is given up on after this long without any removal finishing.
    call_timeout: float = 60.0
    #: Attempts of a job while serving (a shutdown gives up at once; its final pass
    #: lists the runtime and tries once more).
    attempts: int = 3
    #: Delays between a job's attempts: 2 s, then 4 s.
    retry: BackoffPolicy = REMOVAL_RETRY
    #: Seconds before every removal of a leftover (test-only: ``C2L_TEST_SWEEP_DELAY``
    #: makes "while the sweep runs" certain on a fast runtime).
    leftover_delay: float = 0.0
    #: The label (``key=value``) of this gateway's own networks: while closing, they are
    #: removed all at once (see the module docstring); empty: always one by one.
    network_label: str = ""
    #: The removal of all networks at once is given up on (then they go one by one) after
    #: this long plus :attr:`batch_seconds_per_network` per network. Podman 4.3 re-reads
    #: every remaining network's file for each network a prune removes, so the call grows
    #: with the square of their number (measured: 200 in 2.9 s, 500 in 29.4 s); a
    #: shutdown's stall bound does not run while it is in flight.
    batch_timeout: float = 30.0
    batch_seconds_per_network: float = 0.15
    sweep: SweepProgress = attrs.field(factory=SweepProgress)
    _queue: collections.deque[Job] = attrs.field(factory=collections.deque)
    _jobs: dict[str, Job] = attrs.field(factory=dict)
    _lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    _background_running: int = 0
    _unfinished: int = 0
    _idle: trio.Event = attrs.field(factory=trio.Event)
    _listed: trio.Event = attrs.field(factory=trio.Event)
    _scope: trio.CancelScope = attrs.field(factory=lambda: trio.CancelScope(shield=True))
    _inflight: set[trio.CancelScope] = attrs.field(factory=set)
    #: Jobs waiting for the removal of all networks at once, and the jobs being run.
    _parked: list[Job] = attrs.field(factory=list)
    _running: int = 0
    #: Networks the removals at once took away (their jobs skip them).
    _gone_networks: set[str] = attrs.field(factory=set)
    _watchdog: trio.CancelScope | None = None
    _stall_timeout: float = 0.0
    _closing: bool = False
    _failures: int = 0
    _last_log: float = -1e9
    _last_drain_log: float = -1e9
    _sweep_started: float = 0.0

    def __attrs_post_init__(self) -> None:
        self._idle.set()

    # -- queue -------------------------------------------------------------------

    def remove(self, user_hash: str, names: Iterable[tuple[Kind, str]], *, leftover: bool) -> Job:
        """Queue the removal of ``names`` (one user's objects, in order); returns the job.

        A user with an unfinished job keeps that one (it removes the same names). A job of a
        live session goes to the front: someone waits for it.
        """
        job = self._jobs.get(user_hash)
        if job is not None and job.state in ("queued", "running", "parked"):
            if not leftover:
                self._hurry(job)
            return job
        job = Job(user_hash, tuple(names), leftover, urgent=not leftover)
        self._jobs[user_hash] = job
        self._unfinished += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        (self._queue.appendleft if job.urgent else self._queue.append)(job)
        self._lot.unpark()
        return job

    def _hurry(self, job: Job) -> None:
        job.urgent = True
        if job.state == "queued":
            self._queue.remove(job)
            self._queue.appendleft(job)
            self._lot.unpark()

    async def wait_clear(self, user_hash: str) -> None:
        """Return once nothing of ``user_hash``'s earlier objects is being or to be removed.

        Waits for the runtime to be listed first (a leftover might have this user's names),
        then moves the user's job to the front and waits for it.
        """
        await self._listed.wait()
        job = self._jobs.get(user_hash)
        if job is None or job.finished.is_set():
            return
        self._hurry(job)
        await job.finished.wait()

    async def wait_listed(self) -> None:
        """Return once the runtime was listed for leftovers (or could not be)."""
        await self._listed.wait()

    def pending(self) -> list[Job]:
        """Every job not finished (queued, running or parked)."""
        return [job for job in self._jobs.values() if not job.finished.is_set()]

    def failed(self) -> list[Job]:
        """Every job given up on, whose objects may still be there."""
        return [job for job in self._jobs.values() if job.state == "failed"]

    def retry_failed(self) -> None:
        """Queue every job given up on once more (a shutdown's final pass)."""
        for job in self.failed():
            if job.leftover:
                self.sweep.failed -= 1
            del self._jobs[job.user_hash]
            retry = self.remove(job.user_hash, job.names, leftover=job.leftover)
            retry.urgent = True

    # -- sweep -------------------------------------------------------------------

    def sweep_found(self, found: LabelledObjects, dirs: Iterable[str] = ()) -> None:
        """Queue the removal of leftovers (listed at start), behind everything else."""
        dirs = list(dirs)
        groups = by_owner(found, dirs)
        self.sweep.total += len(groups)
        self._sweep_started = trio.current_time()
        if groups:
            logger.warning(
                "found leftovers of %d sessions of gateways no longer running (%d pods, %d"
                " containers, %d networks, %d session directories): removing them in the"
                " background",
                len(groups),
                len(found.pods),
                len(found.containers),
                len(found.networks),
                len(dirs),
            )
        for user_hash, names in groups.items():
            self.remove(user_hash, names, leftover=True)
        self.listed()

    def listed(self) -> None:
        """The runtime was listed (or could not be): new sessions may start."""
        self.sweep.listed = True
        self._listed.set()

    def _sweep_progress(self, job: Job) -> None:
        if job.state == "done":
            self.sweep.removed += 1
        else:
            self.sweep.failed += 1
        now = trio.current_time()
        if self.sweep.remaining == 0 or now - self._last_log >= 5:
            self._last_log = now
            logger.info(
                "sweep: removed %d of %d leftover sessions (%d remaining, %d failed) in %.1f s",
                self.sweep.removed,
                self.sweep.total,
                self.sweep.remaining,
                self.sweep.failed,
                now - self._sweep_started,
            )

    # -- workers -----------------------------------------------------------------

    async def serve(self) -> None:
        """Run the workers until :meth:`stop` (shielded from outer cancellation)."""
        with self._scope:
            async with trio.open_nursery() as nursery:
                for i in range(self.workers):
                    nursery.start_soon(self._worker, name=f"janitor-{i}")

    def stop(self) -> None:
        """End the workers (a removal in flight is abandoned: call :meth:`drain` first)."""
        self._scope.cancel()

    def _next(self) -> Job | None:
        limit = self.workers if self._closing else self.leftover_workers
        for job in self._queue:
            if job.urgent or self._background_running < limit:
                self._queue.remove(job)
                return job
        return None

    async def _worker(self) -> None:
        while True:
            if self._parked and not self._queue and not self._running:
                # Every pod that was to go is gone (or given up on): the networks now.
                await self._remove_networks_at_once()
                continue
            job = self._next()
            if job is None:
                await self._lot.park()
                continue
            background = not job.urgent
            self._background_running += background
            self._running += 1
            try:
                await self._run(job)
            finally:
                self._running -= 1
                self._background_running -= background
                self._lot.unpark()  # a background slot may be free now

    def _defers(self, job: Job, kind: Kind) -> bool:
        """Whether ``job`` leaves its network to a removal of all networks at once."""
        # Only this gateway's own (a leftover of another gateway carries another label),
        # and only while closing: serving, another session's network may be in use soon.
        return kind == "network" and self._closing and bool(self.network_label) and not job.batched

    async def _remove_networks_at_once(self) -> None:
        """One call for the networks of every parked job; then they go on (one by one for
        whatever network is still there)."""
        parked, self._parked = self._parked, []
        t0 = trio.current_time()
        bound = self.batch_timeout + self.batch_seconds_per_network * len(parked)
        if self._watchdog is not None:
            # One call doing the work of many: no stall while it runs within its bound.
            self._watchdog.deadline = max(self._watchdog.deadline, t0 + bound + self._stall_timeout)
        try:
            # Not in _inflight: other removals' progress does not extend this bound.
            with trio.move_on_after(bound) as call:
                gone = await self.runtime.remove_unused_networks(self.network_label)
            if call.cancelled_caught:
                raise trio.TooSlowError
        except Exception as exc:
            why = str(exc) if not isinstance(exc, trio.TooSlowError) else "no answer"
            logger.warning(
                "shutdown: removing %d networks at once failed (%s): removing them one by one",
                len(parked),
                why,
            )
        else:
            self._gone_networks.update(gone)
            self._progress()
            logger.info(
                "shutdown: removed %d networks at once in %.1f s",
                len(gone),
                trio.current_time() - t0,
            )
        for job in reversed(parked):
            job.batched = job.resuming = True
            job.state = "queued"
            self._queue.appendleft(job)
        self._lot.unpark_all()

    async def _run(self, job: Job) -> None:
        resuming, job.resuming = job.resuming, False
        job.state = "running"
        if not resuming:
            job.attempts += 1
        removers: dict[Kind, Callable[[str], Awaitable[None]]] = {
            "container": self.runtime.remove_container,
            "pod": self.runtime.remove_pod,
            "network": self.runtime.remove_network,
            "dir": self._remove_dir,
        }
        try:
            if job.leftover and self.leftover_delay and not resuming:
                await trio.sleep(self.leftover_delay)
            while job.step < len(job.names):
                kind, name = job.names[job.step]
                if self._defers(job, kind):
                    job.state = "parked"
                    self._parked.append(job)
                    self._log_drain()
                    return
                if kind == "network" and name in self._gone_networks:
                    job.step += 1
                    continue
                # Calls queue inside Podman behind each other: a call is given up on only
                # when no removal at all finished for call_timeout, not after a fixed time.
                with trio.CancelScope(deadline=trio.current_time() + self.call_timeout) as call:
                    self._inflight.add(call)
                    try:
                        await removers[kind](name)
                    finally:
                        self._inflight.discard(call)
                if call.cancelled_caught:
                    raise trio.TooSlowError
                job.step += 1
                self._progress()
        except Exception as exc:
            job.error = str(exc) if not isinstance(exc, trio.TooSlowError) else "no answer"
            if job.attempts < self.attempts and not self._closing:
                delay = self.retry.ceiling(job.attempts - 1)
                self._failures += 1
                if self._failures <= _LOGGED_FAILURES:
                    logger.warning(
                        "removing the objects of user %s failed (%s): retrying in %g s",
                        job.user_hash,
                        job.error,
                        delay,
                    )
                await trio.sleep(delay)
                job.state = "queued"
                (self._queue.appendleft if job.urgent else self._queue.append)(job)
                return
            self._finish(job, "failed")
            return
        self._finish(job, "done")

    async def _remove_dir(self, user_hash: str) -> None:
        # In the event loop (see SessionDirs): one socket file and a directory, microseconds.
        if self.dirs is not None:
            self.dirs.remove(user_hash)
        await trio.lowlevel.checkpoint()

    def _finish(self, job: Job, state: JobState) -> None:
        job.state = state
        if state == "failed":
            self._failures += 1
            if self._failures <= _LOGGED_FAILURES:
                logger.warning(
                    "could not remove the objects of user %s (%s)", job.user_hash, job.error
                )
        job.finished.set()
        if job.leftover:
            self._sweep_progress(job)
        self._log_drain(finishing=1)
        if self._jobs.get(job.user_hash) is job and state == "done":
            del self._jobs[job.user_hash]
        self._unfinished -= 1
        if self._unfinished == 0:
            self._idle.set()

    def _log_drain(self, finishing: int = 0) -> None:
        """Every 10 s while closing: how many sessions' objects are still to remove."""
        now = trio.current_time()
        left = self._unfinished - finishing
        if self._closing and left > 0 and now - self._last_drain_log >= 10:
            self._last_drain_log = now
            parked = len(self._parked)
            logger.info(
                "shutdown: %d sessions' objects still to remove%s",
                left,
                f" ({parked} of them only their network, removed at once next)" if parked else "",
            )

    def _progress(self) -> None:
        deadline = trio.current_time() + self.call_timeout
        for call in self._inflight:
            call.deadline = deadline
        if self._watchdog is not None:
            self._watchdog.deadline = trio.current_time() + self._stall_timeout

    # -- shutdown ----------------------------------------------------------------

    def begin_closing(self) -> None:
        """The owner is stopping: from now on every worker may take leftovers, nothing is
        retried and this gateway's networks wait to be removed at once (:meth:`drain`
        waits for it all)."""
        self._closing = True
        self._lot.unpark_all()

    async def drain(self, stall_timeout: float) -> bool:
        """Wait until every job finished; False if the runtime made no progress at all for
        ``stall_timeout`` seconds first (the wait scales with the work, not the clock).

        From now on every worker may take leftovers and nothing is retried.
        """
        self._closing = True
        self._stall_timeout = stall_timeout
        self._lot.unpark_all()
        with trio.move_on_after(stall_timeout) as watchdog:
            self._watchdog = watchdog
            while self._unfinished:
                await self._idle.wait()
        self._watchdog = None
        return not watchdog.cancelled_caught
