"""The client side of the connection fallback hierarchy (DESIGN.md section 5).

For a Python program that wants an answer from the user's model and needs a base URL for
the ``ollama`` or ``openai`` client. The levels, in order:

1. ``local``: the local Ollama, only when the caller prefers it (``prefer_local``) and it
   answers ``GET /api/version``;
2. ``cloud``: the gateway's Ollama-compatible API (``<gateway>/api/ollama``) when the
   gateway answers ``GET /health``; the gateway itself uses the bridge or falls back to the
   desktop's tunnel, and says which in each answer's ``X-C2L-Route`` (``cloud`` or
   ``direct``);
3. ``direct``: the desktop's tunnel URL called by the client itself, only when the gateway
   is unreachable. The URL is learned from the gateway's registration
   (``GET /api/desktop/tunnel``) whenever the gateway answers, and cached (0600) in
   ``config_dir()/tunnel.json`` for the day it does not. This is the one case where the
   user's own token crosses the tunnel: the gateway never sends it there (it mints a
   short-lived token of its own), but a client that cannot reach the gateway has nothing
   else to show the desktop. So the tunnel is used only over https (or plain http to a
   loopback address, for development) and only after its ``/c2l/health`` has answered as
   the token's own user's desktop;
4. ``local``: the local Ollama as the last resort (when it was not already level 1).

:func:`routes` yields the candidates in that order, probing each one just before it is
yielded, so a caller can move down the list when a route fails before its first token
(``c2l chat`` does). :func:`resolve` (and :func:`resolve_sync`) return the first one::

    from c2l.routes import resolve_sync
    route = resolve_sync(gateway="https://c2l.example.com", token=token)
    ollama.Client(host=route.base_url, headers=dict(route.headers))
    openai.OpenAI(base_url=route.openai_base_url, api_key=route.api_key)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import os
import types
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import httpx
import jwt
import trio

from c2lcore import config_dir, is_loopback, user_hash

__all__ = [
    "DEFAULT_OLLAMA_URL",
    "LEVELS",
    "PROBE_TIMEOUT_S",
    "Route",
    "RouteError",
    "resolve",
    "resolve_sync",
    "routes",
    "tunnel_cache_path",
]

log = logging.getLogger("c2l.routes")

#: The levels a :class:`Route` can have.
LEVELS: Final = ("local", "cloud", "direct")
#: Where Ollama listens by default.
DEFAULT_OLLAMA_URL: Final = "http://127.0.0.1:11434"
#: How long each probe (health, version, registration) may take.
PROBE_TIMEOUT_S: Final = 2.0
#: The gateway's Ollama-compatible API under its base URL.
GATEWAY_OLLAMA_PATH: Final = "/api/ollama"
#: The gateway's registration of the user's tunnel.
TUNNEL_REGISTRATION_PATH: Final = "/api/desktop/tunnel"
#: The direct endpoint's health check (through the tunnel).
DIRECT_HEALTH_PATH: Final = "/c2l/health"


class RouteError(Exception):
    """No level of the hierarchy answers; the message says what was tried and how it failed."""


def _frozen_headers(value: Mapping[str, str]) -> Mapping[str, str]:
    return types.MappingProxyType(dict(value))


@attrs.frozen
class Route:
    """One way to the user's model.

    ``base_url`` is the Ollama-compatible root (for ``ollama.Client(host=...)``); the
    OpenAI-compatible API is under :attr:`openai_base_url`. ``headers`` holds the
    ``Authorization`` header when the route needs one; it is left out of ``repr`` so that
    printing a route never prints a token.
    """

    level: str = attrs.field(validator=attrs.validators.in_(LEVELS))
    base_url: str
    headers: Mapping[str, str] = attrs.field(
        factory=dict, converter=_frozen_headers, repr=False, hash=False
    )

    @property
    def openai_base_url(self) -> str:
        """The base URL for ``openai.OpenAI(base_url=...)``."""
        return self.base_url + "/v1"

    @property
    def api_key(self) -> str:
        """The bearer token for ``openai.OpenAI(api_key=...)`` ("ollama" when none is needed:
        the OpenAI client insists on a key)."""
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else "ollama"


def tunnel_cache_path() -> Path:
    """Where the tunnel URL learned from the gateway is kept: ``config_dir()/tunnel.json``."""
    return config_dir() / "tunnel.json"


def _token_user(token: str) -> str | None:
    """The user hash of the token's ``sub``, read without verifying (the gateway and the
    desktop verify it; here it only keys the cache and checks the tunnel's answer)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return user_hash(sub) if isinstance(sub, str) and sub else None


