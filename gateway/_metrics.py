"""``GET /metrics``: the gateway's Prometheus metrics, and the counters its handlers bump.

prometheus_client renders the text exposition format (escaping, ``_total``/``_bucket``
suffixes, histogram cumulation) exactly as Prometheus parses it; writing that by hand is
where exporters usually go wrong. Each gateway has its own registry, so several gateways
in one process (tests) never share counters.

Per-session figures (memory, CPU, bytes) carry the session's user hash, never the user.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from orchestrator import Orchestrator, Session, Usage

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
        labels = ["session", "user"]
        memory = GaugeMetricFamily(
            "c2l_session_memory_bytes", "Proxy process memory (PSS) per session", labels=labels
        )
        cpu = GaugeMetricFamily(
            "c2l_session_cpu_seconds", "Proxy process CPU time per session", labels=labels
        )
        bytes_ = GaugeMetricFamily(
            "c2l_session_relayed_bytes",
            "Bytes relayed per session; in = towards the proxy",
            labels=[*labels, "direction"],
        )
        for s in sessions:
            ids = [s.id, s.user_hash]
            usage = self.metrics.usage.get(s.id)
            if usage is not None and usage.memory_bytes is not None:
                memory.add_metric(ids, usage.memory_bytes)
            if usage is not None and usage.cpu_seconds is not None:
                cpu.add_metric(ids, usage.cpu_seconds)
            bytes_.add_metric([*ids, "in"], s.bytes_in)
            bytes_.add_metric([*ids, "out"], s.bytes_out)
        yield memory
        yield cpu
        yield bytes_


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
        for side in ("stream", "bridge", "http"):
            self.connections.labels(side).set(0)
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
