"""Limits on every input, each answered with its documented error, none disturbing others.

Each test runs a well-behaved user (a real desktop agent, the fake Ollama and a WebSocket
client that keeps streaming and checking chats) next to the abuse, and asserts that every
one of that user's chats came back unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket

import wire
from desktop import AgentConfig, StaticToken, serve_agent
from desktop._agent import BadPath, ollama_url
from desktop.testing import serve_fake_ollama
from gateway import DevIssuer, RunningGateway
from gateway._state import MAX_BODY_BYTES, MAX_HEADER_BYTES, MAX_REQUEST_HEADERS

from ._hostile import authed_stream, good_user_alongside, open_gateway, recv, ws_url


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with open_gateway(tmp_path, max_sessions=4) as running:
        yield running


@pytest.fixture
def issuer(tmp_path: Path) -> DevIssuer:
    return DevIssuer.load_or_create(tmp_path / "key.pem")


@pytest.fixture
async def http(gw: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gw.url, timeout=15) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_oversized_frame_closes_1009(gw: RunningGateway, issuer: DevIssuer) -> None:
    with trio.fail_after(40):
        async with good_user_alongside(gw, issuer):
            for side in ("stream", "bridge"):
                async with (
                    authed_stream(gw, issuer.sign(f"big-{side}"))
                    if side == "stream"
                    else (
                        trio_websocket.open_websocket_url(
                            ws_url(gw, side),
                            extra_headers=[
                                (b"authorization", f"Bearer {issuer.sign('big')}".encode())
                            ],
                        )
                    ) as conn
                ):
                    if side == "bridge":
                        assert isinstance(await recv(conn, 15), wire.AuthOk)
                    frame = '{"type":"ping","timestamp":1,"pad":"' + "x" * wire.MAX_FRAME_BYTES
                    await conn.send_message(frame + '"}')
                    with pytest.raises(trio_websocket.ConnectionClosed) as info:
                        await recv(conn)
                    assert info.value.reason.code == wire.CLOSE_TOO_BIG, side
            # an unauthenticated client cannot send a huge frame either
            async with trio_websocket.open_websocket_url(ws_url(gw, "stream")) as conn:
                await conn.send_message("x" * (wire.MAX_FRAME_BYTES + 10))
                with pytest.raises(trio_websocket.ConnectionClosed) as info:
                    await recv(conn)
                assert info.value.reason.code == wire.CLOSE_TOO_BIG


async def test_the_frame_limit_counts_bytes_not_characters(
    gw: RunningGateway, issuer: DevIssuer
) -> None:
    # Under the limit in characters, over it in UTF-8 bytes (two bytes each): Hypercorn
    # counts characters, the contract counts bytes.
    text = "\u00e9" * (wire.MAX_FRAME_BYTES // 2 + 64)
    assert len(text) < wire.MAX_FRAME_BYTES < len(text.encode())
    with trio.fail_after(40):
        async with trio_websocket.open_websocket_url(ws_url(gw, "stream")) as conn:
            await conn.send_message(text)  # as the first (unauthenticated) frame
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await recv(conn)
            assert info.value.reason.code == wire.CLOSE_TOO_BIG
        async with authed_stream(gw, issuer.sign("utf8")) as conn:
            await conn.send_message('{"type":"ping","timestamp":1,"pad":"' + text + '"}')
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await recv(conn)
            assert info.value.reason.code == wire.CLOSE_TOO_BIG


async def test_oversized_http_bodies_are_413(gw: RunningGateway, issuer: DevIssuer) -> None:
    token = issuer.sign("bulky")
    port = int(gw.url.rsplit(":", 1)[1])
    big = b"x" * (MAX_BODY_BYTES + 1)
    piece = b"x" * 65536
    chunked = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") * (MAX_BODY_BYTES // 65536 + 2)
    with trio.fail_after(40):
        async with good_user_alongside(gw, issuer):
            for path in ("/api/ollama/api/chat", "/api/streaming/create"):
                for framing, body in (
                    (f"Content-Length: {len(big)}", big),
                    ("Transfer-Encoding: chunked", chunked + b"0\r\n\r\n"),
                ):
                    if "chunked" in framing and "ollama" not in path:
                        continue  # create reads no body; only a declared length is checked
                    head = (
                        f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n"
                        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
                    ).encode()
                    answer = await trio.to_thread.run_sync(_raw_http, port, head + body)
                    status = answer.split(b" ", 2)[1]
                    assert status == b"413", (path, framing, answer[:300])
                    assert b'"too_large"' in answer, answer[:300]


async def test_too_many_requests_in_flight_on_one_session(
    gw: RunningGateway, issuer: DevIssuer
) -> None:
    token = issuer.sign("greedy")
    limit = wire.MAX_INFLIGHT_PER_SESSION
    with trio.fail_after(40):
        async with good_user_alongside(gw, issuer):
            # a desktop that takes requests and never answers
            async with trio_websocket.open_websocket_url(
                ws_url(gw, "bridge"), extra_headers=[(b"authorization", f"Bearer {token}".encode())]
            ) as desktop:
                assert isinstance(await recv(desktop, 15), wire.AuthOk)
                async with trio.open_nursery() as nursery:

                    async def drain() -> None:
                        while True:
                            await desktop.get_message()

                    nursery.start_soon(drain)
                    async with authed_stream(gw, token) as a, authed_stream(gw, token) as b:
                        # two connections of one user share the session's budget
                        for n in range(limit):
                            conn = a if n % 2 else b
                            req = wire.Request(f"q{n}", "POST", "/api/chat", {}, {"model": "m"})
                            await conn.send_message(wire.encode(req))
                        # let the proxy take them all in
                        await a.send_message(wire.encode(wire.Ping(1)))
                        assert await recv(a) == wire.Pong(1)
                        await b.send_message(wire.encode(wire.Ping(2)))
                        assert await recv(b) == wire.Pong(2)
                        await a.send_message(wire.encode(wire.Request("over", "GET", "/api/tags")))
                        err = await recv(a)
                        assert isinstance(err, wire.Error)
                        assert err.code == wire.ErrorCode.TOO_MANY_REQUESTS
                        assert err.id == "over"
                        # the connection stays up and a cancel frees a slot
                        await a.send_message(wire.encode(wire.Cancel("q1")))
                        await a.send_message(wire.encode(wire.Request("ok", "GET", "/api/tags")))
                        await a.send_message(wire.encode(wire.Ping(3)))
                        assert await recv(a) == wire.Pong(3)
                    nursery.cancel_scope.cancel()


async def test_too_many_sessions_is_429_with_retry_after(
    gw: RunningGateway, issuer: DevIssuer, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(40):
        async with good_user_alongside(gw, issuer):  # the good user holds one of 4
            for n in range(3):
                r = await http.post("/api/streaming/create", headers=bearer(issuer.sign(f"u{n}")))
                assert r.status_code == 200, r.text
            r = await http.post("/api/streaming/create", headers=bearer(issuer.sign("u-late")))
            assert r.status_code == 429
            assert r.json()["error"] == "too_many_sessions"
            assert int(r.headers["Retry-After"]) >= 1
            # a WebSocket that would need a new session is told so and closed (try again)
            async with trio_websocket.open_websocket_url(ws_url(gw, "stream")) as conn:
                await conn.send_message(wire.encode(wire.Auth(issuer.sign("u-late"))))
                err = await recv(conn, 15)
                assert isinstance(err, wire.Error)
                assert err.code == "too_many_sessions"
                with pytest.raises(trio_websocket.ConnectionClosed) as info:
                    await recv(conn)
                assert info.value.reason.code == wire.CLOSE_TRY_AGAIN
            # users who have a session keep it
            r = await http.post("/api/streaming/create", headers=bearer(issuer.sign("u0")))
            assert r.status_code == 200


async def test_session_creation_rate_per_user_is_429(
    gw: RunningGateway, issuer: DevIssuer, http: httpx.AsyncClient
) -> None:
    gw.gateway.session_create_burst = 3
    token = bearer(issuer.sign("churner"))
    with trio.fail_after(40):
        async with good_user_alongside(gw, issuer):
            for _ in range(3):
                r = await http.post("/api/streaming/create", headers=token)
                assert r.status_code == 200, r.text
                # asking again for the live session is free
                r2 = await http.post("/api/streaming/create", headers=token)
                assert r2.json()["sessionId"] == r.json()["sessionId"]
                sid = r.json()["sessionId"]
                assert (
                    await http.delete(f"/api/streaming/{sid}", headers=token)
                ).status_code == 204
            r = await http.post("/api/streaming/create", headers=token)
            assert r.status_code == 429
            assert r.json()["error"] == "rate_limited"
            assert int(r.headers["Retry-After"]) >= 1
            # another user is not affected
            r = await http.post("/api/streaming/create", headers=bearer(issuer.sign("calm")))
            assert r.status_code == 200


def _raw_http(port: int, request: bytes) -> bytes:
    """Send ``request`` (the server may answer and close early) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with contextlib.suppress(OSError):  # the server may answer early and close
            s.sendall(request)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
                head, sep, rest = data.partition(b"\r\n\r\n")
                if sep and (b"content-length: " + str(len(rest)).encode()) in head.lower():
                    break
        except OSError:
            pass
        return data


