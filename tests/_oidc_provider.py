"""A real OpenID Connect provider on 127.0.0.1 for the web page's sign-in tests.

Built with authlib's Flask authorization server: the authorization-code grant with PKCE
(S256, required) and the OpenID Connect extension (ID token with ``nonce``), the
refresh-token grant (rotating), discovery at ``/.well-known/openid-configuration``, a
JWKS and an ``end_session_endpoint``. Like Auth0, it takes an ``audience`` parameter at
the authorization endpoint and issues the access token as an RS256 JWT for that API
audience (``aud``), while the ID token's ``aud`` is the client id; the gateway in
``jwks`` mode therefore accepts the access token and refuses the ID token.

The login is automatic for one test user (``sub``): the authorization endpoint approves
at once and redirects back. It runs Werkzeug's threaded server in a thread of its own;
what it saw (authorization requests, token requests, logouts) is kept for assertions.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import jwt
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core import UserInfo
from authlib.oidc.core.grants import OpenIDCode
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, Response, jsonify, redirect, request
from werkzeug.serving import make_server

from .conftest import free_port

SCOPES = "openid profile email offline_access"


@attrs.define
class _Client:
    """A public single-page-app client: no secret, PKCE, code + refresh grants."""

    client_id: str
    redirect_uris: list[str]

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope: str) -> str:
        allowed = set(SCOPES.split())
        return " ".join(s for s in (scope or "").split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return False

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "none"

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("authorization_code", "refresh_token")


@attrs.define
class _User:
    sub: str

    def get_user_id(self) -> str:
        return self.sub


@attrs.define
class _Code:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    sub: str
    auth_time: int
    expires_at: float

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time

    def get_acr(self) -> None:
        return None

    def get_amr(self) -> None:
        return None


@attrs.define
class _Refresh:
    token: str
    client_id: str
    scope: str
    sub: str
    revoked: bool = False

    def get_scope(self) -> str:
        return self.scope

    def check_client(self, client: _Client) -> bool:
        return client.client_id == self.client_id


@attrs.define
class OidcProvider:
    """The running provider: its address, keys, registered client and what it saw."""

    url: str
    audience: str
    client_id: str
    sub: str
    access_ttl: int
    key: rsa.RSAPrivateKey
    kid: str
    client: _Client
    #: the query of every authorization request
    authorize_requests: list[dict[str, str]] = attrs.field(factory=list)
    #: grant types of the token requests that succeeded, in order
    token_grants: list[str] = attrs.field(factory=list)
    #: every access token and ID token issued
    access_tokens: list[str] = attrs.field(factory=list)
    id_tokens: list[str] = attrs.field(factory=list)
    #: the query of every request to the end-session endpoint
    logouts: list[dict[str, str]] = attrs.field(factory=list)
    codes: dict[str, _Code] = attrs.field(factory=dict)
    refresh_tokens: dict[str, _Refresh] = attrs.field(factory=dict)

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/jwks"

    def register_redirect_uri(self, uri: str) -> None:
        self.client.redirect_uris.append(uri)

    def sign_access(self, sub: str, ttl: float) -> str:
        """An access token (a JWT for the API audience) for ``sub``, valid ``ttl`` seconds."""
        now = int(time.time())
        claims = {
            "iss": self.url,
            "aud": [self.audience, f"{self.url}/userinfo"],
            "sub": sub,
            "azp": self.client_id,
            "iat": now,
            "exp": now + int(ttl),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    def jwks(self) -> dict[str, Any]:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return {"keys": [jwk]}

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "authorization_endpoint": f"{self.url}/authorize",
            "token_endpoint": f"{self.url}/oauth/token",
            "jwks_uri": self.jwks_url,
            "end_session_endpoint": f"{self.url}/logout",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "scopes_supported": SCOPES.split(),
        }


def _app(provider: OidcProvider) -> Flask:
    app = Flask("c2l-test-oidc")
    pem = provider.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )

    class _CodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
        TOKEN_ENDPOINT_AUTH_METHODS = ["none"]

        def save_authorization_code(self, code: str, req: Any) -> None:
            provider.codes[code] = _Code(
                code=code,
                client_id=req.client.client_id,
                redirect_uri=req.payload.redirect_uri,
                scope=req.payload.scope,
                nonce=req.payload.data.get("nonce"),
                code_challenge=req.payload.data.get("code_challenge"),
                code_challenge_method=req.payload.data.get("code_challenge_method"),
                sub=req.user.sub,
                auth_time=int(time.time()),
                expires_at=time.time() + 60,
            )

        def query_authorization_code(self, code: str, client: _Client) -> _Code | None:
            found = provider.codes.get(code)
            if found and found.client_id == client.client_id and found.expires_at > time.time():
                return found
            return None

        def delete_authorization_code(self, authorization_code: _Code) -> None:
            provider.codes.pop(authorization_code.code, None)

        def authenticate_user(self, authorization_code: _Code) -> _User:
            return _User(authorization_code.sub)

    class _OpenIDCode(OpenIDCode):  # type: ignore[misc]
        def exists_nonce(self, nonce: str, req: Any) -> bool:
            return any(c.nonce == nonce for c in provider.codes.values())

        def resolve_client_private_key(self, client: _Client) -> Any:
            from joserfc.jwk import RSAKey

            return RSAKey.import_key(pem, {"kid": provider.kid})

        def get_client_claims(self, client: _Client) -> dict[str, Any]:
            return {"iss": provider.url, "aud": [client.client_id], "exp": int(time.time()) + 300}

        def get_encode_header(self, client: _Client) -> dict[str, str]:
            return {"alg": "RS256", "kid": provider.kid}

        def process_token(self, grant: Any, response: Any) -> Any:
            token = super().process_token(grant, response)
            if "id_token" in token:  # added after save_token saw the response
                provider.id_tokens.append(token["id_token"])
            return token

        def generate_user_info(self, user: _User, scope: str) -> UserInfo:
            return UserInfo(sub=user.sub, name="Test User", email=f"{user.sub}@example.test")

    class _RefreshGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
        TOKEN_ENDPOINT_AUTH_METHODS = ["none"]
        INCLUDE_NEW_REFRESH_TOKEN = True

        def authenticate_refresh_token(self, refresh_token: str) -> _Refresh | None:
            found = provider.refresh_tokens.get(refresh_token)
            return found if found and not found.revoked else None

        def authenticate_user(self, refresh_token: _Refresh) -> _User:
            return _User(refresh_token.sub)

        def revoke_old_credential(self, refresh_token: _Refresh) -> None:
            refresh_token.revoked = True

    def query_client(client_id: str) -> _Client | None:
        return provider.client if client_id == provider.client_id else None

    def save_token(token: dict[str, Any], req: Any) -> None:
        provider.token_grants.append(req.payload.grant_type)
        provider.access_tokens.append(token["access_token"])
        if token.get("refresh_token"):
            provider.refresh_tokens[token["refresh_token"]] = _Refresh(
                token["refresh_token"], req.client.client_id, token.get("scope", ""), req.user.sub
            )

    def generate_token(
        grant_type: str,
        client: _Client,
        user: _User | None = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        assert user is not None
        token = {
            "token_type": "Bearer",
            "access_token": provider.sign_access(user.sub, provider.access_ttl),
            "expires_in": provider.access_ttl,
            "scope": scope or "",
        }
        if include_refresh_token and "offline_access" in (scope or "").split():
            token["refresh_token"] = secrets.token_urlsafe(32)
        return token

    server = AuthorizationServer(app, query_client=query_client, save_token=save_token)
    server.register_token_generator("default", generate_token)
    server.register_grant(
        _CodeGrant, [CodeChallenge(required=True), _OpenIDCode(require_nonce=True)]
    )
    server.register_grant(_RefreshGrant)

    @app.after_request
    def cors(resp: Response) -> Response:
        # A single-page app calls discovery and the token endpoint from its own origin.
        resp.headers["Access-Control-Allow-Origin"] = "*"
        return resp

    @app.get("/.well-known/openid-configuration")
    def discovery() -> Any:
        return jsonify(provider.discovery())

    @app.get("/jwks")
    def jwks() -> Any:
        return jsonify(provider.jwks())

    @app.get("/authorize")
    def authorize() -> Any:
        provider.authorize_requests.append(dict(request.args))
        if request.args.get("audience") != provider.audience:
            return Response("unknown audience", 400, mimetype="text/plain")
        user = _User(provider.sub)
        try:
            grant = server.get_consent_grant(end_user=user)
        except OAuth2Error as exc:
            return Response(f"{exc.error}: {exc.description}", 400, mimetype="text/plain")
        return server.create_authorization_response(grant=grant, grant_user=user)

    @app.post("/oauth/token")
    def token() -> Any:
        return server.create_token_response()

    @app.get("/logout")
    def logout() -> Any:
        provider.logouts.append(dict(request.args))
        back = request.args.get("post_logout_redirect_uri", "")
        if back in provider.client.redirect_uris:
            return redirect(back)
        return Response("signed out", 200, mimetype="text/plain")

    return app


@contextmanager
def run_oidc_provider(
    *, audience: str, client_id: str, sub: str, access_ttl: int = 3600
) -> Iterator[OidcProvider]:
    """The provider on 127.0.0.1 (plain http), stopped on exit."""
    port = free_port()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    provider = OidcProvider(
        url=f"http://127.0.0.1:{port}",
        audience=audience,
        client_id=client_id,
        sub=sub,
        access_ttl=access_ttl,
        key=key,
        kid=f"test-{secrets.token_hex(4)}",
        client=_Client(client_id, []),
    )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = make_server("127.0.0.1", port, _app(provider), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        thread.join(10)
