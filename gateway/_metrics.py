"""``GET /metrics``: the gateway's Prometheus metrics, and the counters its handlers bump.

prometheus_client renders the text exposition format (escaping, ``_total``/``_bucket``
suffixes, histogram cumulation) exactly as Prometheus parses it; writing that by hand is
where exporters usually go wrong. Each gateway has its own registry, so several gateways
in one process (tests) never share counters.

There are no per-user labels (nor per-session ones: one session is one user): resource
figures are summed over the live sessions. Who is online, and how much each uses, is in
the admin API only. :func:`serve_metrics` serves ``/metrics`` without a token on
``C2L_METRICS_ADDR`` (loopback by default, for a local Prometheus); on the main port the
gateway answers it to an admin token only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from orchestrator import Orchestrator, Session, Usage

log = logging.getLogger("c2l.gateway")

#: The ``Content-Type`` of the text exposition format.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: End reasons reported as themselves; anything else (start failures, crashes) is folded
#: into a few bounded values so the label cannot grow without bound.
_REASONS: Final = frozenset(
    {
        "deleted",
        "idle",
        "unhealthy",
        "proxy_exited",
        "shutdown",
        "abandoned",
        "busy",
        "cancelled",
    }
)

#: Create-to-ready latency buckets (seconds): the target is p50 0.35 s, p99 1 s.
_READY_BUCKETS: Final = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)


def end_reason_label(reason: str | None) -> str:
    """A bounded label value for a session's end reason."""
    if reason is None:
        return "cancelled"
    if reason in _REASONS:
        return reason
    if reason.startswith("start failed"):
        return "start_failed"
    return "error"


@attrs.define(eq=False)
class _SessionCollector:
    """Live sessions and their resource figures, read from the orchestrator at scrape time."""

    metrics: Metrics

    def collect(self) -> Iterator[Metric]:
        orch = self.metrics.orchestrator
        sessions = orch.sessions() if orch is not None else []
        live = GaugeMetricFamily("c2l_sessions_live", "Sessions not yet ended", labels=["state"])
        by_state: dict[str, int] = {"starting": 0, "ready": 0, "stopping": 0}
        for s in sessions:
            by_state[s.state] = by_state.get(s.state, 0) + 1
        for state, n in by_state.items():
            live.add_metric([state], n)
        yield live
        memory = [u.memory_bytes for u in self.metrics.usage.values() if u.memory_bytes is not None]
        cpu = [u.cpu_seconds for u in self.metrics.usage.values() if u.cpu_seconds is not None]
        yield GaugeMetricFamily(
            "c2l_sessions_memory_bytes",
            "Proxy process memory (PSS) summed over the live sessions",
            value=sum(memory),
        )
        yield GaugeMetricFamily(
            "c2l_sessions_memory_max_bytes",
            "Proxy process memory (PSS) of the live session that uses the most",
            value=max(memory, default=0),
        )
        yield GaugeMetricFamily(
            "c2l_sessions_cpu_seconds",
            "Proxy process CPU time summed over the live sessions",
            value=sum(cpu),
        )
        if orch is not None:
            # Removal of the leftovers of gateways no longer running, in the background.
            sweep = orch.sweep
            for name, text, value in (
                ("c2l_sweep_leftovers", "Leftover sessions found at start", sweep.total),
                ("c2l_sweep_removed", "Leftover sessions removed so far", sweep.removed),
                ("c2l_sweep_remaining", "Leftover sessions still to remove", sweep.remaining),
                ("c2l_removals_pending", "Sessions whose objects are being removed", None),
            ):
                yield GaugeMetricFamily(
                    name, text, value=orch.removals_pending() if value is None else value
                )