def _usable_tunnel_url(url: Any) -> str | None:
    """``url`` without a trailing slash when the user's token may be sent to it: https, or
    plain http to a loopback address (development); None otherwise."""
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None
    if not host or parts.query or parts.fragment or parts.username or parts.password:
        return None
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback(host)):
        return url.rstrip("/")
    return None


@attrs.define
class _Prober:
    """The probes of one walk down the hierarchy, with what each one found (``tried``)."""

    timeout: float
    transport: httpx.AsyncBaseTransport | None
    tried: list[str]

    @contextlib.asynccontextmanager
    async def _client(self) -> AsyncIterator[httpx.AsyncClient]:
        # trust_env=False: a proxy from the environment must not see the user's token.
        async with httpx.AsyncClient(
            timeout=self.timeout, transport=self.transport, trust_env=False
        ) as client:
            yield client

    async def get(
        self, what: str, url: str, headers: Mapping[str, str] | None = None
    ) -> httpx.Response | None:
        """``GET url`` within the timeout, or None (and a note in ``tried``) when it fails."""
        try:
            with trio.fail_after(self.timeout):
                async with self._client() as client:
                    response = await client.get(url, headers=dict(headers or {}))
                    await response.aread()
                    return response
        except trio.TooSlowError:
            self.tried.append(f"{what} {url}: no answer within {self.timeout:g} s")
        except httpx.HTTPError as exc:
            self.tried.append(f"{what} {url}: {type(exc).__name__} {exc}".rstrip())
        return None

    async def _answers(self, what: str, url: str, path: str) -> bool:
        """Whether ``url + path`` answers 200 (why not goes to ``tried``)."""
        response = await self.get(what, url + path)
        if response is None:
            return False
        if response.status_code != 200:
            self.tried.append(f"{what} {url}: {path} answered HTTP {response.status_code}")
            return False
        return True

    async def ollama(self, url: str) -> bool:
        """Whether an Ollama answers at ``url``."""
        return await self._answers("local Ollama", url, "/api/version")

    async def gateway(self, url: str) -> bool:
        """Whether the gateway at ``url`` answers its health check."""
        return await self._answers("gateway", url, "/health")

    async def registration(
        self, gateway: str, auth: Mapping[str, str]
    ) -> tuple[str, dict[str, Any]] | None:
        """The gateway's answer about the user's tunnel: ("found", registration),
        ("none", {}) for 404, or None when it could not say."""
        url = gateway + TUNNEL_REGISTRATION_PATH
        response = await self.get("tunnel registration at", url, auth)
        if response is None:
            return None
        if response.status_code == 404:
            return "none", {}
        if response.status_code != 200:
            return None
        try:
            data = response.json()
        except ValueError:
            return None
        return ("found", data) if isinstance(data, dict) else None

    async def tunnel(self, url: str, auth: Mapping[str, str], user: str) -> bool:
        """Whether the tunnel at ``url`` answers as the desktop of ``user``."""
        response = await self.get("tunnel", url + DIRECT_HEALTH_PATH, auth)
        if response is None:
            return False
        if response.status_code != 200:
            self.tried.append(f"tunnel {url}: /c2l/health answered HTTP {response.status_code}")
            return False
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("user") != user:
            # Not (or no longer) this user's desktop: a stale URL someone else now holds.
            self.tried.append(f"tunnel {url}: does not answer as your desktop")
            return False
        return True


