"""Running the gateway: Hypercorn (trio worker) + orchestrator, and its blocking entry point."""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve

import wire
from c2lcore import Config
from orchestrator import (
    ContainerRuntime,
    GatewayRunning,
    KubernetesRuntime,
    KubernetesSessions,
    KubernetesState,
    PodmanRuntime,
    RuntimeUnavailable,
    SharedState,
    open_kubernetes_sessions,
    open_orchestrator,
    replica_lock_path,
    sessions_dir_path,
)
from orchestrator._kubernetes import DEFAULT_NAMESPACE

from ._app import create_app
from ._audit import AuditObserver, SessionObservers, configure_audit_log
from ._auth import make_authenticator
from ._direct import AddressGuard, DirectKey, DirectRoutes
from ._metrics import Metrics, serve_metrics
from ._state import MAX_HEAD_BYTES, Gateway

log = logging.getLogger("c2l.gateway")

#: Where a pod finds its own namespace (the service account's).
_SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@attrs.frozen
class RunningGateway:
    """What :func:`serve_gateway` reports once it accepts connections."""

    gateway: Gateway
    binds: list[str]

    @property
    def url(self) -> str:
        """Base URL of the first bind, e.g. ``http://127.0.0.1:8080``."""
        return self.binds[0]


def _hypercorn_config(config: Config) -> HyperConfig:
    hc = HyperConfig()
    hc.bind = [f"{config.host}:{config.port}"]
    if config.tls_cert and config.tls_key:
        # HTTPS and WSS only: Hypercorn then reports the scheme as https/wss, so the
        # session API answers wss:// endpoints.
        hc.certfile = config.tls_cert
        hc.keyfile = config.tls_key
    hc.websocket_max_message_size = wire.MAX_FRAME_BYTES
    # The whole request head (request line + headers): bigger is refused before parsing.
    hc.h11_max_incomplete_size = MAX_HEAD_BYTES
    hc.graceful_timeout = 2.0
    hc.accesslog = None  # request lines carry no tokens, but there is no need for them
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


@contextlib.asynccontextmanager
async def _kubernetes_sessions(config: Config) -> AsyncIterator[KubernetesSessions]:
    """Sessions as Pods (DESIGN.md section 6): the API from the service account in a
    cluster, else ``KUBECONFIG``; this replica's own Pod (``C2L_REPLICA_ID``) owns them."""
    namespace = config.k8s_namespace or _service_account_namespace() or DEFAULT_NAMESPACE
    k8s = KubernetesRuntime.from_env(namespace=namespace, replica=config.replica_id or "")
    try:
        with trio.fail_after(30):
            await k8s.ping()
            if config.replica_id:
                await k8s.resolve_owner()
    except BaseException:
        with trio.CancelScope(shield=True):
            await k8s.aclose()
        raise
    async with open_kubernetes_sessions(k8s) as sessions:
        log.info("sessions run as pods in namespace %s of %s", namespace, k8s.server)
        yield sessions


async def _shared_state(config: Config, state: SharedState) -> dict[str, Any]:
    """The keys and registrations every replica shares (DESIGN.md section 6): the audit
    key and the ``c2l-direct`` signing key made by the first replica, read by the others;
    tunnel registrations in ``state``."""
    with trio.fail_after(30):
        audit_key = await state.key("audit-hmac-key", lambda: secrets.token_bytes(32))
        pem = await state.key("direct-jwt-key", DirectKey.new_pem)
    guard = AddressGuard(config.allow_private_tunnels)
    direct = DirectRoutes(DirectKey.from_pem(pem), guard, config.tunnel_ttl, state)
    return {"audit_key": audit_key, "direct": direct}


def _service_account_namespace() -> str | None:
    try:
        return Path(_SA_NAMESPACE).read_text().strip() or None
    except OSError:
        return None


