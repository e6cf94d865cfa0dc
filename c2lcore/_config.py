"""Configuration of the gateway and orchestrator (DESIGN.md section 2, "Configuration").

Every setting comes from a ``C2L_*`` environment variable and can be overridden by the
matching ``c2l serve`` flag. With nothing set, the embedded defaults run a development
gateway (local RS256 issuer) against the invoking user's rootless Podman socket.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs

#: Podman REST socket that the project's set-up script starts (as root, for the service user).
SERVICE_SOCKET = "/run/c2l/podman.sock"
DEFAULT_IMAGE = "localhost/c2l-proxy:latest"
#: Largest C2L_MAX_BLOB: the most a streamed request body may have on the wire
#: (``wire.MAX_STREAMED_BODY_BYTES``; this package sits below ``wire``).
MAX_BLOB_LIMIT = 1024**3


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names it and the fix."""


def user_hash(sub: str) -> str:
    """First 16 hex digits of sha256(sub): the user's name on Podman objects and in logs."""
    return hashlib.sha256(sub.encode()).hexdigest()[:16]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (as given to ``--host``) is a loopback address.

    Loopback is 127.0.0.0/8, ::1 and the name ``localhost``; anything else, including
    0.0.0.0 / :: (every interface) and other names, may be reachable from elsewhere.
    """
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def config_dir() -> Path:
    """The invoking user's configuration directory for c2l (XDG)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "c2l"


def default_podman_url() -> str:
    """The rootless Podman socket of the invoking user.

    Root has no rootless Podman of its own: it uses the service user's socket that the
    set-up script starts at :data:`SERVICE_SOCKET`.
    """
    if os.geteuid() == 0 or Path(SERVICE_SOCKET).exists():
        return f"unix://{SERVICE_SOCKET}"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}"
    return f"unix://{runtime}/podman/podman.sock"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)[bB]?\s*$")


def parse_memory(text: str, name: str = "C2L_PROXY_MEMORY") -> int:
    """``512m`` -> bytes (``name`` is the setting that an error message names)."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"{name}={text!r} is not a size such as 512m or 1g")
    mult = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def _float(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{name}={text!r} must be greater than 0")
    return value


_YES = frozenset({"1", "true", "yes", "on"})
_NO = frozenset({"0", "false", "no", "off", ""})


def _flag(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value not in _YES | _NO:
        raise ConfigError(f"{name}={text!r}: use 1 (on) or 0 (off)")
    return value in _YES


def insecure_dev_auth_from_env(env: Mapping[str, str] | None = None) -> bool:
    """``C2L_INSECURE_DEV_AUTH`` as a flag (``c2l doctor`` reads the environment form)."""
    env = os.environ if env is None else env
    return _flag("C2L_INSECURE_DEV_AUTH", env.get("C2L_INSECURE_DEV_AUTH", ""))


def allow_private_tunnels_from_env(env: Mapping[str, str] | None = None) -> bool:
    """``C2L_ALLOW_PRIVATE_TUNNELS`` as a flag (``c2l doctor`` reads the environment form)."""
    env = os.environ if env is None else env
    return _flag("C2L_ALLOW_PRIVATE_TUNNELS", env.get("C2L_ALLOW_PRIVATE_TUNNELS", ""))


#: What the gateway says (at start and in ``c2l doctor``) when private tunnels are allowed.
PRIVATE_TUNNELS_WARNING = (
    "insecure: C2L_ALLOW_PRIVATE_TUNNELS=1 lets users register tunnel URLs on loopback,"
    " private and link-local addresses and plain http, so the gateway can be made to call"
    " its own network: for development and tests only"
)


#: What the gateway says (at start, in ``c2l doctor``, on the page) when development auth
#: is allowed off loopback on purpose.
INSECURE_DEV_AUTH_WARNING = (
    "insecure: development auth is on and allowed off loopback (--insecure-dev-auth,"
    " C2L_INSECURE_DEV_AUTH=1): anyone who can reach this gateway can sign in as any user"
    " and use that user's desktop; real users need C2L_AUTH_MODE=jwks"
)


def _host_port(name: str, text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name}={text!r} is not host:port, e.g. 127.0.0.1:9464")
    return host, int(port)


def _public_url(text: str) -> str:
    """C2L_PUBLIC_URL checked, as ``scheme://host[:port]`` (no trailing slash)."""
    url = urlsplit(text.strip())
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            f"C2L_PUBLIC_URL={text!r} is not the URL clients use, e.g. https://c2l.example.com"
        )
    if url.path.strip("/") or url.query or url.fragment or url.username or url.password:
        raise ConfigError(f"C2L_PUBLIC_URL={text!r}: give scheme://host[:port] only")
    return urlunsplit((url.scheme, url.netloc, "", "", ""))


