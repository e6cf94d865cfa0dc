"""Configuration of the gateway and orchestrator (DESIGN.md section 2, "Configuration").

Every setting comes from a ``C2L_*`` environment variable and can be overridden by the
matching ``c2l serve`` flag. With nothing set, the embedded defaults run a development
gateway (local RS256 issuer) against the invoking user's rootless Podman socket.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

#: Podman REST socket that the project's set-up script starts (as root, for the service user).
SERVICE_SOCKET = "/run/c2l/podman.sock"
DEFAULT_IMAGE = "localhost/c2l-proxy:latest"
PROXY_PORT = 8080  # inside the container


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names it and the fix."""


def user_hash(sub: str) -> str:
    """First 16 hex digits of sha256(sub): the user's name on Podman objects and in logs."""
    return hashlib.sha256(sub.encode()).hexdigest()[:16]


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


def parse_memory(text: str) -> int:
    """``512m`` -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"C2L_PROXY_MEMORY={text!r} is not a size such as 512m or 1g")
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
    max_sessions: int = 1000
    proxy_memory: int = 512 * 1024**2
    proxy_cpus: float = 0.5
    proxy_pids_limit: int = 64
    #: Where the development issuer keeps its private key (0600).
    dev_key_path: Path = attrs.field(factory=lambda: config_dir() / "dev-jwt-key.pem")

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
        }
        for var, field in text.items():
            if env.get(var):
                kw[field] = env[var]
        for var, field in {
            "C2L_IDLE_TIMEOUT": "idle_timeout",
            "C2L_CLEANUP_INTERVAL": "cleanup_interval",
            "C2L_HEALTH_INTERVAL": "health_interval",
            "C2L_HEARTBEAT_INTERVAL": "heartbeat_interval",
            "C2L_PROXY_CPUS": "proxy_cpus",
        }.items():
            if env.get(var):
                kw[field] = _float(var, env[var])
        if env.get("C2L_MAX_SESSIONS"):
            kw["max_sessions"] = _int("C2L_MAX_SESSIONS", env["C2L_MAX_SESSIONS"])
        if env.get("C2L_PROXY_MEMORY"):
            kw["proxy_memory"] = parse_memory(env["C2L_PROXY_MEMORY"])
        for key, value in overrides.items():
            if value is not None:
                kw[key] = value
        if isinstance(kw.get("proxy_memory"), str):
            kw["proxy_memory"] = parse_memory(kw["proxy_memory"])
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
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        if not self.podman_url.startswith(("unix://", "http://")):
            raise ConfigError(f"C2L_PODMAN_URL={self.podman_url!r}: use unix:///path/podman.sock")
        if not 0 < self.proxy_cpus <= 64:
            raise ConfigError(f"C2L_PROXY_CPUS={self.proxy_cpus} is out of range")
