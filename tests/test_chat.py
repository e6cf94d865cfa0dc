"""``c2l chat`` run as a subprocess, the way a user runs it, against real servers.

Without Podman: the fake Ollama as the local Ollama and as the desktop's, with fronts on
127.0.0.1 playing the gateway and the tunnel (``tests/_front.py``). With Podman (``-m
podman``): a real ``c2l serve`` and ``c2l desktop``, then the gateway stopped.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from c2lcore import user_hash
from desktop.testing import FakeOllama, serve_fake_ollama
from gateway import DevIssuer

from ._front import Front, serve_front
from ._stack import Stack, stop, wait_for_desktop
from ._stack import stack as stack  # the fixture
from .conftest import free_port

SUB = "alice@example.com"
MODEL = "llama3.2:latest"
C2L = [sys.executable, "-m", "c2l"]


@attrs.frozen
class Run:
    rc: int
    out: str
    err: str


async def chat(env: dict[str, str], *args: str, stdin: bytes = b"", timeout: float = 60) -> Run:
    """``c2l chat ARGS`` as a subprocess: exit code, stdout, stderr."""
    with trio.fail_after(timeout):
        proc = await trio.run_process(
            [*C2L, "chat", "--model", MODEL, *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    return Run(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


@attrs.define
class World:
    """The servers of one test and the chat command's environment."""

    env: dict[str, str]
    token: str
    token_file: Path
    local: FakeOllama
    desktop: FakeOllama
    tunnel: Front
    gateway: Front
    gateway_scope: trio.CancelScope
    cache: Path

    def args(self, *more: str) -> list[str]:
        return [
            "--gateway",
            self.gateway.url,
            "--token-file",
            str(self.token_file),
            "--ollama",
            self.local.url,
            *more,
        ]


async def _serve_in(scope: trio.CancelScope, front: Front, task_status: Any) -> None:
    with scope:
        await serve_front(front, task_status=task_status)


@pytest.fixture
async def world(nursery: trio.Nursery, tmp_path: Path) -> World:
    issuer = DevIssuer.load_or_create(tmp_path / "key" / "dev.pem")
    token = issuer.sign(SUB)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    local: FakeOllama = await nursery.start(serve_fake_ollama, "127.0.0.1", 0)
    desktop: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=0.01)
    )
    tunnel: Front = await nursery.start(serve_front, Front(desktop.url, SUB))
    scope = trio.CancelScope()
    gateway = Front(
        desktop.url, SUB, role="gateway", registration={"url": tunnel.url, "provider": "url"}
    )
    await nursery.start(_serve_in, scope, gateway)
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "PYTHONUNBUFFERED": "1",
    }
    cache = tmp_path / "config" / "c2l" / "tunnel.json"
    return World(env, token, token_file, local, desktop, tunnel, gateway, scope, cache)


def _chat_requests(fake: FakeOllama) -> int:
    return sum(1 for r in fake.requests if r.path == "/api/chat")


async def test_cloud_then_the_route_the_gateway_reports_then_the_tunnel_then_local(
    world: World,
) -> None:
    run = await chat(world.env, *world.args("--message", "hello there"))
    assert run.rc == 0, run.err
    assert run.out.startswith("You said: hello there")
    assert run.out.endswith("\n")
    assert f"c2l chat: route cloud ({world.gateway.url}/api/ollama)" in run.err
    assert len(world.gateway.chats()) == 1
    assert world.gateway.chats()[0].body["messages"] == [{"role": "user", "content": "hello there"}]
    # the gateway taught the client its tunnel
    assert json.loads(world.cache.read_text())["url"] == world.tunnel.url

    # the gateway answers through the tunnel itself: the client says what the gateway says
    world.gateway.route = "direct"
    run = await chat(world.env, *world.args("--message", "hello again"))
    assert run.rc == 0, run.err
    assert "c2l chat: route direct (" + world.gateway.url + "/api/ollama)" in run.err
    assert world.tunnel.chats() == []  # the client did not call the tunnel

    # the gateway is gone: the client calls the tunnel itself, with the user's token
    world.gateway_scope.cancel()
    run = await chat(world.env, *world.args("--message", "where is the gateway"))
    assert run.rc == 0, run.err
    assert run.out.startswith("You said: where is the gateway")
    assert f"c2l chat: route direct ({world.tunnel.url})" in run.err
    assert [s.authorization for s in world.tunnel.chats()] == [f"Bearer {world.token}"]

    # the tunnel fails before its first token: the local Ollama, last resort
    world.tunnel.fail_status = 503
    before = _chat_requests(world.desktop)
    run = await chat(world.env, *world.args("--message", "anyone"))
    assert run.rc == 0, run.err
    assert run.out.startswith("You said: anyone")
    assert f"c2l chat: direct {world.tunnel.url}: HTTP 503" in run.err
    assert "trying the next route" in run.err
    assert f"c2l chat: route local ({world.local.url})" in run.err
    assert _chat_requests(world.local) == 1
    assert _chat_requests(world.desktop) == before
    assert world.token not in run.out + run.err


