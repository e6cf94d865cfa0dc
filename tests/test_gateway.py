"""The gateway on a fake runtime with real in-process proxies: auth, session API, relays."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

import wire
from c2lcore import Config, user_hash
from gateway import RunningGateway, serve_gateway
from gateway._auth import DevIssuer
from orchestrator import proxy_get
from orchestrator.testing import FakeRuntime, open_fake_runtime


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(port=0, dev_key_path=tmp_path / "key.pem", podman_url="unix:///nonexistent")


@pytest.fixture
async def fake_runtime() -> AsyncIterator[FakeRuntime]:
    async with open_fake_runtime(run_proxies=True) as fake:
        yield fake


@pytest.fixture
async def gw(nursery: trio.Nursery, config: Config, fake_runtime: FakeRuntime) -> RunningGateway:
    running: RunningGateway = await nursery.start(
        functools.partial(serve_gateway, config, runtime=fake_runtime)
    )
    return running


@pytest.fixture
def issuer(config: Config) -> DevIssuer:
    return DevIssuer.load_or_create(config.dev_key_path)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def http(gw: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        yield client


def ws_url(gw: RunningGateway, side: str) -> str:
    return gw.url.replace("http://", "ws://") + f"/ws/{side}"


async def recv(conn: Any, timeout: float = 5) -> wire.Message:
    with trio.fail_after(timeout):
        return wire.decode(await conn.get_message())


async def test_health(http: httpx.AsyncClient) -> None:
    r = await http.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "healthy"
    assert "T" in r.json()["timestamp"]


async def test_jwks_serves_the_dev_key(http: httpx.AsyncClient, issuer: DevIssuer) -> None:
    r = await http.get("/.well-known/jwks.json")
    assert r.status_code == 200
    assert [k["kid"] for k in r.json()["keys"]] == [issuer.kid]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer not-a-jwt"}, {"Authorization": "Basic abc"}],
)
async def test_session_api_needs_a_valid_token(
    http: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    for method, path in (
        ("POST", "/api/streaming/create"),
        ("GET", "/api/streaming/status"),
        ("DELETE", "/api/streaming/abc"),
        ("GET", "/api/admin/streaming/sessions"),
        ("POST", "/api/ollama/api/chat"),
    ):
        r = await http.request(method, path, headers=headers)
        assert r.status_code == 401, (method, path)
        assert set(r.json()) == {"error", "message"}


async def test_token_of_another_issuer_is_refused(http: httpx.AsyncClient, tmp_path: Path) -> None:
    other = DevIssuer.load_or_create(tmp_path / "other.pem")
    r = await http.post("/api/streaming/create", headers=bearer(other.sign("alice")))
    assert r.status_code == 401
    assert r.json()["error"] == "bad_signature"


async def test_expired_token_is_refused(http: httpx.AsyncClient, issuer: DevIssuer) -> None:
    r = await http.post("/api/streaming/create", headers=bearer(issuer.sign("a", ttl=-120)))
    assert r.status_code == 401
    assert r.json()["error"] == "token_expired"


async def test_session_lifecycle(
    http: httpx.AsyncClient, issuer: DevIssuer, fake_runtime: FakeRuntime
) -> None:
    alice, bob = bearer(issuer.sign("alice")), bearer(issuer.sign("bob"))
    assert (await http.get("/api/streaming/status", headers=alice)).status_code == 404
    r = await http.post("/api/streaming/create", headers=alice)
    assert r.status_code == 200
    s = r.json()
    assert set(s) >= {"sessionId", "endpoint", "bridgeEndpoint", "state"}
    assert s["endpoint"].startswith("ws://") and s["endpoint"].endswith("/ws/stream")
    assert s["bridgeEndpoint"].endswith("/ws/bridge")
    assert s["state"] == "ready"
    again = (await http.post("/api/streaming/create", headers=alice)).json()
    assert again["sessionId"] == s["sessionId"]
    status = await http.get("/api/streaming/status", headers=alice)
    assert status.json()["sessionId"] == s["sessionId"]
    # another user knowing the id gets 404 and changes nothing
    assert (await http.delete(f"/api/streaming/{s['sessionId']}", headers=bob)).status_code == 404
    assert (await http.get("/api/streaming/status", headers=alice)).status_code == 200
    assert (await http.delete(f"/api/streaming/{s['sessionId']}", headers=alice)).status_code == 204
    assert (await http.get("/api/streaming/status", headers=alice)).status_code == 404
    assert fake_runtime.empty


async def test_admin_list_needs_admin(http: httpx.AsyncClient, issuer: DevIssuer) -> None:
    await http.post("/api/streaming/create", headers=bearer(issuer.sign("carol")))
    r = await http.get("/api/admin/streaming/sessions", headers=bearer(issuer.sign("carol")))
    assert r.status_code == 403
    assert r.json()["error"] == "forbidden"
    r = await http.get(
        "/api/admin/streaming/sessions", headers=bearer(issuer.sign("root", admin=True))
    )
    assert r.status_code == 200
    rows = r.json()["sessions"]
    assert len(rows) == 1
    assert "carol" not in json.dumps(rows)
    assert rows[0]["state"] == "ready"


async def test_websocket_auth_failures_close_with_1008(
    gw: RunningGateway, issuer: DevIssuer, tmp_path: Path
) -> None:
    other = DevIssuer.load_or_create(tmp_path / "other.pem").sign("mallory")
    for first in ("not json", wire.encode(wire.Ping(1)), wire.encode(wire.Auth(other))):
        async with trio_websocket.open_websocket_url(ws_url(gw, "stream")) as conn:
            await conn.send_message(first)
            err = await recv(conn)
            assert isinstance(err, wire.Error)
            assert err.code == wire.ErrorCode.AUTH_FAILED
            with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as info:
                await conn.get_message()
            assert info.value.reason.code == wire.CLOSE_POLICY


async def test_stream_through_the_gateway(gw: RunningGateway, issuer: DevIssuer) -> None:
    token = issuer.sign("dave")
    async with trio_websocket.open_websocket_url(
        ws_url(gw, "bridge"), extra_headers=[(b"authorization", f"Bearer {token}".encode())]
    ) as desktop:
        ok = await recv(desktop)
        assert isinstance(ok, wire.AuthOk)
        async with trio_websocket.open_websocket_url(ws_url(gw, "stream")) as client:
            await client.send_message(wire.encode(wire.Auth(token, ok.session_id, 0)))
            assert await recv(client) == wire.AuthOk(ok.session_id)
            await client.send_message(wire.encode(wire.Request("q1", "POST", "/api/chat")))
            fwd = await recv(desktop)
            assert isinstance(fwd, wire.Request)
            assert fwd.path == "/api/chat"
            await desktop.send_message(wire.encode(wire.ResponseStart(fwd.id, 200, {})))
            for n in range(3):
                await desktop.send_message(wire.encode(wire.Chunk(fwd.id, f'{{"n":{n}}}')))
            await desktop.send_message(wire.encode(wire.ResponseEnd(fwd.id)))
            got = [await recv(client) for _ in range(5)]
            assert isinstance(got[0], wire.ResponseStart) and got[0].resume  # resumable
            assert got[0] == wire.ResponseStart("q1", 200, {}, "cloud", resume=got[0].resume)
            assert got[1:4] == [wire.Chunk("q1", f'{{"n":{n}}}', seq=n + 1) for n in range(3)]
            assert got[4] == wire.ResponseEnd("q1")
            # bad input is answered and the connection stays up
            await client.send_message("{bad")
            err = await recv(client)
            assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.BAD_JSON


async def test_delete_parks_the_desktop_and_the_next_session_takes_it(
    gw: RunningGateway, issuer: DevIssuer, http: httpx.AsyncClient, fake_runtime: FakeRuntime
) -> None:
    token = issuer.sign("erin")
    async with trio_websocket.open_websocket_url(
        ws_url(gw, "bridge"), extra_headers=[(b"authorization", f"Bearer {token}".encode())]
    ) as desktop:
        ok = await recv(desktop)
        assert isinstance(ok, wire.AuthOk)
        r = await http.delete(f"/api/streaming/{ok.session_id}", headers=bearer(token))
        assert r.status_code == 204
        assert fake_runtime.empty
        # parked: still connected, answering pings, with no proxy behind it
        await desktop.send_message(wire.encode(wire.Ping(7)))
        assert await recv(desktop) == wire.Pong(7)
        new = (await http.post("/api/streaming/create", headers=bearer(token))).json()
        assert new["sessionId"] != ok.session_id
        session = gw.gateway.orchestrator.get(user_hash("erin"))
        assert session is not None
        assert session.id == new["sessionId"]
        # the proxy of the new session sees the parked agent attach, with no action from it
        assert session.socket_path is not None
        with trio.fail_after(5):
            while not json.loads((await proxy_get(session.socket_path))[1])["desktop"]:
                await trio.sleep(0.02)
        async with trio_websocket.open_websocket_url(ws_url(gw, "stream")) as client:
            await client.send_message(wire.encode(wire.Auth(token)))
            assert await recv(client) == wire.AuthOk(new["sessionId"])
            await client.send_message(wire.encode(wire.Request("1", "GET", "/api/tags")))
            fwd = await recv(desktop)
            assert isinstance(fwd, wire.Request)
            assert fwd.path == "/api/tags"


async def test_web_client_is_told_when_its_session_ends(
    gw: RunningGateway, issuer: DevIssuer, http: httpx.AsyncClient
) -> None:
    token = issuer.sign("frank")
    async with trio_websocket.open_websocket_url(ws_url(gw, "stream")) as client:
        await client.send_message(wire.encode(wire.Auth(token)))
        ok = await recv(client)
        assert isinstance(ok, wire.AuthOk)
        await http.delete(f"/api/streaming/{ok.session_id}", headers=bearer(token))
        err = await recv(client)
        assert isinstance(err, wire.Error)
        assert err.code == wire.ErrorCode.SESSION_ENDED
        with trio.fail_after(5), pytest.raises(trio_websocket.ConnectionClosed) as info:
            await client.get_message()
        # a delete is a normal end (DESIGN.md section 2: 1000); a proxy that died is 4003
        assert info.value.reason.code == wire.CLOSE_NORMAL


async def test_ollama_api_without_desktop_is_503(
    http: httpx.AsyncClient, issuer: DevIssuer
) -> None:
    r = await http.post(
        "/api/ollama/api/chat", headers=bearer(issuer.sign("gina")), json={"model": "m"}
    )
    assert r.status_code == 503
    assert r.json()["error"] == wire.ErrorCode.DESKTOP_UNAVAILABLE


async def test_oversized_http_body_is_413(http: httpx.AsyncClient, issuer: DevIssuer) -> None:
    r = await http.post(
        "/api/ollama/api/chat",
        headers=bearer(issuer.sign("hank")),
        content=b"x" * (2 * 1024 * 1024),
    )
    assert r.status_code == 413
    assert r.json()["error"] == "too_large"
