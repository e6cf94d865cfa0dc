"""The desktop agent against an in-test gateway and the fake Ollama."""

from __future__ import annotations

import functools
import itertools
import json
import random
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import WebSocketConnection, WebSocketRequest, serve_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, TextMessage
from wsproto.events import Request as WSRequest

import wire
from c2l._cli import main as c2l_main
from desktop import (
    AgentConfig,
    AgentConfigError,
    Backoff,
    BackoffPolicy,
    BodySplitter,
    DesktopAgent,
    StaticToken,
    TokenError,
    TokenFile,
    bridge_url,
    serve_agent,
)
from desktop.testing import FakeOllama, serve_fake_ollama

GOOD = "good-token"
FAST = BackoffPolicy(base=0.01, factor=2.0, cap=0.05, reset_after=30.0)


# ----- sans-IO pieces ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gateway", "expected"),
    [
        ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/ws/bridge"),
        ("https://c2l.example.com", "wss://c2l.example.com/ws/bridge"),
        ("https://c2l.example.com/", "wss://c2l.example.com/ws/bridge"),
        ("https://host/prefix", "wss://host/prefix/ws/bridge"),
        ("wss://host/ws/bridge", "wss://host/ws/bridge"),
    ],
)
def test_bridge_url(gateway: str, expected: str) -> None:
    assert bridge_url(gateway) == expected


@pytest.mark.parametrize(
    "gateway", ["ftp://host", "host:8080", "https://u:p@host", "http://h/?t=x"]
)
def test_bridge_url_rejects(gateway: str) -> None:
    with pytest.raises(AgentConfigError):
        bridge_url(gateway)


def test_backoff_grows_to_cap() -> None:
    b = Backoff(BackoffPolicy(base=0.5, factor=2, cap=30), random.Random(1))
    ceilings = []
    for _ in range(10):
        ceilings.append(b.ceiling())
        b.next_delay()
    assert ceilings == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    for _ in range(2000):  # a very long outage must not overflow
        b.next_delay()
    assert b.ceiling() == 30


def test_backoff_full_jitter_bounds() -> None:
    policy = BackoffPolicy(base=0.5, factor=2, cap=30)
    delays = []
    for seed in range(300):
        b = Backoff(policy, random.Random(seed))
        b.attempt = 3  # ceiling 4
        delays.append(b.next_delay())
    assert all(0 <= d <= 4 for d in delays)
    # Full jitter: spread over the whole range, not clustered at the ceiling.
    assert min(delays) < 0.5
    assert max(delays) > 3.5


def test_backoff_resets_only_after_a_long_connection() -> None:
    b = Backoff(BackoffPolicy(reset_after=30), random.Random(0))
    for _ in range(5):
        b.next_delay()
    b.connection_lasted(29.9)
    assert b.attempt == 5
    b.connection_lasted(30)
    assert b.attempt == 0
    assert b.ceiling() == 0.5


def test_backoff_without_jitter_is_its_ceiling_and_is_the_one_in_c2lcore() -> None:
    import c2lcore

    # The orchestrator's retries use the same implementation without jitter.
    assert (Backoff, BackoffPolicy) == (c2lcore.Backoff, c2lcore.BackoffPolicy)
    policy = BackoffPolicy(base=0.5, factor=2, cap=10, reset_after=30, jitter=False)
    b = Backoff(policy)
    assert [b.next_delay() for _ in range(8)] == [0.5, 1, 2, 4, 8, 10, 10, 10]
    b.connection_lasted(30)
    assert b.next_delay() == 0.5
    b.reset()
    assert b.attempt == 0
    assert policy.ceiling(-1) == 0.5  # never below the first step
    assert BackoffPolicy(base=2, factor=1, cap=5, jitter=False).ceiling(10**6) == 2


def test_splitter_lines_across_feeds() -> None:
    s = BodySplitter.for_response("application/x-ndjson")
    assert s.feed(b'{"a":1}\n{"b"') == ['{"a":1}\n']
    assert s.feed(b":2}\n") == ['{"b":2}\n']
    assert s.feed('{"c":"\u00e9'.encode()[:-1]) == []  # a split UTF-8 sequence waits
    assert s.feed('\u00e9"}\n'.encode()[1:]) == ['{"c":"\u00e9"}\n']
    assert s.feed(b"tail") == []
    assert s.flush() == ["tail"]


