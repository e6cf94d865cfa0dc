"""Scale mode: N live sessions, each with a connected desktop (not a test: it asserts nothing).

Against a real ``c2l serve`` on real rootless Podman. The desktops and web clients are
simulated in this one load-generator process (trio, one trio-websocket connection each,
speaking the ``wire`` protocol), because on a real deployment they are not on the cloud
host; the simulated agent answers ``/api/chat`` with NDJSON lines stamped ``created_at``
like the fake Ollama, ``/api/tags`` with one model, pings with pongs.

1. Sessions are made in batches of ``--bucket`` (``--concurrency`` in flight): for each
   user ``POST /api/streaming/create`` (create-to-ready: until it answers 200, state
   ``ready``), then its agent dials ``/ws/bridge`` (attach: until ``auth_ok``), and with
   ``--clients`` a web client holds ``/ws/stream`` too. After each batch (and ``--settle``
   seconds) it reports, for the live sessions: ready p50/p99, attach p50/p99, PSS per
   session, the shared helpers' PSS, the gateway's PSS and host memory used.
2. One stream of ``--tokens`` tokens (one every ``--delay`` s) through the oldest and
   through the newest session: latency per chunk, arrival minus ``created_at``.
3. SIGTERM of the gateway: seconds to exit, exit code, what is left labelled, and how the
   agents' connections were closed.

PSS per session. A session's processes are found from Podman's own list of the run's
labelled containers (``GET /containers/json``: ``Pid``, ``PodName`` and ``Ports`` of the
infra and proxy containers), not from cgroups: rootless Podman on this hybrid cgroup v1
host puts no container in a cgroup of its own (``cgroupfs`` manager, limits ignored), so a
cgroup names no session. Per session that gives: each container's init process and
everything below it (the infra ``catatonit``, the proxy's ``python3``), its parent
``conmon``, and the pod's ``rootlessport`` (a child of the REST service, not of the pod:
found as the ``rootlessport`` process holding the listening socket of the pod's published
host port, through ``/proc/net/tcp`` inodes and its ``/proc/<pid>/fd``) with the
``rootlessport-child`` below it. Their PSS (``/proc/<pid>/smaps_rollup``) is summed per
session. Processes of the Podman service user that belong to no session (the shared
rootless-netns ``slirp4netns``, the pause process, ``aardvark-dns``) are reported as
"shared", divided by the live sessions; the REST service itself and the gateway are
reported apart. Host memory is ``MemTotal - MemAvailable``: it includes everything else
running on the host, so its growth per session is the figure to read.

Run it when the Podman service is not shared with another benchmark (a gateway takes a
replica lock next to the socket; its start-up sweep removes labelled leftovers):

    C2L_PODMAN_URL=unix:///run/c2l/podman.sock \\
        .venv/bin/python bench/scale.py --sessions 1000 --json /tmp/scale.json

Whatever happens it stops the gateway it started, ends its own connections, and removes,
bounded by ``--cleanup-timeout``, the Podman objects labelled for its own users only.
Exit status 1 only when the harness itself failed (the table says why).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import httpx
import trio
import trio_websocket
from _common import (
    TOKEN_TTL,
    Gateway,
    Podman,
    Proc,
    Run,
    ServiceUser,
    chat_body,
    descendants,
    describe,
    fmt,
    host_memory_used,
    key_values,
    kind_of,
    left_text,
    on_signals,
    parse_tcp_listeners,
    processes,
    produced_at,
    pss_bytes,
    stamp_now,
    summary,
    table,
)

import wire
from c2lcore import user_hash
from gateway import DevIssuer
from orchestrator import LABEL_USER

#: What the simulated desktop's Ollama says it has.
MODEL: Final = "llama3.2:latest"
MB: Final = 1e6


# --------------------------------------------------------------------------- the simulated peers


async def _auth_ok(ws: trio_websocket.WebSocketConnection) -> str:
    """Wait for ``auth_ok`` (answering pings); its session id. RuntimeError on ``error``."""
    while True:
        msg = wire.decode(await ws.get_message())
        if isinstance(msg, wire.AuthOk):
            return msg.session_id
        if isinstance(msg, wire.Ping):
            await ws.send_message(wire.encode(wire.Pong(msg.timestamp)))
        elif isinstance(msg, wire.Error):
            raise RuntimeError(f"refused: {msg.code}: {msg.message}")


def _ndjson(content: str, done: bool = False) -> str:
    line: dict[str, Any] = {
        "model": MODEL,
        "created_at": stamp_now(),
        "message": {"role": "assistant", "content": content},
        "done": done,
    }
    if done:
        line["done_reason"] = "stop"
    return json.dumps(line) + "\n"


@attrs.define(eq=False)
class SimPeer:
    """One simulated desktop agent (side ``bridge``) or idle web client (``stream``).

    ``run`` connects with the token in the ``Authorization`` header, reports ``auth_ok``
    through ``task_status``, then serves until the gateway closes the connection; it never
    reconnects and never raises once started (a failure is kept in ``failure``).
    """

    url: str
    token: str
    side: str
    connect_timeout: float
    close_code: int | None = None
    failure: str | None = None
    _lock: trio.Lock = attrs.field(factory=trio.Lock)
    _requests: dict[str, trio.CancelScope] = attrs.field(factory=dict)

    async def run(self, *, task_status: trio.TaskStatus[float] = trio.TASK_STATUS_IGNORED) -> None:
        t0 = time.monotonic()
        started = False
        headers = [(b"Authorization", f"Bearer {self.token}".encode())]
        try:
            async with trio_websocket.open_websocket_url(
                self.url,
                extra_headers=headers,
                connect_timeout=self.connect_timeout,
                disconnect_timeout=2.0,
                max_message_size=wire.MAX_FRAME_BYTES,
            ) as ws:
                with trio.fail_after(self.connect_timeout):
                    await _auth_ok(ws)
                started = True
                task_status.started(time.monotonic() - t0)
                async with trio.open_nursery() as nursery:
                    await self._serve(ws, nursery)
                    nursery.cancel_scope.cancel()
        except trio_websocket.ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason is not None else None
            if not started:
                raise RuntimeError(f"{self.side}: closed before auth_ok: {exc.reason}") from None
        except (OSError, trio_websocket.HandshakeError, trio.TooSlowError, RuntimeError) as exc:
            self.failure = describe(exc)
            if not started:
                raise RuntimeError(f"{self.side}: {self.failure}") from None

    async def _send(self, ws: trio_websocket.WebSocketConnection, msg: wire.Message) -> None:
        async with self._lock:
            await ws.send_message(wire.encode(msg))

    async def _serve(self, ws: trio_websocket.WebSocketConnection, nursery: trio.Nursery) -> None:
        while True:
            try:
                frame = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                self.close_code = exc.reason.code if exc.reason is not None else None
                return
            try:
                msg = wire.decode(frame)
            except wire.ProtocolError as exc:
                self.failure = f"bad frame from the gateway: {exc.message}"
                continue
            if isinstance(msg, wire.Ping):
                nursery.start_soon(self._send, ws, wire.Pong(msg.timestamp))
            elif isinstance(msg, wire.Request) and self.side == "bridge":
                scope = trio.CancelScope()
                self._requests[msg.id] = scope
                nursery.start_soon(self._answer, ws, msg, scope)
            elif isinstance(msg, wire.Cancel):
                cancelled = self._requests.pop(msg.id, None)
                if cancelled is not None:
                    cancelled.cancel()

    async def _answer(
        self, ws: trio_websocket.WebSocketConnection, req: wire.Request, scope: trio.CancelScope
    ) -> None:
        """What the desktop agent would send for Ollama's answer, paced as the fake is."""
        try:
            with scope:
                if req.path == "/api/chat" and isinstance(req.body, dict):
                    options = req.body.get("options") or {}
                    tokens = int(options.get("num_predict", 12))
                    delay = float(options.get("bench_delay", 0.02))
                    headers = {"content-type": "application/x-ndjson"}
                    await self._send(ws, wire.ResponseStart(req.id, 200, headers))
                    for k in range(tokens):
                        await trio.sleep(delay)
                        await self._send(ws, wire.Chunk(req.id, _ndjson(f"t{k} ")))
                    await self._send(ws, wire.Chunk(req.id, _ndjson("", done=True)))
                else:
                    body = json.dumps({"models": [{"name": MODEL, "model": MODEL}]})
                    headers = {"content-type": "application/json; charset=utf-8"}
                    await self._send(ws, wire.ResponseStart(req.id, 200, headers))
                    await self._send(ws, wire.Chunk(req.id, body))
                await self._send(ws, wire.ResponseEnd(req.id))
        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
            pass  # the connection is ending; the reader records how
        finally:
            self._requests.pop(req.id, None)


