"""The client side of the fallback hierarchy (``c2l.routes``, DESIGN.md section 5).

A table test on an in-memory network (``httpx.MockTransport``: which services answer is the
table's row), then the same resolver against real HTTP servers on 127.0.0.1: the fake
Ollama as the local Ollama, and small fronts before it playing the gateway and the tunnel.
"""

from __future__ import annotations

import contextlib
import json
import stat
import threading
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from c2l.routes import Route, RouteError, resolve, resolve_sync, routes
from c2lcore import user_hash
from desktop.testing import FakeOllama, serve_fake_ollama
from gateway import DevIssuer

from ._front import Front, serve_front
from .conftest import free_port

SUB = "alice@example.com"
LOCAL = "http://ollama.test:11434"
GATEWAY = "http://gw.test"
TUNNEL = "https://alice.tunnel.test"


@pytest.fixture
def issuer(tmp_path: Path) -> DevIssuer:
    return DevIssuer.load_or_create(tmp_path / "key" / "dev.pem")


@pytest.fixture
def token(issuer: DevIssuer) -> str:
    return issuer.sign(SUB)


@attrs.define
class Net:
    """Which services of the in-memory network answer, and what they were asked."""

    token: str
    local: bool = False
    gateway: bool = False
    tunnel: bool = False
    registered: str | None = TUNNEL
    tunnel_user: str = user_hash(SUB)
    asked: list[str] = attrs.field(factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.asked.append(url)
        auth = request.headers.get("authorization")
        up = {LOCAL: self.local, GATEWAY: self.gateway, TUNNEL: self.tunnel}
        base = next((b for b in up if url.startswith(b)), None)
        if base is None or not up[base]:
            raise httpx.ConnectError("connection refused", request=request)
        path = url.removeprefix(base)
        if base == LOCAL and path == "/api/version":
            return httpx.Response(200, json={"version": "0.5.7"})
        if base == GATEWAY and path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        if base == GATEWAY and path == "/api/desktop/tunnel":
            assert auth == f"Bearer {self.token}"
            if self.registered is None:
                return httpx.Response(404, json={"error": "not_found"})
            return httpx.Response(200, json={"url": self.registered, "provider": "url"})
        if base == TUNNEL and path == "/c2l/health":
            if auth != f"Bearer {self.token}":
                return httpx.Response(401, json={"error": "invalid_token"})
            return httpx.Response(200, json={"status": "ok", "user": self.tunnel_user})
        return httpx.Response(404)


async def _levels(net: Net, cache: Path, *, prefer_local: bool) -> list[Route]:
    found = []
    candidates = routes(
        GATEWAY,
        net.token,
        prefer_local=prefer_local,
        ollama_url=LOCAL,
        cache_path=cache,
        transport=httpx.MockTransport(net.handler),
    )
    async with contextlib.aclosing(candidates):
        async for route in candidates:
            found.append(route)
    return found


def _cache(path: Path, token_user: str = user_hash(SUB), url: str = TUNNEL) -> Path:
    path.write_text(json.dumps({"gateway": GATEWAY, "user": token_user, "url": url}))
    return path


# (row name, prefer_local, local up, gateway up, tunnel up, tunnel cached) -> levels in order
TABLE = [
    ("local preferred and up", True, True, True, True, False, ["local", "cloud"]),
    ("local preferred but down: the gateway", True, False, True, True, False, ["cloud"]),
    ("gateway up, local not preferred", False, True, True, True, False, ["cloud", "local"]),
    ("gateway down, cached tunnel up", False, True, False, True, True, ["direct", "local"]),
    ("gateway down, tunnel down, local up", False, True, False, False, True, ["local"]),
    ("gateway down, nothing cached, local up", False, True, False, True, False, ["local"]),
    ("gateway up: the tunnel is not tried", False, False, True, True, True, ["cloud"]),
    ("nothing up", True, False, False, False, True, []),
]


@pytest.mark.parametrize(
    ("prefer_local", "local", "gateway", "tunnel", "cached", "expected"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
async def test_each_level_is_chosen_when_it_should_be(
    tmp_path: Path,
    token: str,
    prefer_local: bool,
    local: bool,
    gateway: bool,
    tunnel: bool,
    cached: bool,
    expected: list[str],
) -> None:
    net = Net(token, local=local, gateway=gateway, tunnel=tunnel)
    cache = _cache(tmp_path / "tunnel.json") if cached else tmp_path / "tunnel.json"
    with trio.fail_after(10):
        found = await _levels(net, cache, prefer_local=prefer_local)
    assert [r.level for r in found] == expected
    by_level = {r.level: r for r in found}
    if "local" in by_level:
        assert by_level["local"].base_url == LOCAL
        assert by_level["local"].headers == {}  # the token never goes to the local Ollama
    if "cloud" in by_level:
        assert by_level["cloud"].base_url == GATEWAY + "/api/ollama"
        assert by_level["cloud"].headers == {"Authorization": f"Bearer {token}"}
    if "direct" in by_level:
        assert by_level["direct"].base_url == TUNNEL
        assert by_level["direct"].headers == {"Authorization": f"Bearer {token}"}
    if gateway:
        # the tunnel is called by the client itself only when the gateway is unreachable
        assert not any(u.startswith(TUNNEL) for u in net.asked)
    # resolve() gives the first of them, or says what it tried
    with trio.fail_after(10):
        if expected:
            first = await resolve(
                GATEWAY,
                token,
                prefer_local=prefer_local,
                ollama_url=LOCAL,
                cache_path=cache,
                transport=httpx.MockTransport(net.handler),
            )
            assert first.level == expected[0]
        else:
            with pytest.raises(RouteError) as err:
                await resolve(
                    GATEWAY,
                    token,
                    prefer_local=prefer_local,
                    ollama_url=LOCAL,
                    cache_path=cache,
                    transport=httpx.MockTransport(net.handler),
                )
            message = str(err.value)
            assert message.startswith("no route to your model answers:")
            for what in (f"local Ollama {LOCAL}", f"gateway {GATEWAY}", f"tunnel {TUNNEL}"):
                assert what in message
            assert token not in message


async def test_the_gateway_teaches_the_tunnel_and_the_cache_is_private(
    tmp_path: Path, token: str
) -> None:
    cache = tmp_path / "cfg" / "tunnel.json"
    net = Net(token, gateway=True, tunnel=True)
    with trio.fail_after(10):
        assert [r.level for r in await _levels(net, cache, prefer_local=False)] == ["cloud"]
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    saved = json.loads(cache.read_text())
    assert saved["url"] == TUNNEL and saved["gateway"] == GATEWAY
    assert saved["user"] == user_hash(SUB)
    assert token not in cache.read_text()
    # the gateway goes away: the learned tunnel is used
    net.gateway = False
    with trio.fail_after(10):
        assert [r.level for r in await _levels(net, cache, prefer_local=False)] == ["direct"]
    # the gateway is back and says there is no tunnel any more: the cache is forgotten
    net.gateway, net.registered = True, None
    with trio.fail_after(10):
        await _levels(net, cache, prefer_local=False)
    assert not cache.exists()


@pytest.mark.parametrize(
    ("registered", "kept"),
    [
        ("https://alice.tunnel.test/", "https://alice.tunnel.test"),
        ("http://127.0.0.1:9/", "http://127.0.0.1:9"),  # loopback: development
        ("http://alice.tunnel.test", None),  # plain http off loopback: the token would leak
        ("https://user:pw@alice.tunnel.test", None),
        ("ftp://alice.tunnel.test", None),
    ],
)
async def test_only_tunnel_urls_safe_for_the_token_are_kept(
    tmp_path: Path, token: str, registered: str, kept: str | None
) -> None:
    cache = tmp_path / "tunnel.json"
    net = Net(token, gateway=True, registered=registered)
    with trio.fail_after(10):
        await _levels(net, cache, prefer_local=False)
    if kept is None:
        assert not cache.exists()
    else:
        assert json.loads(cache.read_text())["url"] == kept


async def test_a_tunnel_answering_as_someone_else_or_cached_for_someone_else_is_not_used(
    tmp_path: Path, token: str
) -> None:
    cache = _cache(tmp_path / "tunnel.json")
    net = Net(token, tunnel=True, tunnel_user=user_hash("mallory@example.com"))
    tried: list[str] = []
    with trio.fail_after(10):
        found = [
            r
            async for r in routes(
                GATEWAY,
                token,
                ollama_url=None,
                cache_path=cache,
                transport=httpx.MockTransport(net.handler),
                tried=tried,
            )
        ]
    assert found == []
    assert any("does not answer as your desktop" in t for t in tried)
    # a cache written for another user (or gateway) is not even tried
    _cache(cache, token_user=user_hash("bob@example.com"))
    net = Net(token, tunnel=True)
    with trio.fail_after(10):
        assert await _levels(net, cache, prefer_local=False) == []
    assert not any(u.startswith(TUNNEL) for u in net.asked)


def test_route_never_shows_its_token_and_gives_both_client_urls() -> None:
    route = Route("cloud", "https://gw/api/ollama", {"Authorization": "Bearer s3cret.jwt"})
    assert "s3cret" not in repr(route)
    assert "s3cret" not in str(route)
    assert route.openai_base_url == "https://gw/api/ollama/v1"
    assert route.api_key == "s3cret.jwt"
    assert Route("local", "http://127.0.0.1:11434").api_key == "ollama"
    with pytest.raises(ValueError, match="level"):
        Route("ngrok", "https://x")
    with pytest.raises(TypeError):
        route.headers["Authorization"] = "x"  # type: ignore[index]


# --------------------------------------------------------------------------- real servers


@pytest.fixture
async def local_ollama(nursery: trio.Nursery) -> FakeOllama:
    fake: FakeOllama = await nursery.start(serve_fake_ollama, "127.0.0.1", 0)
    return fake


@pytest.fixture
async def desktop_ollama(nursery: trio.Nursery) -> FakeOllama:
    fake: FakeOllama = await nursery.start(serve_fake_ollama, "127.0.0.1", 0)
    return fake


@pytest.fixture
async def tunnel(nursery: trio.Nursery, desktop_ollama: FakeOllama) -> Front:
    front: Front = await nursery.start(serve_front, Front(desktop_ollama.url, SUB))
    return front


@pytest.fixture
async def gateway(nursery: trio.Nursery, desktop_ollama: FakeOllama, tunnel: Front) -> Front:
    registration = {"url": tunnel.url, "provider": "url"}
    front = Front(desktop_ollama.url, SUB, role="gateway", registration=registration)
    started: Front = await nursery.start(serve_front, front)
    return started


async def _chat_tokens(route: Route) -> str:
    """Ask through ``route`` with the official ollama client, as a caller would."""
    import ollama

    client = ollama.AsyncClient(host=route.base_url, headers=dict(route.headers))
    words = []
    async for part in await client.chat(
        model="llama3.2:latest", messages=[{"role": "user", "content": "hi"}], stream=True
    ):
        words.append(part["message"]["content"])
    return "".join(words)


async def test_real_servers_every_level_and_the_clients_work_on_each(
    tmp_path: Path,
    token: str,
    local_ollama: FakeOllama,
    desktop_ollama: FakeOllama,
    tunnel: Front,
    gateway: Front,
) -> None:
    cache = tmp_path / "tunnel.json"
    kw: dict[str, Any] = {"ollama_url": local_ollama.url, "cache_path": cache}
    with trio.fail_after(30):
        # 1: local preferred and up
        route = await resolve(gateway.url, token, prefer_local=True, **kw)
        assert route == Route("local", local_ollama.url)
        assert (await _chat_tokens(route)).startswith("You said: hi")
        # 2: the gateway (which teaches the client its tunnel)
        route = await resolve(gateway.url, token, **kw)
        assert route.level == "cloud" and route.base_url == gateway.url + "/api/ollama"
        assert (await _chat_tokens(route)).startswith("You said: hi")
        assert gateway.chats() and not tunnel.chats()
        assert json.loads(cache.read_text())["url"] == tunnel.url
        # the OpenAI client on the same route
        import openai

        oa = openai.AsyncOpenAI(base_url=route.openai_base_url, api_key=route.api_key)
        models = await oa.models.list()
        assert {m.id for m in models.data} >= {"llama3.2:latest"}
        assert gateway.seen[-1].path == "/api/ollama/v1/models"
        assert gateway.seen[-1].authorization == f"Bearer {token}"
        await oa.close()
        # 3: the gateway is unreachable: the tunnel, with the user's own token
        dead = f"http://127.0.0.1:{free_port()}"
        cache.write_text(json.dumps({"gateway": dead, "user": user_hash(SUB), "url": tunnel.url}))
        route = await resolve(dead, token, **kw)
        assert route.level == "direct" and route.base_url == tunnel.url
        assert (await _chat_tokens(route)).startswith("You said: hi")
        assert tunnel.chats()[-1].authorization == f"Bearer {token}"
        assert len(local_ollama.requests) == 2  # /api/version, then the chat of level 1
        # 4: the tunnel does not admit this token's user: the local Ollama, last resort
        tunnel.sub = "someone-else"
        route = await resolve(dead, token, **kw)
        assert route == Route("local", local_ollama.url)
        # nothing at all
        with pytest.raises(RouteError, match="no route to your model answers"):
            await resolve(dead, token, ollama_url=dead, cache_path=cache)


def test_resolve_sync_against_a_real_local_ollama_and_a_dead_gateway(
    tmp_path: Path, token: str
) -> None:
    # resolve_sync runs its own loop: the fake Ollama serves from another thread
    ready = threading.Event()
    box: dict[str, Any] = {}
    stop = trio.Event()

    async def server() -> None:
        async with trio.open_nursery() as nursery:
            fake: FakeOllama = await nursery.start(serve_fake_ollama, "127.0.0.1", 0)
            box["url"] = fake.url
            box["token"] = trio.lowlevel.current_trio_token()
            ready.set()
            await stop.wait()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(server,))
    thread.start()
    try:
        assert ready.wait(10)
        dead = f"http://127.0.0.1:{free_port()}"
        route = resolve_sync(dead, token, ollama_url=box["url"], cache_path=tmp_path / "t.json")
        assert route == Route("local", box["url"])
        with pytest.raises(RouteError, match=f"gateway {dead}"):
            resolve_sync(dead, token, ollama_url=dead, cache_path=tmp_path / "t.json")
    finally:
        trio.from_thread.run_sync(stop.set, trio_token=box.get("token"))
        thread.join(10)
