"""The desktop's direct endpoint (DESIGN.md section 5) against the fake Ollama.

Tokens are signed with real RS256 keys whose JWKS a stand-in gateway serves
(tests/_direct_gateway.py); the endpoint learns them through ``/api/config/auth`` as it does
from the real gateway.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from c2lcore import user_hash
from desktop._direct import INSTANCE_HEADER, DirectAuth, DirectEndpoint, serve_direct
from desktop.testing import FakeOllama, serve_fake_ollama

from ._direct_gateway import (
    IDP_KEY,
    STRANGER_KEY,
    FakeGateway,
    direct_token,
    idp_token,
    serve_fake_gateway,
)

ALICE = "auth0|alice"
CHAT = {
    "model": "llama3.2",
    "messages": [{"role": "user", "content": "hello there"}],
    "options": {"num_predict": 20},
}


@pytest.fixture
async def ollama(nursery: trio.Nursery) -> FakeOllama:
    fake: FakeOllama = await nursery.start(serve_fake_ollama, "127.0.0.1", 0)
    fake.delay = 0.02
    return fake


@pytest.fixture
async def gateway(nursery: trio.Nursery) -> FakeGateway:
    gw: FakeGateway = await nursery.start(serve_fake_gateway)
    return gw


@attrs.define
class Direct:
    endpoint: DirectEndpoint
    client: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.endpoint.url


async def start_direct(
    nursery: trio.Nursery, gateway: FakeGateway, ollama: FakeOllama, cache: Path
) -> Direct:
    client = httpx.AsyncClient(timeout=httpx.Timeout(10, read=None), trust_env=False)

    async def own_token() -> str:
        return idp_token(ALICE)

    auth = DirectAuth(gateway.url, own_token, client, cache_path=cache)
    endpoint = DirectEndpoint(auth, ollama.url, client)
    await nursery.start(serve_direct, endpoint, 0)
    return Direct(endpoint, client)


@pytest.fixture
async def direct(
    nursery: trio.Nursery, gateway: FakeGateway, ollama: FakeOllama, tmp_path: Path
) -> Direct:
    return await start_direct(nursery, gateway, ollama, tmp_path / "direct-auth.json")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_minted_token_streams_line_by_line_with_host_localhost(
    direct: Direct, ollama: FakeOllama
) -> None:
    with trio.fail_after(10):
        async with (
            httpx.AsyncClient(trust_env=False) as c,
            c.stream(
                "POST",
                f"{direct.url}/api/chat",
                json=CHAT,
                headers=bearer(direct_token(ALICE)) | {"X-Forwarded-For": "1.2.3.4"},
            ) as resp,
        ):
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "application/x-ndjson"
            lines = resp.aiter_lines()
            first = json.loads(await lines.__anext__())
            # The first line is here while Ollama is still generating (20 x 20 ms).
            assert first["done"] is False
            assert ollama.completed == 0
            rest = [json.loads(line) async for line in lines if line]
    assert rest[-1]["done"] is True
    assert len(rest) == 20  # 19 more tokens and the final line
    assert ollama.completed == 1
    (seen,) = ollama.requests
    assert seen.path == "/api/chat"
    assert seen.headers["host"] == "localhost"
    assert "authorization" not in seen.headers
    assert "x-forwarded-for" not in seen.headers


async def test_the_users_identity_provider_token_is_admitted_too(
    direct: Direct, ollama: FakeOllama
) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as c:
            resp = await c.get(f"{direct.url}/api/tags?x=1", headers=bearer(idp_token(ALICE)))
    assert resp.status_code == 200
    assert resp.json()["models"][0]["name"] == "llama3.2:latest"
    assert [(r.path, r.query) for r in ollama.requests] == [("/api/tags", "x=1")]


async def test_a_caller_that_goes_away_mid_stream_aborts_the_ollama_request(
    direct: Direct, ollama: FakeOllama
) -> None:
    with trio.fail_after(10):
        async with (
            httpx.AsyncClient(trust_env=False) as c,
            c.stream(
                "POST", f"{direct.url}/api/chat", json=CHAT, headers=bearer(direct_token(ALICE))
            ) as resp,
        ):
            assert resp.status_code == 200
            await resp.aiter_lines().__anext__()
        # The client closed its connection after one line: Ollama's generation stops.
        await ollama.wait_until(lambda f: bool(f.cancelled))
    (cancelled,) = ollama.cancelled
    assert cancelled.path == "/api/chat"
    assert cancelled.tokens_sent < 20
    assert ollama.completed == 0


def _expired() -> str:
    return direct_token(ALICE, ttl=-60)


async def raw_request(
    port: int, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], str]:
    """POST ``path`` exactly as given; the status, headers and body of the answer."""
    body = json.dumps(CHAT).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head.encode() + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    answer = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), answer, rest.decode()


REFUSED: list[tuple[str, str, Any, int, str]] = [
    ("no token", "/api/tags", None, 401, "missing_token"),
    ("not a bearer", "/api/tags", lambda: "Basic YWxpY2U6eA==", 401, "missing_token"),
    ("garbage", "/api/tags", lambda: "Bearer not.a.jwt", 401, "malformed_token"),
    ("another user", "/api/tags", lambda: f"Bearer {direct_token('auth0|bob')}", 403, "forbidden"),
    (
        "another user, idp token",
        "/api/tags",
        lambda: f"Bearer {idp_token('auth0|bob')}",
        403,
        "forbidden",
    ),
    (
        "another audience",
        "/api/tags",
        lambda: f"Bearer {direct_token(ALICE, aud='c2l')}",
        401,
        "wrong_audience",
    ),
    (
        "idp-signed token claiming the direct issuer",
        "/api/tags",
        lambda: f"Bearer {direct_token(ALICE, key=IDP_KEY)}",
        401,
        "unknown_kid",
    ),
    ("expired", "/api/tags", lambda: f"Bearer {_expired()}", 401, "token_expired"),
    (
        "unknown key, known kid",
        "/api/tags",
        lambda: f"Bearer {direct_token(ALICE, key=STRANGER_KEY)}",
        401,
        "bad_signature",
    ),
    ("bad path", "/api/../admin", lambda: f"Bearer {direct_token(ALICE)}", 400, "bad_path"),
    ("encoded dots", "/api/%2e%2e/x", lambda: f"Bearer {direct_token(ALICE)}", 400, "bad_path"),
    ("other path", "/metrics", lambda: f"Bearer {direct_token(ALICE)}", 404, "not_found"),
    ("no token, bad path", "/api/../x", None, 401, "missing_token"),
]


@pytest.mark.parametrize(
    ("case", "path", "auth", "status", "code"), REFUSED, ids=[r[0] for r in REFUSED]
)
async def test_refused_requests_reach_nothing(
    direct: Direct,
    ollama: FakeOllama,
    case: str,
    path: str,
    auth: Any,
    status: int,
    code: str,
) -> None:
    value = auth() if auth is not None else None
    headers = {"Authorization": value} if value is not None else {}
    with trio.fail_after(10):
        # raw bytes: an HTTP client would normalise the dots away
        got_status, got_headers, body = await raw_request(direct.endpoint.port, path, headers)
    assert got_status == status, body
    assert json.loads(body)["error"] == code
    assert got_headers[INSTANCE_HEADER] == direct.endpoint.instance
    if value is not None:
        assert value.split()[-1] not in body  # never echoed
    assert ollama.requests == []
    assert direct.endpoint.forwarded == 0


async def test_health_says_401_with_the_instance_to_strangers_and_ok_to_the_user(
    direct: Direct, ollama: FakeOllama
) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as c:
            anon = await c.get(f"{direct.url}/c2l/health")
            mine = await c.get(f"{direct.url}/c2l/health", headers=bearer(direct_token(ALICE)))
            theirs = await c.get(
                f"{direct.url}/c2l/health", headers=bearer(direct_token("auth0|bob"))
            )
    assert anon.status_code == 401
    assert anon.headers[INSTANCE_HEADER] == direct.endpoint.instance
    assert theirs.status_code == 403
    assert mine.status_code == 200
    assert mine.json() == {
        "status": "ok",
        "user": user_hash(ALICE),
        "instance": direct.endpoint.instance,
        "ollama": True,
    }
    assert [r.path for r in ollama.requests] == ["/api/version"]


async def test_keys_are_cached_0600_and_used_while_the_gateway_is_down(
    nursery: trio.Nursery, gateway: FakeGateway, ollama: FakeOllama, tmp_path: Path
) -> None:
    cache = tmp_path / "c2l" / "direct-auth.json"
    first = await start_direct(nursery, gateway, ollama, cache)
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as c:
            ok = await c.get(f"{first.url}/api/tags", headers=bearer(direct_token(ALICE)))
            assert ok.status_code == 200
            assert os.stat(cache).st_mode & 0o777 == 0o600
            assert "BEGIN" not in cache.read_text()  # public keys only
            fetched = gateway.count("GET", "/api/config/auth")
            assert fetched == 1
            # Another agent run while the gateway is down: the cache admits the user.
            gateway.up = False
            second = await start_direct(nursery, gateway, ollama, cache)
            again = await c.get(f"{second.url}/api/tags", headers=bearer(idp_token(ALICE)))
            assert again.status_code == 200
            refused = await c.get(f"{second.url}/api/tags", headers=bearer(idp_token("x|bob")))
            assert refused.status_code == 403
            # Without a cache, nothing is admitted.
            third = await start_direct(nursery, gateway, ollama, tmp_path / "none.json")
            none = await c.get(f"{third.url}/api/tags", headers=bearer(idp_token(ALICE)))
            assert none.status_code == 401
            assert none.json()["error"] == "unknown_kid"
    assert [r.path for r in ollama.requests] == ["/api/tags", "/api/tags"]


async def test_ollama_down_is_a_502_with_a_clear_message(
    nursery: trio.Nursery, gateway: FakeGateway, tmp_path: Path
) -> None:
    client = httpx.AsyncClient(trust_env=False)

    async def own_token() -> str:
        return idp_token(ALICE)

    auth = DirectAuth(gateway.url, own_token, client, cache_path=tmp_path / "a.json")
    endpoint = DirectEndpoint(auth, "http://127.0.0.1:9", client)
    await nursery.start(serve_direct, endpoint, 0)
    with trio.fail_after(10):
        async with httpx.AsyncClient(trust_env=False) as c:
            resp = await c.get(f"{endpoint.url}/api/tags", headers=bearer(direct_token(ALICE)))
    assert resp.status_code == 502
    assert resp.json()["error"] == "ollama_unavailable"
    assert "127.0.0.1:9" in resp.json()["message"]
