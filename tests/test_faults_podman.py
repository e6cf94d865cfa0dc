"""Faults on real rootless Podman, each with a stream in flight.

``c2l serve`` and ``c2l desktop`` run as real processes against the Podman REST service
of the test run (``C2L_PODMAN_URL``); web clients are real WebSocket clients; the fake
Ollama speaks the real NDJSON protocol. Each test measures how long detection and
recovery took and prints it (``pytest -s`` shows the figures).
"""

from __future__ import annotations

import functools
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio_websocket

import wire
from c2lcore import user_hash
from desktop.testing import FakeOllama, serve_fake_ollama
from gateway import DevIssuer
from orchestrator import PodmanRuntime, container_name, sessions_dir_path

from ._stack import count, labelled, stop
from .conftest import PODMAN_URL, PROXY_IMAGE, free_port, need_podman

pytestmark = pytest.mark.podman

C2L = [sys.executable, "-m", "c2l"]
HEARTBEAT = 0.5  # seconds: a frozen agent is dropped after about two of these
ROOT = Path(__file__).resolve().parents[1]


def figure(name: str, seconds: float) -> None:
    """Report one measured duration (shown with ``pytest -s``)."""
    print(f"\nFIGURE {name}: {seconds:.2f} s")


@attrs.define
class Gateway:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


