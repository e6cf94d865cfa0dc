"""Benchmark of the whole path on this machine (not a test: it asserts nothing).

Measures, against a real ``c2l serve`` on real rootless Podman:

1. session create-to-ready latency: ``POST /api/streaming/create`` for N new users, one
   after another (so the later ones start with more sessions alive), median/p90/max;
2. per-chunk latency through the whole path (web client -> gateway -> proxy container ->
   desktop agent -> fake Ollama and back) against the same client reading the fake Ollama
   directly: every NDJSON line carries the time it was produced (``created_at``), so a
   chunk's latency is its arrival time minus that. The difference is the added latency.

Run it after ``bash scripts/test.sh`` (or run.sh) has set the host up:

    .venv/bin/python bench/bench.py --sessions 20 --streams 20 --tokens 100
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import pwd
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
import trio_websocket

import wire
from c2lcore import SERVICE_SOCKET
from desktop.testing import FakeOllama, serve_fake_ollama
from gateway import DevIssuer

PODMAN_URL = os.environ.get("C2L_PODMAN_URL") or f"unix://{SERVICE_SOCKET}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _produced_at(line: str) -> float:
    stamp = json.loads(line)["created_at"]
    return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _summary(name: str, values: list[float], unit: float = 1000.0, suffix: str = "ms") -> str:
    return (
        f"{name}: n={len(values)} median={statistics.median(values) * unit:.2f}{suffix} "
        f"p90={_pct(values, 90) * unit:.2f}{suffix} p99={_pct(values, 99) * unit:.2f}{suffix} "
        f"max={max(values) * unit:.2f}{suffix}"
    )


def _pss_of_service_user() -> float | None:
    """Total PSS (bytes) of the Podman service user's processes and its containers'.

    Counts every process whose uid is the owner of the Podman socket or in that user's
    subordinate range (the containers' processes), except the REST service itself.
    """
    sock = PODMAN_URL.removeprefix("unix://")
    try:
        owner = os.stat(sock).st_uid
        name = pwd.getpwuid(owner).pw_name
        ranges = []
        for line in Path("/etc/subuid").read_text().splitlines():
            user, start, count = line.split(":")
            if user == name:
                ranges.append((int(start), int(start) + int(count)))
    except (OSError, KeyError, ValueError):
        return None
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            uid = proc.stat().st_uid
            if uid != owner and not any(a <= uid < b for a, b in ranges):
                continue
            if b"system\x00service" in (proc / "cmdline").read_bytes():
                continue
            for line in (proc / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _chat_body(tokens: int) -> dict[str, Any]:
    return {
        "model": "llama3.2:latest",
        "messages": [{"role": "user", "content": "benchmark"}],
        "options": {"num_predict": tokens},
    }


async def _direct_stream(fake: FakeOllama, tokens: int, out: list[float]) -> None:
    async with (
        httpx.AsyncClient(timeout=60, trust_env=False) as client,
        client.stream("POST", f"{fake.url}/api/chat", json=_chat_body(tokens)) as resp,
    ):
        async for line in resp.aiter_lines():
            if line:
                out.append(time.time() - _produced_at(line))


async def _tunnel_stream(
    session: dict[str, Any], token: str, tokens: int, out: list[float], rid: str
) -> None:
    async with trio_websocket.open_websocket_url(session["endpoint"]) as ws:
        await ws.send_message(wire.encode(wire.Auth(token, session["sessionId"])))
        wire.decode(await ws.get_message())
        await ws.send_message(
            wire.encode(wire.Request(rid, "POST", "/api/chat", {}, _chat_body(tokens)))
        )
        while True:
            msg = wire.decode(await ws.get_message())
            if isinstance(msg, wire.Chunk):  # one or more NDJSON lines
                now = time.time()
                out.extend(now - _produced_at(line) for line in msg.data.splitlines() if line)
            elif isinstance(msg, wire.ResponseEnd):
                return
            elif isinstance(msg, wire.Error):
                raise RuntimeError(f"stream failed: {msg}")


async def _wait_for_desktop(http: httpx.AsyncClient, token: str) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {token}"}
    with trio.fail_after(60):
        while True:
            session: dict[str, Any] = (
                await http.post("/api/streaming/create", headers=auth)
            ).json()
            async with trio_websocket.open_websocket_url(session["endpoint"]) as ws:
                await ws.send_message(wire.encode(wire.Auth(token)))
                await ws.get_message()
                await ws.send_message(wire.encode(wire.Request("p", "GET", "/api/tags")))
                if isinstance(wire.decode(await ws.get_message()), wire.ResponseStart):
                    return session
            await trio.sleep(0.2)


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="c2l-bench-"))
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp), "C2L_PODMAN_URL": PODMAN_URL}
    env["C2L_MAX_SESSIONS"] = str(max(args.sessions + 10, 100))
    issuer = DevIssuer.load_or_create(tmp / "c2l" / "dev-jwt-key.pem")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    c2l = [sys.executable, "-m", "c2l"]
    log = open(tmp / "gateway.log", "wb")  # noqa: SIM115 - lives as long as the run
    gateway = subprocess.Popen(
        [*c2l, "serve", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    agents: list[subprocess.Popen[bytes]] = []
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as http:
            with trio.fail_after(60):
                while True:
                    try:
                        if (await http.get("/health")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        await trio.sleep(0.1)
            print(f"gateway up at {url}; Podman at {PODMAN_URL}")

            # 1. create-to-ready, and memory per idle session
            pss_before = _pss_of_service_user()
            ready: list[float] = []
            for i in range(args.sessions):
                token = issuer.sign(f"bench-user-{i}")
                t = time.perf_counter()
                r = await http.post(
                    "/api/streaming/create", headers={"Authorization": f"Bearer {token}"}
                )
                ready.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"create failed: {r.status_code} {r.text}")
            print(
                _summary(f"create-to-ready ({args.sessions} sessions, sequential)", ready, 1, " s")
            )
            await trio.sleep(2)  # let the new proxies settle
            pss_after = _pss_of_service_user()
            if pss_before is not None and pss_after is not None:
                per = (pss_after - pss_before) / args.sessions / 1e6
                print(f"memory per idle session (PSS of all its processes): {per:.1f} MB")

            # 2. per-chunk latency, direct and through the whole path
            async with trio.open_nursery() as nursery:
                fake: FakeOllama = await nursery.start(
                    functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=args.delay)
                )
                # One desktop agent per streaming user: a user's requests in flight are
                # capped (128), so many concurrent streams are spread over several users.
                users = []
                for u in range(args.users):
                    token = issuer.sign(f"bench-user-{u}")
                    token_file = tmp / f"token-{u}"
                    token_file.write_text(token)
                    argv = [*c2l, "desktop", "--gateway", url, "--token-file", str(token_file)]
                    agents.append(
                        subprocess.Popen(
                            [*argv, "--ollama", fake.url],
                            env=env,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    )
                    users.append((await _wait_for_desktop(http, token), token))
                for concurrency in sorted({1, args.streams}):
                    direct: list[float] = []
                    tunnel: list[float] = []
                    async with trio.open_nursery() as streams:
                        for _ in range(concurrency):
                            streams.start_soon(_direct_stream, fake, args.tokens, direct)
                    async with trio.open_nursery() as streams:
                        for n in range(concurrency):
                            session, token = users[n % len(users)]
                            streams.start_soon(
                                _tunnel_stream, session, token, args.tokens, tunnel, f"s{n}"
                            )
                    print(
                        f"--- {concurrency} concurrent stream(s) of {args.tokens} tokens, "
                        f"{args.delay * 1000:.0f} ms per token"
                    )
                    print(_summary("  direct to fake Ollama   ", direct))
                    print(_summary("  through the whole path  ", tunnel))
                    print(
                        f"  added latency per chunk: median "
                        f"{(statistics.median(tunnel) - statistics.median(direct)) * 1000:.2f} ms, "
                        f"p99 {(_pct(tunnel, 99) - _pct(direct, 99)) * 1000:.2f} ms"
                    )
                nursery.cancel_scope.cancel()
    finally:
        for agent in agents:
            agent.send_signal(signal.SIGTERM)
        for agent in agents:
            agent.wait(10)
        t = time.perf_counter()
        gateway.send_signal(signal.SIGTERM)
        rc = gateway.wait(60)
        log.close()
        print(
            f"gateway stopped (exit {rc}) in {time.perf_counter() - t:.2f} s, "
            f"tearing down {args.sessions} sessions"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sessions", type=int, default=20, help="sessions to create (%(default)s)")
    ap.add_argument("--streams", type=int, default=20, help="concurrent streams (%(default)s)")
    ap.add_argument(
        "--users",
        type=int,
        default=2,
        help="users (one agent each) the streams share (%(default)s)",
    )
    ap.add_argument("--tokens", type=int, default=100, help="tokens per stream (%(default)s)")
    ap.add_argument("--delay", type=float, default=0.01, help="seconds per token (%(default)s)")
    trio.run(main, ap.parse_args())
