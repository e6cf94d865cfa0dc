"""The gateway's side of the direct route (DESIGN.md section 5), on the in-memory runtime.

Registration behind the SSRF guard (checked through an injected resolver: these tests never
connect to an address outside the loopback range), verification of a tunnel through its
``/c2l/health``, the fallback of ``/api/ollama`` and ``/ws/stream`` to the tunnel when the
bridge cannot answer, and the route each answer reports. The tunnel here is a small ASGI
server on 127.0.0.1 that plays a desktop's direct endpoint (the real one, run by ``c2l
desktop``, is tested in ``test_direct.py`` and end to end on Podman).
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import jwt
import pytest
import trio
import trio_websocket
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

import wire
from c2lcore import DIRECT_AUDIENCE, DIRECT_ISSUER, Config, user_hash
from gateway import RunningGateway, serve_gateway
from gateway._auth import DevIssuer
from gateway._direct import AddressGuard, TunnelRefused, is_public, parse_tunnel_url
from orchestrator.testing import open_fake_runtime

# ---- the guard, alone -------------------------------------------------------------------

#: What the injected resolver answers for names (nothing is ever looked up or dialled).
NAMES: dict[str, list[str]] = {
    "public.example": ["93.184.216.34"],
    "private.example": ["10.1.2.3"],
    "mixed.example": ["93.184.216.34", "192.168.0.7"],
    "metadata.example": ["169.254.169.254"],
    "v6private.example": ["fd00::5"],
    "mapped.example": ["::ffff:127.0.0.1"],
}


@attrs.define
class FakeResolver:
    asked: list[str] = attrs.field(factory=list)

    async def __call__(self, host: str, port: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        self.asked.append(host)
        if host not in NAMES:
            raise OSError(f"no such name {host}")
        return NAMES[host]


REFUSED = [
    "http://public.example",  # not https
    "https://127.0.0.1",
    "https://127.1",  # inet_aton's short form of 127.0.0.1
    "https://2130706433",  # and its integer form
    "https://0x7f.1",
    "https://[::1]",
    "https://localhost",
    "https://api.localhost",
    "https://0.0.0.0",
    "https://10.0.0.5",
    "https://172.16.3.4",
    "https://192.168.1.1",
    "https://100.64.0.1",  # shared (carrier-grade NAT)
    "https://169.254.169.254",  # the cloud metadata address
    "https://[fe80::1]",
    "https://[fd00::1]",
    "https://[::ffff:10.0.0.1]",
    "https://[2002:a00:1::]",  # 6to4 of 10.0.0.1
    "https://224.0.0.1",
    "https://private.example",
    "https://mixed.example",  # one private address is enough to refuse
    "https://metadata.example",
    "https://v6private.example",
    "https://mapped.example",
    "https://nowhere.example",  # does not resolve
    "https://user:secret@public.example",
    "https://public.example/some/path",
    "https://public.example?x=1",
    "ftp://public.example",
    "https://",
    "not a url",
]


@pytest.mark.parametrize("url", REFUSED)
async def test_the_guard_refuses_what_is_not_public_https(url: str) -> None:
    guard = AddressGuard(allow_private=False, resolver=FakeResolver())

    async def check() -> None:
        parsed = parse_tunnel_url(url, allow_private=False)
        await guard.addresses(parsed.host, parsed.port)

    with pytest.raises(TunnelRefused):
        await check()


async def test_the_guard_admits_a_public_name_and_says_where_to_dial() -> None:
    resolver = FakeResolver()
    guard = AddressGuard(allow_private=False, resolver=resolver)
    parsed = parse_tunnel_url("https://public.example:8443/", allow_private=False)
    assert (parsed.base, parsed.port) == ("https://public.example:8443", 8443)
    assert await guard.addresses(parsed.host, parsed.port) == ["93.184.216.34"]
    assert await guard.addresses("8.8.8.8", 443) == ["8.8.8.8"]
    assert resolver.asked == ["public.example"]  # a literal address is not looked up


def test_public_addresses() -> None:
    import ipaddress

    public = ["93.184.216.34", "8.8.8.8", "2606:4700::1111"]
    private = ["127.0.0.1", "10.0.0.1", "169.254.1.1", "::1", "fe80::1", "::ffff:192.168.0.1"]
    assert all(is_public(ipaddress.ip_address(a)) for a in public)
    assert not any(is_public(ipaddress.ip_address(a)) for a in private)


async def test_private_tunnels_admit_loopback_and_http() -> None:
    guard = AddressGuard(allow_private=True, resolver=FakeResolver())
    parsed = parse_tunnel_url("http://127.0.0.1:11480", allow_private=True)
    assert await guard.addresses(parsed.host, parsed.port) == ["127.0.0.1"]
    with pytest.raises(TunnelRefused):  # still no credentials, paths or odd schemes
        parse_tunnel_url("http://u:p@127.0.0.1", allow_private=True)


# ---- a desktop's direct endpoint, played by a small ASGI server ---------------------------


@attrs.define
class FakeDirect:
    """A direct endpoint on 127.0.0.1: checks the gateway's token, streams NDJSON lines."""

    jwks_url: str = ""
    sub: str = "dana"
    answer_as: str | None = None  # the user hash /c2l/health reports (default: sub's)
    lines: int = 5
    delay: float = 0.05
    seen: list[dict[str, Any]] = attrs.field(factory=list)
    aborted: int = 0
    completed: int = 0

    def claims(self, authorization: str) -> dict[str, Any]:
        token = authorization.removeprefix("Bearer ")
        keys = jwt.PyJWKClient(self.jwks_url)
        key = keys.get_signing_key_from_jwt(token)
        claims: dict[str, Any] = jwt.decode(
            token, key.key, algorithms=["RS256"], audience=DIRECT_AUDIENCE, issuer=DIRECT_ISSUER
        )
        return claims

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        auth = headers.get("authorization", "")
        claims = await trio.to_thread.run_sync(self.claims, auth)  # raises: a 500, test fails
        self.seen.append(
            {"path": scope["path"], "claims": claims, "body": body, "headers": headers}
        )
        if claims["sub"] != self.sub:
            await _json(send, 403, {"error": "forbidden"})
            return
        if scope["path"] == "/c2l/health":
            who = self.answer_as or user_hash(self.sub)
            await _json(send, 200, {"status": "ok", "user": who, "ollama": True})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")],
            }
        )
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                # Hypercorn drops what is sent after the caller went: watch for that.
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.aborted += 1
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            for i in range(self.lines):
                line = {"message": {"role": "assistant", "content": f"t{i} "}, "done": False}
                await send(
                    {
                        "type": "http.response.body",
                        "body": (json.dumps(line) + "\n").encode(),
                        "more_body": True,
                    }
                )
                await trio.sleep(self.delay)
            await send({"type": "http.response.body", "body": b'{"done":true}\n'})
            self.completed += 1
            nursery.cancel_scope.cancel()