@attrs.define
class Stack:
    tmp: Path
    env: dict[str, str]
    issuer: DevIssuer
    gateway: Gateway | None = None
    agents: dict[str, subprocess.Popen[bytes]] = attrs.field(factory=dict)

    def token(self, sub: str) -> str:
        return self.issuer.sign(sub)

    def start_gateway(self, port: int | None = None) -> Gateway:
        port = port or free_port()
        log = self.tmp / f"gateway-{port}-{time.monotonic_ns()}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*C2L, "serve", "--port", str(port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.gateway = Gateway(f"http://127.0.0.1:{port}", proc, log)
        return self.gateway

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return self.gateway.url

    def start_agent(self, sub: str, ollama_url: str) -> subprocess.Popen[bytes]:
        token_file = self.tmp / f"{sub}.token"
        token_file.write_text(self.token(sub))
        token_file.chmod(0o600)
        argv = [*C2L, "desktop", "--gateway", self.url, "--token-file", str(token_file)]
        with open(self.tmp / f"agent-{sub}.log", "ab") as out:
            agent = subprocess.Popen(
                [*argv, "--ollama", ollama_url], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        self.agents[sub] = agent
        return agent

    def agent_log(self, sub: str) -> str:
        return (self.tmp / f"agent-{sub}.log").read_text()

    async def serve(self) -> Gateway:
        """Start a gateway and wait until it answers /health."""
        gw = self.start_gateway()
        await wait_healthy(gw)
        return gw

    async def user_with_agent(
        self, sub: str, ollama_url: str
    ) -> tuple[subprocess.Popen[bytes], dict[str, Any], str]:
        """Start ``sub``'s desktop agent; return it, the ready session and a token."""
        agent = self.start_agent(sub, ollama_url)
        return agent, await ready_session(self, sub), self.token(sub)


async def wait_healthy(gw: Gateway, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        async with httpx.AsyncClient(timeout=1) as http:
            while True:
                try:
                    if (await http.get(f"{gw.url}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                assert gw.proc.poll() is None, gw.log.read_text()[-3000:]
                await trio.sleep(0.05)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    need_podman()
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "C2L_PODMAN_URL": PODMAN_URL,
        "C2L_PROXY_IMAGE": PROXY_IMAGE,
        "C2L_HEARTBEAT_INTERVAL": str(HEARTBEAT),
        "PYTHONUNBUFFERED": "1",
    }
    issuer = DevIssuer.load_or_create(tmp_path / "config" / "c2l" / "dev-jwt-key.pem")
    s = Stack(tmp_path, env, issuer)
    try:
        yield s
    finally:
        for agent in s.agents.values():
            stop(agent)
        if s.gateway is not None:
            stop(s.gateway.proc)
            print(s.gateway.log.read_text()[-3000:])


@pytest.fixture
async def fake_ollama(nursery: trio.Nursery) -> FakeOllama:
    fake: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=0.05)
    )
    return fake


async def ready_session(stack: Stack, sub: str, timeout: float = 60) -> dict[str, Any]:
    """Create the user's session and wait until its desktop agent answers through it."""
    token = stack.token(sub)
    with trio.fail_after(timeout):
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            while True:
                r = await http.post(
                    "/api/streaming/create", headers={"Authorization": f"Bearer {token}"}
                )
                if r.status_code == 200:
                    session: dict[str, Any] = r.json()
                    async with client(session, token) as ws:
                        await ws.send_message(wire.encode(wire.Request("p", "GET", "/api/tags")))
                        msg = await next_message(ws)
                    if isinstance(msg, wire.ResponseStart):
                        return session
                await trio.sleep(0.1)


@asynccontextmanager
async def client(
    session: dict[str, Any], token: str
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    async with trio_websocket.open_websocket_url(session["endpoint"]) as ws:
        await ws.send_message(wire.encode(wire.Auth(token, session["sessionId"])))
        assert isinstance(await next_message(ws), wire.AuthOk)
        yield ws


async def next_message(ws: trio_websocket.WebSocketConnection) -> wire.Message:
    """The next message that is not a heartbeat (pings are answered, as a client must)."""
    while True:
        msg = wire.decode(await ws.get_message())
        if isinstance(msg, wire.Ping):
            await ws.send_message(wire.encode(wire.Pong(msg.timestamp)))
            continue
        return msg


async def start_long_stream(ws: trio_websocket.WebSocketConnection, rid: str = "long") -> None:
    """Start a generation of 1000 tokens (50 s) and wait for its first chunk."""
    body = {"model": "llama3.2:latest", "prompt": "go", "options": {"num_predict": 1000}}
    await ws.send_message(wire.encode(wire.Request(rid, "POST", "/api/generate", {}, body)))
    assert isinstance(await next_message(ws), wire.ResponseStart)
    assert isinstance(await next_message(ws), wire.Chunk)


async def until_error(ws: trio_websocket.WebSocketConnection) -> tuple[str, float]:
    """Read the stream until an error or a close; (what, when)."""
    try:
        while True:
            msg = await next_message(ws)
            if isinstance(msg, wire.Error):
                return msg.code, trio.current_time()
    except trio_websocket.ConnectionClosed as exc:
        return f"closed {exc.reason.code}", trio.current_time()


async def podman_post(path: str) -> None:
    async with PodmanRuntime(PODMAN_URL) as rt:
        response = await rt._api.http.post(path)
        assert response.status_code < 300, response.text


async def test_proxy_container_killed(stack: Stack, fake_ollama: FakeOllama) -> None:
    sub = "kill-proxy@example.com"
    gw = await stack.serve()
    _, session, token = await stack.user_with_agent(sub, fake_ollama.url)
    auth = {"Authorization": f"Bearer {token}"}
    with trio.fail_after(60):
        async with client(session, token) as ws:
            await start_long_stream(ws)
            t0 = trio.current_time()
            await podman_post(f"/containers/{container_name(user_hash(sub))}/kill?signal=KILL")
            what, at = await until_error(ws)
        detected = at - t0
        assert what in (wire.ErrorCode.SESSION_ENDED, wire.ErrorCode.DESKTOP_UNAVAILABLE), what
        assert detected < 2
        async with httpx.AsyncClient(base_url=stack.url) as http:
            while (await http.get("/api/streaming/status", headers=auth)).status_code == 200:
                await trio.sleep(0.05)
            ended = trio.current_time() - t0
            assert count(await labelled()) == 0  # nothing left once the session ended
        assert ended < 5
        assert "ended (proxy_exited)" in gw.log.read_text()
        fresh = await ready_session(stack, sub)  # the parked agent is attached by itself
        recovered = trio.current_time() - t0
        assert fresh["sessionId"] != session["sessionId"]
    figure("proxy killed: client told", detected)
    figure("proxy killed: session ended, nothing left", ended)
    figure("proxy killed: new session streaming with the same agent", recovered)


async def test_desktop_agent_killed_then_restarted(stack: Stack, fake_ollama: FakeOllama) -> None:
    sub = "kill-agent@example.com"
    await stack.serve()
    agent, session, token = await stack.user_with_agent(sub, fake_ollama.url)
    with trio.fail_after(60):
        async with client(session, token) as ws:
            await start_long_stream(ws)
            t0 = trio.current_time()
            agent.kill()
            what, at = await until_error(ws)
            detected = at - t0
            assert what == wire.ErrorCode.DESKTOP_UNAVAILABLE
            assert detected < 2
            agent.wait(5)
            t1 = trio.current_time()
            stack.start_agent(sub, fake_ollama.url)
            while True:  # the same web client, the same session: the new agent reconnects
                await ws.send_message(wire.encode(wire.Request("again", "GET", "/api/tags")))
                msg = await next_message(ws)
                if isinstance(msg, wire.ResponseStart):
                    break
                assert isinstance(msg, wire.Error) and msg.code == "desktop_unavailable", msg
                await trio.sleep(0.1)
            recovered = trio.current_time() - t1
    figure("agent killed: in-flight request failed", detected)
    figure("agent restarted: requests succeed again", recovered)


async def test_desktop_agent_frozen_is_dropped_by_heartbeat(
    stack: Stack, fake_ollama: FakeOllama
) -> None:
    sub = "frozen@example.com"
    await stack.serve()
    agent, session, token = await stack.user_with_agent(sub, fake_ollama.url)
    with trio.fail_after(60):
        async with client(session, token) as ws:
            await start_long_stream(ws)
            t0 = trio.current_time()
            agent.send_signal(signal.SIGSTOP)
            try:
                what, at = await until_error(ws)
            finally:
                agent.send_signal(signal.SIGCONT)
            detected = at - t0
            assert what == wire.ErrorCode.DESKTOP_UNAVAILABLE
            assert detected < 2 * HEARTBEAT + 2  # two silent intervals, then the next ping
            t1 = trio.current_time()
            while True:  # thawed, the agent finds its connection closed and reconnects
                await ws.send_message(wire.encode(wire.Request("again", "GET", "/api/tags")))
                msg = await next_message(ws)
                if isinstance(msg, wire.ResponseStart):
                    break
                await trio.sleep(0.1)
            recovered = trio.current_time() - t1
    assert stack.agent_log(sub).count("connected as") >= 2
    figure("agent frozen (SIGSTOP): detected by heartbeat", detected)
    figure("agent thawed: reconnected, requests succeed", recovered)


async def test_web_client_gone_mid_stream_cancels_ollama(
    stack: Stack, fake_ollama: FakeOllama
) -> None:
    sub = "leaver@example.com"
    await stack.serve()
    _, session, token = await stack.user_with_agent(sub, fake_ollama.url)
    with trio.fail_after(30):
        async with client(session, token) as ws:
            await start_long_stream(ws)
            before = len(fake_ollama.cancelled)
            t0 = trio.current_time()
        # the client is gone mid-stream (it closed its WebSocket without a cancel)
        await fake_ollama.wait_until(lambda f: len(f.cancelled) > before)
        cancelled = trio.current_time() - t0
    assert cancelled < 1
    assert fake_ollama.cancelled[-1].path == "/api/generate"
    figure("web client gone: cancel reached Ollama", cancelled)


async def serve_http_500(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """An 'Ollama' that answers every request with HTTP 500, until ``scope`` is cancelled."""

    async def handle(stream: trio.SocketStream) -> None:
        with trio.move_on_after(5):
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            body = b'{"error":"model crashed"}'
            await stream.send_all(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        with scope:
            task_status.started(listeners[0].socket.getsockname()[1])
            await trio.serve_listeners(handle, listeners)
    finally:
        for listener in listeners:  # closed: connections are refused, as with Ollama down
            await listener.aclose()


async def test_ollama_answering_500_then_down(stack: Stack, nursery: trio.Nursery) -> None:
    sub = "sick-ollama@example.com"
    await stack.serve()
    ollama_scope = trio.CancelScope()
    port = await nursery.start(serve_http_500, ollama_scope)
    stack.start_agent(sub, f"http://127.0.0.1:{port}")
    token = stack.token(sub)
    with trio.fail_after(60):
        session = await ready_session(stack, sub)  # /api/tags answers 500: still an answer
        async with client(session, token) as ws:
            body = {"model": "llama3.2:latest", "prompt": "x"}
            await ws.send_message(wire.encode(wire.Request("a", "POST", "/api/generate", {}, body)))
            start = await next_message(ws)
            assert isinstance(start, wire.ResponseStart) and start.status == 500
            chunk = await next_message(ws)
            assert isinstance(chunk, wire.Chunk) and "model crashed" in chunk.data
            assert isinstance(await next_message(ws), wire.ResponseEnd)
            ollama_scope.cancel()  # Ollama goes down
            await trio.sleep(0.2)
            t0 = trio.current_time()
            await ws.send_message(wire.encode(wire.Request("b", "POST", "/api/generate", {}, body)))
            err = await next_message(ws)
            answered = trio.current_time() - t0
            assert isinstance(err, wire.Error), err
            assert err.code == wire.ErrorCode.OLLAMA_UNAVAILABLE
            # the HTTP API gives the 502-style answer
            async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
                r = await http.post(
                    "/api/ollama/api/generate",
                    json=body,
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert r.status_code == 502
                assert r.json()["error"] == wire.ErrorCode.OLLAMA_UNAVAILABLE
    log = stack.agent_log(sub)
    assert log.count("connected as") == 1 and "disconnected" not in log  # agent stayed up
    figure("ollama down: client told", answered)


async def test_gateway_sigterm_tears_everything_down_fast(
    stack: Stack, fake_ollama: FakeOllama
) -> None:
    gw = await stack.serve()
    sub = "streaming@example.com"
    stack.start_agent(sub, fake_ollama.url)
    session = await ready_session(stack, sub)
    users = [f"user{i}@example.com" for i in range(7)]
    with trio.fail_after(120):
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
            for u in users:  # a burst of creates: all succeed
                r = await http.post(
                    "/api/streaming/create",
                    headers={"Authorization": f"Bearer {stack.token(u)}"},
                )
                assert r.status_code == 200, r.text
        assert len((await labelled()).pods) == len(users) + 1
        async with client(session, stack.token(sub)) as ws:
            await start_long_stream(ws)
            t0 = trio.current_time()
            gw.proc.send_signal(signal.SIGTERM)
            what, _ = await until_error(ws)
            rc = await trio.to_thread.run_sync(gw.proc.wait, 15)
            took = trio.current_time() - t0
    assert rc == 0
    assert took < 10
    told = (wire.ErrorCode.SESSION_ENDED, wire.ErrorCode.DESKTOP_UNAVAILABLE, "closed 1001")
    assert what in told, what
    assert count(await labelled()) == 0
    assert session_dirs() == []  # the proxies' socket directories went too
    figure(f"SIGTERM with {len(users) + 1} sessions: exit 0, nothing left", took)


async def test_gateway_sigkill_then_restart_cleans_up_while_serving(
    stack: Stack, fake_ollama: FakeOllama
) -> None:
    first = stack.start_gateway()
    await wait_healthy(first)
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=first.url, timeout=60) as http:
            for u in ("a@example.com", "b@example.com"):
                auth = {"Authorization": f"Bearer {stack.token(u)}"}
                assert (await http.post("/api/streaming/create", headers=auth)).status_code == 200
        first.proc.kill()
        first.proc.wait(5)
        assert count(await labelled()) == 6  # the killed gateway left its pods behind
        left = [user_hash(u) for u in ("a@example.com", "b@example.com")]
        assert session_dirs() == sorted(left)  # ... and their socket directories
        t0 = trio.current_time()
        second = stack.start_gateway()
        await wait_healthy(second)
        took = trio.current_time() - t0
        # Removed in the background while it serves (tests/test_scale_podman.py at scale),
        # each session's directory after its pod and network.
        while count(await labelled()) > 0 or set(left) & set(session_dirs()):
            await trio.sleep(0.2)
        swept = trio.current_time() - t0
        stack.start_agent("c@example.com", fake_ollama.url)
        await ready_session(stack, "c@example.com")
    figure("restart after SIGKILL: serving", took)
    figure("restart after SIGKILL: leftovers removed", swept)


def session_dirs() -> list[str]:
    """The session directories (user hashes) in the gateways' sessions directory (a
    gateway removes that directory on its way out when it is empty)."""
    try:
        return sorted(os.listdir(sessions_dir_path(PODMAN_URL)))
    except FileNotFoundError:
        return []


async def _wait_gone(pid: int) -> None:
    while os.path.exists(f"/proc/{pid}"):  # noqa: ASYNC240 (a cheap stat)
        await trio.sleep(0.05)


async def _start_service(svc_user: str, run_dir: Path) -> None:
    """Start the service user's Podman REST service the way scripts/_setup.sh does."""
    script = f"source {ROOT}/scripts/_setup.sh && _c2l_root_podman"
    env = {**os.environ, "C2L_SVC_USER": svc_user, "C2L_RUN_DIR": str(run_dir)}
    await trio.run_process(["bash", "-c", script], env=env, capture_stderr=True)


def _service_pidfile() -> Path:
    return Path(PODMAN_URL.removeprefix("unix://")).parent / "podman.pid"


@pytest.mark.skipif(os.geteuid() != 0, reason="restarts the service user's Podman as root")
async def test_podman_service_restarted_under_a_live_gateway(
    stack: Stack, fake_ollama: FakeOllama
) -> None:
    pidfile = _service_pidfile()
    if not pidfile.exists():
        pytest.skip(f"{pidfile} is missing: the Podman service was not started by scripts/")
    sub = "podman-restart@example.com"
    await stack.serve()
    _, session, token = await stack.user_with_agent(sub, fake_ollama.url)
    run_dir = pidfile.parent
    # The service belongs to whoever owns its socket: never guess, or the restart would
    # start another user's Podman on this socket.
    svc_user = pwd.getpwuid(os.stat(PODMAN_URL.removeprefix("unix://")).st_uid).pw_name
    arrivals: list[float] = []
    with trio.fail_after(120):
        async with client(session, token) as ws, trio.open_nursery() as reader:
            await start_long_stream(ws)

            async def read() -> None:  # keeps answering heartbeats, as a browser does
                while True:
                    msg = await next_message(ws)
                    assert isinstance(msg, wire.Chunk), msg
                    arrivals.append(trio.current_time())

            reader.start_soon(read)
            pid = int(pidfile.read_text())
            t0 = trio.current_time()
            restarted = False
            try:
                os.kill(pid, signal.SIGTERM)
                await _wait_gone(pid)
                down_at = trio.current_time()
                await trio.sleep(1.0)
                await _start_service(svc_user, run_dir)
                restarted = True
            finally:
                if not restarted:  # never leave the run without its Podman service
                    with trio.CancelScope(shield=True), trio.move_on_after(60):
                        await _start_service(svc_user, run_dir)
            back_at = trio.current_time()
            await trio.sleep(1.0)
            reader.cancel_scope.cancel()
        # the stream kept going while the service was down, and after it came back
        assert sum(down_at < t < back_at for t in arrivals) > 10
        assert sum(t > back_at for t in arrivals) > 10
        back = back_at - t0
        # new creates work with the restarted service
        other = "after-restart@example.com"
        stack.start_agent(other, fake_ollama.url)
        t1 = trio.current_time()
        await ready_session(stack, other)
        created = trio.current_time() - t1
    figure("podman service restarted: down and back", back)
    figure("podman service restarted: first new session ready", created)