async def test_a_failure_before_the_first_token_moves_on_after_it_ends_the_answer(
    world: World,
) -> None:
    world.gateway.fail_status = 503
    run = await chat(world.env, *world.args("--message", "first"))
    assert run.rc == 0, run.err
    assert "c2l chat: cloud " in run.err and "HTTP 503" in run.err
    assert "route local" in run.err
    assert _chat_requests(world.local) == 1

    # three lines, then the connection drops: the answer ends with an error, and the
    # generation is not started again anywhere else
    world.gateway.fail_status = None
    world.gateway.cut_after_lines = 3
    run = await chat(world.env, *world.args("--message", "second"))
    assert run.rc == 1
    assert run.out.startswith("You said: second")
    err_lines = run.err.strip().splitlines()
    assert err_lines[0].startswith("c2l chat: route cloud")
    assert len(err_lines) == 2 and err_lines[1].startswith("c2l chat: the answer broke off")
    assert _chat_requests(world.local) == 1
    assert world.tunnel.chats() == []


async def test_no_first_token_in_time_moves_on(world: World, nursery: trio.Nursery) -> None:
    slow: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=30)
    )
    world.gateway.ollama_url = slow.url
    run = await chat(
        world.env, *world.args("--message", "slow", "--first-token-timeout", "1.5"), timeout=30
    )
    assert run.rc == 0, run.err
    assert "cloud" in run.err and "no answer within 1.5 s" in run.err
    assert "route local" in run.err
    # the abandoned generation was cancelled on the slow desktop
    with trio.fail_after(10):
        await slow.wait_until(lambda f: len(f.cancelled) == 1)


async def test_prefer_local_and_nothing_up(world: World) -> None:
    run = await chat(world.env, *world.args("--prefer-local", "--message", "near"))
    assert run.rc == 0, run.err
    assert f"c2l chat: route local ({world.local.url})" in run.err
    assert world.gateway.chats() == []

    dead = f"http://127.0.0.1:{free_port()}"
    run = await chat(
        world.env,
        *["--gateway", dead, "--token", world.token, "--ollama", dead, "--message", "x"],
    )
    assert run.rc == 1
    assert run.out == ""
    lines = run.err.strip().splitlines()
    assert len(lines) == 1, run.err
    assert lines[0].startswith("c2l chat: no route to your model answer")
    assert f"gateway {dead}" in lines[0] and f"local Ollama {dead}" in lines[0]
    assert world.token not in run.err


async def test_interactive_keeps_the_conversation(world: World) -> None:
    run = await chat(world.env, *world.args(), stdin=b"first question\n\nsecond question\n")
    assert run.rc == 0, run.err
    answers = run.out.strip().splitlines()
    assert len(answers) == 2
    assert answers[0].startswith("You said: first question")
    assert answers[1].startswith("You said: second question")
    bodies = [s.body for s in world.gateway.chats()]
    assert len(bodies) == 2
    assert bodies[1]["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "second question"},
    ]


async def test_tokens_are_printed_as_they_arrive(world: World, nursery: trio.Nursery) -> None:
    slowish: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=0.3)
    )
    world.gateway.ollama_url = slowish.url
    with trio.fail_after(30):
        proc = await trio.lowlevel.open_process(
            [*C2L, "chat", "--model", MODEL, *world.args("--message", "stream it")],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=world.env,
        )
        assert proc.stdout is not None
        first = await proc.stdout.receive_some(4096)
        # a token is on the terminal while the desktop is still generating
        assert first and not first.decode().startswith("You said: stream it token")
        assert slowish.completed == 0
        rest = b""
        while chunk := await proc.stdout.receive_some(4096):
            rest += chunk
        assert await proc.wait() == 0
    assert (first + rest).decode().startswith("You said: stream it")
    assert slowish.completed == 1


