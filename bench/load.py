"""Load mode: S streams at R tokens/s over U users with real desktop agents (not a test).

Against a real ``c2l serve`` on real rootless Podman, everything on this one machine:

- U users, each with a real ``c2l desktop`` agent process (a simulated agent would hide
  the agent's own cost) serving a fake Ollama (``c2l fake-ollama`` processes, one per
  user by default, or one shared with ``--fake-ollama shared``) that sends one NDJSON line
  every 1/R seconds, each stamped ``created_at`` when it is written;
- S streams (``/api/chat`` of ``--tokens`` tokens), stream n for user n mod U, started
  evenly over one token interval so that the offered load is a steady S x R chunks/s,
  run twice in the same run: first directly against the fake Ollama (HTTP, the baseline),
  then through the whole path (a web client per stream on ``/ws/stream`` -> gateway ->
  the user's proxy container -> the desktop agent -> fake Ollama and back).

A chunk's latency is its arrival time minus its ``created_at``; the added latency is the
whole path's p50 (p99) minus the direct one's. Achieved chunks/s is the NDJSON lines
received over the window from the phase's first line to its last, against the offered
S x R (the streams' connection set-up is left out of that window).
CPU is read from ``/proc/<pid>/stat`` (utime + stime) before and after each phase, per
process, and divided by the lines relayed in the phase:

- the cloud side: the gateway process, and every process of the Podman service user
  and its containers (the uid of the socket's owner and its /etc/subuid range): the
  proxies (``python3``), ``conmon``, ``rootlessport`` (and ``rootlessport-child``),
  ``slirp4netns``, the infra and pause processes, ``aardvark-dns``; the Podman REST
  service is reported apart (it carries no chunk);
- the desktop agents (the ``c2l desktop`` processes this run started);
- the load generator: this process (``getrusage``, every thread) and the fake Ollamas.

A process that starts during a phase counts from zero; one that ends during it is lost.

    C2L_PODMAN_URL=unix:///run/c2l/podman.sock \\
        .venv/bin/python bench/load.py --streams 200 --rate 20 --users 20 --json /tmp/load.json

Whatever happens it stops the processes it started (by pid) and the gateway, and removes,
bounded, the Podman objects labelled for its own users only. Exit status 1 only when the
harness itself failed (the table says why).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import httpx
import trio
import trio_websocket
from _common import (
    TOKEN_TTL,
    CpuSample,
    Gateway,
    Podman,
    Run,
    ServiceUser,
    chat_body,
    cpu_delta,
    cpu_sample,
    describe,
    fmt,
    free_port,
    key_values,
    on_signals,
    produced_at,
    self_cpu_seconds,
    summary,
    table,
)

import wire
from c2lcore import user_hash
from gateway import DevIssuer

#: The kinds of process on the cloud side (``_common.kind_of``, plus the gateway).
CLOUD_KINDS: Final = (
    "gateway",
    "proxy",
    "conmon",
    "rootlessport",
    "slirp4netns",
    "infra/pause",
    "aardvark-dns",
    "other",
)
US: Final = 1e6


# --------------------------------------------------------------------------- streams


@attrs.define
class Phase:
    """What the streams of one phase saw."""

    name: str
    latencies: list[float] = attrs.field(factory=list)
    lines: int = 0
    frames: int = 0
    complete: int = 0
    errors: list[str] = attrs.field(factory=list)
    started: float | None = None
    ended: float | None = None
    #: arrival of the phase's first and last line (the window achieved/s is counted over)
    first_line: float | None = None
    last_line: float | None = None

    def mark(self, start: float, end: float) -> None:
        self.started = start if self.started is None else min(self.started, start)
        self.ended = end if self.ended is None else max(self.ended, end)

    def line(self, text: str, now: float) -> None:
        """One NDJSON line received at ``now`` (epoch seconds)."""
        if not text.strip():
            return
        self.lines += 1
        if self.first_line is None:
            self.first_line = now
        self.last_line = now
        # a line with no stamp (an error line) is counted, not timed
        with contextlib.suppress(ValueError, KeyError, TypeError):
            self.latencies.append(now - produced_at(text))

    def figures(self, offered: float) -> dict[str, Any]:
        wall = (self.ended - self.started) if self.started and self.ended else None
        window = None
        if self.first_line is not None and self.last_line is not None:
            window = self.last_line - self.first_line
        return {
            "streams_complete": self.complete,
            "errors": self.errors[:10],
            "error_count": len(self.errors),
            "lines": self.lines,
            "frames": self.frames,
            "wall_s": wall,
            "offered_per_s": offered,
            "window_s": window,
            # lines over the window from the first line's arrival to the last one's: the
            # connections' set-up (handshake, auth) is not streaming time
            "achieved_per_s": (self.lines / window) if window else None,
            "latency": summary(self.latencies),
        }


async def direct_stream(
    http: httpx.AsyncClient, url: str, tokens: int, phase: Phase, limit: float
) -> None:
    """One stream straight to a fake Ollama."""
    t0 = time.time()
    try:
        with trio.fail_after(limit):
            async with http.stream("POST", f"{url}/api/chat", json=chat_body(tokens)) as resp:
                async for line in resp.aiter_lines():
                    phase.frames += 1
                    phase.line(line, time.time())
        phase.complete += 1
    except (httpx.HTTPError, trio.TooSlowError) as exc:
        phase.errors.append(describe(exc))
    phase.mark(t0, time.time())


async def path_stream(
    endpoint: str, token: str, tokens: int, phase: Phase, limit: float, rid: str
) -> None:
    """One stream through the whole path: a web client on ``/ws/stream``."""
    t0 = time.time()
    headers = [(b"Authorization", f"Bearer {token}".encode())]
    try:
        with trio.fail_after(limit):
            async with trio_websocket.open_websocket_url(
                endpoint, extra_headers=headers, max_message_size=wire.MAX_FRAME_BYTES
            ) as ws:
                while not isinstance(msg := wire.decode(await ws.get_message()), wire.AuthOk):
                    if isinstance(msg, wire.Error):
                        raise RuntimeError(f"auth: {msg.code}: {msg.message}")
                request = wire.Request(rid, "POST", "/api/chat", {}, chat_body(tokens))
                await ws.send_message(wire.encode(request))
                while True:
                    msg = wire.decode(await ws.get_message())
                    if isinstance(msg, wire.Chunk):
                        now = time.time()
                        phase.frames += 1
                        for text in msg.data.splitlines():
                            phase.line(text, now)
                    elif isinstance(msg, wire.ResponseEnd):
                        break
                    elif isinstance(msg, wire.Error):
                        raise RuntimeError(f"{msg.code}: {msg.message}")
                    elif isinstance(msg, wire.Ping):
                        await ws.send_message(wire.encode(wire.Pong(msg.timestamp)))
        phase.complete += 1
    except (
        OSError,
        RuntimeError,
        trio.TooSlowError,
        trio_websocket.HandshakeError,
        trio_websocket.ConnectionClosed,
        wire.ProtocolError,
    ) as exc:
        phase.errors.append(describe(exc))
    phase.mark(t0, time.time())


# --------------------------------------------------------------------------- CPU


def per_chunk(spent: Mapping[str, float], gateway: float, lines: int) -> dict[str, Any]:
    """CPU microseconds per relayed line, by side and kind, from one phase's seconds."""
    if not lines:
        return {}
    kinds = {k: spent.get(k, 0.0) for k in CLOUD_KINDS if k != "gateway"}
    kinds["gateway"] = gateway
    cloud = sum(kinds.values())
    return {
        "cloud_us": cloud / lines * US,
        "cloud_by_kind_us": {k: v / lines * US for k, v in kinds.items()},
        "podman_service_us": spent.get("podman service", 0.0) / lines * US,
        "agents_us": spent.get("agent", 0.0) / lines * US,
        "fake_ollama_us": spent.get("fake ollama", 0.0) / lines * US,
        "load_generator_us": spent.get("load generator", 0.0) / lines * US,
    }


