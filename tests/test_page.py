"""The web page's HTTP side on the in-memory runtime: page, CSP, dev tokens, desktop status.

The page itself is driven in a real browser by ``test_web_page.py``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket

import wire
from c2lcore import Config
from gateway import RunningGateway, serve_gateway
from gateway._auth import DevIssuer
from orchestrator.testing import open_fake_runtime


async def _serve(nursery: trio.Nursery, config: Config) -> AsyncIterator[httpx.AsyncClient]:
    async with open_fake_runtime(run_proxies=True) as runtime:
        gw: RunningGateway = await nursery.start(
            functools.partial(serve_gateway, config, runtime=runtime)
        )
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
            yield http
        nursery.cancel_scope.cancel()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(port=0, dev_key_path=tmp_path / "key.pem", podman_url="unix:///nonexistent")


@pytest.fixture
async def http(nursery: trio.Nursery, config: Config) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _serve(nursery, config):
        yield client


async def test_page_is_self_contained_with_a_strict_csp(http: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        r = await http.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    # no external assets: no src=/href= pointing anywhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", r.text)
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self' 'sha256-" in csp
    assert "unsafe-inline" not in csp
    assert "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
    assert 'const DEV_MODE = "true" === "true"' in r.text
    # the two libraries come from the gateway itself, pinned by their SRI hashes, with
    # their licences beside them
    scripts = re.findall(r'<script src="([^"]+)" integrity="(sha384-[^"]+)"></script>', r.text)
    assert [src for src, _ in scripts] == [
        "/static/vendor/marked.min.js",
        "/static/vendor/purify.min.js",
    ]
    for src, integrity in scripts:
        lib = await http.get(src)
        assert lib.status_code == 200
        assert lib.headers["content-type"].startswith("text/javascript")
        assert lib.headers["x-content-type-options"] == "nosniff"
        digest = base64.b64encode(hashlib.sha384(lib.content).digest()).decode()
        assert integrity == f"sha384-{digest}"
    for licence in ("marked.LICENSE.md", "dompurify.LICENSE"):
        r = await http.get(f"/static/vendor/{licence}")
        assert r.status_code == 200 and "Copyright" in r.text
    for bad in ("../_page.py", "index.html", "x.js", "%2e%2e/_app.py"):
        assert (await http.get(f"/static/vendor/{bad}")).status_code == 404


async def test_dev_token_endpoint(http: httpx.AsyncClient, config: Config) -> None:
    with trio.fail_after(10):
        r = await http.post("/api/dev/token", json={"sub": "alice"})
        assert r.status_code == 200
        token = r.json()["token"]
        assert r.headers["cache-control"] == "no-store"
        me = await http.post("/api/streaming/create", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200
        for bad in ({"sub": ""}, {"sub": "a b"}, {"sub": 5}, {}, ["alice"]):
            r = await http.post("/api/dev/token", json=bad)
            assert r.status_code == 400, bad
            assert set(r.json()) == {"error", "message"}
        r = await http.post("/api/dev/token", content=b"{nope")
        assert r.status_code == 400


async def test_no_dev_token_endpoint_in_jwks_mode(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = Config(
        port=0,
        dev_key_path=tmp_path / "key.pem",
        podman_url="unix:///nonexistent",
        auth_mode="jwks",
        jwks_url="http://127.0.0.1:9/jwks.json",
        jwt_issuer="https://issuer.example/",
        jwt_audience="c2l",
    )
    with trio.fail_after(10):
        async for http in _serve(nursery, config):
            r = await http.post("/api/dev/token", json={"sub": "alice"})
            assert r.status_code == 404
            page = await http.get("/")
            assert 'const DEV_MODE = "false" === "true"' in page.text
            # What a desktop agent learns to admit the user's own token at its direct
            # endpoint (DESIGN.md section 5): the identity provider's, not the dev issuer's.
            cfg = (await http.get("/api/config/auth")).json()
            assert (cfg["mode"], cfg["issuer"], cfg["audience"], cfg["jwksUrl"]) == (
                "jwks",
                "https://issuer.example/",
                "c2l",
                "http://127.0.0.1:9/jwks.json",
            )
            assert cfg["direct"]["audience"] == "c2l-direct"


async def test_desktop_status_follows_the_agent(http: httpx.AsyncClient, config: Config) -> None:
    token = DevIssuer.load_or_create(config.dev_key_path).sign("dana")
    auth = {"Authorization": f"Bearer {token}"}
    with trio.fail_after(15):
        assert (await http.get("/api/streaming/desktop")).status_code == 401
        r = await http.get("/api/streaming/desktop", headers=auth)
        assert r.json() == {
            "sessionId": None,
            "state": None,
            "desktop": "unknown",
            "bridge": False,
            "tunnel": None,
            "desktops": [],
        }
        created = (await http.post("/api/streaming/create", headers=auth)).json()
        r = await http.get("/api/streaming/desktop", headers=auth)
        assert r.json()["desktop"] == "disconnected"
        assert r.json()["bridge"] is False
        assert r.json()["sessionId"] == created["sessionId"]
        url = str(http.base_url).replace("http://", "ws://").rstrip("/") + "/ws/bridge"
        async with trio_websocket.open_websocket_url(
            url, extra_headers=[(b"authorization", f"Bearer {token}".encode())]
        ) as desktop:
            assert isinstance(wire.decode(await desktop.get_message()), wire.AuthOk)
            while (await http.get("/api/streaming/desktop", headers=auth)).json()[
                "desktop"
            ] != "connected":
                await trio.sleep(0.05)
            assert (await http.get("/api/streaming/desktop", headers=auth)).json()["bridge"] is True
        while (await http.get("/api/streaming/desktop", headers=auth)).json()[
            "desktop"
        ] != "disconnected":
            await trio.sleep(0.05)
