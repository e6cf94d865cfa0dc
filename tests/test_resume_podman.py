"""Resumable streams end to end on real rootless Podman (DESIGN.md section 2, issue 13).

``c2l serve`` with a short ``--resume-window``, a real ``c2l desktop`` agent, the fake
Ollama streaming slowly. The web client reaches the gateway through a TCP relay on
127.0.0.1 that the test cuts with resets (SO_LINGER 0) in both directions: to the
gateway, the client simply vanished mid-answer, as a phone changing networks does.
"""

from __future__ import annotations

import functools
import json
import socket
import struct
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio_websocket

import wire
from desktop.testing import FakeOllama, make_tokens, serve_fake_ollama

from ._stack import run_stack, wait_for_desktop

pytestmark = pytest.mark.podman

WINDOW = 6.0
DELAY = 0.1  # seconds per token


@attrs.define(eq=False)
class Relay:
    """A TCP relay to ``target`` whose connections the test can cut with resets."""

    target: tuple[str, int]
    port: int = 0
    pairs: list[tuple[trio.SocketStream, trio.SocketStream]] = attrs.field(factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, down: trio.SocketStream) -> None:
        up = await trio.open_tcp_stream(*self.target)
        self.pairs.append((down, up))

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            try:
                while data := await src.receive_some(65536):
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, down, up)
            nursery.start_soon(pump, up, down)

    def cut(self) -> None:
        """Reset every relayed connection, both ways (no close frame, no FIN)."""
        for pair in self.pairs:
            for stream in pair:
                sock = stream.socket
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    continue
                sock.close()  # the pumps' next call fails: they end
        self.pairs.clear()


def body(prompt: str, tokens: int) -> dict[str, Any]:
    return {
        "model": "llama3.2:latest",
        "messages": [{"role": "user", "content": prompt}],
        "options": {"num_predict": tokens},
    }


def contents(chunks: list[wire.Chunk]) -> tuple[str, bool]:
    """The answer's text from its NDJSON chunks, and whether its final line came."""
    text, done = "", False
    for chunk in chunks:
        for line in chunk.data.splitlines():
            if line.strip():
                obj = json.loads(line)
                text += obj["message"]["content"]
                done = done or bool(obj.get("done"))
    return text, done


async def open_client(url: str, token: str, session_id: str, nursery: trio.Nursery) -> Any:
    ws = await trio_websocket.connect_websocket_url(nursery, url)
    await ws.send_message(wire.encode(wire.Auth(token, session_id)))
    ok = wire.decode(await ws.get_message())
    assert isinstance(ok, wire.AuthOk), ok
    return ws


async def until_broken(ws: Any) -> list[wire.Chunk]:
    """The chunks already in ``ws``'s buffer, read until the connection is seen broken."""
    chunks: list[wire.Chunk] = []
    with trio.fail_after(10):
        while True:
            try:
                msg = wire.decode(await ws.get_message())
            except trio_websocket.ConnectionClosed:
                return chunks
            if isinstance(msg, wire.Chunk):
                chunks.append(msg)


async def next_msg(ws: Any, timeout: float = 15) -> wire.Message:
    with trio.fail_after(timeout):
        return wire.decode(await ws.get_message())