def _read_cache(path: Path, gateway: str, user: str) -> str | None:
    """The cached tunnel URL for this gateway and user, or None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("gateway") != gateway or data.get("user") != user:
        return None
    return _usable_tunnel_url(data.get("url"))


def _write_cache(path: Path, record: dict[str, Any]) -> None:
    """Write the cache atomically, 0600 from the start (it names the user's desktop)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _forget_cache(path: Path, gateway: str, user: str) -> None:
    """Remove the cache when it is this gateway's and user's (the tunnel is gone)."""
    if _read_cache(path, gateway, user) is not None:
        with contextlib.suppress(OSError):
            path.unlink()


async def _learn_tunnel(
    probe: _Prober, gateway: str, auth: Mapping[str, str], user: str, cache: Path
) -> None:
    """Ask the reachable gateway for the user's tunnel and keep the answer for later."""
    answer = await probe.registration(gateway, auth)
    if answer is None:
        return  # the gateway could not say: keep what we knew
    kind, data = answer
    url = _usable_tunnel_url(data.get("url")) if kind == "found" else None
    if url is None:
        _forget_cache(cache, gateway, user)
        return
    record = {
        "gateway": gateway,
        "user": user,
        "url": url,
        "provider": str(data.get("provider") or ""),
        "savedAt": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    try:
        _write_cache(cache, record)
    except OSError as exc:
        log.warning("cannot cache the tunnel URL in %s: %s", cache, exc.strerror)


async def routes(
    gateway: str | None = None,
    token: str | None = None,
    *,
    prefer_local: bool = False,
    ollama_url: str | None = DEFAULT_OLLAMA_URL,
    cache_path: Path | None = None,
    probe_timeout: float = PROBE_TIMEOUT_S,
    transport: httpx.AsyncBaseTransport | None = None,
    tried: list[str] | None = None,
) -> AsyncGenerator[Route, None]:
    """Yield the routes of the hierarchy that answer, in order, probing each just before.

    ``gateway`` is the gateway's base URL (None: no cloud or direct level); ``token`` the
    user's JWT, required with a gateway. ``ollama_url`` is the local Ollama (None: no local
    level). ``cache_path`` is where the tunnel URL is cached (default
    :func:`tunnel_cache_path`). ``probe_timeout`` bounds each probe. ``transport`` replaces the
    network (an ``httpx.MockTransport`` in tests). Each level that does not answer leaves
    a line in ``tried``, if given.

    A consumer that stops early should close the iterator (``contextlib.aclosing``); it
    holds no connection between items.
    """
    if gateway is not None and not token:
        raise ValueError("a gateway needs the user's token (token=...)")
    probe = _Prober(probe_timeout, transport, tried if tried is not None else [])
    local = ollama_url.rstrip("/") if ollama_url else None
    local_up: bool | None = None
    if prefer_local and local is not None:
        local_up = await probe.ollama(local)
        if local_up:
            yield Route("local", local)
    if gateway is not None and token:
        gateway = gateway.rstrip("/")
        auth = {"Authorization": f"Bearer {token}"}
        user = _token_user(token)
        cache = tunnel_cache_path() if cache_path is None else cache_path
        if await probe.gateway(gateway):
            if user is not None:
                await _learn_tunnel(probe, gateway, auth, user, cache)
            yield Route("cloud", gateway + GATEWAY_OLLAMA_PATH, auth)
        elif user is None:
            probe.tried.append("tunnel: the token has no readable user (sub)")
        else:
            tunnel = _read_cache(cache, gateway, user)
            if tunnel is None:
                probe.tried.append("tunnel: none learned from this gateway yet")
            elif await probe.tunnel(tunnel, auth, user):
                yield Route("direct", tunnel, auth)
    if local is not None and local_up is None and await probe.ollama(local):
        yield Route("local", local)


async def resolve(
    gateway: str | None = None,
    token: str | None = None,
    *,
    prefer_local: bool = False,
    ollama_url: str | None = DEFAULT_OLLAMA_URL,
    cache_path: Path | None = None,
    probe_timeout: float = PROBE_TIMEOUT_S,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Route:
    """The first route of the hierarchy that answers (see :func:`routes` for the arguments).

    Raises :class:`RouteError`, naming every level tried and why it failed, when none does.
    """
    tried: list[str] = []
    candidates = routes(
        gateway,
        token,
        prefer_local=prefer_local,
        ollama_url=ollama_url,
        cache_path=cache_path,
        probe_timeout=probe_timeout,
        transport=transport,
        tried=tried,
    )
    async with contextlib.aclosing(candidates):
        async for route in candidates:
            return route
    raise RouteError("no route to your model answers: " + "; ".join(tried or ["nothing to try"]))


def resolve_sync(
    gateway: str | None = None,
    token: str | None = None,
    *,
    prefer_local: bool = False,
    ollama_url: str | None = DEFAULT_OLLAMA_URL,
    cache_path: Path | None = None,
    probe_timeout: float = PROBE_TIMEOUT_S,
) -> Route:
    """:func:`resolve` for synchronous callers (runs its own trio loop: not from async code)."""
    return trio.run(
        functools.partial(
            resolve,
            gateway,
            token,
            prefer_local=prefer_local,
            ollama_url=ollama_url,
            cache_path=cache_path,
            probe_timeout=probe_timeout,
        )
    )