async def serve_gateway(
    config: Config,
    *,
    runtime: ContainerRuntime | None = None,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[RunningGateway] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the gateway until ``shutdown`` is set (or the task is cancelled).

    On the way out every session is torn down, whether the exit is graceful or not. With
    the Podman runtime of ``config`` (no ``runtime`` given), the gateway holds the replica
    lock of that Podman service for as long as it runs: a second one refuses to start.
    """
    auth, dev = make_authenticator(config)
    async with contextlib.AsyncExitStack() as stack:
        lock_path = sessions_dir = None
        if runtime is None and config.runtime == "kubernetes":
            runtime = await stack.enter_async_context(_kubernetes_sessions(config))
        elif runtime is None:
            runtime = await stack.enter_async_context(PodmanRuntime(config.podman_url))
            lock_path = replica_lock_path(config.podman_url)
            sessions_dir = sessions_dir_path(config.podman_url)
        metrics = Metrics()
        orch = await stack.enter_async_context(
            open_orchestrator(
                config,
                runtime,
                observer=SessionObservers(metrics, AuditObserver()),
                lock_path=lock_path,
                sessions_dir=sessions_dir,
                replica=config.replica_id,
            )
        )
        metrics.orchestrator = orch
        shared: dict[str, Any] = {}
        if isinstance(runtime, KubernetesSessions):
            shared = await _shared_state(config, KubernetesState(runtime.k8s))
        async with trio.open_nursery() as nursery:
            gateway = Gateway(config, orch, auth, dev, metrics=metrics, **shared)
            app = create_app(gateway)
            stop = shutdown if shutdown is not None else trio.Event()
            host, port = config.metrics_bind
            await nursery.start(
                functools.partial(serve_metrics, metrics, host, port, shutdown_trigger=stop.wait)
            )
            binds = await nursery.start(
                functools.partial(
                    hypercorn_serve, app, _hypercorn_config(config), shutdown_trigger=stop.wait
                )
            )
            log.info("gateway serving on %s (auth mode %s)", ", ".join(binds), config.auth_mode)
            task_status.started(RunningGateway(gateway, binds))
            await stop.wait()
            # Hypercorn stops accepting now and waits (graceful_timeout) for open
            # connections; ending every session at once closes the relays' clients, and
            # aclose() returns once every pod is removed: as long as that takes while
            # Podman makes progress (it removes one at a time), and ObjectsLeft if not.
            t0 = trio.current_time()
            n = len(orch.sessions())
            await orch.aclose("shutdown")
            await gateway.direct.aclose()
            log.info("shutdown: %d sessions torn down in %.2f s", n, trio.current_time() - t0)
            nursery.cancel_scope.deadline = trio.current_time() + 5


async def _serve_until_signalled(config: Config) -> None:
    shutdown = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            watching = trio.CancelScope()

            async def on_signal() -> None:
                # No deadline here: the shutdown removes every session's objects for as
                # long as Podman makes progress, and is bounded when it makes none.
                with watching:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if not shutdown.is_set():
                            log.info("got %s: shutting down", name)
                            shutdown.set()
                        else:
                            log.warning(
                                "got %s: still removing the sessions' objects (SIGKILL stops"
                                " at once; the next `c2l serve` then removes what is left)",
                                name,
                            )

            nursery.start_soon(on_signal)
            async with trio.open_nursery() as serving:
                running = await serving.start(
                    functools.partial(serve_gateway, config, shutdown=shutdown)
                )
                print(f"c2l gateway listening on {running.url}", flush=True)
            watching.cancel()  # serve_gateway returned: everything is removed
    log.info("gateway stopped")


class ServeError(Exception):
    """The gateway could not serve (its address is taken or not allowed)."""


def run_gateway(config: Config) -> None:
    """Run the gateway until SIGINT/SIGTERM; every session is torn down on the way out.

    The blocking entry point of ``c2l serve``. Raises :class:`ServeError` when it cannot
    listen, and the orchestrator's :class:`GatewayRunning` (another gateway holds the
    Podman service) or :class:`RuntimeUnavailable` (Podman cannot be reached, or objects
    are left after shutdown: :class:`ObjectsLeft`), each one exception with a message
    that names the fix.
    """
    configure_audit_log(sys.stderr)
    # Not ``except*``: a plain exception raised in an ``except*`` clause comes out wrapped in
    # a new group on Python 3.11 before 3.11.4 (Debian 12's 3.11.2, the gateway image's).
    try:
        trio.run(_serve_until_signalled, config)
    except (BaseExceptionGroup, GatewayRunning, RuntimeUnavailable, OSError) as caught:
        exc = _first(caught) if isinstance(caught, BaseExceptionGroup) else caught
        if isinstance(exc, GatewayRunning | RuntimeUnavailable):
            raise exc from None
        if isinstance(exc, OSError):
            raise ServeError(f"cannot serve on {config.host}:{config.port}: {exc}") from None
        raise


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
