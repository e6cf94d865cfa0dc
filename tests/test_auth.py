"""Authentication, Auth0-style: JWKS verification against a real local JWKS HTTP server.

RS256 and ES256 tokens, issuer/audience/exp/nbf/iat with a small leeway, a required
``sub``, the kid cache with one rate-limited refresh (key rotation without a restart),
every rejection case with its 401 code, WebSocket expiry (1008) and re-authentication,
and the admin permission.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import jwt
import pytest
import trio
import trio.testing
import trio_websocket
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import wire
from c2lcore import Config
from gateway import JwksAuthenticator, RunningGateway, serve_gateway
from gateway._auth import DEV_AUDIENCE, DEV_ISSUER, LEEWAY_S, AuthError
from gateway._auth import DevIssuer as DevIssuer
from orchestrator.testing import FakeRuntime, open_fake_runtime

ISSUER = "https://issuer.example/"
AUDIENCE = "https://c2l.example/api"


@attrs.define
class Key:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        algo = jwt.algorithms.RSAAlgorithm if self.alg == "RS256" else jwt.algorithms.ECAlgorithm
        data: dict[str, Any] = json.loads(algo.to_jwk(self.private.public_key()))
        data.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return data

    def sign(self, claims: dict[str, Any] | None = None, **overrides: Any) -> str:
        return jwt.encode(
            {**good_claims(), **(claims or {}), **overrides},
            self.private,
            algorithm=self.alg,
            headers={"kid": self.kid},
        )


def rsa_key(kid: str) -> Key:
    return Key(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str) -> Key:
    return Key(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


def good_claims(sub: str = "auth0|alice", ttl: int = 600) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "nbf": now, "exp": now + ttl}


@attrs.define
class JwksServer:
    """A real HTTP server answering GET /jwks.json with ``keys``; counts the fetches."""

    keys: list[Key]
    url: str = ""
    hits: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        raw = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in raw:
                data = await stream.receive_some(4096)
                if not data:
                    break
                raw += data
        self.hits += 1
        body = json.dumps({"keys": [k.jwk() for k in self.keys]}).encode()
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with trio.move_on_after(5):
            await stream.send_all(head.encode() + body)
            await stream.aclose()


@pytest.fixture
def rs() -> Key:
    return rsa_key("rs-1")


@pytest.fixture
def es() -> Key:
    return ec_key("es-1")


@pytest.fixture
async def jwks(nursery: trio.Nursery, rs: Key, es: Key) -> JwksServer:
    server = JwksServer([rs, es])
    listeners = await nursery.start(functools.partial(trio.serve_tcp, server.handle, 0))
    port = listeners[0].socket.getsockname()[1]
    server.url = f"http://127.0.0.1:{port}/jwks.json"
    return server


@pytest.fixture
async def gw(nursery: trio.Nursery, jwks: JwksServer, tmp_path: Path) -> RunningGateway:
    config = Config(
        port=0,
        auth_mode="jwks",
        jwks_url=jwks.url,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        dev_key_path=tmp_path / "unused.pem",
        podman_url="unix:///nonexistent",
        metrics_addr="127.0.0.1:0",
        # the expiry tests jump the clock by minutes: no heartbeat or idle end meanwhile
        heartbeat_interval=86400,
        idle_timeout=86400,
    )
    fake: FakeRuntime = await nursery.start(_fake_runtime)
    running: RunningGateway = await nursery.start(
        functools.partial(serve_gateway, config, runtime=fake)
    )
    return running


async def _fake_runtime(task_status: trio.TaskStatus[FakeRuntime]) -> None:
    async with open_fake_runtime(run_proxies=True) as fake:
        task_status.started(fake)
        await trio.sleep_forever()


@pytest.fixture
async def http(gw: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with_public_key(key: Key) -> str:
    """Algorithm confusion: an HS256 token whose HMAC secret is the issuer's public key."""
    pem = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    body = _b64(json.dumps(good_claims()).encode())
    sig = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def alg_none(key: Key) -> str:
    head = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": key.kid}).encode())
    return f"{head}.{_b64(json.dumps(good_claims()).encode())}."


