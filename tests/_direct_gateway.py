"""A stand-in for the gateway's side of the direct route, for the desktop's tests.

It serves what the desktop agent asks of the gateway (DIRECT.md): ``GET /api/config/auth``,
the two JWKS, and ``PUT``/``DELETE /api/desktop/tunnel`` (recorded; their answers can be
set by the test). Tokens are RS256 with real keys: one for the gateway's direct tokens,
one for the identity provider.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import attrs
import jwt
import trio
from cryptography.hazmat.primitives.asymmetric import rsa
from hypercorn.config import Config as HyperConfig
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from c2lcore import DIRECT_AUDIENCE, DIRECT_ISSUER

IDP_ISSUER = "https://idp.example/"
IDP_AUDIENCE = "c2l-api"


@attrs.define
class Key:
    """An RS256 signing key with its kid."""

    kid: str
    key: rsa.RSAPrivateKey = attrs.field(
        factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return {"keys": [jwk]}

    def sign(self, sub: str, *, iss: str, aud: str, ttl: float = 60, **extra: Any) -> str:
        now = int(time.time())
        claims = {"iss": iss, "aud": aud, "sub": sub, "iat": now, "nbf": now}
        claims |= {"exp": now + int(ttl), "jti": uuid.uuid4().hex, **extra}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})


# Key generation takes a while: made once per test run.
DIRECT_KEY = Key("c2l-direct-0001")
IDP_KEY = Key("idp-0001")
STRANGER_KEY = Key("c2l-direct-0001")  # same kid, other key: a forged token


def direct_token(
    sub: str, *, ttl: float = 60, key: Key = DIRECT_KEY, aud: str = DIRECT_AUDIENCE
) -> str:
    """A token as the gateway mints it for the direct route."""
    return key.sign(sub, iss=DIRECT_ISSUER, aud=aud, ttl=ttl)


def idp_token(sub: str, *, ttl: float = 3600) -> str:
    """The user's identity-provider token."""
    return IDP_KEY.sign(sub, iss=IDP_ISSUER, aud=IDP_AUDIENCE, ttl=ttl)


@attrs.define(eq=False)
class FakeGateway:
    """The running stand-in: its URL, what it was asked, and the answers it gives."""

    url: str = ""
    #: (method, path, authorization, JSON body) of every request.
    calls: list[tuple[str, str, str | None, Any]] = attrs.field(factory=list)
    #: Status and body for PUT /api/desktop/tunnel (the body's ttl is used as given).
    put_status: int = 200
    put_body: dict[str, Any] = attrs.field(factory=lambda: {"ttl": 120})
    #: Fetches of /api/config/auth fail while this is False.
    up: bool = True
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def count(self, method: str, path: str) -> int:
        return sum(1 for c in self.calls if c[0] == method and c[1] == path)

    async def wait_until(self, predicate: Any) -> None:
        while not predicate(self):
            await self._changed.wait()

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                await send({"type": event["type"] + ".complete"})
                if event["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        self.calls.append(
            (method, path, headers.get("authorization"), json.loads(body) if body else None)
        )
        self._changed.set()
        self._changed = trio.Event()
        status, answer = 404, {"error": "not_found"}
        if not self.up:
            status, answer = 503, {"error": "down"}
        elif path == "/api/config/auth":
            status, answer = (
                200,
                {
                    "mode": "jwks",
                    "issuer": IDP_ISSUER,
                    "audience": IDP_AUDIENCE,
                    "jwksUrl": f"{self.url}/idp/jwks.json",
                    "direct": {
                        "issuer": DIRECT_ISSUER,
                        "audience": DIRECT_AUDIENCE,
                        "jwksUrl": f"{self.url}/.well-known/c2l-jwks.json",
                    },
                },
            )
        elif path == "/.well-known/c2l-jwks.json":
            status, answer = 200, DIRECT_KEY.jwks()
        elif path == "/idp/jwks.json":
            status, answer = 200, IDP_KEY.jwks()
        elif path == "/api/desktop/tunnel" and method == "PUT":
            status, answer = self.put_status, dict(self.put_body)
        elif path == "/api/desktop/tunnel" and method == "DELETE":
            status, answer = 204, {}
        data = b"" if status == 204 else json.dumps(answer).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": data})


async def serve_fake_gateway(
    *, task_status: trio.TaskStatus[FakeGateway] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve a :class:`FakeGateway` on 127.0.0.1 (a free port) until cancelled."""
    gw = FakeGateway()
    hc = HyperConfig()
    hc.bind = ["127.0.0.1:0"]
    hc.accesslog = None
    hc.graceful_timeout = 0.5
    sockets = hc.create_sockets()
    for sock in sockets.insecure_sockets:
        sock.listen(hc.backlog)
    gw.url = f"http://127.0.0.1:{sockets.insecure_sockets[0].getsockname()[1]}"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await gw.app(scope, receive, send)

    class _Started:
        def started(self, value: object = None) -> None:
            task_status.started(gw)

    await worker_serve(
        wrap_app(app, hc.wsgi_max_body_size, "asgi"), hc, sockets=sockets, task_status=_Started()
    )