async def stream_once(
    endpoint: str, token: str, tokens: int, delay: float, limit: float
) -> dict[str, Any]:
    """One web client, one ``/api/chat`` stream: latency per chunk line, in seconds."""
    latencies: list[float] = []
    lines = 0
    t0 = time.monotonic()
    headers = [(b"Authorization", f"Bearer {token}".encode())]
    body = chat_body(tokens)
    body["options"]["bench_delay"] = delay
    with trio.fail_after(limit):
        async with trio_websocket.open_websocket_url(
            endpoint, extra_headers=headers, max_message_size=wire.MAX_FRAME_BYTES
        ) as ws:
            await _auth_ok(ws)
            await ws.send_message(wire.encode(wire.Request("s1", "POST", "/api/chat", {}, body)))
            while True:
                msg = wire.decode(await ws.get_message())
                if isinstance(msg, wire.Chunk):
                    now = time.time()
                    for line in msg.data.splitlines():
                        if line.strip():
                            lines += 1
                            latencies.append(now - produced_at(line))
                elif isinstance(msg, wire.ResponseEnd):
                    break
                elif isinstance(msg, wire.Error):
                    raise RuntimeError(f"stream failed: {msg.code}: {msg.message}")
                elif isinstance(msg, wire.Ping):
                    await ws.send_message(wire.encode(wire.Pong(msg.timestamp)))
    return {
        "lines": lines,
        "expected": tokens + 1,
        "seconds": time.monotonic() - t0,
        "latency": summary(latencies),
    }


