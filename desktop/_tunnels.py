"""Tunnel providers and the tunnel manager: the direct endpoint's public URL (DESIGN.md 5).

A provider turns the direct endpoint's local address into a public URL: :class:`UrlTunnel`
(a URL the user already forwards to it: a router port-forward, a named cloudflared tunnel,
Tailscale Funnel) or :class:`NgrokTunnel` (the official ``ngrok`` SDK, an optional extra).
:class:`TunnelManager` opens it, registers the URL with the gateway
(``PUT /api/desktop/tunnel``) and renews it, checks the URL every ``health_interval``
seconds (``GET /c2l/health`` without a token: the endpoint answers 401 with its instance id,
so no token ever crosses the tunnel for it), reopens it with jittered exponential backoff
when it fails, and on exit deletes the registration and closes the provider, shielded and
bounded, so that Ctrl-C or SIGTERM leaves nothing registered.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import attrs
import httpx
import trio

from c2lcore import Backoff, BackoffPolicy

from ._direct import HEALTH_PATH, INSTANCE_HEADER, gateway_api_url

#: The gateway's registration of this desktop's tunnel.
TUNNEL_API_PATH: Final = "/api/desktop/tunnel"
#: Environment variables: the ngrok authtoken, and the ngrok server address (tests only:
#: it points the SDK at a listener on 127.0.0.1 instead of ngrok's cloud).
NGROK_AUTHTOKEN_ENV: Final = "NGROK_AUTHTOKEN"
NGROK_SERVER_ADDR_ENV: Final = "C2L_NGROK_SERVER_ADDR"
#: ngrok's error codes for a refused authtoken (malformed, invalid, account not allowed).
NGROK_AUTH_ERRORS: Final = ("ERR_NGROK_105", "ERR_NGROK_106", "ERR_NGROK_107", "ERR_NGROK_4018")

TokenGetter = Callable[[], Awaitable[str]]
StatusCallback = Callable[[str], None]


class TunnelError(Exception):
    """The tunnel could not be opened or stopped working; a one-line message says why."""


class TunnelAuthError(TunnelError):
    """The provider refused our credentials: retrying cannot help (not retried)."""


class TunnelProvider(Protocol):
    """Something that gives the direct endpoint a public URL."""

    name: str

    async def open(self, local_addr: str) -> str:
        """Expose ``local_addr`` (``127.0.0.1:11480``); the public URL, or TunnelError."""
        ...

    async def aclose(self) -> None:
        """Stop exposing it (idempotent; bounded)."""
        ...


@attrs.define
class UrlTunnel:
    """A public URL that the user already forwards to the direct endpoint."""

    url: str
    name: str = "url"

    async def open(self, local_addr: str) -> str:
        """The URL as given (the forwarding is the user's)."""
        return self.url.rstrip("/")

    async def aclose(self) -> None:
        """Nothing to close."""


def _one_line(exc: BaseException) -> str:
    parts = [str(a) for a in exc.args] or [type(exc).__name__]
    text = ": ".join(p for p in parts if p) or type(exc).__name__
    return " ".join(text.split())[:300]


@attrs.define(repr=False)
class NgrokTunnel:
    """An ngrok HTTPS endpoint through the official SDK (``pip install 'cloudtolocalllm[ngrok]'``).

    The SDK's calls block and its connect has no timeout of its own (against a server that
    never answers it waits for minutes), so each runs in a worker thread under
    ``connect_timeout``; a thread still connecting when we give up closes whatever it
    opens late. ``server_addr`` is for tests (a listener on 127.0.0.1).
    """

    authtoken: str
    domain: str | None = None
    server_addr: str | None = None
    connect_timeout: float = 20.0
    close_timeout: float = 5.0
    name: str = "ngrok"
    _url: str | None = None

    def __repr__(self) -> str:  # never the authtoken
        return f"NgrokTunnel(domain={self.domain!r}, server_addr={self.server_addr!r})"

    async def open(self, local_addr: str) -> str:
        """Start an HTTPS-only listener forwarding to ``local_addr``; its public URL."""
        try:
            import ngrok  # an optional extra
        except ImportError:
            raise TunnelAuthError(
                "the ngrok SDK is not installed: pip install 'cloudtolocalllm[ngrok]'"
            ) from None
        if not self.authtoken:
            raise TunnelAuthError(
                f"no ngrok authtoken: set {NGROK_AUTHTOKEN_ENV} or pass --ngrok-authtoken-file"
            )
        options: dict[str, Any] = {
            "proto": "http",
            "authtoken": self.authtoken,
            "schemes": ["HTTPS"],
            "force_new_session": True,
        }
        if self.domain:
            options["domain"] = self.domain
        if self.server_addr:
            options["server_addr"] = self.server_addr
        lock = threading.Lock()
        given_up = False

        def forward() -> str:
            listener = ngrok.forward(local_addr, **options)
            url = str(listener.url())
            with lock:
                if given_up:  # the caller timed out or was cancelled meanwhile
                    ngrok.disconnect(url)
            return url

        where = self.server_addr or "ngrok's cloud"
        try:
            with trio.fail_after(self.connect_timeout):
                url = await trio.to_thread.run_sync(forward, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise TunnelError(
                f"ngrok: no session with {where} within {self.connect_timeout:g} s"
            ) from None
        except Exception as exc:
            text = _one_line(exc)
            if any(code in text for code in NGROK_AUTH_ERRORS) or "authentication failed" in (
                text.lower()
            ):
                raise TunnelAuthError(f"ngrok refused the authtoken: {text}") from None
            raise TunnelError(f"ngrok: {text} ({where})") from None
        finally:
            with lock:
                given_up = True
        self._url = url
        return url

    async def aclose(self) -> None:
        """Close the listener (in a thread, at most ``close_timeout`` seconds)."""
        url, self._url = self._url, None
        if url is None:
            return
        import ngrok

        with trio.move_on_after(self.close_timeout):
            try:
                await trio.to_thread.run_sync(
                    functools.partial(ngrok.disconnect, url), abandon_on_cancel=True
                )
            except Exception as exc:  # closing is best effort: the session ends with us
                raise TunnelError(f"ngrok: closing {url}: {_one_line(exc)}") from None


@attrs.define
class TunnelStatus:
    """The tunnel as the agent reports it.

    ``state``: ``off`` (none configured, or stopped), ``starting`` (opening, or waiting for
    the first health check), ``up`` (open and its last health check passed), ``failed``
    (``error`` says why; retried with backoff unless the provider refused our credentials).
    ``registered`` says whether the gateway holds the URL (``registration_error`` if not).
    """

    provider: str | None = None
    state: str = "off"
    url: str | None = None
    error: str | None = None
    registered: bool = False
    registration_error: str | None = None
    #: Counters for status displays and tests.
    opens: int = 0
    registrations: int = 0
    health_checks: int = 0
    _changed: trio.Event = attrs.field(factory=trio.Event, repr=False)

    def changed(self) -> None:
        """Wake whoever waits in :meth:`wait_until`."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[TunnelStatus], bool]) -> None:
        """Block until ``predicate(self)`` holds; re-checked at every change."""
        while not predicate(self):
            await self._changed.wait()


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        return f"{body.get('error', '?')}: {body.get('message', '')}".rstrip(": ")
    except (ValueError, AttributeError):
        return resp.text[:200]


@attrs.define(eq=False)
class TunnelManager:
    """Keeps the direct endpoint reachable through ``provider`` and registered.

    ``instance`` is the direct endpoint's instance id, which its ``/c2l/health`` answers
    (header :data:`INSTANCE_HEADER`): the health check knows that the public URL leads to
    this very agent.
    """

    provider: TunnelProvider
    local_addr: str
    gateway_url: str
    token: TokenGetter = attrs.field(repr=False)
    instance: str
    http: httpx.AsyncClient = attrs.field(repr=False)
    report: StatusCallback = print
    status: TunnelStatus = attrs.field(factory=TunnelStatus)
    backoff: Backoff = attrs.field(factory=lambda: Backoff(BackoffPolicy(base=1.0, cap=60.0)))
    health_interval: float = 30.0
    #: Consecutive failed health checks that make the tunnel reopen.
    health_failures: int = 2
    request_timeout: float = 10.0
    close_timeout: float = 5.0
    #: The desktop's name (``c2l desktop --name``): the gateway keeps one registration per
    #: desktop of a user. None: none sent (the gateway's ``default``).
    name: str | None = None

    def __attrs_post_init__(self) -> None:
        self.status.provider = self.provider.name

    @property
    def _api(self) -> str:
        return gateway_api_url(self.gateway_url, TUNNEL_API_PATH)

    def _set(self, state: str, error: str | None = None) -> None:
        self.status.state = state
        self.status.error = error
        self.status.changed()

    async def run(self) -> None:
        """Open, register, watch, reopen; until cancelled. Unregisters and closes on exit."""
        try:
            while True:
                self._set("starting", self.status.error)  # the last failure stays visible
                try:
                    url = await self.provider.open(self.local_addr)
                except TunnelAuthError as exc:
                    self._set("failed", str(exc))
                    self.report(f"tunnel failed: {exc} (not retried)")
                    await trio.sleep_forever()
                except TunnelError as exc:
                    reason = str(exc)
                else:
                    self.status.url = url
                    self.status.opens += 1
                    self.report(f"tunnel {self.provider.name} open at {url}")
                    reason = await self._watch(url)
                    await self._close_provider()
                self._set("failed", reason)
                delay = self.backoff.next_delay()
                self.report(f"tunnel failed: {reason}; reopening in {delay:.1f} s")
                await trio.sleep(delay)
        finally:
            with trio.CancelScope(shield=True):
                await self._unregister()
                await self._close_provider()
            self._set("off", self.status.error)

    async def _watch(self, url: str) -> str:
        """Keep ``url`` registered and check it; returns why it stopped working."""
        reason = "stopped"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_registered, url)
            reason = await self._check_health(url)
            nursery.cancel_scope.cancel()
        return reason

    async def _check_health(self, url: str) -> str:
        failures = 0
        while True:
            problem = await self._health_once(url)
            self.status.health_checks += 1
            if problem is None:
                failures = 0
                if self.status.state != "up":
                    self.backoff.reset()
                    self._set("up")
                    self.report(f"tunnel up: {url} reaches this desktop")
            else:
                failures += 1
                self.status.error = problem
                self.status.changed()
                if failures >= self.health_failures:
                    return problem
            await trio.sleep(self.health_interval)

    async def _health_once(self, url: str) -> str | None:
        """None if ``url`` leads to this agent's direct endpoint, else what is wrong."""
        try:
            with trio.fail_after(self.request_timeout):
                resp = await self.http.get(url + HEALTH_PATH)
        except trio.TooSlowError:
            return f"health check of {url}: no answer within {self.request_timeout:g} s"
        except httpx.HTTPError as exc:
            return f"health check of {url}: {str(exc) or type(exc).__name__}"
        if resp.status_code != 401 or resp.headers.get(INSTANCE_HEADER) != self.instance:
            return (
                f"health check of {url}: HTTP {resp.status_code} from something that is not"
                " this desktop's direct endpoint"
            )
        return None

    async def _keep_registered(self, url: str) -> None:
        """PUT the registration, and again every ttl/3; failures retried with backoff."""
        backoff = Backoff(self.backoff.policy)
        while True:
            ttl = await self._register(url)
            if ttl is None:
                await trio.sleep(backoff.next_delay())
            else:
                backoff.reset()
                await trio.sleep(max(ttl / 3, 1.0))

    async def _register(self, url: str) -> float | None:
        """One PUT; the registration's ttl, or None (the reason is in the status)."""
        error: str | None
        ttl: float | None = None
        try:
            token = await self.token()
            with trio.fail_after(self.request_timeout):
                resp = await self.http.put(
                    self._api,
                    json={
                        "url": url,
                        "provider": self.provider.name,
                        **({"name": self.name} if self.name is not None else {}),
                    },
                    headers={"Authorization": f"Bearer {token}"},
                )
        except trio.TooSlowError:
            error = f"the gateway did not answer within {self.request_timeout:g} s"
        except (httpx.HTTPError, OSError) as exc:
            error = f"cannot reach the gateway: {str(exc) or type(exc).__name__}"
        except Exception as exc:  # the token source failed (TokenError)
            error = str(exc) or type(exc).__name__
        else:
            if resp.status_code == 200:
                error = None
                try:
                    ttl = float(resp.json()["ttl"])
                except (ValueError, KeyError, TypeError):
                    ttl = 60.0
                if not math.isfinite(ttl) or ttl <= 0:
                    ttl = 60.0
            else:
                error = f"HTTP {resp.status_code} {_error_text(resp)}"
        was = (self.status.registered, self.status.registration_error)
        self.status.registered = error is None
        self.status.registration_error = error
        if error is None:
            self.status.registrations += 1
        self.status.changed()
        if (self.status.registered, error) != was:
            if ttl is not None:
                self.report(f"tunnel registered with the gateway ({url}, ttl {ttl:g} s)")
            else:
                self.report(f"tunnel registration failed: {error}; retrying")
        return ttl

    async def _unregister(self) -> None:
        """DELETE the registration if the gateway holds one (bounded; shielded by the caller)."""
        if not self.status.registered:
            return
        with trio.move_on_after(self.close_timeout):
            try:
                token = await self.token()
                resp = await self.http.delete(
                    self._api,
                    params={"name": self.name} if self.name is not None else None,
                    headers={"Authorization": f"Bearer {token}"},
                )
                if resp.status_code in (204, 404):
                    self.status.registered = False
                    self.report("tunnel unregistered")
            except Exception as exc:  # best effort: the registration expires by itself
                self.report(f"tunnel not unregistered ({type(exc).__name__}); it expires by itself")

    async def _close_provider(self) -> None:
        with trio.move_on_after(self.close_timeout):
            try:
                await self.provider.aclose()
            except TunnelError as exc:
                self.report(str(exc))