def test_splitter_sse_events_and_raw() -> None:
    s = BodySplitter.for_response("text/event-stream; charset=utf-8")
    assert s.feed(b"data: 1\n\ndata: 2\n") == ["data: 1\n\n"]
    assert s.feed(b"\ndata: [DONE]\n\n") == ["data: 2\n\n", "data: [DONE]\n\n"]
    raw = BodySplitter.for_response("application/json")
    assert raw.feed(b'{"x":') == ['{"x":']
    assert raw.feed("\u00e9".encode()[:1]) == []
    assert raw.feed("\u00e9".encode()[1:] + b"}") == ["\u00e9}"]


def test_splitter_caps_giant_lines() -> None:
    s = BodySplitter("lines", max_bytes=10)
    out = s.feed(b"x" * 25)
    assert out == ["x" * 10, "x" * 10]
    assert s.feed(b"\n") == ["xxxxx\n"]


def test_tokens_never_in_repr(tmp_path: Path) -> None:
    assert GOOD not in repr(StaticToken(GOOD))
    config = AgentConfig("http://127.0.0.1:1", StaticToken(GOOD))
    assert GOOD not in repr(config)


# ----- an in-test gateway ---------------------------------------------------------------


@attrs.define(eq=False)
class FakeGateway:
    """Checks the bearer header, answers auth_ok, hands each connection to the test."""

    token: str = GOOD
    port: int = 0
    seen_auth: list[str | None] = attrs.field(factory=list)
    seen_paths: list[str] = attrs.field(factory=list)
    rejected: int = 0
    sessions: int = 0
    _send: trio.MemorySendChannel[WebSocketConnection] = attrs.field(init=False)
    receive: trio.MemoryReceiveChannel[WebSocketConnection] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self.receive = trio.open_memory_channel(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handler(self, request: WebSocketRequest) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        auth = headers.get("authorization")
        self.seen_auth.append(auth)
        self.seen_paths.append(request.path)
        ws = await request.accept()
        if auth != f"Bearer {self.token}":
            self.rejected += 1
            err = wire.Error(wire.ErrorCode.AUTH_FAILED, "token rejected: signature invalid")
            await ws.send_message(wire.encode(err))
            await ws.aclose(code=wire.CLOSE_POLICY, reason="authentication failed")
            return
        self.sessions += 1
        await ws.send_message(wire.encode(wire.AuthOk(f"sess-{self.sessions}")))
        await self._send.send(ws)
        await trio.sleep_forever()  # the test drives the connection; closed at teardown


@pytest.fixture
async def gateway(nursery: trio.Nursery) -> FakeGateway:
    gw = FakeGateway()
    server = await nursery.start(
        lambda task_status: serve_websocket(
            gw.handler, "127.0.0.1", 0, None, handler_nursery=nursery, task_status=task_status
        )
    )
    gw.port = server.port
    return gw


@pytest.fixture
async def ollama(nursery: trio.Nursery) -> FakeOllama:
    fake: FakeOllama = await nursery.start(serve_fake_ollama, "127.0.0.1", 0)
    fake.delay = 0.005
    return fake


@attrs.define
class Started:
    agent: DesktopAgent
    lines: list[str]


async def start_agent(
    nursery: trio.Nursery,
    gateway_url: str,
    ollama_url: str,
    token: Any = None,
    **kw: Any,
) -> Started:
    lines: list[str] = []
    config = AgentConfig(gateway_url, token or StaticToken(GOOD), ollama_url, backoff=FAST, **kw)
    agent: DesktopAgent = await nursery.start(
        lambda task_status: serve_agent(config, status=lines.append, task_status=task_status)
    )
    return Started(agent, lines)


async def connected(
    nursery: trio.Nursery, gateway: FakeGateway, ollama: FakeOllama
) -> tuple[Started, WebSocketConnection]:
    started = await start_agent(nursery, gateway.url, ollama.url)
    ws = await gateway.receive.receive()
    return started, ws


async def recv(ws: WebSocketConnection) -> wire.Message:
    return wire.decode(await ws.get_message())


async def send(ws: WebSocketConnection, msg: wire.Message) -> None:
    await ws.send_message(wire.encode(msg))


def chat(rid: str, text: str = "hi", n: int = 5, model: str = "llama3.2") -> wire.Request:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "options": {"num_predict": n},
    }
    headers = {"Authorization": "Bearer client-secret", "Cookie": "s=1", "X-Trace": "t"}
    return wire.Request(rid, "POST", "/api/chat", headers, body)