# --------------------------------------------------------------------------- the run


@attrs.define
class Load:
    args: argparse.Namespace
    tmp: Path
    podman: Podman
    service: ServiceUser
    http: httpx.AsyncClient
    issuer: DevIssuer
    env: dict[str, str]
    results: dict[str, Any]
    run: str = attrs.field(factory=lambda: secrets.token_hex(3))
    users: set[str] = attrs.field(factory=set)
    gateway: Gateway | None = None
    #: every process this run started besides the gateway: (kind, process)
    children: list[tuple[str, trio.Process]] = attrs.field(factory=list)
    fakes: list[str] = attrs.field(factory=list)
    #: per user: (token, its session's web client endpoint)
    sessions: list[tuple[str, str]] = attrs.field(factory=list)

    async def spawn(self, kind: str, argv: list[str], log: str) -> trio.Process:
        with open(self.tmp / log, "wb") as out:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "c2l", *argv],
                env=self.env,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
            )
        self.children.append((kind, proc))
        return proc

    def pids(self, kind: str) -> list[int]:
        return [p.pid for k, p in self.children if k == kind and p.returncode is None]

    async def start_fakes(self) -> None:
        count = self.args.users if self.args.fake_ollama == "per-user" else 1
        delay = 1 / self.args.rate
        for i in range(count):
            port = free_port()
            argv = ["fake-ollama", "--port", str(port), "--delay", f"{delay:.6f}"]
            await self.spawn("fake ollama", argv, f"fake-ollama-{i}.log")
            self.fakes.append(f"http://127.0.0.1:{port}")
        with trio.fail_after(self.args.start_timeout):
            for url in self.fakes:
                while True:
                    try:
                        if (await self.http.get(f"{url}/api/version", timeout=2)).is_success:
                            break
                    except httpx.HTTPError:
                        pass
                    await trio.sleep(0.1)

    async def start_agents(self) -> None:
        assert self.gateway is not None
        for u in range(self.args.users):
            sub = f"load-{self.run}-{u}"
            self.users.add(user_hash(sub))
            token = self.issuer.sign(sub, ttl=TOKEN_TTL)
            token_file = self.tmp / f"token-{u}"
            token_file.write_text(token)
            token_file.chmod(0o600)
            argv = ["desktop", "--gateway", self.gateway.url, "--token-file", str(token_file)]
            argv += ["--ollama", self.fakes[u % len(self.fakes)]]
            await self.spawn("agent", argv, f"agent-{u}.log")
            self.sessions.append((token, ""))
        t0 = time.monotonic()
        ready: list[float] = []
        limiter = trio.CapacityLimiter(8)

        async def wait(u: int) -> None:
            async with limiter:
                token, _ = self.sessions[u]
                endpoint = await self.wait_for_desktop(token)
                self.sessions[u] = (token, endpoint)
                ready.append(time.monotonic() - t0)

        with trio.fail_after(self.args.start_timeout):
            async with trio.open_nursery() as nursery:
                for u in range(self.args.users):
                    nursery.start_soon(wait, u)
        self.results["agents_ready_s"] = summary(ready)

    async def wait_for_desktop(self, token: str) -> str:
        """The user's ``/ws/stream`` endpoint once a request reaches its desktop agent."""
        assert self.gateway is not None
        retries: list[int] = []
        headers = [(b"Authorization", f"Bearer {token}".encode())]
        while True:
            session = await self.gateway.create(self.http, token, 60, retries)
            try:
                with trio.move_on_after(10):
                    async with trio_websocket.open_websocket_url(
                        session["endpoint"], extra_headers=headers
                    ) as ws:
                        await ws.send_message(wire.encode(wire.Request("p", "GET", "/api/tags")))
                        while True:
                            msg = wire.decode(await ws.get_message())
                            if isinstance(msg, wire.ResponseStart) and msg.status == 200:
                                return str(session["endpoint"])
                            if isinstance(msg, wire.Error | wire.ResponseEnd):
                                break  # desktop_unavailable: the agent is not there yet
            except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed):
                pass
            await trio.sleep(0.2)

    def sample(self) -> tuple[CpuSample, float]:
        assert self.gateway is not None
        groups = {
            "gateway": [self.gateway.proc.pid],
            "agent": self.pids("agent"),
            "fake ollama": self.pids("fake ollama"),
        }
        return cpu_sample(groups, self.service), self_cpu_seconds()

    async def phase(self, name: str) -> dict[str, Any]:
        """Run the S streams once, directly or through the whole path, with CPU figures."""
        args = self.args
        phase = Phase(name)
        spacing = 1 / (args.streams * args.rate)
        limit = args.tokens / args.rate * 3 + args.stream_timeout
        before, self_before = await trio.to_thread.run_sync(self.sample)
        async with trio.open_nursery() as nursery:
            for n in range(args.streams):
                u = n % args.users
                if name == "direct":
                    url = self.fakes[u % len(self.fakes)]
                    nursery.start_soon(direct_stream, self.http, url, args.tokens, phase, limit)
                else:
                    token, endpoint = self.sessions[u]
                    nursery.start_soon(
                        path_stream, endpoint, token, args.tokens, phase, limit, f"s{n}"
                    )
                await trio.sleep(spacing)
        after, self_after = await trio.to_thread.run_sync(self.sample)
        spent = cpu_delta(before, after)
        spent["load generator"] = self_after - self_before
        out = phase.figures(args.streams * args.rate)
        out["cpu_s"] = spent
        out["cpu_per_chunk"] = per_chunk(spent, spent.get("gateway", 0.0), phase.lines)
        return out

    async def stop_children(self) -> None:
        """SIGTERM every process this run started (by pid), SIGKILL what outlives 10 s."""
        for _, proc in self.children:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            for _, proc in self.children:
                await proc.wait()
        for _, proc in self.children:
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(5):
                    await proc.wait()

    async def cleanup(self) -> None:
        await self.stop_children()
        if self.gateway is not None and self.gateway.proc.returncode is None:
            seconds, code = await self.gateway.stop(signal.SIGTERM, self.args.stop_timeout)
            self.results["gateway_stop"] = {"seconds": seconds, "exit": code}
        t0 = time.monotonic()
        removed = 0
        with trio.move_on_after(self.args.cleanup_timeout):
            removed = await self.podman.remove_users(self.users)
        self.results["cleanup"] = {
            "removed": removed,
            "seconds": time.monotonic() - t0,
            "left": (await self.podman.counts(self.users))["ours"],
        }


