"""Helpers for hostile-input tests: an in-process gateway and a well-behaved user.

The gateway runs on the fake runtime with real in-process proxies; the well-behaved user
is a real desktop agent in front of the fake Ollama plus a real WebSocket client that
keeps streaming chats and checks every one of them, so a test can show that whatever it
throws at the gateway does not disturb somebody else.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
import trio_websocket

import wire
from c2lcore import Config
from desktop import AgentConfig, StaticToken, serve_agent
from desktop.testing import make_tokens, serve_fake_ollama
from gateway import DevIssuer, RunningGateway, serve_gateway
from orchestrator.testing import open_fake_runtime

TOKENS = 12


def ws_url(gw: RunningGateway, side: str) -> str:
    return gw.url.replace("http://", "ws://") + f"/ws/{side}"


async def recv(conn: Any, timeout: float = 5) -> wire.Message:
    with trio.fail_after(timeout):
        return wire.decode(await conn.get_message())


@asynccontextmanager
async def open_gateway(tmp_path: Path, **config: Any) -> AsyncIterator[RunningGateway]:
    """A gateway (dev auth) on the fake runtime with real in-process proxies."""
    cfg = Config(
        port=0,
        dev_key_path=tmp_path / "key.pem",
        podman_url="unix:///nonexistent",
        **config,
    )
    async with open_fake_runtime(run_proxies=True) as fake, trio.open_nursery() as nursery:
        running: RunningGateway = await nursery.start(
            functools.partial(serve_gateway, cfg, runtime=fake)
        )
        yield running
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def authed_stream(gw: RunningGateway, token: str) -> AsyncIterator[Any]:
    """A web-client WebSocket that has sent ``auth`` and got ``auth_ok``."""
    async with trio_websocket.open_websocket_url(ws_url(gw, "stream")) as conn:
        await conn.send_message(wire.encode(wire.Auth(token)))
        ok = await recv(conn, 15)
        assert isinstance(ok, wire.AuthOk), ok
        yield conn


@attrs.define
class GoodUser:
    """A user who streams chats the whole time and checks every answer."""

    gw: RunningGateway
    issuer: DevIssuer
    sub: str = "good-user"
    completed: int = 0
    failures: list[str] = attrs.field(factory=list)
    #: set to stop after the chat in progress (cancelling mid-stream would leave the
    #: agent's HTTP streams to the garbage collector)
    stopping: bool = False
    idle: trio.Event = attrs.field(factory=trio.Event)

    @property
    def token(self) -> str:
        return self.issuer.sign(self.sub)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the user's agent, wait until a first chat succeeds, then keep chatting."""
        async with trio.open_nursery() as nursery:
            ollama = await nursery.start(
                functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=0.005)
            )
            config = AgentConfig(
                gateway_url=self.gw.url,
                token=StaticToken(self.token),
                ollama_url=ollama.url,
                probe_ollama=False,
            )
            agent = await nursery.start(functools.partial(serve_agent, config, status=str))
            with trio.fail_after(20):
                await agent.wait_until(lambda a: a.state == "connected")
                while not await self.chat(0):
                    await trio.sleep(0.05)
            self.failures.clear()
            task_status.started()
            n = 1
            while not self.stopping:
                await self.chat(n)
                n += 1
            self.idle.set()
            await trio.sleep_forever()

    async def chat(self, n: int) -> bool:
        """One chat over the web-client WebSocket; True when it came back unchanged."""
        prompt = f"well-behaved prompt {n}"
        body = {
            "model": "llama3.2:latest",
            "messages": [{"role": "user", "content": prompt}],
            "options": {"num_predict": TOKENS},
        }
        try:
            with trio.fail_after(15):
                async with authed_stream(self.gw, self.token) as conn:
                    await conn.send_message(
                        wire.encode(wire.Request("good", "POST", "/api/chat", {}, body))
                    )
                    start = await recv(conn)
                    if not isinstance(start, wire.ResponseStart) or start.status != 200:
                        raise AssertionError(f"chat {n}: {start}")
                    text = ""
                    while True:
                        msg = await recv(conn)
                        if isinstance(msg, wire.ResponseEnd):
                            break
                        if not isinstance(msg, wire.Chunk) or msg.id != "good":
                            raise AssertionError(f"chat {n}: {msg}")
                        for raw in msg.data.splitlines():  # one or more lines a chunk
                            line = json.loads(raw)
                            if not line["done"]:
                                text += line["message"]["content"]
                    if text != "".join(make_tokens(prompt, TOKENS)):
                        raise AssertionError(f"chat {n} changed: {text!r}")
        except (AssertionError, trio.TooSlowError, trio_websocket.ConnectionClosed) as exc:
            self.failures.append(repr(exc))
            return False
        except (OSError, trio_websocket.HandshakeError) as exc:
            self.failures.append(repr(exc))
            return False
        self.completed += 1
        return True


@asynccontextmanager
async def good_user_alongside(gw: RunningGateway, issuer: DevIssuer) -> AsyncIterator[GoodUser]:
    """Run a :class:`GoodUser` for the block; on exit, check it was never disturbed."""
    user = GoodUser(gw, issuer)
    async with trio.open_nursery() as nursery:
        await nursery.start(user.run)
        before = user.completed
        yield user
        # at least one whole chat ran while the block's hostile traffic went on
        with trio.fail_after(20):
            while user.completed < before + 1 and not user.failures:
                await trio.sleep(0.02)
            user.stopping = True
            await user.idle.wait()
            await trio.sleep(0.1)  # let the agent's request tasks finish
        nursery.cancel_scope.cancel()
    assert not user.failures, user.failures
    assert user.completed > before