async def collect(
    ws: WebSocketConnection, ids: set[str], log: list[wire.Message] | None = None
) -> dict[str, list[wire.Message]]:
    """Every message per id until each id got response_end or error."""
    out: dict[str, list[wire.Message]] = {i: [] for i in ids}
    open_ids = set(ids)
    while open_ids:
        msg = await recv(ws)
        if log is not None:
            log.append(msg)
        rid = getattr(msg, "id", None)
        assert rid in out, f"unexpected {msg!r}"
        out[rid].append(msg)
        if isinstance(msg, wire.ResponseEnd | wire.Error):
            open_ids.discard(rid)
    return out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# ----- the agent ------------------------------------------------------------------------


async def test_streams_one_chunk_per_ndjson_line(
    nursery: trio.Nursery, gateway: FakeGateway, ollama: FakeOllama
) -> None:
    """On an idle path (a token line every 0.1 s) every token line is its own chunk, sent as
    it comes: nothing is held back to fill a chunk (a busy path may merge lines, see below).
    Ollama writes its final line right after the last token, so those two may share one."""
    ollama.delay = 0.1
    with trio.fail_after(10):
        started, ws = await connected(nursery, gateway, ollama)
        await send(ws, chat("r1", "hello", n=5))
        msgs = (await collect(ws, {"r1"}))["r1"]
    assert gateway.seen_auth == [f"Bearer {GOOD}"]
    assert gateway.seen_paths == ["/ws/bridge"]
    start, *chunks, end = msgs
    assert isinstance(start, wire.ResponseStart)
    assert start.status == 200
    assert start.headers["content-type"] == "application/x-ndjson"
    assert isinstance(end, wire.ResponseEnd)
    assert all(isinstance(c, wire.Chunk) for c in chunks)
    data = [c.data for c in chunks if isinstance(c, wire.Chunk)]
    assert len(data) in (5, 6)  # five tokens and the final line, maybe with the last token
    assert all(d.endswith("\n") and d.count("\n") == 1 for d in data[:4])
    lines = "".join(data).splitlines()
    assert len(lines) == 6
    objs = [json.loads(line) for line in lines]
    assert "".join(o["message"]["content"] for o in objs) == "You said: hello token1 token2"
    assert [o["done"] for o in objs] == [False] * 5 + [True]
    assert started.agent.state == "connected"
    assert started.agent.session_id == "sess-1"
    assert any("connected as session sess-1" in line for line in started.lines)
    assert started.lines[0] == f"Ollama 0.5.7-fake at {ollama.url}"
    assert all(GOOD not in line for line in started.lines)


async def test_client_credentials_are_not_forwarded(
    nursery: trio.Nursery, gateway: FakeGateway
) -> None:
    # A tiny HTTP server that echoes the request headers it received.
    seen: list[bytes] = []

    async def echo(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
        seen.append(data)
        body = b'{"ok":true}'
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, echo, 0)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        await start_agent(nursery, gateway.url, f"http://127.0.0.1:{port}")
        ws = await gateway.receive.receive()
        await send(ws, chat("r1"))
        msgs = (await collect(ws, {"r1"}))["r1"]
    (head,) = [h.decode().lower() for h in seen if h.startswith(b"POST")]
    assert "x-trace: t" in head
    assert "authorization" not in head
    assert "cookie" not in head
    assert [type(m) for m in msgs] == [wire.ResponseStart, wire.Chunk, wire.ResponseEnd]
    assert isinstance(msgs[1], wire.Chunk)
    assert msgs[1].data == '{"ok":true}'