async def test_rs256_and_es256_tokens_are_accepted(
    http: httpx.AsyncClient, rs: Key, es: Key
) -> None:
    with trio.fail_after(20):
        for key in (rs, es):
            r = await http.post("/api/streaming/create", headers=bearer(key.sign()))
            assert r.status_code == 200, (key.alg, r.text)
            assert r.json()["state"] == "ready"
        # within the leeway of exp, nbf and iat: still accepted (an exp 1 s past leaves the
        # rest of the leeway for a busy machine between signing and checking)
        now = int(time.time())
        skew = LEEWAY_S // 2
        for claims in ({"exp": now - 1}, {"nbf": now + skew}, {"iat": now + skew}):
            r = await http.get("/api/streaming/status", headers=bearer(rs.sign(claims)))
            assert r.status_code == 200, (claims, r.text)


def _rejections(rs: Key, es: Key) -> list[tuple[str, dict[str, str], str]]:
    now = int(time.time())
    stranger = rsa_key(rs.kid)  # same kid, other key: a forged signature
    claims_without_sub = {k: v for k, v in good_claims().items() if k != "sub"}
    no_sub = jwt.encode(claims_without_sub, rs.private, algorithm="RS256", headers={"kid": rs.kid})
    es_header_on_rsa_kid = jwt.encode(
        good_claims(), es.private, algorithm="ES256", headers={"kid": rs.kid}
    )
    return [
        ("missing token", {}, "missing_token"),
        ("not a bearer", {"Authorization": "Basic YWxpY2U6cHc="}, "missing_token"),
        ("malformed", bearer("not.a.jwt"), "malformed_token"),
        ("garbage", bearer("x" * 50), "malformed_token"),
        ("bad signature", bearer(stranger.sign()), "bad_signature"),
        ("alg none", bearer(alg_none(rs)), "unsupported_algorithm"),
        ("hs256 with public key", bearer(hs256_with_public_key(rs)), "unsupported_algorithm"),
        ("alg of another key type", bearer(es_header_on_rsa_kid), "unsupported_algorithm"),
        ("wrong issuer", bearer(rs.sign(iss="https://evil.example/")), "wrong_issuer"),
        ("wrong audience", bearer(es.sign(aud="https://other.example/")), "wrong_audience"),
        ("expired", bearer(rs.sign(exp=now - LEEWAY_S - 30)), "token_expired"),
        ("not yet valid", bearer(rs.sign(nbf=now + LEEWAY_S + 60)), "token_not_yet_valid"),
        ("issued in the future", bearer(rs.sign(iat=now + LEEWAY_S + 60)), "token_not_yet_valid"),
        ("no sub", bearer(no_sub), "missing_claim"),
        ("empty sub", bearer(rs.sign(sub="")), "missing_claim"),
        ("no exp", bearer(rs.sign({"exp": None})), "missing_claim"),
        ("unknown kid", bearer(rsa_key("no-such-kid").sign()), "unknown_kid"),
    ]


async def test_every_bad_token_is_401_with_its_code(
    http: httpx.AsyncClient, rs: Key, es: Key
) -> None:
    with trio.fail_after(30):
        for name, headers, code in _rejections(rs, es):
            if name == "no exp":
                # jwt.encode keeps a None exp; build the token without the claim instead
                claims = {k: v for k, v in good_claims().items() if k != "exp"}
                token = jwt.encode(claims, rs.private, algorithm="RS256", headers={"kid": rs.kid})
                headers = bearer(token)
            for method, path in (
                ("POST", "/api/streaming/create"),
                ("GET", "/api/streaming/status"),
                ("POST", "/api/ollama/api/chat"),
            ):
                r = await http.request(method, path, headers=headers)
                assert r.status_code == 401, (name, path, r.text)
                body = r.json()
                assert set(body) == {"error", "message"}
                assert body["error"] == code, (name, body)


