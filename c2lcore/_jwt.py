"""Authentication: JWT verification against an Auth0-style JWKS, or a local dev issuer.

Shared by the gateway (every request and WebSocket) and the desktop agent (its direct
endpoint, DESIGN.md section 5), so both verify tokens the same way.

``dev`` mode makes an RS256 key at first use (kept 0600 under the user's config
directory), signs tokens for ``c2l token`` and serves its public key as a JWKS, so the
same verification path runs in development and production.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

import attrs
import httpx
import jwt
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ._config import Config, user_hash

log = logging.getLogger("c2l.auth")

DEV_ISSUER = "c2l-dev"
DEV_AUDIENCE = "c2l"
ADMIN_PERMISSION = "c2l:admin"
#: Tokens the gateway mints for the desktop's direct endpoint (DESIGN.md section 5): its
#: own issuer and audience, so no other token of the user is accepted as one, and a short
#: life, since they cross a third-party tunnel.
DIRECT_ISSUER = "c2l-gateway"
DIRECT_AUDIENCE = "c2l-direct"
DIRECT_TOKEN_TTL_S = 60
#: Clock skew tolerated on ``exp``, ``nbf`` and ``iat``.
LEEWAY_S = 10
#: Asymmetric algorithms only: ``none`` and HMAC (which would let the public key act as a
#: shared secret, "algorithm confusion") are refused before any key is looked at.
ALGORITHMS = ("RS256", "ES256")
#: Longest token looked at; anything longer is malformed (it would only cost CPU).
MAX_TOKEN_BYTES = 16 * 1024


class AuthCode:
    """The ``error`` codes of refused tokens (HTTP 401, or a WebSocket ``error`` + 1008)."""

    MISSING_TOKEN = "missing_token"
    MALFORMED_TOKEN = "malformed_token"
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
    BAD_SIGNATURE = "bad_signature"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    TOKEN_EXPIRED = "token_expired"
    NOT_YET_VALID = "token_not_yet_valid"
    MISSING_CLAIM = "missing_claim"
    UNKNOWN_KID = "unknown_kid"


class AuthError(Exception):
    """A token was refused; ``code`` goes into the 401 body or the WebSocket error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.frozen
class Principal:
    """The authenticated user of a request or connection."""

    sub: str = attrs.field(repr=False)
    user_hash: str
    admin: bool
    expires: float | None


class Authenticator(Protocol):
    """Something that turns a bearer token into a :class:`Principal`."""

    async def verify(self, token: str) -> Principal:
        """Return the token's principal or raise :class:`AuthError`."""
        ...


def _principal(claims: dict[str, Any]) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip():
        raise AuthError(AuthCode.MISSING_CLAIM, "the token has no subject (sub)")
    perms = claims.get("permissions") or []
    scope = claims.get("scope") or ""
    admin = (isinstance(perms, list) and ADMIN_PERMISSION in perms) or (
        isinstance(scope, str) and ADMIN_PERMISSION in scope.split()
    )
    exp = claims.get("exp")
    return Principal(sub, user_hash(sub), admin, float(exp) if exp is not None else None)


def _header(token: str) -> dict[str, Any]:
    """The token's unverified header, with its algorithm checked first."""
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError(AuthCode.MALFORMED_TOKEN, f"the token is over {MAX_TOKEN_BYTES} bytes")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise AuthError(AuthCode.MALFORMED_TOKEN, "the token is not a JWT") from None
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        shown = alg[:20] if isinstance(alg, str) else type(alg).__name__
        raise AuthError(
            AuthCode.UNSUPPORTED_ALGORITHM,
            f"algorithm {shown!r} is not accepted (use {' or '.join(ALGORITHMS)})",
        )
    return header


