"""The direct route to a desktop: tunnel registrations and calls through them (DESIGN.md 5).

A desktop agent whose bridge cannot reach the gateway (blocked WebSockets, a dead session)
can still be reached through a tunnel to its direct endpoint (ngrok, or a URL the user
forwards). The agent registers the tunnel's public URL (``PUT /api/desktop/tunnel``); the
gateway checks the URL, calls its ``/c2l/health`` with a token of its own, and keeps the
registration for ``C2L_TUNNEL_TTL`` unless renewed. When the user's desktop has no bridge,
``/api/ollama/*`` and ``/ws/stream`` requests go through the tunnel instead.

The user's identity-provider token never crosses the tunnel from here: every call carries a
short-lived token minted for it (audience ``c2l-direct``, 60 s, signed with a key of the
gateway's published at ``/.well-known/c2l-jwks.json``).

An SSRF guard: a tunnel URL must be https on a host whose every address is public. The
check runs at registration and again at every connection (the connection goes to the
address that was checked), so a name that resolves elsewhere later (DNS rebinding) cannot
make the gateway call its own network. ``C2L_ALLOW_PRIVATE_TUNNELS=1`` (development and
tests) admits loopback, private addresses and plain http.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import attrs
import httpcore
import jwt
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import wire
from c2lcore import DIRECT_AUDIENCE, DIRECT_ISSUER, DIRECT_TOKEN_TTL_S
from orchestrator import LocalState, OrchestratorError, SharedState

from ._audit import audit
from ._auth import DevIssuer, Principal
from ._errors import ApiError

log = logging.getLogger("c2l.gateway")

#: Where a direct endpoint answers the gateway's check (DESIGN.md section 5).
HEALTH_PATH: Final = "/c2l/health"
#: The providers an agent may name in its registration.
PROVIDERS: Final = ("ngrok", "url")
#: Longest tunnel URL accepted.
MAX_URL_LENGTH: Final = 2048
#: Bounds of one registration check (DNS, then the health call) and of a tunnel's connect.
RESOLVE_TIMEOUT_S: Final = 5.0
VERIFY_TIMEOUT_S: Final = 10.0
CONNECT_TIMEOUT_S: Final = 10.0

#: An address check: (host, port) -> the addresses that may be dialled, or TunnelRefused.
Resolver = Callable[[str, int], Awaitable[list[str]]]


class TunnelRefused(Exception):
    """A tunnel URL the gateway will not call (400 ``bad_tunnel_url``)."""


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses of ``host`` from the system's resolver."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an address when it is one, in any form a resolver would take as one.

    ``127.1``, ``0x7f.1`` and ``2130706433`` are IPv4 addresses to ``inet_aton`` (and to
    every resolver that uses it), so they are read as such here too.
    """
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefx." for c in host.lower()) and host[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``address`` is a public unicast address (not loopback, private, link-local,
    shared, reserved, multicast or unspecified; IPv4 in IPv6 is judged as IPv4)."""
    if isinstance(address, ipaddress.IPv6Address):
        for embedded in (address.ipv4_mapped, address.sixtofour):
            if embedded is not None:
                return is_public(embedded)
        if address.teredo is not None:
            return False
    return address.is_global and not address.is_multicast


@attrs.frozen
class TunnelUrl:
    """A tunnel's base URL, checked for form (not yet for where it points)."""

    scheme: str
    host: str
    port: int
    #: ``scheme://host[:port]`` with no trailing slash: paths are appended to it.
    base: str


def parse_tunnel_url(text: Any, *, allow_private: bool) -> TunnelUrl:
    """``text`` as a tunnel URL, or :class:`TunnelRefused` saying what is wrong."""
    if not isinstance(text, str) or not text or len(text) > MAX_URL_LENGTH:
        raise TunnelRefused("url must be a string of at most 2048 characters")
    if any(c <= " " or c == "\x7f" for c in text):
        raise TunnelRefused("the URL holds whitespace or control characters")
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError:
        raise TunnelRefused("the URL is not valid") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if url.scheme not in schemes:
        raise TunnelRefused("the tunnel URL must be https")
    if url.username is not None or url.password is not None:
        raise TunnelRefused("the URL must not hold credentials")
    if url.path.strip("/") or url.query or url.fragment:
        raise TunnelRefused("give the tunnel's base URL only (scheme://host[:port])")
    host = (url.hostname or "").rstrip(".")
    if not host:
        raise TunnelRefused("the URL has no host")
    if port is None:
        port = 443 if url.scheme == "https" else 80
    netloc = url.netloc.rsplit("@", 1)[-1]
    return TunnelUrl(url.scheme, host, port, urlunsplit((url.scheme, netloc, "", "", "")))