def report(results: Mapping[str, Any]) -> str:
    """The tables of a run's ``results`` (whatever parts of it exist)."""
    out: list[str] = []
    phases = [(n, results[n]) for n in ("direct", "path") if n in results]
    if phases:
        out.append(
            table(
                [
                    "phase",
                    "streams ok",
                    "lines",
                    "frames",
                    "offered/s",
                    "achieved/s",
                    "p50",
                    "p99",
                    "max",
                    "errors",
                ],
                (
                    [
                        name,
                        str(p["streams_complete"]),
                        str(p["lines"]),
                        str(p["frames"]),
                        fmt(p["offered_per_s"], 1, "", 0),
                        fmt(p["achieved_per_s"], 1, "", 0),
                        fmt(p["latency"]["p50"], 1000, " ms"),
                        fmt(p["latency"]["p99"], 1000, " ms"),
                        fmt(p["latency"]["max"], 1000, " ms"),
                        str(p["error_count"]),
                    ]
                    for name, p in phases
                ),
            )
        )
    rows: list[list[str]] = []
    added = results.get("added")
    if added:
        rows.append(
            [
                "added latency per chunk",
                f"p50 {fmt(added['p50'], 1000, ' ms', 2)}, p99 {fmt(added['p99'], 1000, ' ms', 2)}",
            ]
        )
    for name, p in phases:
        c = p.get("cpu_per_chunk") or {}
        if not c:
            continue
        if name == "path":
            by = ", ".join(f"{k} {v:.0f}" for k, v in c["cloud_by_kind_us"].items() if v)
            rows.append(["cloud CPU per chunk (path)", f"{c['cloud_us']:.0f} us ({by})"])
            rows.append(["podman REST service (path)", f"{c['podman_service_us']:.1f} us/chunk"])
            rows.append(["desktop agents per chunk (path)", f"{c['agents_us']:.0f} us"])
        rows.append(
            [
                f"load generator per chunk ({name})",
                f"{c['load_generator_us']:.0f} us (+ fake Ollama {c['fake_ollama_us']:.0f} us)",
            ]
        )
    ready = results.get("agents_ready_s")
    if ready and ready.get("n"):
        rows.append(["agents serving after", f"p50 {ready['p50']:.1f} s, max {ready['max']:.1f} s"])
    stop = results.get("gateway_stop")
    if stop:
        rows.append(["gateway SIGTERM", f"{stop['seconds']:.1f} s, exit code {stop['exit']}"])
    clean = results.get("cleanup")
    if clean and (clean["removed"] or any(clean["left"].values())):
        rows.append(["cleanup", f"removed {clean['removed']}, left {clean['left']}"])
    if results.get("error"):
        rows.append(["ERROR", results["error"]])
    if rows:
        out.append(key_values(rows))
    return "\n\n".join(out)


