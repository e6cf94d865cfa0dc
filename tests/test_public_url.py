"""``C2L_PUBLIC_URL``: the URL clients use; endpoints and redirects never come from ``Host``."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from c2lcore import Config, ConfigError
from gateway import DevIssuer

from ._hostile import open_gateway

EVIL = "evil.example:666"


def test_public_url_setting() -> None:
    assert Config().public_url is None
    for given, kept in (
        ("https://c2l.example.com", "https://c2l.example.com"),
        ("https://c2l.example.com/", "https://c2l.example.com"),
        ("http://10.0.0.5:8080", "http://10.0.0.5:8080"),
        ("https://[2001:db8::1]:8443/", "https://[2001:db8::1]:8443"),
    ):
        assert Config.from_env({"C2L_PUBLIC_URL": given}).public_url == kept
        assert Config.from_env({}, public_url=given).public_url == kept
    for bad in (
        "c2l.example.com",
        "ftp://c2l.example.com",
        "https://",
        "https://c2l.example.com/c2l",
        "https://c2l.example.com?x=1",
        "https://c2l.example.com#top",
        "https://user:pw@c2l.example.com",
        "wss://c2l.example.com",
    ):
        with pytest.raises(ConfigError, match="C2L_PUBLIC_URL"):
            Config.from_env({"C2L_PUBLIC_URL": bad})


@pytest.mark.parametrize(
    ("public", "ws_base"),
    [("https://c2l.example.com", "wss://c2l.example.com"), ("http://gw.lan:81", "ws://gw.lan:81")],
)
async def test_endpoints_csp_and_redirects_come_from_the_public_url(
    tmp_path: Path, public: str, ws_base: str
) -> None:
    token = DevIssuer.load_or_create(tmp_path / "key.pem").sign("alice")
    auth = {"Authorization": f"Bearer {token}", "Host": EVIL}
    with trio.fail_after(20):
        async with (
            open_gateway(tmp_path, metrics_addr="127.0.0.1:0", public_url=public) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=10) as http,
        ):
            created = (await http.post("/api/streaming/create", headers=auth)).json()
            status = (await http.get("/api/streaming/status", headers=auth)).json()
            page = await http.get("/", headers={"Host": EVIL})
            moved = await http.get("/api//streaming/status", headers=auth)
    for answer in (created, status):
        assert answer["endpoint"] == f"{ws_base}/ws/stream"
        assert answer["bridgeEndpoint"] == f"{ws_base}/ws/bridge"
    csp = page.headers["content-security-policy"]
    assert ws_base in csp and "evil" not in csp
    assert moved.status_code == 308
    assert moved.headers["location"] == f"{public}/api/streaming/status"


async def test_without_a_public_url_redirects_are_relative(tmp_path: Path) -> None:
    token = DevIssuer.load_or_create(tmp_path / "key.pem").sign("alice")
    auth = {"Authorization": f"Bearer {token}", "Host": EVIL}
    with trio.fail_after(20):
        async with (
            open_gateway(tmp_path, metrics_addr="127.0.0.1:0") as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=10) as http,
        ):
            created = (await http.post("/api/streaming/create", headers=auth)).json()
            moved = await http.get("/api//streaming/status?x=1", headers=auth)
    # the endpoints follow the Host the client used (DESIGN.md: built from the request)...
    assert created["endpoint"] == f"ws://{EVIL}/ws/stream"
    # ...but a redirect never sends a client to another host
    assert moved.status_code == 308
    assert moved.headers["location"] == "/api/streaming/status?x=1"
