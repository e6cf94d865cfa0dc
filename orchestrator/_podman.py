"""The Podman implementation of :class:`ContainerRuntime`: the libpod REST API over httpx.

httpx runs on trio (through anyio), so every call is a cancellable checkpoint that never
blocks the event loop; podman-py is not used because it blocks (DESIGN.md section 3).
The HTTP client itself (URL forms, API prefix, error translation) is :mod:`._podman_api`,
shared with the command line.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import trio

import wire

from ._errors import ObjectNotFound, RuntimeObjectError, RuntimeUnavailable
from ._podman_api import AsyncPodmanClient
from ._runtime import LABEL_SESSION, ContainerExit, LabelledObjects, ProxySpec

logger = logging.getLogger("c2l.orchestrator")


class PodmanRuntime:
    """Talk to the Podman REST service at ``url`` (``unix:///path/podman.sock``).

    Every call goes through the one Podman client (:mod:`._podman_api`), which translates
    failures into the orchestrator's exceptions; :meth:`aclose` releases its connections.
    """

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url = url
        self._api = AsyncPodmanClient(url, timeout=timeout)
        #: Warnings Podman gave when creating each live container, by name.
        self.warnings: dict[str, list[str]] = {}
        self._warned: set[str] = set()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._api.aclose()

    async def __aenter__(self) -> PodmanRuntime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- transport ---------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        what: str,
        kind: str = "",
        name: str = "",
        params: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> Any:
        return await self._api.request(
            method, path, what=what, kind=kind, name=name, params=params, body=body
        )

    async def _remove(self, kind: str, path: str, name: str, params: dict[str, str]) -> None:
        with contextlib.suppress(ObjectNotFound):  # already gone is what we want
            await self._request(
                "DELETE", path, what=f"remove {kind} {name}", kind=kind, name=name, params=params
            )

    # -- ContainerRuntime --------------------------------------------------------

    async def ping(self) -> None:
        """Raise :class:`RuntimeUnavailable` unless ``/_ping`` answers."""
        await self._request("GET", "/_ping", what="answer a ping")

    async def service_owner(self) -> tuple[int, int] | None:
        """From ``/info``: the host ids that the containers' root maps to (rootless: the
        service user), whoever owns the socket (a relay, say); None for root Podman."""
        info = await self._request("GET", "/info", what="describe itself")
        mappings = ((info or {}).get("host") or {}).get("idMappings") or {}
        ids = []
        for key in ("uidmap", "gidmap"):
            for entry in mappings.get(key) or ():
                if entry.get("container_id") == 0:
                    ids.append(int(entry["host_id"]))
                    break
        return (ids[0], ids[1]) if len(ids) == 2 else None

    async def create_network(self, name: str, labels: Mapping[str, str]) -> None:
        """An isolated, internal bridge; Podman picks a free subnet from its pools.

        ``internal``: no default route, so no egress and no NAT (the proxy never dials
        out: the desktop agent dials the gateway), and no port can be published on it.
        netavark then adds no masquerade or port-forwarding rules for it, whose number
        made every other network's setup and teardown slower (DESIGN.md section 3).
        """
        await self._request(
            "POST",
            "/networks/create",
            what=f"create network {name}",
            kind="network",
            name=name,
            body={
                "name": name,
                "driver": "bridge",
                "labels": dict(labels),
                # isolate: no traffic to or from other users' bridges.
                "options": {"isolate": "true"},
                "internal": True,
                "dns_enabled": False,
            },
        )

    async def create_pod(self, name: str, *, network: str, labels: Mapping[str, str]) -> None:
        """A pod without an infra container, that publishes nothing (no ``rootlessport``).

        ``network`` is not attached to the pod: the pod's one container joins it itself
        (``ProxySpec.network``, :func:`container_body`), so the
        pod needs no infra container to hold a network namespace: one ``conmon`` and one
        OCI runtime start and stop fewer per session. Measured here at 0 live sessions:
        pod start 0.30 -> 0.17 s, create to ready 0.53 -> 0.36-0.44 s, pod + network
        removal 0.41-0.54 -> 0.26 s. The proxy is reached over the UNIX socket in its
        session directory, which is mounted into the container.
        """
        await self._request(
            "POST",
            "/pods/create",
            what=f"create pod {name}",
            kind="pod",
            name=name,
            body={"name": name, "labels": dict(labels), "no_infra": True},
        )

    async def create_container(self, spec: ProxySpec) -> None:
        """Create the hardened proxy container in its pod.

        Podman answers with warnings for settings it drops; on rootless cgroup v1 hosts it
        drops every resource limit ("Resource limits are not supported and ignored on
        cgroups V1 rootless systems") and inspect then shows 0. The warnings are kept in
        :attr:`warnings` (per container, until it is removed) and logged once.
        """
        answer = await self._request(
            "POST",
            "/containers/create",
            what=f"create container {spec.name}",
            kind="container",
            name=spec.name,
            body=container_body(spec),
        )
        warnings = [str(w) for w in (answer or {}).get("Warnings") or ()]
        if warnings:
            self.warnings[spec.name] = warnings
            for text in warnings:
                if text not in self._warned:
                    self._warned.add(text)
                    logger.warning("podman: %s (first seen creating %s)", text, spec.name)

    async def start_pod(self, name: str) -> None:
        """Start the pod's proxy container."""
        answer = await self._request(
            "POST", f"/pods/{name}/start", what=f"start pod {name}", kind="pod", name=name
        )
        errs = answer.get("Errs") if isinstance(answer, dict) else None
        if errs:
            raise RuntimeObjectError(
                f"podman could not start pod {name}: {errs}", kind="pod", name=name
            )

    async def inspect_pod(self, name: str) -> dict[str, Any]:
        """``podman pod inspect``."""
        info: dict[str, Any] = await self._request(
            "GET", f"/pods/{name}/json", what=f"inspect pod {name}", kind="pod", name=name
        )
        return info

    async def inspect_network(self, name: str) -> dict[str, Any]:
        """``podman network inspect``."""
        info: dict[str, Any] = await self._request(
            "GET",
            f"/networks/{name}/json",
            what=f"inspect network {name}",
            kind="network",
            name=name,
        )
        return info

    async def inspect_container(self, name: str) -> dict[str, Any]:
        """``podman container inspect``."""
        info: dict[str, Any] = await self._request(
            "GET",
            f"/containers/{name}/json",
            what=f"inspect container {name}",
            kind="container",
            name=name,
        )
        return info

    async def container_pid(self, name: str) -> int | None:
        """``State.Pid`` of the container (0, i.e. not running, gives None)."""
        info = await self.inspect_container(name)
        pid = int((info.get("State") or {}).get("Pid") or 0)
        return pid or None

    async def remove_container(self, name: str) -> None:
        """Stop with a short timeout (the proxy handles SIGTERM) and remove."""
        self.warnings.pop(name, None)
        await self._remove(
            "container", f"/containers/{name}", name, {"force": "true", "timeout": "1"}
        )

    async def remove_pod(self, name: str) -> None:
        """Stop and remove the pod with whatever containers are left in it."""
        await self._remove("pod", f"/pods/{name}", name, {"force": "true", "timeout": "1"})

    async def remove_network(self, name: str) -> None:
        """Remove the network (force: also anything still attached)."""
        await self._remove("network", f"/networks/{name}", name, {"force": "true"})

    async def remove_unused_networks(self, label: str) -> list[str]:
        """``POST /networks/prune`` filtered on ``label``: every unused network carrying it,
        in one call.

        Removing networks one by one costs Podman 4.3 a pass over every container (to find
        the network's users, one database transaction each) per network, and each removal
        makes the next network operation re-read every network's file; a prune makes that
        pass once (measured: 20 networks in 0.2 s, against 0.22 s each, at 175 live
        sessions). A network some container still uses is kept (never forced), so a
        network of a session whose pod is still there, or being made, is not touched.
        """
        answer = await self._request(
            "POST",
            "/networks/prune",
            what=f"remove the unused networks labelled {label}",
            params={"filters": json.dumps({"label": [label]})},
        )
        removed = []
        for report in answer if isinstance(answer, list) else ():
            if not isinstance(report, dict) or report.get("Error"):
                continue
            name = report.get("Name") or report.get("name")
            if name:
                removed.append(str(name))
        return removed

    async def watch_exits(
        self,
        label: str,
        report: Callable[[ContainerExit], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow Podman's event stream for ``died`` events of containers with ``label``.

        One long-lived request for all sessions (a ``wait`` per container would hold one
        connection to the service per user). Podman writes ``died`` as soon as conmon
        sees the container's process exit, whatever the cause (exit, kill, OOM).
        """
        filters = {"type": ["container"], "event": ["died"], "label": [label]}
        params = {"stream": "true", "filters": json.dumps(filters)}
        try:
            async with self._api.http.stream(
                "GET", "/events", params=params, timeout=httpx.Timeout(None, connect=5.0)
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise RuntimeUnavailable(
                        f"podman socket {self.url} refused its event stream"
                        f" (HTTP {response.status_code}): {response.text.strip()}"
                    )
                task_status.started()
                async for line in response.aiter_lines():
                    exit_ = _container_exit(line)
                    if exit_ is not None:
                        report(exit_)
        except (httpx.TransportError, OSError) as exc:
            raise RuntimeUnavailable(
                f"podman socket {self.url}: event stream broke ({exc!r})"
            ) from None
        raise RuntimeUnavailable(f"podman socket {self.url}: event stream ended")

    async def list_labelled(self, label: str) -> LabelledObjects:
        """Containers (running or not), pods and networks carrying ``label``."""
        params = {"filters": json.dumps({"label": [label]})}
        containers = await self._request(
            "GET", "/containers/json", what="list containers", params={**params, "all": "true"}
        )
        pods = await self._request("GET", "/pods/json", what="list pods", params=params)
        networks = await self._request("GET", "/networks/json", what="list networks", params=params)
        return LabelledObjects(
            # Infra containers inherit their pod's labels but go only with the pod.
            tuple(c["Names"][0] for c in containers or () if not c.get("IsInfra")),
            tuple(p["Name"] for p in pods or ()),
            tuple(n["name"] for n in networks or ()),
        )


def _container_exit(line: str) -> ContainerExit | None:
    """A ``died`` event line of ``GET /events`` as a :class:`ContainerExit`, else None."""
    try:
        event = json.loads(line)
        attributes = event["Actor"]["Attributes"]
        if event.get("Action") != "died":
            return None
        code = attributes.get("containerExitCode")
        return ContainerExit(
            name=str(attributes.get("name", "")),
            session_id=str(attributes.get(LABEL_SESSION, "")),
            exit_code=int(code) if code not in (None, "") else None,
        )
    except (ValueError, KeyError, TypeError):
        return None


def container_body(spec: ProxySpec) -> dict[str, Any]:
    """The libpod SpecGenerator for ``spec`` (``POST /libpod/containers/create``)."""
    env = dict(spec.env)
    mounts: list[dict[str, Any]] = [
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": [f"size={spec.tmpfs_size}", "mode=1777", "nosuid", "nodev", "noexec"],
        }
    ]
    if spec.socket_dir is not None:
        # The session's own host directory, where the proxy makes its socket: the only
        # writable place besides /tmp, and nothing in it can be executed or be a device.
        mounts.append(
            {
                "destination": wire.SOCKET_DIR,
                "type": "bind",
                "source": spec.socket_dir,
                "options": ["rw", "nosuid", "nodev", "noexec"],
            }
        )
        env[wire.SOCKET_ENV] = f"{wire.SOCKET_DIR}/{wire.SOCKET_NAME}"
    network: dict[str, Any] = {}
    if spec.network is not None:
        # The pod has no infra container: the proxy's own network namespace is on the
        # user's network (DESIGN.md section 2: a network of its own per user).
        network = {"netns": {"nsmode": "bridge"}, "Networks": {spec.network: {}}}
    return {
        "name": spec.name,
        "pod": spec.pod,
        **network,
        "image": spec.image,
        "labels": dict(spec.labels),
        "env": env,
        "user": spec.user,
        "read_only_filesystem": spec.read_only,
        # No implicit writable tmpfs on /run and /var/tmp: only the bounded /tmp below.
        "read_only_tmpfs": False,
        "cap_drop": list(spec.cap_drop),
        "no_new_privileges": spec.no_new_privileges,
        "resource_limits": {
            "memory": {"limit": spec.memory},
            "cpu": {"quota": spec.cpu_quota, "period": spec.cpu_period},
            "pids": {"limit": spec.pids_limit},
        },
        # The cgroup limits above are dropped on rootless cgroup v1 hosts; a resource
        # limit is not (`--ulimit as=N`), so memory stays bounded there too. Only the
        # address space: RLIMIT_CPU counts CPU seconds over the process's life, so it
        # would kill a long session however idle; RLIMIT_NPROC counts per host uid, and
        # every proxy maps to the same one, so one user's processes would use up all.
        "r_limits": [{"type": "as", "hard": spec.address_space, "soft": spec.address_space}],
        "mounts": mounts,
        "stop_timeout": spec.stop_timeout,
        "systemd": "false",
    }