class Metrics:
    """The gateway's metrics; also the orchestrator's :class:`SessionObserver`.

    ``orchestrator`` is set once the orchestrator runs (its sessions are read at scrape
    time); until then the per-session families are empty.
    """

    def __init__(self, orchestrator: Orchestrator | None = None) -> None:
        self.registry = CollectorRegistry()
        self.orchestrator = orchestrator
        #: Resource figures of the last scrape, by session id.
        self.usage: dict[str, Usage] = {}
        #: Base URL of :func:`serve_metrics` while it serves (None: not served).
        self.url: str | None = None
        r = self.registry
        self.sessions_created = Counter(
            "c2l_sessions_created", "Sessions admitted (starting)", registry=r
        )
        self.sessions_destroyed = Counter(
            "c2l_sessions_destroyed", "Sessions torn down, by reason", ["reason"], registry=r
        )
        self.create_seconds = Histogram(
            "c2l_session_create_seconds",
            "Seconds from admission to a ready proxy",
            buckets=_READY_BUCKETS,
            registry=r,
        )
        self.connections = Gauge(
            "c2l_connections", "Open client connections by side", ["side"], registry=r
        )
        self.messages = Counter(
            "c2l_messages_relayed",
            "WebSocket messages relayed; in = towards the proxy",
            ["side", "direction"],
            registry=r,
        )
        self.bytes = Counter(
            "c2l_bytes_relayed",
            "Bytes relayed; in = towards the proxy",
            ["side", "direction"],
            registry=r,
        )
        self.errors = Counter(
            "c2l_errors",
            "Error messages and responses sent to clients, by code",
            ["code"],
            registry=r,
        )
        self.auth_failures = Counter(
            "c2l_auth_failures", "Rejected tokens, by reason", ["code"], registry=r
        )
        self.heartbeat_drops = Counter(
            "c2l_heartbeat_drops",
            "Connections dropped for not answering heartbeats",
            ["side"],
            registry=r,
        )
        self.paced_seconds = Counter(
            "c2l_frame_budget_wait_seconds",
            "Seconds clients' frames waited for their user's frame budget (reads slowed)",
            ["side"],
            registry=r,
        )
        self.routes = Counter(
            "c2l_requests_by_route",
            "Answers served, by route: cloud (the bridge) or direct (the desktop's tunnel)",
            ["route"],
            registry=r,
        )
        for route in ("cloud", "direct"):
            self.routes.labels(route)
        for side in ("stream", "bridge", "http"):
            self.connections.labels(side).set(0)
            self.paced_seconds.labels(side)
        r.register(_SessionCollector(self))

    # -- SessionObserver -------------------------------------------------------------

    def session_admitted(self, session: Session) -> None:
        """Count a new session."""
        self.sessions_created.inc()

    def session_ready(self, session: Session, seconds: float) -> None:
        """Record create-to-ready latency."""
        self.create_seconds.observe(seconds)

    def session_ended(self, session: Session) -> None:
        """Count a teardown by its reason."""
        self.sessions_destroyed.labels(end_reason_label(session.end_reason)).inc()
        self.usage.pop(session.id, None)

    # -- exposition ------------------------------------------------------------------

    async def render(self) -> bytes:
        """The text exposition, with fresh resource figures."""
        if self.orchestrator is not None:
            self.usage = await self.orchestrator.usage_all()
        return generate_latest(self.registry)


async def _metrics_app(metrics: Metrics, scope: Any, receive: Any, send: Any) -> None:
    """ASGI: ``GET /metrics`` and nothing else (404; other methods 405)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        await send({"type": "websocket.close", "code": 1008})  # answered 403 by Hypercorn
        return
    method = scope["method"]
    status, body, kind = 200, b"", CONTENT_TYPE
    if scope["path"] != "/metrics":
        status, body, kind = 404, b"not found: GET /metrics\n", "text/plain"
    elif method not in ("GET", "HEAD"):
        status, body, kind = 405, b"method not allowed: GET /metrics\n", "text/plain"
    else:
        body = await metrics.render()
    headers = [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


async def serve_metrics(
    metrics: Metrics,
    host: str,
    port: int,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` without a token on ``host:port`` until ``shutdown_trigger``.

    An address that cannot be bound (in use, say) is logged as a warning and the gateway
    serves on without it: metrics stay available on the main port to an admin token.
    """
    hc = HyperConfig()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 1.0
    hc.h11_max_incomplete_size = 16 * 1024
    try:
        sockets = hc.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(hc.backlog)
    except OSError as exc:
        log.warning(
            "cannot serve /metrics on %s:%s (C2L_METRICS_ADDR): %s; it stays available on"
            " the main port to an admin token",
            host,
            port,
            exc.strerror or exc,
        )
        task_status.started([])
        return
    bound_host, bound_port = sockets.insecure_sockets[0].getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    metrics.url = f"http://{shown}:{bound_port}"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _metrics_app(metrics, scope, receive, send)

    try:
        log.info("metrics served on %s/metrics", metrics.url)
        await worker_serve(
            wrap_app(app, hc.wsgi_max_body_size, "asgi"),
            hc,
            sockets=sockets,
            shutdown_trigger=shutdown_trigger,
            task_status=task_status,
        )
    finally:
        metrics.url = None
