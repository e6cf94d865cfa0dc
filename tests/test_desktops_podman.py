"""Several desktops of one user end to end, on real rootless Podman (issue 13, point 2).

A real ``c2l serve`` (with ``C2L_ALLOW_PRIVATE_TUNNELS=1``: loopback tunnels) and two real
``c2l desktop`` agents of one user, ``--name laptop`` and ``--name workstation``, each in
front of a fake Ollama with models of its own and each registering its direct endpoint as
its tunnel. Through the gateway: the model listings are the union with ``desktops``; a
chat goes to the desktop that has its model (seen in each fake's records), and between two
that both have it to the less busy one; ``/api/streaming/desktop`` lists both desktops; a
newer agent named ``laptop`` replaces the older one (which stops, and unregisters only its
own tunnel); killing an agent mid-stream errors only its own request.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

import wire
from desktop.testing import FakeOllama, fake_models, serve_fake_ollama

from ._stack import C2L, Stack, run_stack
from .conftest import free_port

pytestmark = pytest.mark.podman

SUB = "multi@example.com"
DELAY = 0.05


def _agent(
    stack: Stack, name: str, fake: FakeOllama, *, tunnel_port: int | None = None, key: str = ""
) -> subprocess.Popen[bytes]:
    token_file = stack.tmp / "multi.token"
    token_file.write_text(stack.token(SUB))
    token_file.chmod(0o600)
    argv = [*C2L, "desktop", "--gateway", stack.url, "--token-file", str(token_file)]
    argv += ["--ollama", fake.url, "--name", name]
    if tunnel_port is not None:
        argv += ["--tunnel", "url", "--tunnel-url", f"http://127.0.0.1:{tunnel_port}"]
        argv += ["--direct-port", str(tunnel_port)]
    key = key or name
    with open(stack.tmp / f"agent-{key}.log", "wb") as out:
        proc = subprocess.Popen(argv, env=stack.env, stdout=out, stderr=subprocess.STDOUT)
    stack.agents[key] = proc
    return proc


async def _status(http: httpx.AsyncClient, auth: dict[str, str]) -> dict[str, Any]:
    r = await http.get("/api/streaming/desktop", headers=auth)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _chats(fake: FakeOllama) -> list[str | None]:
    return [r.model for r in fake.requests if r.path == "/api/chat"]


async def _chat(http: httpx.AsyncClient, auth: dict[str, str], model: str, n: int = 3) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "options": {"num_predict": n},
    }
    r = await http.post("/api/ollama/api/chat", json=body, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["done"] is True


async def test_two_desktops_of_one_user(tmp_path: Any, nursery: trio.Nursery) -> None:
    fake_a: FakeOllama = await nursery.start(
        functools.partial(
            serve_fake_ollama, "127.0.0.1", 0, delay=DELAY, models=fake_models("alpha", "shared")
        )
    )
    fake_b: FakeOllama = await nursery.start(
        functools.partial(
            serve_fake_ollama, "127.0.0.1", 0, delay=DELAY, models=fake_models("beta", "shared")
        )
    )
    with run_stack(tmp_path, env={"C2L_ALLOW_PRIVATE_TUNNELS": "1"}) as stack:
        auth = {"Authorization": f"Bearer {stack.token(SUB)}"}
        port_a, port_b = free_port(), free_port()
        _agent(stack, "laptop", fake_a, tunnel_port=port_a)
        _agent(stack, "workstation", fake_b, tunnel_port=port_b)
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            # ---- /api/streaming/desktop lists both, with models and tunnels ----------
            with trio.fail_after(90):
                while True:
                    status = await _status(http, auth)
                    listed = {d["name"]: d for d in status["desktops"]}
                    if set(listed) == {"laptop", "workstation"} and all(
                        d["bridge"] and d["tunnel"] and d["models"] for d in listed.values()
                    ):
                        break
                    await trio.sleep(0.2)
            assert (status["desktop"], status["bridge"]) == ("connected", True)
            assert listed["laptop"]["models"] == ["alpha:latest", "shared:latest"]
            assert listed["workstation"]["models"] == ["beta:latest", "shared:latest"]
            assert listed["laptop"]["tunnel"]["url"] == f"http://127.0.0.1:{port_a}"
            assert listed["workstation"]["tunnel"]["url"] == f"http://127.0.0.1:{port_b}"
            assert listed["laptop"]["tunnel"]["name"] == "laptop"
            for name, port in (("laptop", port_a), ("workstation", port_b)):
                r = await http.get("/api/desktop/tunnel", params={"name": name}, headers=auth)
                assert r.status_code == 200, r.text
                assert (r.json()["url"], r.json()["name"]) == (f"http://127.0.0.1:{port}", name)
            assert (
                "desktop 'laptop' connected as session"
                in (stack.tmp / "agent-laptop.log").read_text()
            )

            # ---- the listings are the union, each model once with its desktops -------
            r = await http.get("/api/ollama/api/tags", headers=auth)
            assert r.status_code == 200, r.text
            assert {m["name"]: m["desktops"] for m in r.json()["models"]} == {
                "alpha:latest": ["laptop"],
                "shared:latest": ["laptop", "workstation"],
                "beta:latest": ["workstation"],
            }
            r = await http.get("/api/ollama/v1/models", headers=auth)
            assert r.status_code == 200, r.text
            assert {m["id"]: m["desktops"] for m in r.json()["data"]} == {
                "alpha:latest": ["laptop"],
                "shared:latest": ["laptop", "workstation"],
                "beta:latest": ["workstation"],
            }

            # ---- a chat goes to the desktop that has its model --------------------------
            with trio.fail_after(60):
                await _chat(http, auth, "alpha")
                await _chat(http, auth, "beta:latest")
            assert _chats(fake_a) == ["alpha"]
            assert _chats(fake_b) == ["beta:latest"]

            # ---- both have it: the one with fewer requests in flight -----------------
            async def long_chat() -> None:
                await _chat(http, auth, "shared", n=60)  # 3 s at 50 ms a token

            with trio.fail_after(60):
                async with trio.open_nursery() as inner:
                    inner.start_soon(long_chat)
                    while "shared" not in _chats(fake_a) + _chats(fake_b):
                        await trio.sleep(0.05)
                    busy, idle = (
                        (fake_a, fake_b) if "shared" in _chats(fake_a) else (fake_b, fake_a)
                    )
                    await _chat(http, auth, "shared")
                    assert _chats(idle).count("shared") == 1  # not the busy desktop
                    assert busy.completed < len(_chats(busy))  # it was still streaming

            # ---- a newer "laptop" replaces the older one, which stops ------------------
            old = stack.agents["laptop"]
            _agent(stack, "laptop", fake_a, key="laptop2")
            with trio.fail_after(60):
                while old.poll() is None:
                    await trio.sleep(0.1)
            assert old.returncode == 0
            old_log = (stack.tmp / "agent-laptop.log").read_text()
            assert "took over as desktop 'laptop' (close 4001 replaced)" in old_log
            assert stack.agents["workstation"].poll() is None  # the other desktop stays
            # The old laptop unregistered its own tunnel, not the workstation's.
            with trio.fail_after(30):
                while True:
                    listed = {d["name"]: d for d in (await _status(http, auth))["desktops"]}
                    if (
                        listed.get("laptop", {}).get("tunnel", 1) is None
                        and listed["laptop"]["bridge"]
                    ):
                        break
                    await trio.sleep(0.2)
            assert listed["workstation"]["tunnel"]["url"] == f"http://127.0.0.1:{port_b}"
            assert listed["workstation"]["bridge"] is True

            # ---- a desktop killed mid-stream errs only its own request -----------------
            r = await http.post("/api/streaming/create", headers=auth)
            assert r.status_code == 200, r.text
            session = r.json()
            with trio.fail_after(60):
                async with trio_websocket.open_websocket_url(session["endpoint"]) as web:
                    await web.send_message(
                        wire.encode(wire.Auth(stack.token(SUB), session["sessionId"]))
                    )
                    assert isinstance(wire.decode(await web.get_message()), wire.AuthOk)
                    before_a, before_b = len(_chats(fake_a)), len(_chats(fake_b))
                    for rid, model in (("on-laptop", "alpha"), ("on-workstation", "beta")):
                        body = {
                            "model": model,
                            "messages": [{"role": "user", "content": "go"}],
                            "options": {"num_predict": 60},
                        }
                        req = wire.Request(rid, "POST", "/api/chat", {}, body)
                        await web.send_message(wire.encode(req))
                    while len(_chats(fake_a)) <= before_a or len(_chats(fake_b)) <= before_b:
                        await trio.sleep(0.05)
                    await trio.sleep(0.3)  # both streams are flowing
                    new_laptop = stack.agents["laptop2"]
                    new_laptop.send_signal(signal.SIGKILL)
                    new_laptop.wait(10)
                    answers: dict[str, list[wire.Message]] = {}
                    await _collect_both(web, answers)
            laptop_end = answers["on-laptop"][-1]
            assert isinstance(laptop_end, wire.Error), laptop_end
            assert laptop_end.code == wire.ErrorCode.DESKTOP_UNAVAILABLE
            ws_msgs = answers["on-workstation"]
            assert ws_msgs[-1] == wire.ResponseEnd("on-workstation")
            assert not any(isinstance(m, wire.Error) for m in ws_msgs)
            text = "".join(m.data for m in ws_msgs if isinstance(m, wire.Chunk))
            lines = [json.loads(line) for line in text.splitlines()]
            assert len(lines) == 61 and lines[-1]["done"] is True  # 60 tokens and the final
            assert stack.agents["workstation"].poll() is None


async def _collect_both(web: Any, answers: dict[str, list[wire.Message]]) -> None:
    """Read ``web`` until both requests ended, sorting their messages by id."""
    for rid in ("on-laptop", "on-workstation"):
        answers.setdefault(rid, [])
    while not all(
        answers[rid] and isinstance(answers[rid][-1], wire.ResponseEnd | wire.Error)
        for rid in answers
    ):
        msg = wire.decode(await web.get_message())
        rid = getattr(msg, "id", None)
        if rid in answers:
            answers[rid].append(msg)