async def main(args: argparse.Namespace) -> int:
    run = Run.open(
        "c2l-load-",
        args,
        max_sessions=args.users + 10,
        max_connections=args.streams + 16,
        timeout=60,
    )
    tmp, env, podman, http, results = run.tmp, run.env, run.podman, run.http, run.results
    podman_url, issuer = run.podman_url, run.issuer
    bench = Load(args, tmp, podman, ServiceUser.of_socket(podman_url), http, issuer, env, results)
    print(f"logs in {tmp}; Podman at {podman_url} (user {bench.service.name})", flush=True)
    code = 0
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(on_signals, scope, results)
                bench.gateway = gw = await Gateway.start(env, tmp / "gateway.log")
                results["gateway_up_s"] = await gw.wait_healthy(http, 120)
                await bench.start_fakes()
                await bench.start_agents()
                print(f"{args.users} agents serving; {args.streams} streams direct ...", flush=True)
                results["direct"] = await bench.phase("direct")
                print(f"{args.streams} streams through the whole path ...", flush=True)
                results["path"] = await bench.phase("path")
                d, p = results["direct"]["latency"], results["path"]["latency"]
                if d["n"] and p["n"]:
                    results["added"] = {"p50": p["p50"] - d["p50"], "p99": p["p99"] - d["p99"]}
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
    ap.add_argument("--streams", type=int, default=200, help="concurrent streams (%(default)s)")
    ap.add_argument("--rate", type=float, default=20, help="tokens/s per stream (%(default)s)")
    ap.add_argument("--users", type=int, default=20, help="users, one agent each (%(default)s)")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per stream (%(default)s)")
    ap.add_argument(
        "--fake-ollama",
        choices=("per-user", "shared"),
        default="per-user",
        help="one fake Ollama process per user, or one for all (%(default)s)",
    )
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument(
        "--start-timeout", type=float, default=300, help="gateway, fakes, agents, s (%(default)s)"
    )
    ap.add_argument(
        "--stream-timeout",
        type=float,
        default=60,
        help="per stream, s beyond 3x its nominal length (%(default)s)",
    )
    ap.add_argument(
        "--stop-timeout", type=float, default=300, help="gateway SIGKILL after, s (%(default)s)"
    )
    ap.add_argument(
        "--cleanup-timeout", type=float, default=600, help="removal bound, s (%(default)s)"
    )
    return ap


if __name__ == "__main__":
    sys.exit(trio.run(main, parser().parse_args()))
