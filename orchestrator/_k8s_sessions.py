"""The orchestrator's runtime on Kubernetes (DESIGN.md section 6): one Pod per session.

:class:`KubernetesSessions` gives the orchestrator the same :class:`ContainerRuntime` it
drives on Podman, over :class:`~orchestrator._kubernetes.KubernetesRuntime`, so the session
model (admission, start slots, readiness, idle and health, teardown, shutdown) is one
piece of code for both. Where Podman's shape does not fit:

- network + pod + container collapse into one Pod (and its Secret): ``create_network`` and
  ``create_pod`` make nothing (the NetworkPolicy isolates every proxy; the Pod is made with
  its container), ``create_container`` makes the session's Pod, ``start_pod`` has nothing
  to start (the kubelet does);
- the proxy's address comes from the runtime (:class:`~orchestrator.PlacesProxies`): the
  pod IP, once the watch sees the Pod ready;
- create-or-adopt: a Pod of that name that is live (another replica's session of the same
  user) is adopted, its secret used, and never deleted by this replica: its removal here
  only forgets it;
- every listing and removal is limited to this replica's own objects (the label
  ``cloudtolocalllm.replica``): a starting replica sweeps only what an earlier run of
  itself left, never another live replica's sessions;
- exits come from the one list + watch of the proxy pods that this adapter runs for its
  whole life (:func:`open_kubernetes_sessions`), which also keeps the routing table.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

import wire

from ._kubernetes import KubernetesRuntime, PodEvent
from ._runtime import (
    LABEL_REPLICA,
    LABEL_SESSION,
    LABEL_USER,
    PROXY_SELECTOR,
    ContainerExit,
    LabelledObjects,
    ProxySpec,
    container_name,
)

_POD_PREFIX = "c2l-pod-"


@attrs.define(eq=False)
class KubernetesSessions:
    """:class:`~orchestrator.ContainerRuntime` over a :class:`KubernetesRuntime`."""

    k8s: KubernetesRuntime
    #: user hash -> the uid of the Pod this replica made or adopted
    _uids: dict[str, str] = attrs.field(factory=dict)
    #: user hash -> (session id, secret) of an adopted Pod (another replica's session)
    _adopted: dict[str, tuple[str, str]] = attrs.field(factory=dict, repr=False)
    _subscribers: list[Callable[[PodEvent], None]] = attrs.field(factory=list)

    @property
    def url(self) -> str:
        """The API server (for logs)."""
        return self.k8s.server

    def _mine(self, label: str) -> str:
        """``label`` narrowed to this replica's objects."""
        own = f"{LABEL_REPLICA}={self.k8s.replica}"
        return label if own in label.split(",") else f"{label},{own}"

    # -- ContainerRuntime -------------------------------------------------------------

    async def ping(self) -> None:
        await self.k8s.ping()

    async def service_owner(self) -> tuple[int, int] | None:
        await trio.lowlevel.checkpoint()
        return None

    async def create_network(self, name: str, labels: Mapping[str, str]) -> None:
        await trio.lowlevel.checkpoint()  # the NetworkPolicy isolates every proxy pod

    async def create_pod(self, name: str, *, network: str, labels: Mapping[str, str]) -> None:
        await trio.lowlevel.checkpoint()  # the Pod is made with its container

    async def create_container(self, spec: ProxySpec) -> None:
        uh = spec.labels[LABEL_USER]
        pod = await self.k8s.create_session(
            user_hash=uh,
            session_id=spec.labels[LABEL_SESSION],
            secret=spec.env[wire.SECRET_ENV],
            image=spec.image,
            memory=spec.memory,
            cpus=spec.cpus,
            **_resume_option(spec),
        )
        self._uids[uh] = pod.uid
        if pod.adopted:
            self._adopted[uh] = (pod.session_id, pod.secret)
        else:
            self._adopted.pop(uh, None)

    async def start_pod(self, name: str) -> None:
        await trio.lowlevel.checkpoint()  # the kubelet starts it

    async def remove_container(self, name: str) -> None:
        await trio.lowlevel.checkpoint()  # goes with its Pod

    async def remove_pod(self, name: str) -> None:
        uh = name.removeprefix(_POD_PREFIX)
        self._uids.pop(uh, None)
        if self._adopted.pop(uh, None) is not None:
            await trio.lowlevel.checkpoint()  # another replica's session: never deleted here
            return
        await self.k8s.remove_session(uh)

    async def remove_network(self, name: str) -> None:
        await trio.lowlevel.checkpoint()

    async def remove_unused_networks(self, label: str) -> list[str]:
        await trio.lowlevel.checkpoint()
        return []

    async def list_labelled(self, label: str) -> LabelledObjects:
        found = await self.k8s.list_labelled(self._mine(label))
        return LabelledObjects(pods=found.pods)

    async def inspect_container(self, name: str) -> dict[str, Any]:
        uh = name.removeprefix("c2l-proxy-")
        state = self.k8s.state(uh)
        await trio.lowlevel.checkpoint()
        return attrs.asdict(state) if state is not None else {}

    async def container_pid(self, name: str) -> int | None:
        await trio.lowlevel.checkpoint()
        return None  # on another machine

    async def watch_exits(
        self,
        label: str,
        report: Callable[[ContainerExit], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        def on_event(event: PodEvent) -> None:
            if event.kind in ("died", "gone"):
                state = event.state
                report(
                    ContainerExit(
                        container_name(state.user_hash), state.session_id, state.exit_code
                    )
                )

        self._subscribers.append(on_event)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._subscribers.remove(on_event)

    async def aclose(self) -> None:
        await self.k8s.aclose()

    # -- PlacesProxies ---------------------------------------------------------------

    async def proxy_address(self, user_hash: str) -> tuple[str, int]:
        return await self.k8s.wait_ready(user_hash, self._uids.get(user_hash))

    def adopted(self, user_hash: str) -> tuple[str, str] | None:
        return self._adopted.get(user_hash)

    async def usage_by_user(self) -> dict[str, tuple[int | None, float | None]]:
        """(memory bytes, CPU cores) of each proxy pod by user hash (the metrics API)."""
        return await self.k8s.pod_usage()

    # -- the watch -------------------------------------------------------------------

    def _dispatch(self, event: PodEvent) -> None:
        for subscriber in list(self._subscribers):
            subscriber(event)


@asynccontextmanager
async def open_kubernetes_sessions(k8s: KubernetesRuntime) -> AsyncIterator[KubernetesSessions]:
    """The adapter, with the watch of every proxy pod running for the block (it feeds
    readiness, addresses and exits); the API client is closed on the way out."""
    sessions = KubernetesSessions(k8s)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(k8s.watch_pods, PROXY_SELECTOR, sessions._dispatch)
            yield sessions
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await k8s.aclose()


def _resume_option(spec: ProxySpec) -> dict[str, float]:
    """The session pod's resume window, as the orchestrator put it in the spec's env."""
    text = spec.env.get("C2L_RESUME_WINDOW")
    try:
        return {} if text is None else {"resume_window": float(text)}
    except ValueError:
        return {}