# --------------------------------------------------------------------------- memory


def socket_inode(link: str) -> int | None:
    """The inode of a ``socket:[123]`` fd link, else None."""
    if link.startswith("socket:[") and link.endswith("]"):
        return int(link[8:-1])
    return None


def rootlessport_by_port(procs: Mapping[int, Proc]) -> dict[int, int]:
    """Host port -> pid of the ``rootlessport`` process listening on it."""
    inode_port: dict[int, int] = {}
    for name in ("tcp", "tcp6"):
        try:
            inode_port.update(parse_tcp_listeners(Path(f"/proc/net/{name}").read_text()))
        except OSError:
            continue
    out: dict[int, int] = {}
    for p in procs.values():
        if p.comm != "rootlessport":
            continue
        try:
            fds = list(os.scandir(f"/proc/{p.pid}/fd"))
        except OSError:
            continue
        for fd in fds:
            try:
                inode = socket_inode(os.readlink(fd.path))
            except OSError:
                continue
            if inode is not None and inode in inode_port:
                out[inode_port[inode]] = p.pid
    return out


def session_processes(
    containers: Iterable[Mapping[str, Any]], procs: Mapping[int, Proc], ports: Mapping[int, int]
) -> dict[str, set[int]]:
    """Pod name -> the pids of that session (see the module docstring)."""
    roots: dict[str, set[int]] = collections.defaultdict(set)
    for c in containers:
        pod = str(c.get("PodName") or c.get("Pod") or "")
        if not pod:
            continue
        pid = int(c.get("Pid") or 0)
        if pid in procs:
            roots[pod].add(pid)
            parent = procs.get(procs[pid].ppid)
            if parent is not None and parent.comm == "conmon":
                roots[pod].add(parent.pid)
        for mapping in c.get("Ports") or ():
            helper = ports.get(int(mapping.get("host_port") or 0))
            if helper is not None:
                roots[pod].add(helper)
    return {pod: descendants(procs, pids) for pod, pids in roots.items()}