async def test_two_concurrent_requests_interleave_by_id(
    nursery: trio.Nursery, gateway: FakeGateway, ollama: FakeOllama
) -> None:
    ollama.delay = 0.02
    log: list[wire.Message] = []
    with trio.fail_after(10):
        _, ws = await connected(nursery, gateway, ollama)
        await send(ws, chat("a", "first", n=10))
        await send(ws, chat("b", "second", n=10))
        got = await collect(ws, {"a", "b"}, log)
    for rid, word in (("a", "first"), ("b", "second")):
        chunks = [m.data for m in got[rid] if isinstance(m, wire.Chunk)]
        lines = [line for c in chunks for line in c.splitlines() if line]  # one or more each
        assert len(lines) == 11
        text = "".join(json.loads(c)["message"]["content"] for c in lines)
        assert text.startswith(f"You said: {word} token1")
        assert isinstance(got[rid][0], wire.ResponseStart)
        assert isinstance(got[rid][-1], wire.ResponseEnd)
    order = [m.id for m in log if isinstance(m, wire.Chunk)]
    # Streamed concurrently: b's first chunk came before a's last one.
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")


async def test_cancel_aborts_the_ollama_request(
    nursery: trio.Nursery, gateway: FakeGateway, ollama: FakeOllama
) -> None:
    ollama.delay = 0.02
    with trio.fail_after(10):
        started, ws = await connected(nursery, gateway, ollama)
        await send(ws, chat("long", n=1000))
        chunks = 0
        while chunks < 2:
            msg = await recv(ws)
            chunks += isinstance(msg, wire.Chunk)
        await send(ws, wire.Cancel("long"))
        # (the stream runs 20 s if nothing cancels it: a generous bound still tells)
        with trio.fail_after(10):
            await ollama.wait_until(lambda f: bool(f.cancelled))
        await send(ws, wire.Ping(7.0))
        while not isinstance(msg := await recv(ws), wire.Pong):
            assert isinstance(msg, wire.Chunk)  # only chunks already on the wire
        with trio.move_on_after(0.3):
            extra = await recv(ws)
            pytest.fail(f"sent {extra!r} after the cancel")
    assert ollama.cancelled[0].path == "/api/chat"
    assert ollama.cancelled[0].tokens_sent < 1000
    assert started.agent.in_flight == 0


async def test_ollama_down_is_an_error_and_the_link_stays_up(
    nursery: trio.Nursery, gateway: FakeGateway
) -> None:
    down = f"http://127.0.0.1:{closed_port()}"
    with trio.fail_after(10):
        started = await start_agent(nursery, gateway.url, down)
        ws = await gateway.receive.receive()
        await send(ws, chat("r1"))
        (err,) = (await collect(ws, {"r1"}))["r1"]
        await send(ws, wire.Ping(1.5))
        pong = await recv(ws)
    assert isinstance(err, wire.Error)
    assert err.code == wire.ErrorCode.OLLAMA_UNAVAILABLE
    assert down in err.message
    assert started.lines[0].startswith(f"warning: Ollama is not reachable at {down}")
    assert pong == wire.Pong(1.5)
    assert started.agent.state == "connected"
    assert gateway.sessions == 1


async def test_ollama_http_error_is_passed_through(
    nursery: trio.Nursery, gateway: FakeGateway, ollama: FakeOllama
) -> None:
    with trio.fail_after(10):
        _, ws = await connected(nursery, gateway, ollama)
        await send(ws, chat("r1", model="missing"))
        msgs = (await collect(ws, {"r1"}))["r1"]
    start, *chunks, end = msgs
    assert isinstance(start, wire.ResponseStart)
    assert start.status == 404
    assert isinstance(end, wire.ResponseEnd)
    body = "".join(c.data for c in chunks if isinstance(c, wire.Chunk))
    assert json.loads(body) == {"error": 'model "missing" not found, try pulling it first'}


async def test_ping_is_answered_with_the_same_timestamp(
    nursery: trio.Nursery, gateway: FakeGateway, ollama: FakeOllama
) -> None:
    with trio.fail_after(10):
        _, ws = await connected(nursery, gateway, ollama)
        await send(ws, wire.Ping(1712345678901.0))
        assert await recv(ws) == wire.Pong(1712345678901.0)


