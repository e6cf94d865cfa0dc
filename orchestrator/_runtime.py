"""The narrow interface between the orchestrator and a container runtime.

The orchestrator only ever talks to :class:`ContainerRuntime`; Podman is one implementation
of it (:mod:`orchestrator._podman`), the in-memory fake used by tests is another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol, runtime_checkable

import attrs
import trio

LABEL_PROXY: Final = "cloudtolocalllm.proxy"
LABEL_USER: Final = "cloudtolocalllm.user"
LABEL_SESSION: Final = "cloudtolocalllm.session"
#: The gateway instance that made the object (DESIGN.md section 2).
LABEL_REPLICA: Final = "cloudtolocalllm.replica"
#: The label filter that selects every object the project ever made.
PROXY_SELECTOR: Final = f"{LABEL_PROXY}=true"
#: Address space the OCI runtime itself needs under the container's RLIMIT_AS: runc
#: applies the limit to its own init process (a Go program) before that execs the proxy,
#: and runc 1.1.5 fails below about 1000 MiB ("error adding seccomp filter rule ...:
#: cannot allocate memory"; 950 MiB fails, 1000 MiB starts). The proxy itself peaks
#: at about 25 MB.
RUNTIME_RESERVE: Final = 1024**3


def object_labels(user_hash: str, session_id: str, replica: str = "") -> dict[str, str]:
    """The labels every Podman object of one session carries (DESIGN.md section 2).

    ``replica`` is the id of the gateway instance that makes the object (the orchestrator
    always gives it; objects made without it are anyone's leftovers).
    """
    labels = {LABEL_PROXY: "true", LABEL_USER: user_hash, LABEL_SESSION: session_id}
    if replica:
        labels[LABEL_REPLICA] = replica
    return labels


def network_name(user_hash: str) -> str:
    """``c2l-net-<userhash>``."""
    return f"c2l-net-{user_hash}"


def pod_name(user_hash: str) -> str:
    """``c2l-pod-<userhash>``."""
    return f"c2l-pod-{user_hash}"


def container_name(user_hash: str) -> str:
    """``c2l-proxy-<userhash>``."""
    return f"c2l-proxy-{user_hash}"


@attrs.frozen
class ProxySpec:
    """Everything needed to create one user's hardened proxy container.

    The defaults are the hardening every proxy gets; only identity, image, environment and
    the resource numbers vary per deployment.
    """

    name: str
    pod: str
    image: str
    labels: Mapping[str, str]
    env: Mapping[str, str] = attrs.field(repr=False)  # holds the session secret
    #: The session's host directory, bind-mounted at ``wire.SOCKET_DIR`` (read-write,
    #: nosuid, nodev, noexec): the proxy listens on ``wire.SOCKET_NAME`` in it.
    socket_dir: str | None = None
    #: The user's network, which the container joins itself (its pod has no infra
    #: container); None leaves the container in its pod's network namespace.
    network: str | None = None
    memory: int = 512 * 1024**2
    cpus: float = 0.5
    pids_limit: int = 64
    user: str = "1001:1001"
    read_only: bool = True
    cap_drop: tuple[str, ...] = ("ALL",)
    no_new_privileges: bool = True
    tmpfs_size: int = 16 * 1024**2
    stop_timeout: int = 2
    #: RLIMIT_AS (bytes) of every process in the container, ``memory`` plus
    #: :data:`RUNTIME_RESERVE` unless given. It needs no cgroups, so it holds where Podman
    #: drops the cgroup limits (rootless cgroup v1): no process in the container can map
    #: more than that, whatever the host.
    address_space: int = attrs.field(
        default=attrs.Factory(lambda self: self.memory + RUNTIME_RESERVE, takes_self=True)
    )

    @property
    def cpu_period(self) -> int:
        """CFS period in microseconds."""
        return 100_000

    @property
    def cpu_quota(self) -> int:
        """CFS quota in microseconds per :attr:`cpu_period` (``cpus`` of a core)."""
        return int(self.cpus * self.cpu_period)


@attrs.frozen
class LabelledObjects:
    """Names of the runtime's objects that carry a label, by kind."""

    containers: tuple[str, ...] = ()
    pods: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.containers or self.pods or self.networks)