def decode_token(token: str, key: Any, *, issuer: str, audience: str) -> Principal:
    """Verify ``token`` with ``key`` for ``issuer`` and ``audience``: its principal, or
    :class:`AuthError` with the reason's code."""
    header = _header(token)
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[header["alg"]],
            issuer=issuer,
            audience=audience,
            leeway=LEEWAY_S,
            options={"require": ["exp", "iat", "sub", "iss", "aud"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError(AuthCode.TOKEN_EXPIRED, "the token has expired: get a new one") from None
    except jwt.ImmatureSignatureError:
        raise AuthError(AuthCode.NOT_YET_VALID, "the token is not valid yet (nbf/iat)") from None
    except jwt.InvalidIssuerError:
        raise AuthError(AuthCode.WRONG_ISSUER, "the token's issuer is not accepted") from None
    except jwt.InvalidAudienceError:
        raise AuthError(AuthCode.WRONG_AUDIENCE, "the token's audience is not accepted") from None
    except jwt.InvalidSignatureError:
        raise AuthError(AuthCode.BAD_SIGNATURE, "the token's signature does not verify") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(
            AuthCode.MISSING_CLAIM, f"the token lacks the {exc.claim!r} claim"
        ) from None
    except jwt.InvalidKeyError:
        # e.g. an ES256 header on a token whose kid names an RSA key
        raise AuthError(
            AuthCode.UNSUPPORTED_ALGORITHM, "the token's algorithm does not fit its key"
        ) from None
    except jwt.PyJWTError:
        raise AuthError(AuthCode.MALFORMED_TOKEN, "the token is malformed") from None
    except (ValueError, TypeError, OverflowError):  # odd claim values deep in the library
        raise AuthError(AuthCode.MALFORMED_TOKEN, "the token is malformed") from None
    return _principal(claims)


@attrs.define
class DevIssuer:
    """The local development issuer: one RS256 key, kept 0600 at ``key_path``."""

    key: rsa.RSAPrivateKey
    kid: str

    @classmethod
    def load_or_create(cls, key_path: Path) -> DevIssuer:
        """Load the key, making it (0600, directory 0700) on first use."""
        if key_path.exists():
            data = key_path.read_bytes()
            loaded = serialization.load_pem_private_key(data, password=None)
            if not isinstance(loaded, rsa.RSAPrivateKey):
                raise ValueError(f"{key_path} does not hold an RSA private key: remove it")
            key = loaded
        else:
            key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            tmp = key_path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            os.replace(tmp, key_path)
            log.info("made a development signing key at %s", key_path)
        numbers = key.public_key().public_numbers()
        kid = f"dev-{numbers.n % (1 << 48):012x}"
        return cls(key, kid)

    def sign(self, sub: str, *, admin: bool = False, ttl: float = 3600) -> str:
        """A token for ``sub``, valid for ``ttl`` seconds."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": DEV_ISSUER,
            "aud": DEV_AUDIENCE,
            "sub": sub,
            "iat": now,
            "nbf": now,
            "exp": now + int(ttl),
            "jti": uuid.uuid4().hex,
        }
        if admin:
            claims["permissions"] = [ADMIN_PERMISSION]
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    def jwks(self) -> dict[str, Any]:
        """The public key as a JSON Web Key Set."""
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return {"keys": [jwk]}

    async def verify(self, token: str) -> Principal:
        """Verify a token of this issuer."""
        return decode_token(token, self.key.public_key(), issuer=DEV_ISSUER, audience=DEV_AUDIENCE)


@attrs.define
class JwksAuthenticator:
    """Verifies RS256/ES256 tokens against an issuer's JWKS URL (Auth0 and the like).

    Keys are cached by ``kid``. A token naming an unknown ``kid`` triggers one refresh of
    the key set, at most once per ``min_refresh_s``, so key rotation works without a
    restart and a flood of made-up kids cannot hammer the issuer.
    """

    url: str
    issuer: str
    audience: str
    min_refresh_s: float = 30.0
    _keys: dict[str, jwt.PyJWK] = attrs.field(factory=dict)
    _last_refresh: float | None = None
    _lock: trio.Lock = attrs.field(factory=trio.Lock)
    #: How many times the key set was fetched (for tests and metrics).
    fetches: int = 0

    async def _refresh(self) -> None:
        now = trio.current_time()
        if self._last_refresh is not None and now - self._last_refresh < self.min_refresh_s:
            return
        self._last_refresh = now
        self.fetches += 1
        try:
            with trio.fail_after(10):
                async with httpx.AsyncClient() as client:
                    r = await client.get(self.url)
                    r.raise_for_status()
                    data = r.json()
            keyset = jwt.PyJWKSet.from_dict(data)
        except (
            httpx.HTTPError,
            trio.TooSlowError,
            ValueError,
            TypeError,
            AttributeError,
            jwt.PyJWTError,
        ) as exc:
            log.warning("could not fetch the JWKS from %s: %s", self.url, exc)
            return
        self.load_keys(keyset)
        log.info("loaded %d signing keys from %s", len(self._keys), self.url)

    def load_keys(self, keyset: jwt.PyJWKSet) -> None:
        """Use ``keyset`` (fetched, or a copy kept from an earlier fetch)."""
        self._keys = {k.key_id: k for k in keyset.keys if k.key_id}

    async def verify(self, token: str) -> Principal:
        """Verify ``token``, fetching the issuer's keys when needed."""
        header = _header(token)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError(AuthCode.UNKNOWN_KID, "the token names no signing key (kid)")
        if kid not in self._keys:
            async with self._lock:
                if kid not in self._keys:  # another task may have just fetched it
                    await self._refresh()
        key = self._keys.get(kid)
        if key is None:
            raise AuthError(
                AuthCode.UNKNOWN_KID, "the token's signing key (kid) is not in the issuer's JWKS"
            )
        if key.algorithm_name != header["alg"]:
            raise AuthError(
                AuthCode.UNSUPPORTED_ALGORITHM,
                f"key {kid[:40]!r} is for {key.algorithm_name}, not {header['alg']}",
            )
        return decode_token(token, key.key, issuer=self.issuer, audience=self.audience)


def make_authenticator(config: Config) -> tuple[Authenticator, DevIssuer | None]:
    """The authenticator for ``config``, and the dev issuer when in dev mode."""
    if config.auth_mode == "jwks":
        assert config.jwks_url and config.jwt_issuer and config.jwt_audience
        return JwksAuthenticator(config.jwks_url, config.jwt_issuer, config.jwt_audience), None
    issuer = DevIssuer.load_or_create(config.dev_key_path)
    return issuer, issuer


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