@attrs.define
class AddressGuard:
    """Says which addresses of a tunnel host may be dialled: public ones only."""

    allow_private: bool = False
    resolver: Resolver = system_resolver

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses to dial for ``host``; :class:`TunnelRefused` if any is not public.

        Every address of the name must be public, not just one: a name with one public and
        one private address would otherwise reach the private one on some connections.
        """
        literal = _literal(host)
        if literal is not None:
            found = [str(literal)]
        else:
            if host.lower() == "localhost" or host.lower().endswith(".localhost"):
                found = ["127.0.0.1"]  # RFC 6761: always loopback, whatever DNS says
            else:
                with trio.move_on_after(RESOLVE_TIMEOUT_S):
                    try:
                        found = await self.resolver(host, port)
                    except OSError:
                        raise TunnelRefused(f"the host {host[:100]!r} does not resolve") from None
                    else:
                        if not found:
                            raise TunnelRefused(f"the host {host[:100]!r} has no address")
                        return self._checked(host, found)
                raise TunnelRefused(f"resolving {host[:100]!r} took too long")
        return self._checked(host, found)

    def _checked(self, host: str, found: Iterable[str]) -> list[str]:
        out: list[str] = []
        for text in found:
            try:
                address = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                raise TunnelRefused(f"the host {host[:100]!r} resolves oddly") from None
            if not self.allow_private and not is_public(address):
                raise TunnelRefused(
                    f"the host {host[:100]!r} is not on a public address"
                    " (loopback, private, link-local and reserved addresses are refused)"
                )
            out.append(str(address))
        return out


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend, dialling only addresses the guard allows at connect time.

    TLS still names the URL's host (SNI and certificate check): httpcore starts TLS on the
    stream returned here with the origin's host name.
    """

    def __init__(self, guard: AddressGuard) -> None:
        self._guard = guard
        self._inner = httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await self._guard.addresses(host, port)
        except TunnelRefused as exc:
            raise httpcore.ConnectError(str(exc)) from None
        error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("a tunnel is never a UNIX socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@attrs.define
class DirectKey:
    """The gateway's key for direct-route tokens (RS256, 0600 at ``key_path``)."""

    key: rsa.RSAPrivateKey
    kid: str

    @classmethod
    def load_or_create(cls, key_path: Path) -> DirectKey:
        """Load the key, making it on first use (the dev issuer's key handling)."""
        return cls._of(DevIssuer.load_or_create(key_path).key)

    @classmethod
    def from_pem(cls, pem: bytes) -> DirectKey:
        """The key of a PEM (PKCS#8) private key, e.g. one shared by every replica."""
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the c2l-direct signing key is not an RSA private key")
        return cls._of(key)

    @staticmethod
    def new_pem() -> bytes:
        """A new RS256 key as PEM (PKCS#8), to be shared."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def _of(cls, key: rsa.RSAPrivateKey) -> DirectKey:
        numbers = key.public_key().public_numbers()
        return cls(key, f"c2l-direct-{numbers.n % (1 << 48):012x}")

    def mint(self, sub: str, ttl: float = DIRECT_TOKEN_TTL_S) -> str:
        """A token for one call of ``sub``'s direct endpoint."""
        now = int(time.time())
        claims = {
            "iss": DIRECT_ISSUER,
            "aud": DIRECT_AUDIENCE,
            "sub": sub,
            "iat": now,
            "nbf": now,
            "exp": now + int(ttl),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    def jwks(self) -> dict[str, Any]:
        """The public key as a JSON Web Key Set."""
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return {"keys": [jwk]}


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


@attrs.define(eq=False)
class Registration:
    """One user's verified tunnel."""

    url: TunnelUrl
    provider: str
    #: Wall-clock seconds of the last check (registration, renewal or a call) and its end.
    checked_at: float
    expires_at: float
    healthy: bool = True
    #: The desktop it reaches (a user's desktops register a tunnel each).
    name: str = wire.DEFAULT_DESKTOP_NAME

    def record(self) -> dict[str, Any]:
        """What the shared state keeps of it (every replica routes by it)."""
        return {
            "url": self.url.base,
            "provider": self.provider,
            "checkedAt": self.checked_at,
            "expiresAt": self.expires_at,
        }

    @classmethod
    def from_record(
        cls,
        record: dict[str, Any],
        *,
        allow_private: bool,
        name: str = wire.DEFAULT_DESKTOP_NAME,
    ) -> Registration | None:
        """A kept registration, or None if it no longer passes the checks of its form."""
        try:
            url = parse_tunnel_url(record["url"], allow_private=allow_private)
            return cls(
                url,
                str(record["provider"]),
                float(record["checkedAt"]),
                float(record["expiresAt"]),
                name=name,
            )
        except (KeyError, TypeError, ValueError, TunnelRefused):
            return None

    def as_dict(self, ttl: float) -> dict[str, Any]:
        """The registration as ``GET /api/desktop/tunnel`` shows it."""
        return {
            "url": self.url.base,
            "provider": self.provider,
            "healthy": self.healthy,
            "checkedAt": _iso(self.checked_at),
            "expiresAt": _iso(self.expires_at),
            "ttl": ttl,
            "name": self.name,
        }


@attrs.frozen
class DirectAnswer:
    """The start of a desktop's answer through its tunnel; ``body`` streams the rest."""

    status: int
    headers: dict[str, str]
    body: AsyncIterator[bytes]


class TunnelFailed(Exception):
    """The tunnel did not answer (before any byte of the answer)."""


def _pairs(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


#: Seconds a replica trusts what it last read of a user's registration (another replica's
#: registration or removal reaches it within this; every read is an API call on Kubernetes).
REGISTRATION_CACHE_S: Final = 2.0
#: The kind of the registrations' records in the shared state.
TUNNEL_KIND: Final = "tunnel"


@attrs.define(eq=False)
class DirectRoutes:
    """Every user's tunnel registration, and the calls the gateway makes through them.

    Registrations are kept in the deployment's shared state (``state``: memory on one
    host, Secrets of the namespace on Kubernetes, so every replica routes by them), read
    through a short cache.
    """

    key: DirectKey
    guard: AddressGuard
    ttl: float
    state: SharedState = attrs.field(factory=LocalState)
    #: user hash -> (monotonic time until which it is trusted, registrations by desktop)
    _cache: dict[str, tuple[float, dict[str, Registration]]] = attrs.field(factory=dict)
    _pool: httpcore.AsyncConnectionPool | None = None
    #: user hash -> the route their last answer took (route changes go to the audit trail)
    _last_route: dict[str, str] = attrs.field(factory=dict)

    @property
    def pool(self) -> httpcore.AsyncConnectionPool:
        """The connections to tunnels (made at first use, only to checked addresses)."""
        if self._pool is None:
            self._pool = httpcore.AsyncConnectionPool(
                ssl_context=ssl.create_default_context(),
                max_connections=256,
                keepalive_expiry=30.0,
                network_backend=_GuardedBackend(self.guard),
            )
        return self._pool

    async def aclose(self) -> None:
        """Close the connections to tunnels."""
        if self._pool is not None:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await self._pool.aclose()

    # ---- registrations ------------------------------------------------------------

    async def registrations(self, uh: str) -> dict[str, Registration]:
        """``uh``'s live registrations by desktop name (expired ones are forgotten).

        One shared record per user holds them all (``{"desktops": {name: ...}}``; a record
        of one registration, as kept before desktops had names, is the ``default``
        desktop's), so the shared state needs no listing of its own.
        """
        now = time.monotonic()
        cached = self._cache.get(uh)
        if cached is not None and cached[0] > now:
            regs = cached[1]
        else:
            regs = {}
            try:
                record = await self.state.get(TUNNEL_KIND, uh)
            except (OrchestratorError, ValueError) as exc:
                log.warning("tunnel registration of %s unreadable: %s", uh, exc)
                record = None
            if record is not None:
                regs = self._from_record(record)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[uh] = (now + REGISTRATION_CACHE_S, regs)
        wall = time.time()
        expired = [name for name, reg in regs.items() if reg.expires_at <= wall]
        if expired:
            regs = {name: reg for name, reg in regs.items() if name not in expired}
            self._cache[uh] = (now + REGISTRATION_CACHE_S, regs)
            for _ in expired:
                audit("tunnel_expired", user=uh)
        return dict(regs)

    def _from_record(self, record: dict[str, Any]) -> dict[str, Registration]:
        allow = self.guard.allow_private
        kept = record.get("desktops")
        if not isinstance(kept, dict):
            kept = {wire.DEFAULT_DESKTOP_NAME: record}
        regs: dict[str, Registration] = {}
        for name, one in kept.items():
            if not wire.valid_desktop_name(name) or not isinstance(one, dict):
                continue
            reg = Registration.from_record(one, allow_private=allow, name=name)
            if reg is not None:
                regs[name] = reg
        return regs

    async def get(self, uh: str, name: str | None = None) -> Registration | None:
        """``uh``'s live registration of desktop ``name``; without a name, the one to use:
        a healthy one if there is (the most recently checked), else any."""
        regs = await self.registrations(uh)
        if name is not None:
            return regs.get(name)
        if not regs:
            return None
        return max(regs.values(), key=lambda reg: (reg.healthy, reg.checked_at))

    async def _keep(self, uh: str, regs: dict[str, Registration]) -> bool:
        """Write ``uh``'s registrations (none: delete the record); whether one was there."""
        existed = False
        if regs:
            record = {"desktops": {name: reg.record() for name, reg in regs.items()}}
            expires = max(reg.expires_at for reg in regs.values())
            await self.state.put(TUNNEL_KIND, uh, record, expires)
        else:
            existed = await self.state.delete(TUNNEL_KIND, uh)
        self._cache[uh] = (time.monotonic() + REGISTRATION_CACHE_S, regs)
        return existed

    async def register(self, principal: Principal, body: Any) -> Registration:
        """Check, verify and keep the tunnel ``body`` names (``PUT /api/desktop/tunnel``).

        ``body["name"]`` (optional) is the desktop's name: each desktop of a user keeps a
        registration of its own.
        """
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", 'send {"url": ..., "provider": ...}')
        provider = body.get("provider", "url")
        if provider not in PROVIDERS:
            raise ApiError(400, "bad_request", f"provider must be one of {', '.join(PROVIDERS)}")
        name = body.get("name", wire.DEFAULT_DESKTOP_NAME)
        if not wire.valid_desktop_name(name):
            raise ApiError(400, "bad_request", "name must be 1-64 characters of A-Z a-z 0-9 . _ -")
        try:
            url = parse_tunnel_url(body.get("url"), allow_private=self.guard.allow_private)
            await self.guard.addresses(url.host, url.port)  # before any connection is made
        except TunnelRefused as exc:
            audit("tunnel_refused", user=principal.user_hash, code="bad_tunnel_url")
            raise ApiError(400, "bad_tunnel_url", str(exc)) from None
        await self._verify(principal, url)
        now = time.time()
        regs = await self.registrations(principal.user_hash)
        old = regs.get(name)
        reg = Registration(url, provider, now, now + self.ttl, name=name)
        regs[name] = reg
        try:
            await self._keep(principal.user_hash, regs)
        except OrchestratorError as exc:
            self._cache.pop(principal.user_hash, None)
            raise ApiError(
                503, "unavailable", f"the registration could not be kept: {exc}"
            ) from None
        if old is None or old.url != url:
            # the host only: a URL's path, query or credentials never reach the audit trail
            audit("tunnel_registered", user=principal.user_hash, endpoint=url.host[:100])
        return reg

    async def remove(self, uh: str, name: str | None = None) -> bool:
        """Forget ``uh``'s registration of desktop ``name``, or all of them (``DELETE
        /api/desktop/tunnel``); whether there was one."""
        self._cache.pop(uh, None)
        try:
            regs = await self.registrations(uh)
            if name is None:
                existed = bool(regs)
                regs = {}
            else:
                existed = regs.pop(name, None) is not None
            if name is None or existed:
                existed = await self._keep(uh, regs) or existed
        except OrchestratorError as exc:
            self._cache.pop(uh, None)
            raise ApiError(
                503, "unavailable", f"the registration could not be removed: {exc}"
            ) from None
        if existed:
            audit("tunnel_removed", user=uh)
        return existed

    async def _verify(self, principal: Principal, url: TunnelUrl) -> None:
        """Call the tunnel's ``/c2l/health`` as the user: it must be their desktop."""
        why = "it did not answer"
        with trio.move_on_after(VERIFY_TIMEOUT_S):
            try:
                status, body = await self._get(principal, url, HEALTH_PATH)
            except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError):
                pass
            else:
                try:
                    data = json.loads(body)
                except ValueError:
                    data = None
                if status == 200 and isinstance(data, dict):
                    if data.get("user") == principal.user_hash:
                        return
                    why = "it answers as another user's desktop"
                else:
                    why = f"its {HEALTH_PATH} answered {status}"
        audit("tunnel_refused", user=principal.user_hash, code="tunnel_unreachable")
        raise ApiError(
            502, "tunnel_unreachable", f"the tunnel could not be verified: {why}"
        ) from None

    async def _get(self, principal: Principal, url: TunnelUrl, path: str) -> tuple[int, bytes]:
        headers = {
            "authorization": f"Bearer {self.key.mint(principal.sub)}",
            "accept": "application/json",
        }
        async with self.pool.stream(
            "GET", url.base + path, headers=_pairs(headers), extensions=self._timeouts()
        ) as response:
            body = b""
            async for piece in response.aiter_stream():
                body += piece
                if len(body) > 64 * 1024:
                    break
            return response.status, body

    @staticmethod
    def _timeouts() -> dict[str, Any]:
        return {"timeout": {"connect": CONNECT_TIMEOUT_S, "read": None, "write": 30.0}}

    # ---- calls through a tunnel --------------------------------------------------------

    @asynccontextmanager
    async def open(
        self,
        principal: Principal,
        reg: Registration,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
    ) -> AsyncIterator[DirectAnswer]:
        """Send one request through ``reg``'s tunnel; yields the answer as it starts.

        :class:`TunnelFailed` when no answer starts (the registration is marked unhealthy);
        leaving the block early (the client went) closes the connection, which aborts the
        request on the desktop.
        """
        out = dict(headers)
        out["authorization"] = f"Bearer {self.key.mint(principal.sub)}"
        if body and "content-type" not in out:
            out["content-type"] = "application/json"
        out["content-length"] = str(len(body))
        try:
            async with self.pool.stream(
                method,
                reg.url.base + target,
                headers=_pairs(out),
                content=body,
                extensions=self._timeouts(),
            ) as response:
                reg.healthy, reg.checked_at = True, time.time()
                got = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers]
                yield DirectAnswer(
                    response.status,
                    wire.response_headers(got),
                    response.aiter_stream(),
                )
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
            reg.healthy, reg.checked_at = False, time.time()
            raise TunnelFailed(str(exc) or type(exc).__name__) from None

    def served(self, uh: str, route: str) -> None:
        """Audit a change of a user's route (``Gateway.served`` counts it in /metrics)."""
        if len(self._last_route) > 10_000:
            self._last_route.clear()  # bounded: a forgotten user's next answer is no change
        if self._last_route.get(uh, route) != route:
            audit("route_changed", user=uh, reason=route)
        self._last_route[uh] = route


def make_direct_routes(key_path: Path, *, allow_private: bool, ttl: float) -> DirectRoutes:
    """The gateway's direct-route state on one host: its key in a file (loaded or made),
    registrations in memory."""
    return DirectRoutes(DirectKey.load_or_create(key_path), AddressGuard(allow_private), ttl)