def measure_memory(
    service: ServiceUser, containers: list[dict[str, Any]], gateway_pid: int
) -> dict[str, Any]:
    """PSS per session, per kind of process, of the shared helpers; host memory (blocking)."""
    procs = processes(service.owns)
    per_session = session_processes(containers, procs, rootlessport_by_port(procs))
    in_sessions: set[int] = set().union(*per_session.values()) if per_session else set()
    pss: dict[int, int] = {}
    for pid in procs:
        value = pss_bytes(pid)
        if value is not None:
            pss[pid] = value
    totals = [sum(pss.get(pid, 0) for pid in pids) for pids in per_session.values()]
    kinds: dict[str, int] = collections.Counter()
    for pid in in_sessions:
        kinds[kind_of(procs[pid])] += pss.get(pid, 0)
    shared = sum(
        v for pid, v in pss.items() if pid not in in_sessions and not procs[pid].is_service
    )
    service_pss = sum(v for pid, v in pss.items() if procs[pid].is_service)
    n = len(per_session)
    return {
        "sessions_seen": n,
        "processes_per_session": (len(in_sessions) / n) if n else None,
        "pss_per_session": (sum(totals) / n) if n else None,
        "pss_per_session_max": max(totals) if totals else None,
        "pss_per_session_by_kind": {k: v / n for k, v in sorted(kinds.items())} if n else {},
        "shared_pss": shared,
        "podman_service_pss": service_pss,
        "gateway_pss": pss_bytes(gateway_pid),
        "host_used": host_memory_used(),
    }


# --------------------------------------------------------------------------- the run