#: An OAuth client id as identity providers show them (Auth0: 32 letters and digits).
_OIDC_CLIENT_ID = re.compile(r"[!-~]{1,256}")


def _int(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a whole number") from None
    if value <= 0:
        raise ConfigError(f"{name}={text!r} must be greater than 0")
    return value


@attrs.frozen
class Config:
    """Settings of one gateway process."""

    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_mode: str = "dev"
    jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    podman_url: str = attrs.field(factory=default_podman_url)
    proxy_image: str = DEFAULT_IMAGE
    idle_timeout: float = 600.0
    cleanup_interval: float = 60.0
    health_interval: float = 30.0
    #: Seconds between the gateway's pings of each client connection; a peer silent
    #: for two intervals is dropped (C2L_HEARTBEAT_INTERVAL).
    heartbeat_interval: float = 30.0
    #: Seconds a session's proxy keeps the answers of a client whose connection dropped
    #: (without a close) for it to resume (C2L_RESUME_WINDOW, DESIGN.md section 2).
    resume_window: float = 30.0
    max_sessions: int = 1000
    proxy_memory: int = 512 * 1024**2
    proxy_cpus: float = 0.5
    proxy_pids_limit: int = 64
    #: Largest blob upload (``POST /api/ollama/api/blobs/<digest>``, C2L_MAX_BLOB), streamed
    #: to the desktop in pieces; bigger ones get 413 (``ollama create`` on the desktop).
    max_blob: int = 64 * 1024**2
    #: Where the development issuer keeps its private key (0600).
    dev_key_path: Path = attrs.field(factory=lambda: config_dir() / "dev-jwt-key.pem")
    #: Development auth off loopback, on purpose (--insecure-dev-auth, C2L_INSECURE_DEV_AUTH).
    insecure_dev_auth: bool = False
    #: The URL clients use (C2L_PUBLIC_URL): when set, ``endpoint`` and ``bridgeEndpoint``
    #: are built from it, never from the request's Host header.
    public_url: str | None = attrs.field(
        default=None, converter=attrs.converters.optional(_public_url)
    )
    #: ``host:port`` where ``/metrics`` is served without a token (C2L_METRICS_ADDR).
    metrics_addr: str = "127.0.0.1:9464"
    #: Where sessions run (C2L_RUNTIME): ``podman`` (this host) or ``kubernetes``.
    runtime: str = "podman"
    #: The namespace of sessions and shared state on Kubernetes (C2L_K8S_NAMESPACE; the
    #: service account's own namespace in a cluster when unset).
    k8s_namespace: str | None = None
    #: This replica's id on every object it makes (C2L_REPLICA_ID: on Kubernetes its pod's
    #: name, from the downward API, which also makes that pod the owner of its sessions).
    replica_id: str | None = None
    #: Tunnel registrations to loopback, private and link-local hosts, and plain http
    #: (C2L_ALLOW_PRIVATE_TUNNELS; development and tests only, DESIGN.md section 5).
    allow_private_tunnels: bool = False
    #: How long a tunnel registration lives unless the agent renews it (C2L_TUNNEL_TTL).
    tunnel_ttl: float = 120.0
    #: The web page's OpenID Connect client id at the issuer (C2L_OIDC_CLIENT_ID; jwks mode
    #: only): when set, the page offers "Sign in" through the issuer's authorization-code
    #: flow with PKCE, asking for an access token for ``jwt_audience``.
    oidc_client_id: str | None = None
    #: The key of the audit trail's keyed user hash (0600, beside the dev key by default).
    audit_key_path: Path = attrs.field()
    #: The key that signs the gateway's direct-route tokens (0600, beside the dev key).
    direct_key_path: Path = attrs.field()

    @direct_key_path.default
    def _direct_key_next_to_the_dev_key(self) -> Path:
        return self.dev_key_path.parent / "direct-jwt-key.pem"

    @audit_key_path.default
    def _audit_key_next_to_the_dev_key(self) -> Path:
        return self.dev_key_path.parent / "audit-hmac-key"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Read ``C2L_*`` variables from ``env`` (default: os.environ), then apply flags.

        ``overrides`` whose value is None are ignored, so argparse namespaces can be passed
        straight through.
        """
        env = os.environ if env is None else env
        kw: dict[str, Any] = {}
        text = {
            "C2L_AUTH_MODE": "auth_mode",
            "C2L_JWKS_URL": "jwks_url",
            "C2L_JWT_ISSUER": "jwt_issuer",
            "C2L_JWT_AUDIENCE": "jwt_audience",
            "C2L_PODMAN_URL": "podman_url",
            "C2L_PROXY_IMAGE": "proxy_image",
            "C2L_PUBLIC_URL": "public_url",
            "C2L_METRICS_ADDR": "metrics_addr",
            "C2L_RUNTIME": "runtime",
            "C2L_K8S_NAMESPACE": "k8s_namespace",
            "C2L_REPLICA_ID": "replica_id",
            "C2L_OIDC_CLIENT_ID": "oidc_client_id",
        }
        for var, field in text.items():
            if env.get(var):
                kw[field] = env[var]
        for var, field in {
            "C2L_IDLE_TIMEOUT": "idle_timeout",
            "C2L_CLEANUP_INTERVAL": "cleanup_interval",
            "C2L_HEALTH_INTERVAL": "health_interval",
            "C2L_HEARTBEAT_INTERVAL": "heartbeat_interval",
            "C2L_RESUME_WINDOW": "resume_window",
            "C2L_PROXY_CPUS": "proxy_cpus",
            "C2L_TUNNEL_TTL": "tunnel_ttl",
        }.items():
            if env.get(var):
                kw[field] = _float(var, env[var])
        if env.get("C2L_MAX_SESSIONS"):
            kw["max_sessions"] = _int("C2L_MAX_SESSIONS", env["C2L_MAX_SESSIONS"])
        if env.get("C2L_PROXY_MEMORY"):
            kw["proxy_memory"] = parse_memory(env["C2L_PROXY_MEMORY"])
        if env.get("C2L_MAX_BLOB"):
            kw["max_blob"] = parse_memory(env["C2L_MAX_BLOB"], "C2L_MAX_BLOB")
        if "C2L_INSECURE_DEV_AUTH" in env:
            kw["insecure_dev_auth"] = insecure_dev_auth_from_env(env)
        if "C2L_ALLOW_PRIVATE_TUNNELS" in env:
            kw["allow_private_tunnels"] = allow_private_tunnels_from_env(env)
        for key, value in overrides.items():
            if value is not None:
                kw[key] = value
        if isinstance(kw.get("proxy_memory"), str):
            kw["proxy_memory"] = parse_memory(kw["proxy_memory"])
        if isinstance(kw.get("max_blob"), str):
            kw["max_blob"] = parse_memory(kw["max_blob"], "C2L_MAX_BLOB")
        config = cls(**kw)
        config.check()
        return config

    def check(self) -> None:
        """Raise :class:`ConfigError` for settings that cannot work together."""
        if self.auth_mode not in ("dev", "jwks"):
            raise ConfigError(f"C2L_AUTH_MODE={self.auth_mode!r}: use 'dev' or 'jwks'")
        if self.auth_mode == "jwks":
            missing = [
                name
                for name, value in (
                    ("C2L_JWKS_URL", self.jwks_url),
                    ("C2L_JWT_ISSUER", self.jwt_issuer),
                    ("C2L_JWT_AUDIENCE", self.jwt_audience),
                )
                if not value
            ]
            if missing:
                raise ConfigError(f"C2L_AUTH_MODE=jwks needs {', '.join(missing)}")
        if self.runtime not in ("podman", "kubernetes"):
            raise ConfigError(f"C2L_RUNTIME={self.runtime!r}: use 'podman' or 'kubernetes'")
        if self.replica_id is not None and not re.fullmatch(
            r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", self.replica_id
        ):
            raise ConfigError(
                f"C2L_REPLICA_ID={self.replica_id!r} is not a DNS-1123 label (a pod's name)"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        if not self.podman_url.startswith(("unix://", "http://")):
            raise ConfigError(f"C2L_PODMAN_URL={self.podman_url!r}: use unix:///path/podman.sock")
        if not 0 < self.max_blob <= MAX_BLOB_LIMIT:
            raise ConfigError(
                f"C2L_MAX_BLOB={self.max_blob} is out of range: give 1 byte to 1g (e.g. 64m)"
            )
        if not 0 < self.proxy_cpus <= 64:
            raise ConfigError(f"C2L_PROXY_CPUS={self.proxy_cpus} is out of range")
        if not 0 <= self.resume_window < 86400:
            raise ConfigError(f"C2L_RESUME_WINDOW={self.resume_window} is out of range")
        if self.auth_mode == "dev" and not self.insecure_dev_auth and not is_loopback(self.host):
            raise ConfigError(
                "development auth (C2L_AUTH_MODE=dev, the default) serves loopback only and"
                f" --host {self.host} is not loopback: anyone who can reach it could sign in as"
                " any user. Set C2L_AUTH_MODE=jwks (with C2L_JWKS_URL, C2L_JWT_ISSUER,"
                " C2L_JWT_AUDIENCE), or allow it on purpose with --insecure-dev-auth"
                " (C2L_INSECURE_DEV_AUTH=1)"
            )
        _host_port("C2L_METRICS_ADDR", self.metrics_addr)
        if self.oidc_client_id is not None and not _OIDC_CLIENT_ID.fullmatch(self.oidc_client_id):
            raise ConfigError(
                f"C2L_OIDC_CLIENT_ID={self.oidc_client_id[:40]!r} is not a client id: 1-256"
                " printable characters without spaces, as the identity provider shows it"
            )

    @property
    def metrics_bind(self) -> tuple[str, int]:
        """C2L_METRICS_ADDR as (host, port)."""
        return _host_port("C2L_METRICS_ADDR", self.metrics_addr)

    @property
    def oidc_client_id_for_page(self) -> str | None:
        """The client id the page signs in with: C2L_OIDC_CLIENT_ID in jwks mode, else None."""
        return self.oidc_client_id if self.auth_mode == "jwks" else None

    @property
    def oidc_warning(self) -> str | None:
        """What to say when C2L_OIDC_CLIENT_ID is set where it means nothing (dev mode)."""
        if self.oidc_client_id and self.auth_mode != "jwks":
            return (
                "C2L_OIDC_CLIENT_ID is ignored: the page signs in with the identity provider"
                " in C2L_AUTH_MODE=jwks only (development mode has its own issuer)"
            )
        return None

    @property
    def dev_auth_warning(self) -> str | None:
        """The warning to give when development auth is allowed off loopback on purpose."""
        if self.auth_mode == "dev" and self.insecure_dev_auth:
            return INSECURE_DEV_AUTH_WARNING
        return None