async def test_unknown_kid_refreshes_once_and_rotation_needs_no_restart(
    jwks: JwksServer, rs: Key, mock_clock: trio.testing.MockClock
) -> None:
    auth = JwksAuthenticator(jwks.url, ISSUER, AUDIENCE, min_refresh_s=30)
    mock_clock.rate = 1.0  # real time passes too, so the bound below still catches a hang
    with trio.fail_after(120):  # the jumps below add 62 s of clock time
        assert (await auth.verify(rs.sign())).sub == "auth0|alice"
        assert jwks.hits == 1
        await auth.verify(rs.sign(sub="bob"))
        assert jwks.hits == 1  # cached
        # a flood of made-up kids costs the issuer one fetch, not fifty
        mock_clock.jump(31)
        for n in range(50):
            with pytest.raises(AuthError) as info:
                await auth.verify(rsa_key(f"bogus-{n % 3}").sign())
            assert info.value.code == "unknown_kid"
        assert jwks.hits == 2
        # the issuer rotates its key: within the refresh interval the new kid is unknown...
        new = rsa_key("rs-2")
        jwks.keys = [new]
        with pytest.raises(AuthError):
            await auth.verify(new.sign())
        assert jwks.hits == 2
        # ...and after it, one refresh picks it up, with no restart
        mock_clock.jump(31)
        assert (await auth.verify(new.sign(sub="carol"))).sub == "carol"
        assert jwks.hits == 3
        # the old key is gone from the issuer and from the cache
        mock_clock.jump(31)
        with pytest.raises(AuthError) as info:
            await auth.verify(rs.sign())
        assert info.value.code == "unknown_kid"


async def test_admin_endpoints_need_the_admin_permission(
    http: httpx.AsyncClient, rs: Key, es: Key
) -> None:
    path = "/api/admin/streaming/sessions"
    with trio.fail_after(20):
        for claims in (
            {},
            {"scope": "openid profile"},
            {"scope": "c2l:administrator"},
            {"permissions": ["c2l:read"]},
            {"permissions": "c2l:admin"},  # a string is not a permission list
        ):
            r = await http.get(path, headers=bearer(rs.sign(claims)))
            assert r.status_code == 403, claims
            assert r.json()["error"] == "forbidden"
        for claims in ({"permissions": ["c2l:admin"]}, {"scope": "openid c2l:admin"}):
            r = await http.get(path, headers=bearer(es.sign(claims, sub="root")))
            assert r.status_code == 200, claims


def ws_url(gw: RunningGateway, side: str) -> str:
    return gw.url.replace("http://", "ws://") + f"/ws/{side}"


async def recv(conn: Any, timeout: float = 5) -> wire.Message:
    with trio.fail_after(timeout):
        return wire.decode(await conn.get_message())


async def test_websocket_is_closed_1008_when_its_token_expires(
    gw: RunningGateway, rs: Key, mock_clock: trio.testing.MockClock
) -> None:
    # On the mock clock (real time passes too, so fail_after still catches a hang): the
    # connection lives until just before the token's exp and is closed just after it.
    mock_clock.rate = 1.0
    with trio.fail_after(600 + 60):  # the jumps below add 600 s of clock time
        token = rs.sign(exp=int(time.time()) + 600)
        async with trio_websocket.open_websocket_url(ws_url(gw, "stream")) as conn:
            await conn.send_message(wire.encode(wire.Auth(token)))
            assert isinstance(await recv(conn), wire.AuthOk)
            mock_clock.jump(570)  # 30 s before exp, whatever a busy machine took so far
            await conn.send_message(wire.encode(wire.Ping(1)))
            assert await recv(conn) == wire.Pong(1)
            mock_clock.jump(30 + 1)
            err = await recv(conn)
            assert isinstance(err, wire.Error)
            assert err.code == wire.ErrorCode.TOKEN_EXPIRED
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await recv(conn)
            assert info.value.reason.code == wire.CLOSE_POLICY