@attrs.frozen
class ContainerExit:
    """A container of ours stopped running (exit, kill, OOM), as the runtime reported it."""

    name: str
    #: The ``cloudtolocalllm.session`` label of the container ("" if it had none).
    session_id: str = ""
    exit_code: int | None = None


class ContainerRuntime(Protocol):
    """What the orchestrator needs from a container runtime.

    Every method is a trio checkpoint and cancellable. Failures are raised as
    :class:`~orchestrator.RuntimeUnavailable` (runtime unreachable) or
    :class:`~orchestrator.RuntimeObjectError` (naming the object). ``remove_*`` are
    idempotent: removing something that does not exist succeeds.
    """

    async def ping(self) -> None:
        """Raise :class:`~orchestrator.RuntimeUnavailable` unless the runtime answers."""

    async def service_owner(self) -> tuple[int, int] | None:
        """Host uid and gid the runtime runs containers as (their root), or None when that
        is whoever runs the gateway. The sessions directory must be theirs to mount."""

    async def create_network(self, name: str, labels: Mapping[str, str]) -> None:
        """Create an isolated, internal bridge network with a subnet of its own.

        Internal: no route out (no NAT, no egress) and no port forwarding into it; the
        proxy is reached over the UNIX socket in its bind-mounted session directory.
        """

    async def create_pod(self, name: str, *, network: str, labels: Mapping[str, str]) -> None:
        """Create a pod on ``network``; it publishes no port."""

    async def create_container(self, spec: ProxySpec) -> None:
        """Create (not start) the proxy container described by ``spec`` in its pod."""

    async def start_pod(self, name: str) -> None:
        """Start every container of the pod."""

    async def remove_container(self, name: str) -> None:
        """Stop (short timeout) and remove a container; missing is fine."""

    async def remove_pod(self, name: str) -> None:
        """Stop (short timeout) and remove a pod and its containers; missing is fine."""

    async def remove_network(self, name: str) -> None:
        """Remove a network; missing is fine."""

    async def remove_unused_networks(self, label: str) -> list[str]:
        """Remove, in one call, every network carrying ``label`` (``key=value``) that no
        container uses; return their names. Networks in use are left alone."""

    async def list_labelled(self, label: str) -> LabelledObjects:
        """Every container, pod and network carrying ``label`` (``key=value``)."""

    async def inspect_container(self, name: str) -> dict[str, Any]:
        """The runtime's description of a container (for tests and diagnostics)."""

    async def container_pid(self, name: str) -> int | None:
        """Host pid of the container's main process, or None when it has none here."""

    async def watch_exits(
        self,
        label: str,
        report: Callable[[ContainerExit], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``report`` for every container carrying ``label`` that stops running.

        Calls ``task_status.started()`` once it is watching; runs until cancelled, or
        raises :class:`~orchestrator.RuntimeUnavailable` when the runtime goes away (the
        caller reconnects).
        """

    async def aclose(self) -> None:
        """Release connections to the runtime."""


@runtime_checkable
class PlacesProxies(Protocol):
    """A runtime that places each proxy itself and says where it listens (Kubernetes: a
    pod address), instead of the UNIX socket in the session's directory (Podman)."""

    async def proxy_address(self, user_hash: str) -> tuple[str, int]:
        """Wait (bounded by the caller) until the user's proxy is ready; its address."""
        ...

    def adopted(self, user_hash: str) -> tuple[str, str] | None:
        """``(session id, secret)`` of the user's proxy when the orchestrator did not make
        it (a pod adopted from another replica: its session, under that one's id), else
        None."""
        ...


@runtime_checkable
class ReportsUsage(Protocol):
    """A runtime that reports its proxies' resource use itself (Kubernetes: the metrics
    API), where the orchestrator cannot read their processes (they run elsewhere)."""

    async def usage_by_user(self) -> dict[str, tuple[int | None, float | None]]:
        """(memory bytes, CPU cores) by user hash; empty when unknown."""
        ...