async def test_a_cut_client_resumes_the_same_answer_and_the_window_and_close_cancel(
    tmp_path: Any, nursery: trio.Nursery
) -> None:
    fake: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=DELAY)
    )
    with run_stack(tmp_path, "--resume-window", str(WINDOW)) as stack:
        sub = "resumer@example.com"
        stack.start_agent(sub, fake.url)
        token = stack.token(sub)
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            session = await wait_for_desktop(http, token)
        sid, endpoint = session["sessionId"], session["endpoint"]
        port = int(stack.url.rsplit(":", 1)[1])
        relay = Relay(("127.0.0.1", port))
        relay_port = await nursery.start(relay.serve)
        via_relay = f"ws://127.0.0.1:{relay_port}/ws/stream"

        # 1. Cut mid-answer, resume on a new connection: the whole answer, once, in order.
        prompt = "please resume this answer"
        web = await open_client(via_relay, token, sid, nursery)
        await web.send_message(
            wire.encode(wire.Request("c1", "POST", "/api/chat", {}, body(prompt, 40)))
        )
        start = await next_msg(web)
        assert isinstance(start, wire.ResponseStart) and start.resume, start
        got: list[wire.Chunk] = []
        while len(got) < 8:
            msg = await next_msg(web)
            assert isinstance(msg, wire.Chunk) and msg.id == "c1", msg
            got.append(msg)
        relay.cut()  # the network goes away under the client, mid-answer
        got += await until_broken(web)
        after = got[-1].seq
        assert after == len(got)
        await trio.sleep(0.5)  # the answer keeps streaming meanwhile
        again = await open_client(endpoint, token, sid, nursery)
        await again.send_message(wire.encode(wire.Resume("r1", start.resume, after)))
        head = await next_msg(again)
        assert isinstance(head, wire.ResponseStart) and head.id == "r1", head
        assert head.status == 200 and head.resume == start.resume
        while True:
            msg = await next_msg(again)
            if isinstance(msg, wire.ResponseEnd):
                assert msg.id == "r1"
                break
            assert isinstance(msg, wire.Chunk) and msg.id == "r1", msg
            got.append(msg)
        assert [c.seq for c in got] == list(range(1, len(got) + 1))  # once, in order
        text, done = contents(got)
        assert text == "".join(make_tokens(prompt, 40)) and done
        assert fake.cancelled == []  # the cut cancelled nothing
        await again.aclose()
        with trio.fail_after(5):
            while fake.cancelled:
                await trio.sleep(0.1)

        # 2. Cut, and come back after the window: resume_expired, and Ollama was cancelled.
        web = await open_client(via_relay, token, sid, nursery)
        await web.send_message(
            wire.encode(wire.Request("c2", "POST", "/api/chat", {}, body("a long one", 400)))
        )
        start = await next_msg(web)
        assert isinstance(start, wire.ResponseStart) and start.resume
        assert isinstance(await next_msg(web), wire.Chunk)
        relay.cut()
        t0 = trio.current_time()
        with trio.fail_after(WINDOW + 20):
            await fake.wait_until(lambda f: len(f.cancelled) == 1)
        assert trio.current_time() - t0 >= WINDOW - 1.5  # kept for the window first
        assert fake.cancelled[0].path == "/api/chat"
        again = await open_client(endpoint, token, sid, nursery)
        await again.send_message(wire.encode(wire.Resume("r2", start.resume, 1)))
        err = await next_msg(again)
        assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.RESUME_EXPIRED, err
        assert err.id == "r2"

        # 3. A clean close (a close frame) cancels at once, long before the window.
        await again.send_message(
            wire.encode(wire.Request("c3", "POST", "/api/chat", {}, body("another long one", 400)))
        )
        assert isinstance(await next_msg(again), wire.ResponseStart)
        assert isinstance(await next_msg(again), wire.Chunk)
        t0 = trio.current_time()
        await again.aclose(1000, "done")
        with trio.fail_after(WINDOW - 2):
            await fake.wait_until(lambda f: len(f.cancelled) == 2)
        assert trio.current_time() - t0 < WINDOW - 2

        # 4. Another user's session does not know this user's tokens.
        other = "other@example.com"
        stack.start_agent(other, fake.url)
        other_token = stack.token(other)
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            other_session = await wait_for_desktop(http, other_token)
        web = await open_client(via_relay, token, sid, nursery)
        await web.send_message(
            wire.encode(wire.Request("c4", "POST", "/api/chat", {}, body("mine only", 400)))
        )
        start = await next_msg(web)
        assert isinstance(start, wire.ResponseStart) and start.resume
        assert isinstance(await next_msg(web), wire.Chunk)
        relay.cut()  # detached: waiting for its owner
        thief = await open_client(
            other_session["endpoint"], other_token, other_session["sessionId"], nursery
        )
        await thief.send_message(wire.encode(wire.Resume("t1", start.resume, 0)))
        err = await next_msg(thief)
        assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.RESUME_EXPIRED, err
        await thief.send_message(wire.encode(wire.Ping(1.0)))
        assert await next_msg(thief) == wire.Pong(1.0)  # nothing of the answer came
        await thief.aclose()