async def test_bad_frames_get_errors_and_the_link_stays_up(
    nursery: trio.Nursery, gateway: FakeGateway, ollama: FakeOllama
) -> None:
    with trio.fail_after(10):
        started, ws = await connected(nursery, gateway, ollama)
        await ws.send_message("{not json")
        bad_json = await recv(ws)
        await ws.send_message('{"type":"request","id":"x"}')
        missing = await recv(ws)
        await ws.send_message('{"type":"teleport"}')
        unknown = await recv(ws)
        await send(ws, wire.ResponseEnd("y"))
        wrong_way = await recv(ws)
        await send(ws, wire.Ping(2.0))
        pong = await recv(ws)
    assert isinstance(bad_json, wire.Error)
    assert bad_json.code == wire.ErrorCode.BAD_JSON
    assert isinstance(missing, wire.Error)
    assert (missing.code, missing.id) == (wire.ErrorCode.MISSING_FIELD, "x")
    assert isinstance(unknown, wire.Error)
    assert unknown.code == wire.ErrorCode.UNKNOWN_TYPE
    assert isinstance(wrong_way, wire.Error)
    assert wrong_way.code == wire.ErrorCode.BAD_MESSAGE
    assert pong == wire.Pong(2.0)
    assert gateway.sessions == 1
    assert started.agent.connections == 1


async def test_duplicate_request_id_is_refused(
    nursery: trio.Nursery, gateway: FakeGateway, ollama: FakeOllama
) -> None:
    ollama.delay = 0.02
    with trio.fail_after(10):
        _, ws = await connected(nursery, gateway, ollama)
        await send(ws, chat("same", n=20))
        await send(ws, chat("same", n=20))
        errors = []
        while True:
            msg = await recv(ws)
            if isinstance(msg, wire.Error):
                errors.append(msg)
            if isinstance(msg, wire.ResponseEnd):
                break
    assert [(e.code, e.id) for e in errors] == [(wire.ErrorCode.DUPLICATE_ID, "same")]


async def test_reconnects_after_the_gateway_closes(
    nursery: trio.Nursery, gateway: FakeGateway, ollama: FakeOllama
) -> None:
    ollama.delay = 0.02
    with trio.fail_after(10):
        started, ws = await connected(nursery, gateway, ollama)
        await send(ws, chat("inflight", n=1000))
        assert isinstance(await recv(ws), wire.ResponseStart)
        await ws.aclose(code=wire.CLOSE_GOING_AWAY, reason="restarting")
        # In-flight requests die with the connection, so Ollama stops generating.
        # (the stream runs 20 s if nothing cancels it: a generous bound still tells)
        with trio.fail_after(10):
            await ollama.wait_until(lambda f: bool(f.cancelled))
        ws2 = await gateway.receive.receive()
        await started.agent.wait_until(lambda a: a.session_id == "sess-2")
        await send(ws2, chat("again", n=2))
        msgs = (await collect(ws2, {"again"}))["again"]
    assert isinstance(msgs[-1], wire.ResponseEnd)
    assert started.agent.connections == 2
    text = "\n".join(started.lines)
    assert "disconnected: closed by gateway with code 1001" in text
    assert "restarting" in text
    assert re.search(r"retrying in \d+\.\d s", text)
    assert text.count("connecting to ws://127.0.0.1:") == 2


async def test_auth_failure_retries_with_the_refreshed_token_file(
    nursery: trio.Nursery, gateway: FakeGateway, ollama: FakeOllama, tmp_path: Path
) -> None:
    token_path = tmp_path / "token"
    token_path.write_text("expired\n")
    with trio.fail_after(10):
        started = await start_agent(nursery, gateway.url, ollama.url, TokenFile(token_path))
        await started.agent.wait_until(lambda a: gateway.rejected >= 2)
        assert started.agent.state != "connected"
        token_path.write_text(f"{GOOD}\n")
        ws = await gateway.receive.receive()
        await send(ws, wire.Ping(3.0))
        assert await recv(ws) == wire.Pong(3.0)
    assert gateway.seen_auth[:2] == ["Bearer expired", "Bearer expired"]
    assert gateway.seen_auth[-1] == f"Bearer {GOOD}"
    text = "\n".join(started.lines)
    assert "authentication failed: token rejected: signature invalid" in text
    assert f"token file {token_path}" in text
    assert GOOD not in text
    assert "expired" not in text.replace("token rejected", "")