async def test_reauth_before_expiry_extends_the_connection(
    gw: RunningGateway, rs: Key, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0
    with trio.fail_after(900 + 60):  # the jump below adds 900 s of clock time
        now = int(time.time())
        short, long = rs.sign(exp=now + 600), rs.sign(exp=now + 3600)
        async with trio_websocket.open_websocket_url(ws_url(gw, "stream")) as conn:
            await conn.send_message(wire.encode(wire.Auth(short)))
            ok = await recv(conn)
            assert isinstance(ok, wire.AuthOk)
            await conn.send_message(wire.encode(wire.Auth(long)))
            assert await recv(conn) == ok
            mock_clock.jump(900)  # well past the first token's exp, well before the second's
            await conn.send_message(wire.encode(wire.Ping(42)))
            assert await recv(conn) == wire.Pong(42)
            # re-authenticating as somebody else is an auth failure: 1008
            await conn.send_message(wire.encode(wire.Auth(rs.sign(sub="mallory"))))
            err = await recv(conn)
            assert isinstance(err, wire.Error)
            assert err.code == wire.ErrorCode.AUTH_FAILED
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await recv(conn)
            assert info.value.reason.code == wire.CLOSE_POLICY


async def test_websocket_rejects_bad_tokens_with_1008(gw: RunningGateway, rs: Key, es: Key) -> None:
    with trio.fail_after(30):
        for name, token in (
            ("alg none", alg_none(rs)),
            ("hs256", hs256_with_public_key(rs)),
            ("expired", rs.sign(exp=int(time.time()) - 100)),
            ("wrong audience", es.sign(aud="x")),
        ):
            async with trio_websocket.open_websocket_url(ws_url(gw, "bridge")) as conn:
                await conn.send_message(wire.encode(wire.Auth(token)))
                err = await recv(conn)
                assert isinstance(err, wire.Error), name
                assert err.code == wire.ErrorCode.AUTH_FAILED
                with pytest.raises(trio_websocket.ConnectionClosed) as info:
                    await recv(conn)
                assert info.value.reason.code == wire.CLOSE_POLICY, name


@pytest.mark.parametrize("alg", ["RS384", "RS512", "PS256", "PS512"])
async def test_an_algorithm_outside_the_allow_list_is_refused_by_the_allow_list(
    alg: str, tmp_path: Path
) -> None:
    """A genuine token of the issuer's own key, in an algorithm that key can verify but the
    allow-list does not name: nothing but the allow-list stands in its way."""
    issuer = DevIssuer.load_or_create(tmp_path / "key.pem")
    claims = jwt.decode(issuer.sign("alice"), options={"verify_signature": False})
    token = jwt.encode(claims, issuer.key, algorithm=alg, headers={"kid": issuer.kid})
    # the signature is good: allowed this algorithm, the library takes the token
    decoded = jwt.decode(
        token, issuer.key.public_key(), algorithms=[alg], audience=DEV_AUDIENCE, issuer=DEV_ISSUER
    )
    assert decoded["sub"] == "alice"
    with trio.fail_after(10):
        with pytest.raises(AuthError) as info:
            await issuer.verify(token)
    assert info.value.code == "unsupported_algorithm"
    assert alg in info.value.message


async def test_a_jwks_key_of_an_algorithm_outside_the_allow_list_is_refused(
    jwks: JwksServer,
) -> None:
    """The issuer publishes an ES384 key and signs with it: the key and the header agree,
    so only the allow-list refuses the token."""
    es384 = Key("es384-1", "ES384", ec.generate_private_key(ec.SECP384R1()))
    jwks.keys.append(es384)
    auth = JwksAuthenticator(jwks.url, ISSUER, AUDIENCE)
    with trio.fail_after(20):
        with pytest.raises(AuthError) as info:
            await auth.verify(es384.sign())
    assert info.value.code == "unsupported_algorithm"