@attrs.define
class Scale:
    args: argparse.Namespace
    tmp: Path
    podman: Podman
    service: ServiceUser
    http: httpx.AsyncClient
    issuer: DevIssuer
    env: dict[str, str]
    results: dict[str, Any]
    run: str = attrs.field(factory=lambda: secrets.token_hex(3))
    #: user hashes of this run's users: cleanup removes only their objects
    users: set[str] = attrs.field(factory=set)
    gateway: Gateway | None = None
    #: per live session in order of creation: (sub, token, session answer)
    live: list[tuple[str, str, dict[str, Any]]] = attrs.field(factory=list)
    peers: list[SimPeer] = attrs.field(factory=list)
    retries: list[int] = attrs.field(factory=list)
    #: sessions that could not be made or attached, and why
    failures: list[str] = attrs.field(factory=list)

    async def one_session(
        self, i: int, peers: trio.Nursery, ready: list[float], attach: list[float]
    ) -> None:
        assert self.gateway is not None
        sub = f"scale-{self.run}-{i}"
        self.users.add(user_hash(sub))
        token = self.issuer.sign(sub, ttl=TOKEN_TTL)
        t0 = time.monotonic()
        try:
            session = await self.gateway.create(
                self.http, token, self.args.create_timeout, self.retries
            )
            ready.append(time.monotonic() - t0)
            agent = SimPeer(session["bridgeEndpoint"], token, "bridge", self.args.connect_timeout)
            self.peers.append(agent)
            attach.append(await peers.start(agent.run))
            if self.args.clients:
                client = SimPeer(session["endpoint"], token, "stream", self.args.connect_timeout)
                self.peers.append(client)
                await peers.start(client.run)
        except (RuntimeError, trio.TooSlowError, KeyError) as exc:
            if self.gateway.proc.returncode is not None:
                raise  # no gateway: nothing more to measure
            # The product failed this session: report it and measure the others.
            self.failures.append(f"session {i}: {describe(exc)}")
            return
        self.live.append((sub, token, session))

    async def grow(self, peers: trio.Nursery) -> None:
        """Create the sessions batch by batch; measure after each batch."""
        n, bucket = self.args.sessions, self.args.bucket
        baseline = host_memory_used()
        self.results["host_used_before"] = baseline
        limiter = trio.CapacityLimiter(self.args.concurrency)
        buckets: list[dict[str, Any]] = self.results.setdefault("buckets", [])
        for start in range(0, n, bucket):
            ready: list[float] = []
            attach: list[float] = []
            t0 = time.monotonic()

            async def limited(i: int, ready: list[float], attach: list[float]) -> None:
                async with limiter:
                    await self.one_session(i, peers, ready, attach)

            async with trio.open_nursery() as batch:
                for i in range(start, min(n, start + bucket)):
                    batch.start_soon(limited, i, ready, attach)
            wall = time.monotonic() - t0
            await trio.sleep(self.args.settle)
            assert self.gateway is not None
            ours = [
                c
                for c in await self.podman.containers()
                if (c.get("Labels") or {}).get(LABEL_USER) in self.users
            ]
            mem = await trio.to_thread.run_sync(
                measure_memory, self.service, ours, self.gateway.proc.pid
            )
            live = len(self.live)
            last = min(n, start + bucket)
            row = {
                "live": f"{start + 1}-{last}" + (f" ({live} live)" if live != last else ""),
                "live_n": live,
                "wall": wall,
                "ready": summary(ready),
                "attach": summary(attach),
                **mem,
                "host_per_session": (mem["host_used"] - baseline) / live if live else None,
            }
            buckets.append(row)
            print(
                f"  {live}/{n} live: ready p50 {fmt(row['ready']['p50'], 1, ' s')}"
                f" p99 {fmt(row['ready']['p99'], 1, ' s')};"
                f" PSS/session {fmt(mem['pss_per_session'], 1 / MB, ' MB', 1)}",
                flush=True,
            )

    async def streams(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if not self.live:
            return out
        for name, (_, token, session) in (("oldest", self.live[0]), ("newest", self.live[-1])):
            try:
                out[name] = await stream_once(
                    session["endpoint"],
                    token,
                    self.args.tokens,
                    self.args.delay,
                    self.args.stream_timeout,
                )
            except (
                OSError,
                RuntimeError,
                trio.TooSlowError,
                trio_websocket.HandshakeError,
                trio_websocket.ConnectionClosed,
                wire.ProtocolError,
            ) as exc:
                out[name] = {"error": describe(exc)}
        return out

    async def sigterm(self) -> dict[str, Any]:
        assert self.gateway is not None
        seconds, code = await self.gateway.stop(signal.SIGTERM, self.args.stop_timeout)
        # The gateway closed every agent's connection on its way out; give the last close
        # frames a moment to be read before counting them.
        with trio.move_on_after(5):
            while any(p.close_code is None and p.failure is None for p in self.peers):
                await trio.sleep(0.1)
        codes = collections.Counter(f"{p.side} {p.close_code}" for p in self.peers)
        return {
            "seconds": seconds,
            "exit": code,
            "left": await self.podman.counts(self.users),
            "peer_close_codes": dict(sorted(codes.items())),
        }

    async def cleanup(self) -> None:
        """Stop the gateway, then remove what is labelled for this run's users (bounded)."""
        if self.gateway is not None and self.gateway.proc.returncode is None:
            await self.gateway.stop(signal.SIGTERM, 60)
        t0 = time.monotonic()
        removed = 0
        with trio.move_on_after(self.args.cleanup_timeout):
            removed = await self.podman.remove_users(self.users)
        left = (await self.podman.counts(self.users))["ours"]
        self.results["cleanup"] = {
            "removed": removed,
            "seconds": time.monotonic() - t0,
            "left": left,
        }


def report(results: Mapping[str, Any]) -> str:
    """The tables of a run's ``results`` (whatever parts of it exist)."""
    out: list[str] = []
    buckets = results.get("buckets") or []
    if buckets:
        out.append(
            table(
                [
                    "live sessions",
                    "batch s",
                    "ready p50",
                    "ready p99",
                    "attach p50",
                    "attach p99",
                    "PSS/session",
                    "shared/session",
                    "gateway PSS",
                    "host used",
                    "host/session",
                ],
                (
                    [
                        b["live"],
                        fmt(b["wall"], 1, "", 1),
                        fmt(b["ready"]["p50"], 1, " s"),
                        fmt(b["ready"]["p99"], 1, " s"),
                        fmt(b["attach"]["p50"], 1, " s"),
                        fmt(b["attach"]["p99"], 1, " s"),
                        fmt(b["pss_per_session"], 1 / MB, " MB", 1),
                        fmt(b["shared_pss"] / b["live_n"], 1 / MB, " MB", 2),
                        fmt(b["gateway_pss"], 1 / MB, " MB", 1),
                        fmt(b["host_used"], 1 / 1e9, " GB", 2),
                        fmt(b["host_per_session"], 1 / MB, " MB", 1),
                    ]
                    for b in buckets
                ),
            )
        )
        last = buckets[-1]
        kinds = ", ".join(f"{k} {v / MB:.2f}" for k, v in last["pss_per_session_by_kind"].items())
        out.append(
            f"PSS per session at {last['live_n']} live, by process (MB): {kinds};"
            f" {fmt(last['processes_per_session'], 1, '', 1)} processes per session;"
            f" Podman REST service {fmt(last['podman_service_pss'], 1 / MB, ' MB', 1)}"
        )
    streams = results.get("streams") or {}
    if streams:
        rows = []
        for name, s in streams.items():
            if "error" in s:
                rows.append([name, "-", "-", "-", "-", s["error"]])
                continue
            lat = s["latency"]
            rows.append(
                [
                    name,
                    f"{s['lines']}/{s['expected']}",
                    fmt(lat["p50"], 1000, " ms"),
                    fmt(lat["p99"], 1000, " ms"),
                    fmt(lat["max"], 1000, " ms"),
                    f"{s['seconds']:.1f} s",
                ]
            )
        out.append(table(["stream through", "chunks", "p50", "p99", "max", "took"], rows))
    rows = []
    if "gateway_up_s" in results:
        rows.append(["gateway /health after", f"{results['gateway_up_s']:.1f} s"])
    term = results.get("sigterm")
    if term:
        killed = "no exit, SIGKILL after " if term["exit"] is None else ""
        rows.append(["SIGTERM: exit", f"{killed}{term['seconds']:.1f} s, exit code {term['exit']}"])
        rows.append(["SIGTERM: left labelled (all)", left_text(term["left"]["all"])])
        rows.append(["SIGTERM: left labelled (this run)", left_text(term["left"]["ours"])])
        codes = ", ".join(f"{k}: {v}" for k, v in term["peer_close_codes"].items())
        rows.append(["peers' close codes", codes])
    clean = results.get("cleanup")
    if clean and (clean["removed"] or any(clean["left"].values())):
        rows.append(
            [
                "cleanup",
                f"removed {clean['removed']} in {clean['seconds']:.1f} s;"
                f" left {left_text(clean['left'])}",
            ]
        )
    if results.get("retries"):
        rows.append(["creates retried (429/503)", str(results["retries"])])
    failed = results.get("session_failures") or {}
    if failed.get("count"):
        first = failed["first"][0] if failed["first"] else ""
        rows.append(["sessions failed", f"{failed['count']} (first: {first})"])
    if results.get("peer_failures"):
        rows.append(["peer failures", str(results["peer_failures"])])
    if results.get("error"):
        rows.append(["ERROR", results["error"]])
    if rows:
        out.append(key_values(rows))
    return "\n\n".join(out)


async def main(args: argparse.Namespace) -> int:
    run = Run.open(
        "c2l-scale-",
        args,
        max_sessions=args.sessions + 10,
        max_connections=args.concurrency + 8,
        timeout=30,
    )
    tmp, env, podman, http, results = run.tmp, run.env, run.podman, run.http, run.results
    podman_url, issuer = run.podman_url, run.issuer
    bench = Scale(args, tmp, podman, ServiceUser.of_socket(podman_url), http, issuer, env, results)
    print(f"logs in {tmp}; Podman at {podman_url} (user {bench.service.name})", flush=True)
    code = 0
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(on_signals, scope, results)
                before = await podman.counts(set())
                results["labelled_before"] = before["all"]
                if any(before["all"].values()):
                    print(f"note: labelled objects before the run: {before['all']}", flush=True)
                bench.gateway = gw = await Gateway.start(env, tmp / "gateway.log")
                results["gateway_up_s"] = await gw.wait_healthy(http, 120)
                async with trio.open_nursery() as peers:
                    await bench.grow(peers)
                    print("streams through the oldest and the newest session ...", flush=True)
                    results["streams"] = await bench.streams()
                    print("SIGTERM ...", flush=True)
                    results["sigterm"] = await bench.sigterm()
                    peers.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
    except BaseException as exc:  # Ctrl-C included: report, clean up, exit non-zero
        results["error"] = describe(exc)
        code = 1
    finally:
        with trio.CancelScope(shield=True):
            try:
                await bench.cleanup()
            except Exception as exc:
                results.setdefault("error", f"cleanup: {describe(exc)}")
                code = 1
            finally:
                await http.aclose()
                await podman.aclose()
        results["retries"] = len(bench.retries)
        results["peer_failures"] = sum(p.failure is not None for p in bench.peers)
        results["session_failures"] = {
            "count": len(bench.failures),
            "first": bench.failures[:10],
        }
        if results.get("error") and bench.gateway is not None:
            print(f"--- last lines of {bench.gateway.log}\n{bench.gateway.tail()}")
        print(report(results))
        if args.json:
            await trio.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
            print(f"wrote {args.json}")
    return 1 if results.get("error") else code


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sessions", type=int, default=1000, help="live sessions (%(default)s)")
    ap.add_argument("--bucket", type=int, default=100, help="report per this many (%(default)s)")
    ap.add_argument("--concurrency", type=int, default=8, help="creations in flight (%(default)s)")
    ap.add_argument(
        "--clients", action="store_true", help="also hold an idle web client per session"
    )
    ap.add_argument(
        "--settle", type=float, default=2.0, help="s before measuring memory (%(default)s)"
    )
    ap.add_argument("--tokens", type=int, default=50, help="tokens per stream (%(default)s)")
    ap.add_argument("--delay", type=float, default=0.05, help="s per token (%(default)s)")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument(
        "--create-timeout", type=float, default=300, help="per session, s (%(default)s)"
    )
    ap.add_argument(
        "--connect-timeout", type=float, default=60, help="per peer to auth_ok, s (%(default)s)"
    )
    ap.add_argument("--stream-timeout", type=float, default=120, help="per stream, s (%(default)s)")
    ap.add_argument(
        "--stop-timeout", type=float, default=900, help="SIGKILL after, s (%(default)s)"
    )
    ap.add_argument(
        "--cleanup-timeout", type=float, default=1200, help="removal bound, s (%(default)s)"
    )
    return ap


if __name__ == "__main__":
    sys.exit(trio.run(main, parser().parse_args()))