async def _json(send: Any, status: int, body: dict[str, Any]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def start_fake_direct(nursery: trio.Nursery, fake: FakeDirect) -> str:
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    binds = await nursery.start(functools.partial(hypercorn_serve, fake, config))
    return str(binds[0])


@attrs.define
class Stack:
    http: httpx.AsyncClient
    running: RunningGateway
    issuer: DevIssuer
    fake: FakeDirect
    tunnel_url: str

    def auth(self, sub: str = "dana") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.issuer.sign(sub)}"}


async def _stack(nursery: trio.Nursery, tmp_path: Path, **config: Any) -> AsyncIterator[Stack]:
    cfg = Config(
        port=0,
        dev_key_path=tmp_path / "key.pem",
        podman_url="unix:///nonexistent",
        allow_private_tunnels=True,
        **config,
    )
    async with open_fake_runtime(run_proxies=True) as runtime:
        running: RunningGateway = await nursery.start(
            functools.partial(serve_gateway, cfg, runtime=runtime)
        )
        fake = FakeDirect(jwks_url=f"{running.url}/.well-known/c2l-jwks.json")
        tunnel_url = await start_fake_direct(nursery, fake)
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as http:
            issuer = DevIssuer.load_or_create(cfg.dev_key_path)
            yield Stack(http, running, issuer, fake, tunnel_url)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def stack(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Stack]:
    async for s in _stack(nursery, tmp_path):
        yield s