async def test_header_count_and_size_limits(
    gw: RunningGateway, issuer: DevIssuer, http: httpx.AsyncClient
) -> None:
    token = issuer.sign("headers")
    many = [(f"x-h{n}", "v") for n in range(MAX_REQUEST_HEADERS + 1)]
    long = [("x-long", "v" * (MAX_HEADER_BYTES + 1))]
    port = int(gw.url.rsplit(":", 1)[1])
    with trio.fail_after(40):
        async with good_user_alongside(gw, issuer):
            for extra in (many, long):
                headers = httpx.Headers([("authorization", f"Bearer {token}"), *extra])
                r = await http.get("/api/streaming/status", headers=headers)
                assert r.status_code == 431, r.text
                assert r.json()["error"] == "headers_too_large"
                with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
                    async with trio_websocket.open_websocket_url(
                        ws_url(gw, "stream"),
                        extra_headers=[(k.encode(), v.encode()) for k, v in extra],
                    ):
                        pass
                assert rejected.value.status_code == 431
            # a head bigger than the server takes at all is refused before parsing
            huge = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
            answer = await trio.to_thread.run_sync(_raw_http, port, huge)
            assert answer.split(b" ", 2)[1] in (b"400", b"431"), answer[:100]
            # on the wire: a request message with too many or too long headers
            async with authed_stream(gw, token) as conn:
                for hdrs in (
                    {f"h{n}": "v" for n in range(wire.MAX_HEADERS + 1)},
                    {"h": "v" * wire.MAX_HEADER_BYTES},
                ):
                    req = wire.to_dict(wire.Request("hx", "GET", "/api/tags"))
                    req["headers"] = hdrs
                    await conn.send_message(json.dumps(req))
                    err = await recv(conn)
                    assert isinstance(err, wire.Error)
                    assert err.code == wire.ErrorCode.TOO_LARGE
                    assert err.id == "hx"
            # the gateway still serves normally
            r = await http.get("/api/streaming/status", headers=bearer(token))
            assert r.status_code == 200