async def test_http_401_on_upgrade_is_an_auth_failure(nursery: trio.Nursery) -> None:
    async def reject(request: WebSocketRequest) -> None:
        await request.reject(401, body=b'{"error":"auth_failed"}')

    server = await nursery.start(
        lambda task_status: serve_websocket(
            reject, "127.0.0.1", 0, None, handler_nursery=nursery, task_status=task_status
        )
    )
    with trio.fail_after(10):
        started = await start_agent(nursery, f"http://127.0.0.1:{server.port}", "http://x:1")
        await started.agent.wait_until(lambda a: a.last_error is not None)
    assert started.agent.last_error is not None
    assert "authentication failed (HTTP 401)" in started.agent.last_error


@attrs.define
class UnreadableToken:
    """A token source that always fails, counting reads; no I/O, so no threads."""

    reads: int = 0

    async def read(self) -> str:
        self.reads += 1
        raise TokenError("token file /nowhere is empty")

    def invalidate(self) -> None:
        pass

    def describe(self) -> str:
        return "token file /nowhere"


async def test_backoff_schedule_on_the_mock_clock(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # Each attempt fails at once without touching the network, so on the mock clock the
    # gaps between attempts are exactly the backoff delays.
    token = UnreadableToken()
    stamps: list[tuple[float, str]] = []
    policy = BackoffPolicy(base=0.5, factor=2, cap=4, reset_after=30)
    config = AgentConfig("http://127.0.0.1:1", token, backoff=policy, probe_ollama=False)

    def status(line: str) -> None:
        stamps.append((trio.current_time(), line))

    with trio.fail_after(300):
        agent: DesktopAgent = await nursery.start(
            lambda task_status: serve_agent(config, status=status, task_status=task_status)
        )
        await agent.wait_until(lambda a: a.backoff.attempt >= 12)
    attempts = [t for t, line in stamps if line.startswith("connecting")]
    printed = [float(m.group(1)) for _, line in stamps if (m := re.search(r"in ([\d.]+) s", line))]
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    ceilings = [0.5, 1, 2, 4, 4, 4, 4, 4, 4, 4, 4]
    assert len(gaps) == len(ceilings)
    for gap, shown, ceiling in zip(gaps, printed, ceilings, strict=False):
        assert 0 <= gap <= ceiling + 1e-9
        assert abs(gap - shown) <= 0.05 + 1e-9
    assert sum(gaps[3:]) > 4  # capped but not stuck at zero: jitter over [0, cap]
    assert token.reads == len(attempts)  # the token is read again before every attempt
    assert all("token file /nowhere is empty" in line for _, line in stamps if "disconn" in line)


def test_cli_rejects_a_bad_gateway_url(capsys: pytest.CaptureFixture[str]) -> None:
    class Args:
        gateway = "ftp://nope"
        token = "t"
        token_file = None
        ollama = "http://127.0.0.1:11434"

    assert c2l_main(["desktop", "--gateway", Args.gateway, "--token", Args.token]) == 2
    assert "--gateway 'ftp://nope'" in capsys.readouterr().err


async def test_cli_exits_0_on_sigterm() -> None:
    gateway = f"http://127.0.0.1:{closed_port()}"
    cmd = [sys.executable, "-m", "c2l", "desktop", "--gateway", gateway, "--token", "sekrit"]
    out = b""
    with trio.fail_after(20):
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            while b"retrying in" not in out:
                data = await proc.stdout.receive_some(4096)
                assert data, out
                out += data
            proc.send_signal(signal.SIGTERM)
            while data := await proc.stdout.receive_some(4096):
                out += data
            assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            assert proc.stdout is not None
            await proc.stdout.aclose()
    text = out.decode()
    assert (
        f"c2l desktop: connecting to ws://127.0.0.1:{gateway.rsplit(':', 1)[1]}/ws/bridge" in text
    )
    assert "stopping (SIGTERM)" in text
    assert "sekrit" not in text


async def test_reconnects_when_the_gateway_goes_silent(nursery: trio.Nursery) -> None:
    # A gateway that completes the handshake, says auth_ok, and then neither reads nor
    # answers anything (a dead peer behind NAT): only the agent's heartbeat finds it.
    opened = 0

    async def silent_gateway(stream: trio.SocketStream) -> None:
        nonlocal opened
        ws = WSConnection(ConnectionType.SERVER)
        while not any(isinstance(e, WSRequest) for e in ws.events()):
            data = await stream.receive_some(65536)
            if not data:
                return
            ws.receive_data(data)
        await stream.send_all(ws.send(AcceptConnection()))
        opened += 1
        await stream.send_all(ws.send(TextMessage(data=wire.encode(wire.AuthOk(f"s{opened}")))))
        await trio.sleep_forever()

    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, silent_gateway, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(20):
        started = await start_agent(
            nursery,
            f"http://127.0.0.1:{port}",
            "http://127.0.0.1:9",
            heartbeat_interval=0.2,
            heartbeat_timeout=0.2,
            probe_ollama=False,
        )
        await started.agent.wait_until(lambda a: a.session_id == "s2")
    assert "disconnected: no answer to ping within 0.2 s" in started.lines


async def test_backoff_starts_over_after_a_connection_that_lasted(
    nursery: trio.Nursery, gateway: FakeGateway, ollama: FakeOllama, tmp_path: Path
) -> None:
    # Failed attempts raise the backoff; a connection that stays up reset_after seconds
    # brings it back to the first step, so a gateway restart after a long quiet run is
    # retried at once, not after the ceiling of an old outage.
    token_path = tmp_path / "token"
    token_path.write_text("refused\n")
    policy = BackoffPolicy(base=0.01, factor=2.0, cap=0.05, reset_after=0.5)
    lines: list[str] = []
    config = AgentConfig(
        gateway.url, TokenFile(token_path), ollama.url, backoff=policy, probe_ollama=False
    )
    with trio.fail_after(20):
        agent: DesktopAgent = await nursery.start(
            lambda task_status: serve_agent(config, status=lines.append, task_status=task_status)
        )
        await agent.wait_until(lambda a: gateway.rejected >= 4)
        token_path.write_text(f"{GOOD}\n")
        ws = await gateway.receive.receive()
        assert agent.backoff.attempt >= 4  # raised by the refusals
        await trio.sleep(0.8)  # up longer than reset_after
        await ws.aclose(code=wire.CLOSE_GOING_AWAY, reason="restarting")
        await gateway.receive.receive()
        # reset to 0, then one step taken for the retry that just connected
        assert agent.backoff.attempt == 1


async def test_cli_stops_when_another_agent_took_over(nursery: trio.Nursery) -> None:
    async def replace(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message(wire.encode(wire.AuthOk("sess")))
        err = wire.Error(wire.ErrorCode.DESKTOP_REPLACED, "another desktop agent took over")
        await ws.send_message(wire.encode(err))
        await ws.aclose(code=wire.CLOSE_REPLACED, reason="replaced")

    server = await nursery.start(
        lambda task_status: serve_websocket(
            replace, "127.0.0.1", 0, None, handler_nursery=nursery, task_status=task_status
        )
    )
    cmd = [sys.executable, "-m", "c2l", "desktop", "--gateway", f"http://127.0.0.1:{server.port}"]
    with trio.fail_after(30):
        proc = await trio.run_process(
            [*cmd, "--token", "t", "--ollama", "http://127.0.0.1:9"],
            capture_stdout=True,
            check=False,
        )
    text = proc.stdout.decode()
    assert proc.returncode == 0, text
    assert "another desktop agent of this user took over" in text
    assert text.count("connecting to") == 1  # it does not come back


# ----- coalescing: fewer frames when the writer is behind, none held back when idle -----


def _streams(*ids: str) -> dict[str, Any]:
    from desktop._agent import _Stream

    return {i: _Stream(i) for i in ids}


def test_coalesce_merges_each_requests_consecutive_chunks_in_order() -> None:
    from desktop._agent import coalesce

    s = _streams("a", "b")
    batch = [
        (s["a"], wire.ResponseStart("a", 200, {})),
        (s["a"], wire.Chunk("a", "1\n")),
        (s["b"], wire.Chunk("b", "x\n")),
        (s["a"], wire.Chunk("a", "2\n")),
        (None, wire.Pong(1.0)),
        (s["b"], wire.Chunk("b", "y\n")),
        (s["a"], wire.Chunk("a", "3\n")),
        (s["a"], wire.ResponseEnd("a")),
        (s["a"], wire.Chunk("a", "late\n")),  # (never sent after an end; kept after it)
        (s["b"], wire.Chunk("b", "z\n")),
    ]
    out = [msg for _, msg in coalesce(batch)]
    assert out == [
        wire.ResponseStart("a", 200, {}),
        wire.Chunk("a", "1\n2\n3\n"),
        wire.Chunk("b", "x\ny\nz\n"),
        wire.Pong(1.0),
        wire.ResponseEnd("a"),
        wire.Chunk("a", "late\n"),
    ]


def test_coalesce_keeps_chunks_under_the_size_limit_and_leaves_one_message_alone() -> None:
    from desktop._agent import MAX_CHUNK_BYTES, coalesce

    s = _streams("a")
    big = "é" * (MAX_CHUNK_BYTES // 6) + "\n"  # 2 bytes a character: a third of the limit
    batch = [(s["a"], wire.Chunk("a", big)) for _ in range(5)]
    out = [msg for _, msg in coalesce(batch)]
    assert all(isinstance(m, wire.Chunk) for m in out)
    sizes = [len(m.data.encode()) for m in out if isinstance(m, wire.Chunk)]
    assert max(sizes) <= MAX_CHUNK_BYTES
    assert len(out) == 3  # 2 + 2 + 1
    assert "".join(m.data for m in out if isinstance(m, wire.Chunk)) == big * 5
    one = [(s["a"], wire.Chunk("a", "only\n"))]
    assert coalesce(one) == one


@attrs.define
class GatedSocket:
    """A WebSocket whose sends wait while ``open`` is clear (a slow network)."""

    open: trio.Event = attrs.field(factory=trio.Event)
    frames: list[str] = attrs.field(factory=list)

    async def send_message(self, frame: str) -> None:
        await self.open.wait()
        self.frames.append(frame)


async def test_the_writer_merges_only_what_queued_up_while_it_was_behind(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    from desktop._agent import OUTGOING_QUEUE, _Link, _Outgoing

    ws = GatedSocket()
    send, receive = trio.open_memory_channel[_Outgoing](OUTGOING_QUEUE)
    link = _Link(None, ws, send, nursery, wire.StreamTracker(max_open=8))  # type: ignore[arg-type]
    nursery.start_soon(link.writer, receive)
    s = _streams("a", "b")
    # Idle: each message goes out on its own, at once.
    ws.open.set()
    await link.send(s["a"], wire.ResponseStart("a", 200, {}))
    await link.send(s["a"], wire.Chunk("a", "1\n"))
    await trio.testing.wait_all_tasks_blocked()
    assert [wire.decode(f) for f in ws.frames] == [
        wire.ResponseStart("a", 200, {}),
        wire.Chunk("a", "1\n"),
    ]
    # Behind: the network stalls while two requests stream; what queued up meanwhile
    # leaves as one chunk per request, complete and in order.
    ws.open = trio.Event()
    await link.send(s["a"], wire.Chunk("a", "2\n"))  # the writer waits with this one
    await link.send(s["b"], wire.ResponseStart("b", 200, {}))
    for i in range(3, 20):
        await link.send(s["a"], wire.Chunk("a", f"{i}\n"))
        await link.send(s["b"], wire.Chunk("b", f"b{i}\n"))
    await link.send(s["a"], wire.ResponseEnd("a"))
    await trio.sleep(1)
    ws.open.set()
    await trio.testing.wait_all_tasks_blocked()
    msgs = [wire.decode(f) for f in ws.frames[2:]]
    assert msgs == [
        wire.Chunk("a", "2\n"),
        wire.ResponseStart("b", 200, {}),
        wire.Chunk("a", "".join(f"{i}\n" for i in range(3, 20))),
        wire.Chunk("b", "".join(f"b{i}\n" for i in range(3, 20))),
        wire.ResponseEnd("a"),
    ]