async def _register(s: Stack, url: str | None = None, sub: str = "dana") -> httpx.Response:
    body = {"url": url or s.tunnel_url, "provider": "url"}
    return await s.http.put("/api/desktop/tunnel", json=body, headers=s.auth(sub))


async def test_public_auth_config_and_the_direct_key(stack: Stack) -> None:
    r = await stack.http.get("/api/config/auth")
    assert r.status_code == 200
    cfg = r.json()
    base = str(stack.http.base_url).rstrip("/")
    assert cfg["mode"] == "dev"
    assert cfg["jwksUrl"] == f"{base}/.well-known/jwks.json"
    assert cfg["direct"] == {
        "issuer": DIRECT_ISSUER,
        "audience": DIRECT_AUDIENCE,
        "jwksUrl": f"{base}/.well-known/c2l-jwks.json",
    }
    keys = (await stack.http.get("/.well-known/c2l-jwks.json")).json()["keys"]
    dev_keys = (await stack.http.get("/.well-known/jwks.json")).json()["keys"]
    assert keys[0]["kid"].startswith("c2l-direct-")
    assert keys[0]["n"] != dev_keys[0]["n"]  # its own key, not the user-token issuer's


async def test_registration_in_production_mode_refuses_before_connecting(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async for s in _stack(nursery, tmp_path):
        direct = s.running.gateway.direct
        resolver = FakeResolver()
        direct.guard = AddressGuard(allow_private=False, resolver=resolver)
        for url in [*REFUSED, s.tunnel_url]:
            r = await _register(s, url)
            assert r.status_code == 400, url
            assert r.json()["error"] in ("bad_tunnel_url", "bad_request"), url
        assert direct._pool is None  # no connection was ever made
        assert s.fake.seen == []
        assert "private.example" in resolver.asked
        r = await s.http.put(
            "/api/desktop/tunnel", json={"url": 5, "provider": "url"}, headers=s.auth()
        )
        assert r.json()["error"] == "bad_tunnel_url"
        r = await s.http.put("/api/desktop/tunnel", content=b"{not json", headers=s.auth())
        assert (r.status_code, r.json()["error"]) == (400, "bad_json")
        assert (
            await s.http.put("/api/desktop/tunnel", json={"url": s.tunnel_url})
        ).status_code == 401


async def test_registration_is_verified_kept_shown_and_removed(stack: Stack) -> None:
    r = await _register(stack)
    assert r.status_code == 200, r.text
    reg = r.json()
    assert (reg["url"], reg["provider"], reg["healthy"]) == (stack.tunnel_url, "url", True)
    # The check called /c2l/health with the gateway's own token for this user.
    (seen,) = stack.fake.seen
    assert seen["path"] == "/c2l/health"
    assert seen["claims"]["sub"] == "dana"
    assert seen["claims"]["exp"] - seen["claims"]["iat"] <= 60
    assert (await stack.http.get("/api/desktop/tunnel", headers=stack.auth())).json() == reg
    status = (await stack.http.get("/api/streaming/desktop", headers=stack.auth())).json()
    assert status["tunnel"]["url"] == stack.tunnel_url
    assert status["bridge"] is False
    # Another user sees none of it.
    assert (
        await stack.http.get("/api/desktop/tunnel", headers=stack.auth("eve"))
    ).status_code == 404
    assert (
        await stack.http.delete("/api/desktop/tunnel", headers=stack.auth("eve"))
    ).status_code == 404
    assert (await stack.http.delete("/api/desktop/tunnel", headers=stack.auth())).status_code == 204
    assert (await stack.http.get("/api/desktop/tunnel", headers=stack.auth())).status_code == 404


async def test_a_tunnel_that_answers_as_another_users_desktop_is_refused(stack: Stack) -> None:
    stack.fake.answer_as = user_hash("eve")
    r = await _register(stack)
    assert (r.status_code, r.json()["error"]) == (502, "tunnel_unreachable")
    assert "another user" in r.json()["message"]
    stack.fake.answer_as = None
    stack.fake.sub = "eve"  # a desktop of eve's refuses dana's token: 403
    r = await _register(stack)
    assert (r.status_code, r.json()["error"]) == (502, "tunnel_unreachable")
    assert (await stack.http.get("/api/desktop/tunnel", headers=stack.auth())).status_code == 404


async def test_an_unreachable_tunnel_is_refused(stack: Stack) -> None:
    from tests.conftest import free_port

    r = await _register(stack, f"http://127.0.0.1:{free_port()}")
    assert (r.status_code, r.json()["error"]) == (502, "tunnel_unreachable")


async def test_http_falls_back_to_the_tunnel_and_says_so(stack: Stack) -> None:
    # No tunnel, no desktop: the bridge's error, as before.
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with trio.fail_after(20):
        r = await stack.http.post("/api/ollama/api/chat", json=body, headers=stack.auth())
        assert r.status_code == 503
        assert (await _register(stack)).status_code == 200
        arrived: list[float] = []
        async with stack.http.stream(
            "POST", "/api/ollama/api/chat", json=body, headers=stack.auth()
        ) as r:
            assert r.status_code == 200
            assert r.headers["x-c2l-route"] == "direct"
            lines = []
            async for line in r.aiter_lines():
                arrived.append(trio.current_time())
                lines.append(json.loads(line))
        assert lines[-1] == {"done": True}
        assert len(lines) == 6
        assert arrived[-1] - arrived[0] >= 0.15  # streamed as it came, not at the end
        call = stack.fake.seen[-1]
        assert call["path"] == "/api/chat"
        assert json.loads(call["body"]) == body
        # The gateway's own token crossed the tunnel, never the user's.
        assert call["claims"]["aud"] == DIRECT_AUDIENCE
        assert stack.issuer.sign("dana").split(".")[0] != call["headers"]["authorization"]
        assert "x-c2l-route" not in call["headers"]
        metrics = await stack.running.gateway.metrics.render()
        assert b'c2l_requests_by_route_total{route="direct"} 1.0' in metrics


async def test_a_client_that_goes_away_aborts_the_tunnel_request(stack: Stack) -> None:
    stack.fake.lines, stack.fake.delay = 100, 0.05
    assert (await _register(stack)).status_code == 200
    body = {"model": "m", "messages": []}
    with trio.fail_after(20):
        async with stack.http.stream(
            "POST", "/api/ollama/api/chat", json=body, headers=stack.auth()
        ) as r:
            async for _line in r.aiter_lines():
                break
        while stack.fake.aborted == 0:
            await trio.sleep(0.05)
    assert stack.fake.completed == 0


async def test_an_expired_registration_is_no_longer_used(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    async for s in _stack(nursery, tmp_path, tunnel_ttl=0.5):
        assert (await _register(s)).status_code == 200
        assert (await s.http.get("/api/desktop/tunnel", headers=s.auth())).status_code == 200
        await trio.sleep(0.7)
        assert (await s.http.get("/api/desktop/tunnel", headers=s.auth())).status_code == 404
        r = await s.http.post("/api/ollama/api/chat", json={}, headers=s.auth())
        assert r.status_code == 503
        assert [c["path"] for c in s.fake.seen] == ["/c2l/health"]


async def _ws(s: Stack, path: str, sub: str = "dana") -> Any:
    url = str(s.http.base_url).replace("http://", "ws://").rstrip("/") + path
    headers = [(b"authorization", s.auth(sub)["Authorization"].encode())]
    return trio_websocket.open_websocket_url(url, extra_headers=headers)


async def _answer(ws: Any, rid: str) -> tuple[wire.ResponseStart, list[str], wire.Message]:
    start = wire.decode(await ws.get_message())
    assert isinstance(start, wire.ResponseStart), start
    assert start.id == rid
    data = []
    while True:
        msg = wire.decode(await ws.get_message())
        if isinstance(msg, wire.Chunk):
            data.append(msg.data)
            continue
        return start, data, msg


async def test_the_web_socket_falls_back_to_the_tunnel_and_back(stack: Stack) -> None:
    assert (await _register(stack)).status_code == 200
    request = wire.Request("r1", "POST", "/api/chat", {}, {"model": "m", "messages": []})
    with trio.fail_after(30):
        async with await _ws(stack, "/ws/stream") as web:
            assert isinstance(wire.decode(await web.get_message()), wire.AuthOk)
            await web.send_message(wire.encode(request))
            start, data, end = await _answer(web, "r1")
            assert start.route == "direct"
            assert end == wire.ResponseEnd("r1")
            assert "".join(data).count("\n") == 6
            # A desktop agent's bridge connects: the next answer comes over it.
            async with await _ws(stack, "/ws/bridge") as desktop:
                assert isinstance(wire.decode(await desktop.get_message()), wire.AuthOk)
                await web.send_message(wire.encode(attrs.evolve(request, id="r2")))
                got = wire.decode(await desktop.get_message())
                while not isinstance(got, wire.Request):
                    got = wire.decode(await desktop.get_message())
                await desktop.send_message(wire.encode(wire.ResponseStart(got.id, 200, {})))
                await desktop.send_message(wire.encode(wire.Chunk(got.id, '{"done":true}\n')))
                await desktop.send_message(wire.encode(wire.ResponseEnd(got.id)))
                start, data, end = await _answer(web, "r2")
                assert start.route == "cloud"
                assert data == ['{"done":true}\n']
            # The bridge is gone: the tunnel answers again, with no error for the client.
            await web.send_message(wire.encode(attrs.evolve(request, id="r3")))
            start, data, end = await _answer(web, "r3")
            assert (start.route, end) == ("direct", wire.ResponseEnd("r3"))
            # A cancel of a request the tunnel serves aborts it there.
            stack.fake.lines = 200
            await web.send_message(wire.encode(attrs.evolve(request, id="r4")))
            start = wire.decode(await web.get_message())
            assert isinstance(start, wire.ResponseStart)
            assert start.route == "direct"
            await web.send_message(wire.encode(wire.Cancel("r4")))
            while stack.fake.aborted == 0:
                await trio.sleep(0.05)
    metrics = await stack.running.gateway.metrics.render()
    assert b'c2l_requests_by_route_total{route="cloud"} 1.0' in metrics
    assert b'c2l_requests_by_route_total{route="direct"} 3.0' in metrics


async def test_another_users_requests_never_use_this_tunnel(stack: Stack) -> None:
    assert (await _register(stack)).status_code == 200
    r = await stack.http.post("/api/ollama/api/chat", json={}, headers=stack.auth("eve"))
    assert r.status_code == 503
    assert [c["path"] for c in stack.fake.seen] == ["/c2l/health"]


async def test_dns_rebinding_cannot_reach_a_private_address(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A name that is public when checked and loopback when dialled is never dialled."""
    accepted: list[int] = []

    async def count(stream: trio.SocketStream) -> None:
        accepted.append(1)
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, count, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    answers = [["93.184.216.34"]]  # the registration's check; every later look-up: loopback

    async def rebinding(host: str, p: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        return answers.pop(0) if answers else ["127.0.0.1"]

    async for s in _stack(nursery, tmp_path):
        s.running.gateway.direct.guard = AddressGuard(allow_private=False, resolver=rebinding)
        r = await _register(s, f"https://rebind.example:{port}")
        assert (r.status_code, r.json()["error"]) == (502, "tunnel_unreachable")
        await trio.sleep(0.2)
        assert accepted == []


async def test_the_audit_trail_has_registrations_and_route_changes_and_no_url_or_token(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="c2l.audit")
    token = stack.auth()["Authorization"].removeprefix("Bearer ")
    secret_url = stack.tunnel_url + "/?key=sekrit"
    r = await stack.http.put("/api/desktop/tunnel", json={"url": secret_url}, headers=stack.auth())
    assert r.json()["error"] == "bad_tunnel_url"
    assert (await _register(stack)).status_code == 200
    r = await stack.http.post("/api/ollama/api/chat", json={}, headers=stack.auth())
    assert r.headers["x-c2l-route"] == "direct"
    stack.running.gateway.served(user_hash("dana"), "cloud")  # as a bridge answer would
    assert (await stack.http.delete("/api/desktop/tunnel", headers=stack.auth())).status_code == 204
    events = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "c2l.audit"]
    names = [e["event"] for e in events]
    for name in ("tunnel_refused", "tunnel_registered", "route_changed", "tunnel_removed"):
        assert name in names, names
    registered = next(e for e in events if e["event"] == "tunnel_registered")
    assert registered["endpoint"] == "127.0.0.1"
    text = caplog.text
    assert "sekrit" not in text
    assert token not in text
    assert stack.tunnel_url not in text


async def test_an_agent_whose_ngrok_fails_keeps_serving_over_the_bridge(
    stack: Stack, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The real ngrok SDK against a server that accepts and never answers (127.0.0.1):
    one clear error in the agent's status, no registration, and answers over the bridge."""
    from desktop import AgentConfig, DesktopAgent, NgrokTunnel, StaticToken, serve_agent
    from desktop.testing import FakeOllama, serve_fake_ollama

    async def hold(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
    silent = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    ollama: FakeOllama = await nursery.start(functools.partial(serve_fake_ollama, "127.0.0.1", 0))
    config = AgentConfig(
        stack.running.url,
        StaticToken(stack.issuer.sign("dana")),
        ollama.url,
        tunnel=NgrokTunnel("not-a-real-token", server_addr=silent, connect_timeout=0.5),
        direct_port=0,
        auth_cache=tmp_path / "auth.json",
    )
    lines: list[str] = []
    agent: DesktopAgent = await nursery.start(
        lambda task_status: serve_agent(config, status=lines.append, task_status=task_status)
    )
    with trio.fail_after(20):
        await agent.tunnel.wait_until(lambda s: s.state == "failed")
        while not (await stack.http.get("/api/streaming/desktop", headers=stack.auth())).json()[
            "bridge"
        ]:
            await trio.sleep(0.05)
        r = await stack.http.post(
            "/api/ollama/api/generate",
            json={"model": "llama3.2", "prompt": "hi", "stream": False},
            headers=stack.auth(),
        )
    assert r.status_code == 200, r.text
    assert r.headers["x-c2l-route"] == "cloud"
    assert r.json()["done"] is True
    assert agent.tunnel.error is not None
    assert agent.tunnel.error.startswith("ngrok: no session with 127.0.0.1:")
    failed = [line for line in lines if line.startswith("tunnel failed")]
    assert failed[0].startswith(f"tunnel failed: {agent.tunnel.error}"), lines
    assert (await stack.http.get("/api/desktop/tunnel", headers=stack.auth())).status_code == 404
