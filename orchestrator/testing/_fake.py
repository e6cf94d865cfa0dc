"""An in-memory :class:`ContainerRuntime` for tests, with fault injection.

Optionally it runs a real in-process proxy for every started pod, listening on the UNIX
socket in the container's session directory as the container's proxy does
(``proxy.serve_proxy_unix``), so the gateway's tests talk to a live proxy without Podman
along the same path as in production.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

import attrs
import trio

import wire

from .._errors import ObjectNotFound, RuntimeObjectError, RuntimeUnavailable
from .._runtime import LABEL_SESSION, ContainerExit, LabelledObjects, ProxySpec

FaultAction = Literal["fail", "block", "block_after", "delay", "late"]

T = TypeVar("T")


@attrs.define
class Fault:
    """What to do on the next ``times`` calls of ``method``.

    ``fail`` raises ``exc`` before the call takes effect; ``block`` hangs before it takes
    effect and ``block_after`` hangs after (the way a real runtime may finish work whose
    answer never arrives); ``delay`` sleeps ``seconds`` first; ``late`` takes effect
    ``seconds`` later *even if the caller gave up meanwhile*, the way a REST server
    finishes a request whose client disconnected.
    """

    method: str
    action: FaultAction
    seconds: float = 0.0
    exc: BaseException | None = None
    times: float = 1


@attrs.define
class FakeNetwork:
    """A network the fake holds."""

    name: str
    labels: dict[str, str]
    subnet: str
    options: dict[str, str]
    #: No egress and no published ports (as every session's network is).
    internal: bool = True


@attrs.define
class FakePod:
    """A pod the fake holds."""

    name: str
    network: str
    labels: dict[str, str]
    started: bool = False
    #: The socket its in-process proxy listens on (``run_proxies``), once started.
    socket_path: str | None = None


def _matches(labels: Mapping[str, str], selector: str) -> bool:
    key, _, value = selector.partition("=")
    return key in labels and (not value or labels[key] == value)


@attrs.define(eq=False)
class FakeRuntime:
    """In-memory runtime: records objects and calls; inject faults with :meth:`inject`.

    With ``run_proxies=True`` (needs ``nursery``, see :func:`open_fake_runtime`) each
    started pod runs a real proxy with the container's secret on the UNIX socket in the
    container's ``socket_dir`` (``proxy.serve_proxy_unix``).
    The ``nursery`` also owns the work of ``late`` faults, which finishes after its caller
    gave up.
    """

    nursery: trio.Nursery | None = None
    run_proxies: bool = False
    available: bool = True
    networks: dict[str, FakeNetwork] = attrs.field(factory=dict)
    pods: dict[str, FakePod] = attrs.field(factory=dict)
    containers: dict[str, ProxySpec] = attrs.field(factory=dict)
    #: Every call, in order, as (method, name).
    calls: list[tuple[str, str]] = attrs.field(factory=list)
    faults: list[Fault] = attrs.field(factory=list)
    _subnets: itertools.count[int] = attrs.field(factory=lambda: itertools.count(0))
    _proxies: dict[str, trio.CancelScope] = attrs.field(factory=dict)
    #: Containers whose process has exited (still present, as in Podman).
    exited: set[str] = attrs.field(factory=set)
    #: Host pids that :meth:`container_pid` answers, by container name (tests set them).
    pids: dict[str, int] = attrs.field(factory=dict)
    _watchers: list[tuple[str, Callable[[ContainerExit], None], trio.Event]] = attrs.field(
        factory=list
    )
    #: Seconds every removal takes, one removal at a time, the way Podman serialises them
    #: (about 0.4 s each, measured): for tests of shutdown and sweeps at scale.
    removal_seconds: float = 0.0
    _removing: trio.Lock = attrs.field(factory=trio.Lock)

    def __attrs_post_init__(self) -> None:
        if self.run_proxies and self.nursery is None:
            raise ValueError("FakeRuntime(run_proxies=True) needs a nursery: use open_fake_runtime")

    # -- test helpers ------------------------------------------------------------

    def inject(
        self,
        method: str,
        action: FaultAction = "fail",
        *,
        seconds: float = 0.0,
        exc: BaseException | None = None,
        times: float = 1,
    ) -> None:
        """Make the next ``times`` calls of ``method`` (``"*"``: any) misbehave."""
        self.faults.append(Fault(method, action, seconds, exc, times))

    def objects(self) -> LabelledObjects:
        """Everything the fake holds, labelled or not."""
        return LabelledObjects(tuple(self.containers), tuple(self.pods), tuple(self.networks))

    @property
    def empty(self) -> bool:
        """True when the fake holds no object and runs no proxy."""
        return not self.objects() and not self._proxies

    def kill_container(self, name: str, exit_code: int = 137) -> None:
        """Make the container's process die (as ``podman kill`` would) and report it."""
        spec = self.containers[name]
        self._stop_proxy(spec.pod)
        self.exited.add(name)
        for label, report, _ in list(self._watchers):
            if _matches(spec.labels, label):
                report(ContainerExit(name, spec.labels.get(LABEL_SESSION, ""), exit_code))

    def break_exit_watchers(self) -> None:
        """End every :meth:`watch_exits` with RuntimeUnavailable (a restarted service)."""
        for _, _, broken in self._watchers:
            broken.set()

    @property
    def exit_watchers(self) -> int:
        """How many :meth:`watch_exits` calls are watching."""
        return len(self._watchers)

    def method_calls(self, method: str) -> list[str]:
        """The names passed to ``method``, in call order."""
        return [name for m, name in self.calls if m == method]

    # -- fault machinery ---------------------------------------------------------

    def _take(self, method: str, actions: tuple[FaultAction, ...]) -> Fault | None:
        for fault in self.faults:
            if fault.method in (method, "*") and fault.action in actions and fault.times > 0:
                fault.times -= 1
                return fault
        return None

    async def _before(self, method: str, name: str) -> None:
        self.calls.append((method, name))
        await trio.lowlevel.checkpoint()
        if not self.available:
            raise RuntimeUnavailable("fake runtime is not reachable: run `c2l doctor`")
        fault = self._take(method, ("fail", "block", "delay"))
        if fault is None:
            return
        if fault.action == "delay":
            await trio.sleep(fault.seconds)
        elif fault.action == "block":
            await trio.sleep_forever()
        else:
            raise fault.exc or RuntimeObjectError(f"injected failure: {method}({name})", name=name)

    async def _removal_cost(self) -> None:
        if self.removal_seconds > 0:
            async with self._removing:
                await trio.sleep(self.removal_seconds)

    async def _after(self, method: str) -> None:
        if self._take(method, ("block_after",)) is not None:
            await trio.sleep_forever()

    async def _apply(self, method: str, effect: Callable[[], T]) -> T:
        fault = self._take(method, ("late",))
        if fault is None:
            result = effect()
        else:
            done = trio.Event()
            outcome: list[Any] = []

            async def server() -> None:
                await trio.sleep(fault.seconds)
                try:
                    outcome.append(effect())
                except Exception as exc:
                    outcome.append(exc)
                done.set()

            # The fake's own nursery owns it: it outlives a cancelled caller, as the work of
            # a server whose client gave up does.
            if self.nursery is None:
                raise RuntimeError(
                    f"a 'late' fault of {method} needs the fake's nursery: use open_fake_runtime()"
                )
            self.nursery.start_soon(server, name=f"fake-late-{method}")
            await done.wait()
            if isinstance(outcome[0], Exception):
                raise outcome[0]
            result = outcome[0]
        await self._after(method)
        return result

    # -- ContainerRuntime --------------------------------------------------------

    async def ping(self) -> None:
        """Succeeds unless ``available`` is False."""
        await self._before("ping", "")

    async def service_owner(self) -> tuple[int, int] | None:
        """In-process proxies run as the gateway's own user: None."""
        await self._before("service_owner", "")
        return None

    async def create_network(self, name: str, labels: Mapping[str, str]) -> None:
        """Record an isolated network with the next free /24."""
        await self._before("create_network", name)

        def effect() -> None:
            if name in self.networks:
                raise RuntimeObjectError(f"network {name} exists", kind="network", name=name)
            n = next(self._subnets)
            subnet = f"10.{89 + n // 256}.{n % 256}.0/24"
            self.networks[name] = FakeNetwork(name, dict(labels), subnet, {"isolate": "true"})

        await self._apply("create_network", effect)

    async def create_pod(self, name: str, *, network: str, labels: Mapping[str, str]) -> None:
        """Record a pod on an existing network."""
        await self._before("create_pod", name)

        def effect() -> None:
            if name in self.pods:
                raise RuntimeObjectError(f"pod {name} already exists", kind="pod", name=name)
            if network not in self.networks:
                raise ObjectNotFound(f"network {network} not found", kind="network", name=network)
            self.pods[name] = FakePod(name, network, dict(labels))

        await self._apply("create_pod", effect)

    async def create_container(self, spec: ProxySpec) -> None:
        """Record a container in an existing pod."""
        await self._before("create_container", spec.name)

        def effect() -> None:
            if spec.name in self.containers:
                raise RuntimeObjectError(
                    f"container {spec.name} already exists", kind="container", name=spec.name
                )
            if spec.pod not in self.pods:
                raise ObjectNotFound(f"pod {spec.pod} not found", kind="pod", name=spec.pod)
            self.containers[spec.name] = spec

        await self._apply("create_container", effect)

    async def start_pod(self, name: str) -> None:
        """Mark the pod started; with ``run_proxies``, start a real proxy for it."""
        await self._before("start_pod", name)
        pod = self.pods.get(name)
        if pod is None:
            raise ObjectNotFound(f"pod {name} not found", kind="pod", name=name)
        if self.run_proxies:
            spec = next(c for c in self.containers.values() if c.pod == name)
            if spec.socket_dir is None:
                raise RuntimeObjectError(
                    f"container {spec.name} has no socket_dir to listen in", kind="pod", name=name
                )
            assert self.nursery is not None
            path = f"{spec.socket_dir}/{wire.SOCKET_NAME}"
            pod.socket_path = await self.nursery.start(
                self._serve, name, path, spec.env[wire.SECRET_ENV], _resume_window(spec.env)
            )
        pod.started = True
        await self._after("start_pod")

    async def _serve(
        self,
        pod: str,
        path: str,
        secret: str,
        resume_window: float | None = None,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # Imported at each start: proxy's __getattr__ then finds a test's wrapper, if any.
        from proxy import serve_proxy_unix  # type: ignore[attr-defined,unused-ignore]
        from proxy._hub import Hub

        # As the container's proxy reads C2L_RESUME_WINDOW from its environment.
        limits: dict[str, Any] = {}
        if resume_window is not None and resume_window != wire.RESUME_WINDOW_S:
            limits["hub"] = Hub(resume_window=resume_window)
        with trio.CancelScope() as scope:
            self._proxies[pod] = scope
            try:
                await serve_proxy_unix(path, secret=secret, task_status=task_status, **limits)
            finally:
                if self._proxies.get(pod) is scope:
                    del self._proxies[pod]

    def _stop_proxy(self, pod: str) -> None:
        scope = self._proxies.pop(pod, None)
        if scope is not None:
            scope.cancel()

    async def remove_container(self, name: str) -> None:
        """Forget the container; missing is fine."""
        await self._before("remove_container", name)
        await self._removal_cost()
        spec = self.containers.pop(name, None)
        self.exited.discard(name)
        if spec is not None:
            self._stop_proxy(spec.pod)
        await self._after("remove_container")

    async def remove_pod(self, name: str) -> None:
        """Forget the pod and its containers; missing is fine."""
        await self._before("remove_pod", name)
        await self._removal_cost()
        for cname in [c.name for c in self.containers.values() if c.pod == name]:
            del self.containers[cname]
        self.pods.pop(name, None)
        self._stop_proxy(name)
        await self._after("remove_pod")

    async def remove_network(self, name: str) -> None:
        """Forget the network (and, like Podman's force, any pod on it); missing is fine."""
        await self._before("remove_network", name)
        await self._removal_cost()
        for pod in [p.name for p in self.pods.values() if p.network == name]:
            for cname in [c.name for c in self.containers.values() if c.pod == pod]:
                del self.containers[cname]
            del self.pods[pod]
            self._stop_proxy(pod)
        self.networks.pop(name, None)
        await self._after("remove_network")

    async def remove_unused_networks(self, label: str) -> list[str]:
        """Forget every network carrying ``label`` that no pod is on, in one call (it costs
        one ``removal_seconds``, as one Podman prune does); return their names."""
        await self._before("remove_unused_networks", label)
        await self._removal_cost()
        used = {p.network for p in self.pods.values()}
        removed = [
            n for n, w in self.networks.items() if _matches(w.labels, label) and n not in used
        ]
        for name in removed:
            del self.networks[name]
        await self._after("remove_unused_networks")
        return removed

    async def list_labelled(self, label: str) -> LabelledObjects:
        """Names of the objects carrying ``label`` (``key=value`` or ``key``)."""
        await self._before("list_labelled", label)
        return LabelledObjects(
            tuple(n for n, c in self.containers.items() if _matches(c.labels, label)),
            tuple(n for n, p in self.pods.items() if _matches(p.labels, label)),
            tuple(n for n, w in self.networks.items() if _matches(w.labels, label)),
        )

    async def inspect_container(self, name: str) -> dict[str, Any]:
        """A Podman-shaped subset of ``podman container inspect``."""
        await self._before("inspect_container", name)
        spec = self.containers.get(name)
        if spec is None:
            raise ObjectNotFound(f"container {name} not found", kind="container", name=name)
        return {
            "Name": spec.name,
            "Pod": spec.pod,
            "Config": {
                "User": spec.user,
                "Labels": dict(spec.labels),
                "Env": [f"{k}={v}" for k, v in spec.env.items()],
                "Image": spec.image,
            },
            "HostConfig": {
                "ReadonlyRootfs": spec.read_only,
                "CapDrop": list(spec.cap_drop),
                "SecurityOpt": ["no-new-privileges"] if spec.no_new_privileges else [],
                "Memory": spec.memory,
                "CpuQuota": spec.cpu_quota,
                "CpuPeriod": spec.cpu_period,
                "PidsLimit": spec.pids_limit,
                "Tmpfs": {"/tmp": f"rw,size={spec.tmpfs_size}"},
                "Binds": [f"{spec.socket_dir}:{wire.SOCKET_DIR}:rw,nosuid,nodev,noexec"]
                if spec.socket_dir
                else [],
            },
        }

    async def container_pid(self, name: str) -> int | None:
        """In-process proxies have no process of their own: None unless set in ``pids``."""
        await self._before("container_pid", name)
        if name not in self.containers:
            raise ObjectNotFound(f"container {name} not found", kind="container", name=name)
        return self.pids.get(name)

    async def watch_exits(
        self,
        label: str,
        report: Callable[[ContainerExit], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Report :meth:`kill_container` calls until cancelled or :meth:`break_exit_watchers`."""
        await self._before("watch_exits", label)
        entry = (label, report, trio.Event())
        self._watchers.append(entry)
        try:
            task_status.started()
            await entry[2].wait()
        finally:
            self._watchers.remove(entry)
        raise RuntimeUnavailable("fake runtime: the event stream broke")

    async def aclose(self) -> None:
        """Stop every in-process proxy."""
        for pod in list(self._proxies):
            self._stop_proxy(pod)
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_fake_runtime(*, run_proxies: bool = False) -> AsyncIterator[FakeRuntime]:
    """A :class:`FakeRuntime` whose in-process proxies (if any) live inside this block."""
    async with trio.open_nursery() as nursery:
        fake = FakeRuntime(nursery=nursery, run_proxies=run_proxies)
        try:
            yield fake
        finally:
            await fake.aclose()
            nursery.cancel_scope.cancel()


def _resume_window(env: Mapping[str, str]) -> float | None:
    """``C2L_RESUME_WINDOW`` of a proxy's environment (None: unset or not a number)."""
    try:
        return float(env["C2L_RESUME_WINDOW"])
    except (KeyError, ValueError):
        return None