# --------------------------------------------------------------------------- real Podman


def _seed_cache(stack: Stack, tunnel_url: str) -> Path:
    """What the client would have cached from the gateway's registration."""
    cache = Path(stack.env["XDG_CONFIG_HOME"]) / "c2l" / "tunnel.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    record = {"gateway": stack.url, "user": user_hash(SUB), "url": tunnel_url}
    cache.write_text(json.dumps(record))
    cache.chmod(0o600)
    return cache


@pytest.mark.podman
async def test_real_gateway_cloud_then_stopped_direct_then_local(
    stack: Stack, nursery: trio.Nursery
) -> None:
    desktop: FakeOllama = await nursery.start(serve_fake_ollama, "127.0.0.1", 0)
    local: FakeOllama = await nursery.start(serve_fake_ollama, "127.0.0.1", 0)
    tunnel: Front = await nursery.start(serve_front, Front(desktop.url, SUB))
    stack.start_agent(SUB, desktop.url)
    token_file = stack.tmp / f"{SUB}.token"
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        await wait_for_desktop(http, stack.token(SUB))
    args = ["--gateway", stack.url, "--token-file", str(token_file), "--ollama", local.url]

    run = await chat(stack.env, *args, "--message", "through the cloud")
    assert run.rc == 0, run.err
    assert run.out.startswith("You said: through the cloud")
    assert f"c2l chat: route cloud ({stack.url}/api/ollama)" in run.err
    assert _chat_requests(desktop) == 1 and _chat_requests(local) == 0

    # the gateway stops: the tunnel the client learned, with the user's own token
    _seed_cache(stack, tunnel.url)
    stop(stack.proc)
    run = await chat(stack.env, *args, "--message", "no gateway")
    assert run.rc == 0, run.err
    assert run.out.startswith("You said: no gateway")
    assert f"c2l chat: route direct ({tunnel.url})" in run.err
    assert [s.authorization for s in tunnel.chats()] == [f"Bearer {token_file.read_text()}"]
    assert _chat_requests(desktop) == 2

    # and the tunnel gone too: the local Ollama
    tunnel.fail_status = 502
    run = await chat(stack.env, *args, "--message", "last resort")
    assert run.rc == 0, run.err
    assert f"c2l chat: route local ({local.url})" in run.err
    assert _chat_requests(local) == 1


@pytest.mark.podman
async def test_real_gateway_answers_direct_through_the_registered_tunnel(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    from ._stack import run_stack

    desktop: FakeOllama = await nursery.start(serve_fake_ollama, "127.0.0.1", 0)
    tunnel: Front = await nursery.start(serve_front, Front(desktop.url, SUB))
    with run_stack(tmp_path, env={"C2L_ALLOW_PRIVATE_TUNNELS": "1"}) as s:
        token = s.token(SUB)
        token_file = tmp_path / "alice.token"
        token_file.write_text(token)
        # no bridge: the desktop is reachable only through its tunnel
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as http:
            r = await http.put(
                "/api/desktop/tunnel",
                json={"url": tunnel.url, "provider": "url"},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 200, r.text
        dead = f"http://127.0.0.1:{free_port()}"
        args = ["--gateway", s.url, "--token-file", str(token_file), "--ollama", dead]
        run = await chat(s.env, *args, "--message", "via the gateway's tunnel")
        assert run.rc == 0, run.err
        assert f"c2l chat: route direct ({s.url}/api/ollama)" in run.err
        # the gateway sent its own minted token through the tunnel, never the user's
        assert tunnel.chats() and all(c.authorization != f"Bearer {token}" for c in tunnel.chats())
        cache = tmp_path / "config" / "c2l" / "tunnel.json"
        assert json.loads(cache.read_text())["url"] == tunnel.url

        stop(s.proc)
        run = await chat(s.env, *args, "--message", "the gateway is down")
        assert run.rc == 0, run.err
        assert f"c2l chat: route direct ({tunnel.url})" in run.err
        assert tunnel.chats()[-1].authorization == f"Bearer {token}"
