"""The direct endpoint: plain HTTP on 127.0.0.1 in front of the local Ollama (DESIGN.md section 5).

A tunnel (ngrok, or a URL the user already forwards) gives it a public address, so the
gateway, or the user's own client when the gateway is down, can reach the desktop without
the WebSocket bridge. It serves exactly what the bridge serves (the same path allow-list and
header filtering, :mod:`desktop._ollama`), streams Ollama's answer as it comes and aborts the
Ollama request when the caller goes away; and it admits only a bearer JWT of the agent's own
user: a short-lived token minted by the gateway (``c2l-gateway`` / ``c2l-direct``) or the
user's identity-provider token. Both key sets are learned from the gateway's public
``GET /api/config/auth`` and kept 0600 under the config directory, so the endpoint still
verifies tokens while the gateway is unreachable.

The server is Hypercorn (on trio) running a small ASGI application: Hypercorn writes each
``http.response.body`` at once and reports a client that goes away as ``http.disconnect``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import attrs
import httpx
import jwt
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

import wire
from c2lcore import (
    DIRECT_AUDIENCE,
    DIRECT_ISSUER,
    AuthCode,
    AuthError,
    JwksAuthenticator,
    Principal,
    bearer_token,
    config_dir,
    user_hash,
)

from ._ollama import ALLOWED_PATH_PREFIXES, BadPath, ollama_request_headers, ollama_url

log = logging.getLogger(__name__)

#: The direct endpoint's port unless ``--direct-port`` says otherwise.
DEFAULT_DIRECT_PORT: Final = 11480
#: The health path (the only path outside Ollama's API).
HEALTH_PATH: Final = "/c2l/health"
#: The response header that names this agent run, so that the agent can recognise its own
#: endpoint behind a public URL without sending a token through the tunnel.
INSTANCE_HEADER: Final = "x-c2l-desktop"
#: The gateway's public description of the tokens it accepts and mints.
AUTH_CONFIG_PATH: Final = "/api/config/auth"
#: Largest request body taken (Ollama's requests are JSON; images in a chat stay far below).
MAX_REQUEST_BODY: Final = 64 * 1024 * 1024
#: Fewest seconds between two fetches of the gateway's auth configuration or a key set.
KEY_REFRESH_S: Final = 30.0

OwnToken = Callable[[], Awaitable[str]]
StatusCallback = Callable[[str], None]


class DirectEndpointError(Exception):
    """The direct endpoint cannot start (its port is taken, say); the message says why."""


class _TooLarge(Exception):
    pass


class Forbidden(Exception):
    """A valid token of another user (HTTP 403)."""


def gateway_api_url(gateway_url: str, path: str) -> str:
    """The HTTP URL of ``path`` on the gateway (a ``ws``/``wss`` gateway URL works too).

    ``https://host/c2l`` and ``wss://host/c2l/ws/bridge`` both give
    ``https://host/c2l/api/config/auth`` for ``/api/config/auth``.
    """
    parts = urlsplit(gateway_url.strip())
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme.lower(), parts.scheme.lower())
    base = parts.path.rstrip("/").removesuffix("/ws/bridge")
    return urlunsplit((scheme, parts.netloc, base + path, "", ""))


def _write_private(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path``, 0600 (directory 0700), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _unverified_claims(token: str) -> dict[str, Any]:
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise AuthError(AuthCode.MALFORMED_TOKEN, "the token is not a JWT") from None
    if not isinstance(claims, dict):
        raise AuthError(AuthCode.MALFORMED_TOKEN, "the token is not a JWT")
    return claims


@attrs.define
class DirectAuth:
    """Admits the agent's own user's tokens at the direct endpoint.

    The agent's user is the ``sub`` of its own token (read unverified: it is the agent's
    own credential, and only used to compare). The issuers and key sets come from the
    gateway's ``GET /api/config/auth``, fetched at first use, kept at ``cache_path`` (0600)
    and used from there while the gateway is unreachable; a token naming an unknown key
    makes :class:`c2lcore.JwksAuthenticator` fetch its key set again, at most every
    ``refresh_s`` seconds.
    """

    gateway_url: str
    own_token: OwnToken = attrs.field(repr=False)
    http: httpx.AsyncClient = attrs.field(repr=False)
    cache_path: Path = attrs.field(factory=lambda: config_dir() / "direct-auth.json")
    refresh_s: float = KEY_REFRESH_S
    fetch_timeout: float = 5.0
    #: The gateway's auth configuration in use, and whether it came from the gateway in
    #: this run (False: from the cache).
    config: dict[str, Any] | None = None
    fresh: bool = False
    _sub: str | None = attrs.field(default=None, repr=False)
    _direct: JwksAuthenticator | None = None
    _idp: JwksAuthenticator | None = None
    _last_fetch: float | None = None
    _lock: trio.Lock = attrs.field(factory=trio.Lock)

    async def own_sub(self) -> str:
        """The ``sub`` of the agent's own token."""
        if self._sub is None:
            sub = _unverified_claims(await self.own_token()).get("sub")
            if not isinstance(sub, str) or not sub:
                raise AuthError(AuthCode.MISSING_CLAIM, "the agent's own token has no sub")
            self._sub = sub
        return self._sub

    async def _fetch_json(self, url: str) -> dict[str, Any]:
        with trio.fail_after(self.fetch_timeout):
            resp = await self.http.get(url)
        resp.raise_for_status()
        data = resp.json()
        if not isinstance(data, dict):
            raise ValueError(f"{url} answered {type(data).__name__}, not a JSON object")
        return data

    async def _fetch(self) -> dict[str, Any]:
        """The gateway's auth configuration and both key sets, fresh from the gateway."""
        config = await self._fetch_json(gateway_api_url(self.gateway_url, AUTH_CONFIG_PATH))
        direct = config.get("direct")
        if not isinstance(direct, dict):
            raise ValueError("the gateway's /api/config/auth has no 'direct' section")
        keys = {
            "direct": await self._fetch_json(str(direct["jwksUrl"])),
            "idp": await self._fetch_json(str(config["jwksUrl"])),
        }
        return {"gateway": self.gateway_url, "config": config, "keys": keys}

    def _load_cache(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.cache_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("gateway") != self.gateway_url:
            return None  # another gateway's keys say nothing about this one's tokens
        return data

    def _use(self, data: dict[str, Any]) -> None:
        config, keys = data["config"], data["keys"]
        direct = config["direct"]
        self._direct = JwksAuthenticator(
            str(direct["jwksUrl"]),
            str(direct.get("issuer") or DIRECT_ISSUER),
            str(direct.get("audience") or DIRECT_AUDIENCE),
            min_refresh_s=self.refresh_s,
        )
        self._idp = JwksAuthenticator(
            str(config["jwksUrl"]),
            str(config["issuer"]),
            str(config["audience"]),
            min_refresh_s=self.refresh_s,
        )
        self._direct.load_keys(jwt.PyJWKSet.from_dict(keys["direct"]))
        self._idp.load_keys(jwt.PyJWKSet.from_dict(keys["idp"]))
        self.config = config

    async def refresh(self) -> bool:
        """Fetch the configuration and key sets from the gateway (at most every
        ``refresh_s`` seconds) and cache them; True if they were fetched."""
        async with self._lock:
            now = trio.current_time()
            if self._last_fetch is not None and now - self._last_fetch < self.refresh_s:
                return False
            self._last_fetch = now
            try:
                data = await self._fetch()
                self._use(data)
            except (httpx.HTTPError, trio.TooSlowError, ValueError, KeyError, TypeError) as exc:
                text = str(exc) or type(exc).__name__
                log.warning("cannot fetch the gateway's token configuration: %s", text)
                return False
            except jwt.PyJWTError as exc:
                log.warning("the gateway's key set is not usable: %s", exc)
                return False
            self.fresh = True
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(_write_private, self.cache_path, data)
            return True

    async def _ensure(self) -> None:
        if self.config is not None or await self.refresh():
            return
        cached = await trio.to_thread.run_sync(self._load_cache)
        if cached is not None:
            with contextlib.suppress(ValueError, KeyError, TypeError, jwt.PyJWTError):
                self._use(cached)

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token of either issuer, or :class:`AuthError`."""
        await self._ensure()
        if self._direct is None or self._idp is None:
            raise AuthError(
                AuthCode.UNKNOWN_KID,
                "the desktop could not learn the gateway's signing keys yet (gateway"
                " unreachable and nothing cached)",
            )
        iss = _unverified_claims(token).get("iss")
        auth = self._direct if iss == self._direct.issuer else self._idp
        try:
            return await auth.verify(token)
        except AuthError as exc:
            # Keys from the cache may be stale (the gateway's configuration changed while
            # it was unreachable): fetch afresh once, then decide.
            retry = (AuthCode.UNKNOWN_KID, AuthCode.WRONG_ISSUER, AuthCode.WRONG_AUDIENCE)
            if self.fresh or exc.code not in retry or not await self.refresh():
                raise
        auth = self._direct if iss == self._direct.issuer else self._idp
        return await auth.verify(token)

    async def admit(self, authorization: str | None) -> Principal:
        """The principal of the request's bearer token if it is the agent's own user's:
        :class:`AuthError` (401) or :class:`Forbidden` (403) otherwise."""
        token = bearer_token(authorization)
        if token is None:
            raise AuthError(AuthCode.MISSING_TOKEN, "send Authorization: Bearer <token>")
        principal = await self.verify(token)
        if principal.sub != await self.own_sub():
            raise Forbidden("the token is valid but belongs to another user than this desktop's")
        return principal


# ----- the ASGI application ----------------------------------------------------------

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@attrs.define(eq=False)
class DirectEndpoint:
    """The running direct endpoint: its address and what it has served (for tests and
    status lines). ``instance`` is the random id of this agent run."""

    auth: DirectAuth
    ollama_base: str
    client: httpx.AsyncClient = attrs.field(repr=False)
    instance: str = attrs.field(factory=lambda: secrets.token_hex(8))
    url: str = ""
    #: Requests forwarded to Ollama, and requests refused (401/403/400/404).
    forwarded: int = 0
    refused: int = 0

    @property
    def port(self) -> int:
        """The bound port."""
        return urlsplit(self.url).port or 0

    async def _json(self, send: Send, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (INSTANCE_HEADER.encode(), self.instance.encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def _refuse(self, send: Send, status: int, code: str, message: str) -> None:
        self.refused += 1
        await self._json(send, status, {"error": code, "message": message})

    async def _admit(self, headers: list[tuple[str, str]], send: Send) -> Principal | None:
        authorization = next((v for k, v in headers if k == "authorization"), None)
        try:
            return await self.auth.admit(authorization)
        except AuthError as exc:
            await self._refuse(send, 401, exc.code, exc.message)
        except Forbidden as exc:
            await self._refuse(send, 403, "forbidden", str(exc))
        return None

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application."""
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        route = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        target = route + ("?" + scope["query_string"].decode("latin-1"))
        target = target.rstrip("?")
        principal = await self._admit(headers, send)
        if route == HEALTH_PATH and principal is not None:
            await self._json(send, 200, await self._health(principal))
            return
        if principal is None:
            return
        try:
            url = ollama_url(self.ollama_base, target)
        except BadPath as exc:
            if route.startswith(ALLOWED_PATH_PREFIXES):
                await self._refuse(send, 400, "bad_path", str(exc))
            else:
                await self._refuse(send, 404, "not_found", f"no such path: {route[:60]!r}")
            return
        try:
            body = await self._body(receive)
        except _TooLarge:
            await self._refuse(send, 413, "too_large", f"bodies are at most {MAX_REQUEST_BODY} B")
            return
        if body is None:
            return  # the caller left before sending its body: nothing goes to Ollama
        self.forwarded += 1
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                # After the body, the next event is the caller going away.
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await self._forward(scope["method"], url, target, headers, body, send)
            nursery.cancel_scope.cancel()

    async def _body(self, receive: Receive) -> bytes | None:
        """The request body; None if the caller left first, _TooLarge if it is too big."""
        body = bytearray()
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return None
            body += event.get("body", b"")
            if len(body) > MAX_REQUEST_BODY:
                raise _TooLarge
            if not event.get("more_body", False):
                return bytes(body)

    async def _forward(
        self,
        method: str,
        url: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        send: Send,
    ) -> None:
        started = False
        try:
            async with self.client.stream(
                method, url, headers=ollama_request_headers(headers), content=body or None
            ) as resp:
                out = wire.http_response_headers(resp.headers.multi_items())
                await send(
                    {
                        "type": "http.response.start",
                        "status": resp.status_code,
                        "headers": [(k.encode(), v.encode("latin-1")) for k, v in out.items()],
                    }
                )
                started = True
                async for data in resp.aiter_bytes():
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        except httpx.HTTPError as exc:
            text = str(exc) or type(exc).__name__
            if started:
                # Too late for a status: ending the body early tells the caller.
                log.info("Ollama failed mid-answer on %s %s: %s", method, target[:60], text)
                return
            unreachable = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
            code = "ollama_unavailable" if unreachable else "upstream_error"
            await self._json(
                send, 502, {"error": code, "message": f"Ollama at {self.ollama_base}: {text}"}
            )

    async def _health(self, principal: Principal) -> dict[str, Any]:
        ollama = False
        with trio.move_on_after(2):
            try:
                resp = await self.client.get(f"{self.ollama_base}/api/version")
                ollama = resp.status_code == 200
            except httpx.HTTPError:
                pass
        return {
            "status": "ok",
            "user": user_hash(principal.sub),
            "instance": self.instance,
            "ollama": ollama,
        }


async def serve_direct(
    endpoint: DirectEndpoint,
    port: int,
    *,
    host: str = "127.0.0.1",
    task_status: trio.TaskStatus[DirectEndpoint] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``endpoint`` on ``host:port`` (0: any free port) until cancelled.

    ``task_status.started()`` gets the endpoint, whose ``url`` holds the bound address.
    :class:`DirectEndpointError` if the port cannot be bound.
    """
    hc = HyperConfig()
    hc.bind = [f"{host}:{port}"]
    hc.accesslog = None  # request lines name no tokens, but they are the user's business
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 1.0
    hc.h11_max_incomplete_size = 64 * 1024
    try:
        sockets = hc.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(hc.backlog)
    except OSError as exc:
        raise DirectEndpointError(
            f"the direct endpoint cannot listen on {host}:{port}: {exc.strerror or exc}"
            " (pass another --direct-port, or 0 for any free port)"
        ) from None
    bound_host, bound_port = sockets.insecure_sockets[0].getsockname()[:2]
    endpoint.url = f"http://{bound_host}:{bound_port}"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await endpoint.app(scope, receive, send)

    try:
        await worker_serve(
            wrap_app(app, hc.wsgi_max_body_size, "asgi"),
            hc,
            sockets=sockets,
            task_status=_Started(task_status, endpoint),
        )
    finally:
        for sock in sockets.insecure_sockets:
            sock.close()


@attrs.frozen
class _Started:
    """Hands the endpoint (not Hypercorn's bind list) to the caller's ``task_status``."""

    task_status: trio.TaskStatus[DirectEndpoint]
    endpoint: DirectEndpoint

    def started(self, value: object = None) -> None:
        self.task_status.started(self.endpoint)
