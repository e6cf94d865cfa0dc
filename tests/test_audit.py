"""The audit trail carries events, never user data: a canary streamed end to end on real
Podman appears in no log of any component (gateway, desktop agent, proxy container)."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket

import wire
from c2lcore import user_hash
from desktop.testing import FakeOllama, serve_fake_ollama
from orchestrator import container_name

from ._stack import Stack, container_logs, podman_client, run_stack, wait_for_desktop
from ._stack import stop as _stop

pytestmark = pytest.mark.podman


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    # debug logging everywhere: the canary must not leak even at the chattiest level
    with run_stack(tmp_path, env={"C2L_DEBUG": "1"}) as s:
        yield s


@pytest.fixture
async def fake_ollama(nursery: trio.Nursery) -> FakeOllama:
    fake: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=0.005)
    )
    return fake


async def test_canary_appears_in_no_log_and_the_audit_trail_is_complete(
    stack: Stack, fake_ollama: FakeOllama
) -> None:
    canary = f"CANARY-{secrets.token_hex(8)}"
    sub = f"canary-user-{secrets.token_hex(4)}@example.com"
    token = stack.token(sub)
    stack.start_agent(sub, fake_ollama.url)
    proxy = container_name(user_hash(sub))
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http, podman_client() as pc:
        with trio.fail_after(90):
            session = await wait_for_desktop(http, token)
            # the canary goes up in a prompt, a header and a query, and comes back streamed
            async with trio_websocket.open_websocket_url(session["endpoint"]) as ws:
                await ws.send_message(wire.encode(wire.Auth(token, session["sessionId"])))
                assert isinstance(wire.decode(await ws.get_message()), wire.AuthOk)
                body = {
                    "model": "llama3.2:latest",
                    "messages": [{"role": "user", "content": f"repeat {canary} {canary}"}],
                    "options": {"num_predict": 30},
                }
                headers = {"X-Note": canary}
                req = wire.Request("c", "POST", f"/api/chat?tag={canary}", headers, body)
                await ws.send_message(wire.encode(req))
                streamed = ""
                while not isinstance(msg := wire.decode(await ws.get_message()), wire.ResponseEnd):
                    if isinstance(msg, wire.Chunk):
                        streamed += msg.data
                # a request the desktop refuses, and bad frames, both carry the canary too
                await ws.send_message(wire.encode(wire.Request("x", "GET", f"/{canary}")))
                await ws.send_message("{" + canary)
                for _ in range(2):
                    assert isinstance(wire.decode(await ws.get_message()), wire.Error)
            # ... and over the HTTP API
            r = await http.post(
                "/api/ollama/api/generate",
                headers={"Authorization": f"Bearer {token}"},
                json={"model": "llama3.2:latest", "prompt": canary, "stream": False},
            )
            assert r.status_code == 200
            # failed logins whose "token" is the canary
            for bad in (canary, f"{canary}.{canary}.{canary}"):
                r = await http.get(
                    "/api/streaming/status", headers={"Authorization": f"Bearer {bad}"}
                )
                assert r.status_code == 401
            assert canary in streamed  # it really went through the whole path
            proxy_log = await container_logs(pc, proxy)
            r = await http.delete(
                f"/api/streaming/{session['sessionId']}",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 204
    agent_log_path = stack.tmp / f"agent-{sub}.log"
    _stop(stack.agents.pop(sub))
    assert _stop(stack.proc, timeout=15) == 0
    logs = {
        "gateway": stack.log.read_text(),
        "agent": agent_log_path.read_text(),
        "proxy container": proxy_log,
    }
    assert "proxy listening" in proxy_log  # the container's log was really read
    for name, text in logs.items():
        assert canary not in text, f"the canary leaked into the {name} log"
        assert token not in text, f"the token leaked into the {name} log"
        assert sub not in text, f"the user's name leaked into the {name} log"

    # the audit trail: JSON lines with the keyed user hash, for each kind of event
    events = []
    for line in logs["gateway"].splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    kinds = {e["event"] for e in events}
    assert {"auth_failed", "session_created", "session_destroyed"} <= kinds, kinds
    assert {"connection_opened", "connection_closed"} <= kinds, kinds
    # users are named by the keyed hash (the gateway's own key), never the plain one
    key = bytes.fromhex((stack.tmp / "config" / "c2l" / "audit-hmac-key").read_text())
    keyed = hmac.new(key, user_hash(sub).encode(), hashlib.sha256).hexdigest()[:16]
    assert all(user_hash(sub) not in json.dumps(e) for e in events)
    mine = [e for e in events if e.get("user") == keyed]
    assert any(e["event"] == "session_created" for e in mine)
    destroyed = [e for e in mine if e["event"] == "session_destroyed"]
    assert destroyed and destroyed[0]["reason"] == "deleted"
    assert any(e["event"] == "connection_opened" and e["side"] == "bridge" for e in mine)
    failed = [e for e in events if e["event"] == "auth_failed"]
    assert {"malformed_token"} <= {e["code"] for e in failed}
    assert all(
        set(e)
        <= {
            "ts",
            "event",
            "user",
            "session",
            "side",
            "reason",
            "code",
            "endpoint",
            "method",
            "remote",
            "status",
        }
        for e in events
    )
