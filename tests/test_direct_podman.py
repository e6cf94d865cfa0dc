"""The direct route end to end, offline, on real rootless Podman (DESIGN.md section 5).

A real ``c2l serve`` (with ``C2L_ALLOW_PRIVATE_TUNNELS=1``, which admits loopback and plain
http) and a real ``c2l desktop --no-bridge`` whose ``url`` tunnel is its own direct endpoint
on 127.0.0.1: the official ``ollama`` client through the gateway streams with
``X-C2L-Route: direct`` and a cancelled stream is aborted on the fake Ollama; then a second
agent's bridge connects and the next answer comes ``cloud`` through the user's proxy
container; the bridge dies while idle and the next answer comes ``direct`` again, with no
error for the client.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import time
from typing import Any

import httpx
import pytest
import trio

from desktop.testing import FakeOllama, serve_fake_ollama

from ._stack import C2L, Stack, run_stack
from .conftest import free_port

pytestmark = pytest.mark.podman

SUB = "direct@example.com"


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeOllama:
    server: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=0.05)
    )
    return server


def _chat(url: str, token: str, routes: list[str]) -> list[tuple[float, Any]]:
    import ollama

    def seen(response: httpx.Response) -> None:
        routes.append(response.headers.get("x-c2l-route", ""))

    client = ollama.Client(
        host=f"{url}/api/ollama",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        event_hooks={"response": [seen]},
    )
    messages = [{"role": "user", "content": "why is the sky blue"}]
    stream = client.chat(
        model="llama3.2", messages=messages, stream=True, options={"num_predict": 12}
    )
    return [(time.monotonic(), part) for part in stream]


def _abandon(url: str, token: str) -> int:
    import ollama

    client = ollama.Client(
        host=f"{url}/api/ollama", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    messages = [{"role": "user", "content": "go on forever"}]
    seen = 0
    stream = client.chat(
        model="llama3.2", messages=messages, stream=True, options={"num_predict": 2000}
    )
    for _ in stream:
        seen += 1
        if seen == 3:
            break
    stream.close()  # type: ignore[attr-defined]
    return seen


def _direct_agent(stack: Stack, fake: FakeOllama, port: int) -> subprocess.Popen[bytes]:
    token_file = stack.tmp / "direct.token"
    token_file.write_text(stack.token(SUB))
    token_file.chmod(0o600)
    argv = [
        *C2L,
        "desktop",
        "--gateway",
        stack.url,
        "--token-file",
        str(token_file),
        "--ollama",
        fake.url,
        "--no-bridge",
        "--tunnel",
        "url",
        "--tunnel-url",
        f"http://127.0.0.1:{port}",
        "--direct-port",
        str(port),
    ]
    with open(stack.tmp / "agent-direct.log", "wb") as out:
        proc = subprocess.Popen(argv, env=stack.env, stdout=out, stderr=subprocess.STDOUT)
    stack.agents["direct"] = proc
    return proc


async def _answer(stack: Stack, token: str) -> tuple[str, list[tuple[float, Any]]]:
    routes: list[str] = []
    parts = await trio.to_thread.run_sync(_chat, stack.url, token, routes)
    assert routes, "no response"
    return routes[-1], parts


async def test_direct_route_then_cloud_then_direct_again(tmp_path: Any, fake: FakeOllama) -> None:
    with run_stack(tmp_path, env={"C2L_ALLOW_PRIVATE_TUNNELS": "1"}) as stack:
        token = stack.token(SUB)
        auth = {"Authorization": f"Bearer {token}"}
        port = free_port()
        _direct_agent(stack, fake, port)
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            with trio.fail_after(60):
                while (await http.get("/api/desktop/tunnel", headers=auth)).status_code != 200:
                    await trio.sleep(0.1)
            status = (await http.get("/api/streaming/desktop", headers=auth)).json()
            assert status["bridge"] is False
            assert status["tunnel"]["url"] == f"http://127.0.0.1:{port}"
            assert status["tunnel"]["healthy"] is True

            with trio.fail_after(60):
                route, parts = await _answer(stack, token)
            assert route == "direct"
            assert len(parts) == 13
            assert parts[-1][1].done is True
            text = "".join(p.message.content for _, p in parts)
            assert text.startswith("You said: why is the sky blue")
            assert parts[-1][0] - parts[0][0] > 0.3  # 12 tokens at 50 ms: streamed, not a burst

            with trio.fail_after(30):
                assert await trio.to_thread.run_sync(_abandon, stack.url, token) == 3
                await fake.wait_until(lambda f: len(f.cancelled) == 1)
            assert fake.cancelled[0].tokens_sent < 100

            # A bridge connects (a second agent of the same user): the answer comes over it.
            stack.start_agent(SUB, fake.url)
            with trio.fail_after(60):
                # (wait_for_desktop's probe would be answered through the tunnel already)
                while not (await http.get("/api/streaming/desktop", headers=auth)).json()["bridge"]:
                    await trio.sleep(0.1)
            with trio.fail_after(60):
                route, parts = await _answer(stack, token)
            assert route == "cloud"
            assert parts[-1][1].done is True

            # The bridge dies while idle: the next answer takes the tunnel, with no error.
            bridge = stack.agents[SUB]
            bridge.send_signal(signal.SIGKILL)
            bridge.wait(10)
            with trio.fail_after(60):
                route, parts = await _answer(stack, token)
            assert route == "direct"
            assert parts[-1][1].done is True
            assert "".join(p.message.content for _, p in parts).startswith("You said:")
