"""The whole path on real rootless Podman, with real processes.

``c2l serve`` (gateway + orchestrator) and one ``c2l desktop`` agent per user run as
subprocesses; the fake Ollama speaks the real NDJSON protocol; web clients are real
WebSocket and HTTP clients. Two users stream at once through their own proxy containers.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio_websocket

import wire
from c2lcore import user_hash
from desktop.testing import FakeOllama, make_tokens, serve_fake_ollama
from orchestrator import LABEL_USER

from ._stack import Stack, count, labelled, stop, wait_for_desktop
from ._stack import stack as stack  # the fixture

pytestmark = pytest.mark.podman

TOKENS = 40
DELAY = 0.05  # seconds per token: a 2-second answer


@pytest.fixture
async def fake_ollama(nursery: trio.Nursery) -> FakeOllama:
    fake: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=DELAY)
    )
    return fake


@attrs.define
class Received:
    chunks: list[str] = attrs.field(factory=list)
    first_at: float = 0.0
    last_at: float = 0.0
    produced_at_first: int = -1

    @property
    def lines(self) -> list[str]:
        """The NDJSON lines of all chunks (a chunk carries one or more, DESIGN.md section 2)."""
        return [line for chunk in self.chunks for line in chunk.splitlines() if line]


async def chat(session: dict[str, Any], token: str, prompt: str, fake: FakeOllama) -> Received:
    """Stream one chat over the web-client WebSocket, timing each chunk."""
    got = Received()
    async with trio_websocket.open_websocket_url(session["endpoint"]) as ws:
        await ws.send_message(wire.encode(wire.Auth(token, session["sessionId"])))
        assert isinstance(wire.decode(await ws.get_message()), wire.AuthOk)
        body = {
            "model": "llama3.2:latest",
            "messages": [{"role": "user", "content": prompt}],
            "options": {"num_predict": TOKENS},
        }
        await ws.send_message(wire.encode(wire.Request("c1", "POST", "/api/chat", {}, body)))
        start = wire.decode(await ws.get_message())
        assert isinstance(start, wire.ResponseStart), start
        assert start.status == 200
        while True:
            msg = wire.decode(await ws.get_message())
            assert getattr(msg, "id", None) == "c1", msg
            if isinstance(msg, wire.ResponseEnd):
                return got
            assert isinstance(msg, wire.Chunk), msg
            if not got.chunks:
                got.first_at = trio.current_time()
                got.produced_at_first = sum(1 for r in fake.requests if r.path == "/api/chat")
            got.chunks.append(msg.data)
            got.last_at = trio.current_time()


async def test_two_users_stream_through_their_own_proxies(
    stack: Stack, fake_ollama: FakeOllama
) -> None:
    users = {"alice@example.com": "tell alice a story", "bob@example.com": "bob asks for a poem"}
    for sub in users:
        stack.start_agent(sub, fake_ollama.url)
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        sessions = {}
        for sub in users:
            sessions[sub] = await wait_for_desktop(http, stack.token(sub))
        assert (
            sessions["alice@example.com"]["sessionId"] != sessions["bob@example.com"]["sessionId"]
        )

        # one container, pod and network per user, each labelled with its user
        for sub in users:
            mine = await labelled(f"{LABEL_USER}={user_hash(sub)}")
            assert len(mine.containers) == 1
            assert len(mine.pods) == 1
            assert len(mine.networks) == 1

        results: dict[str, Received] = {}

        async def run(sub: str) -> None:
            results[sub] = await chat(sessions[sub], stack.token(sub), users[sub], fake_ollama)

        t0 = trio.current_time()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for sub in users:
                    nursery.start_soon(run, sub)
        elapsed = trio.current_time() - t0

        for sub, prompt in users.items():
            got = results[sub]
            lines = [json.loads(line) for line in got.lines]
            # every line arrived, in order; the last is the final done line
            assert [line["done"] for line in lines] == [False] * TOKENS + [True]
            text = "".join(line["message"]["content"] for line in lines[:-1])
            assert text == "".join(make_tokens(prompt, TOKENS)), sub
            other = next(p for s, p in users.items() if s != sub)
            assert other.split()[0] not in text  # only its own chunks
            assert "eval_count" in lines[-1]
            # incremental: the first chunk came long before the last token was produced
            assert got.last_at - got.first_at > (TOKENS - 5) * DELAY * 0.8, (sub, got)
        # the two streams ran at the same time, not one after the other
        assert elapsed < 2 * TOKENS * DELAY * 0.9 + 2

        # DELETE tears alice's session down and leaves bob's alone
        alice = "alice@example.com"
        token = stack.token(alice)
        r = await http.delete(
            f"/api/streaming/{sessions[alice]['sessionId']}",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 204
        assert count(await labelled(f"{LABEL_USER}={user_hash(alice)}")) == 0
        assert count(await labelled(f"{LABEL_USER}={user_hash('bob@example.com')}")) == 3
        r = await http.get("/api/streaming/status", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 404

        # the Ollama-compatible HTTP API streams NDJSON through bob's tunnel, line by line
        bob = {"Authorization": f"Bearer {stack.token('bob@example.com')}"}
        body = {"model": "llama3.2:latest", "prompt": "hi", "options": {"num_predict": 20}}
        arrivals = []
        async with http.stream("POST", "/api/ollama/api/generate", json=body, headers=bob) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("application/x-ndjson")
            async for line in resp.aiter_lines():
                if line:
                    arrivals.append((trio.current_time(), json.loads(line)))
        assert len(arrivals) == 21, [a[1] for a in arrivals]
        assert arrivals[-1][1]["done"] is True
        assert arrivals[-1][0] - arrivals[0][0] > 15 * DELAY * 0.8

    # SIGTERM: the gateway tears every session down and exits 0 in time
    t = time.monotonic()
    assert stop(stack.proc, timeout=15) == 0
    assert time.monotonic() - t < 10
    assert count(await labelled()) == 0


async def test_sigterm_with_streams_in_flight_leaves_nothing(
    stack: Stack, fake_ollama: FakeOllama
) -> None:
    sub = "carol@example.com"
    stack.start_agent(sub, fake_ollama.url)
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        session = await wait_for_desktop(http, stack.token(sub))
    assert count(await labelled()) == 3
    outcome: list[str] = []

    async def stream_forever() -> None:
        async with trio_websocket.open_websocket_url(session["endpoint"]) as ws:
            await ws.send_message(wire.encode(wire.Auth(stack.token(sub), session["sessionId"])))
            await ws.get_message()
            body = {"model": "llama3.2:latest", "prompt": "x", "options": {"num_predict": 1000}}
            await ws.send_message(wire.encode(wire.Request("r", "POST", "/api/generate", {}, body)))
            try:
                while True:
                    msg = wire.decode(await ws.get_message())
                    if isinstance(msg, wire.Error):
                        outcome.append(msg.code)
            except trio_websocket.ConnectionClosed as exc:
                outcome.append(f"closed {exc.reason.code}")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_forever)
            await fake_ollama.wait_until(lambda f: len(f.requests) >= 2)
            await trio.sleep(0.3)
            t = trio.current_time()
            await trio.to_thread.run_sync(stack.proc.send_signal, signal.SIGTERM)
            rc = await trio.to_thread.run_sync(stack.proc.wait, 15)
            assert rc == 0
            assert trio.current_time() - t < 10
    assert outcome, "the web client was not told"
    assert count(await labelled()) == 0


CONTRACT_SMOKE = Path(__file__).resolve().parents[2] / "shared" / "contract_smoke.py"


@pytest.mark.skipif(not CONTRACT_SMOKE.exists(), reason=f"{CONTRACT_SMOKE} is not here")
async def test_shared_contract_smoke_passes(stack: Stack, fake_ollama: FakeOllama) -> None:
    sub = "smoke@example.com"
    stack.start_agent(sub, fake_ollama.url)
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        await wait_for_desktop(http, stack.token(sub))
    argv = [sys.executable, str(CONTRACT_SMOKE), "--gateway", stack.url]
    argv += ["--token", stack.token(sub), "--model", "llama3.2:latest"]
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, out
    assert "contract ok" in out
