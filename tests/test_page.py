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
from c2lcore import Config, ConfigError
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


def _jwks_config(tmp_path: Path, **extra: str) -> Config:
    return Config(
        port=0,
        dev_key_path=tmp_path / "key.pem",
        podman_url="unix:///nonexistent",
        auth_mode="jwks",
        jwks_url="http://127.0.0.1:9/jwks.json",
        jwt_issuer="https://issuer.example:8443/tenant/",
        jwt_audience="https://api.c2l.example",
        **extra,
    )


def _connect_src(r: httpx.Response) -> list[str]:
    for directive in r.headers["content-security-policy"].split(";"):
        name, *sources = directive.split()
        if name == "connect-src":
            return sources
    raise AssertionError("no connect-src")


async def test_oidc_client_id_reaches_the_page_and_its_csp(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # jwks mode with C2L_OIDC_CLIENT_ID: the page learns the client id (with the issuer and
    # the API audience) and may connect to the issuer's origin, and to no other.
    config = _jwks_config(tmp_path, oidc_client_id="page-client_1")
    with trio.fail_after(10):
        async for http in _serve(nursery, config):
            cfg = (await http.get("/api/config/auth")).json()
            assert cfg["oidcClientId"] == "page-client_1"
            assert cfg["issuer"] == "https://issuer.example:8443/tenant/"
            assert cfg["audience"] == "https://api.c2l.example"
            page = await http.get("/")
            host = str(http.base_url.netloc.decode())
            assert _connect_src(page) == [
                "'self'",
                f"ws://{host}",
                f"wss://{host}",
                "https://issuer.example:8443",
            ]
            assert 'id="oidc-btn"' in page.text


async def test_no_oidc_origin_without_a_client_id(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(10):
        async for http in _serve(nursery, _jwks_config(tmp_path)):
            assert (await http.get("/api/config/auth")).json()["oidcClientId"] is None
            assert "issuer.example" not in (await http.get("/")).headers["content-security-policy"]


async def test_oidc_client_id_means_nothing_in_dev_mode(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = Config(
        port=0,
        dev_key_path=tmp_path / "key.pem",
        podman_url="unix:///nonexistent",
        oidc_client_id="page-client",
    )
    assert config.oidc_warning is not None and "C2L_AUTH_MODE=jwks" in config.oidc_warning
    with trio.fail_after(10):
        async for http in _serve(nursery, config):
            assert (await http.get("/api/config/auth")).json()["oidcClientId"] is None
            page = await http.get("/")
            assert len(_connect_src(page)) == 3


def test_oidc_client_id_from_the_environment(tmp_path: Path) -> None:
    env = {
        "C2L_AUTH_MODE": "jwks",
        "C2L_JWKS_URL": "https://idp.example/.well-known/jwks.json",
        "C2L_JWT_ISSUER": "https://idp.example/",
        "C2L_JWT_AUDIENCE": "c2l",
        "C2L_OIDC_CLIENT_ID": "AbC123",
    }
    config = Config.from_env(env)
    assert config.oidc_client_id_for_page == "AbC123"
    assert config.oidc_warning is None
    assert Config.from_env(env, oidc_client_id="flag").oidc_client_id == "flag"
    for bad in ("has space", "x" * 257, "tab\there"):
        with pytest.raises(ConfigError, match="C2L_OIDC_CLIENT_ID"):
            Config.from_env({**env, "C2L_OIDC_CLIENT_ID": bad})