BAD_PATHS = [
    "http://169.254.169.254/latest/meta-data",
    "//evil.example/api/chat",
    "/api/../../etc/passwd",
    "/api/%2e%2e/%2e%2e/admin",
    "/api/%252e%252e/x",
    "/v1/./models",
    "/api\\..\\x",
    "/api/tags%0d%0aX-Injected:%201",
    "/admin",
    "/_fake/stats",
    "/",
    "/apix/tags",
    "/api/tags#frag",
    "/@evil.example/api/tags",
]


async def test_agent_sends_only_ollama_api_paths_to_its_own_ollama(
    gw: RunningGateway, issuer: DevIssuer
) -> None:
    token = issuer.sign("pathfinder")
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            fake = await nursery.start(functools.partial(serve_fake_ollama, "127.0.0.1", 0))
            config = AgentConfig(
                gateway_url=gw.url,
                token=StaticToken(token),
                ollama_url=fake.url,
                probe_ollama=False,
            )
            agent = await nursery.start(functools.partial(serve_agent, config, status=str))
            await agent.wait_until(lambda a: a.state == "connected")
            async with authed_stream(gw, token) as conn:
                for n, path in enumerate(BAD_PATHS):
                    req = {"type": "request", "id": f"b{n}", "method": "GET", "path": path}
                    await conn.send_message(json.dumps(req))
                    err = await recv(conn)
                    assert isinstance(err, wire.Error), (path, err)
                    assert err.code in (wire.ErrorCode.BAD_PATH, wire.ErrorCode.BAD_MESSAGE), path
                    assert err.id == f"b{n}"
                assert fake.requests == [], [r.path for r in fake.requests]
                # a good request goes through, without the client's credentials
                secret_headers = {
                    "Authorization": "Bearer client-secret-token",
                    "Cookie": "session=client-cookie",
                    "Host": "evil.example",
                    "X-Trace": "kept",
                }
                await conn.send_message(
                    wire.encode(wire.Request("ok", "GET", "/api/tags?x=1", secret_headers))
                )
                start = await recv(conn)
                assert isinstance(start, wire.ResponseStart) and start.status == 200, start
            [seen] = fake.requests
            assert seen.path == "/api/tags"
            assert seen.headers["host"] == "localhost"
            assert seen.headers.get("x-trace") == "kept"
            assert "authorization" not in seen.headers
            assert "cookie" not in seen.headers
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("path", BAD_PATHS)
def test_safe_path_refuses(path: str) -> None:
    with pytest.raises(BadPath):
        ollama_url("http://127.0.0.1:11434", path)


@pytest.mark.parametrize("path", ["/api/chat", "/api/tags?x=1", "/v1/chat/completions"])
def test_safe_path_accepts(path: str) -> None:
    assert ollama_url("http://127.0.0.1:11434", path) == "http://127.0.0.1:11434" + path
