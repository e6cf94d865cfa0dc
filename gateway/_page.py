"""The web chat page at ``/``, its desktop-status endpoint and the dev-mode token endpoint.

The page is one HTML file with inline CSS and JavaScript and no external assets; it is
served with a Content-Security-Policy that allows exactly its own inline script and style
(by hash) and connections back to this gateway (and, when it signs in with the identity
provider, C2L_OIDC_CLIENT_ID, to the issuer's origin).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html as htmlmod
import json
import logging
import re
from importlib import resources
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import trio
from quart import Response, request

from orchestrator import proxy_get

from ._direct import Registration
from ._errors import ApiError
from ._state import Gateway, http_principal, websocket_base

log = logging.getLogger("c2l.gateway")

#: Lifetime of a token made by ``POST /api/dev/token``.
DEV_TOKEN_TTL_S: Final = 3600
_SUB: Final = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")
_DESKTOP_PROBE_TIMEOUT_S: Final = 2.0


@functools.cache
def _template() -> str:
    return resources.files("gateway").joinpath("static/index.html").read_text("utf-8")


def _csp_hash(html: str, tag: str) -> str:
    found = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
    assert found is not None, f"index.html has no <{tag}>"
    digest = hashlib.sha256(found.group(1).encode()).digest()
    return "'sha256-" + base64.b64encode(digest).decode() + "'"


@functools.cache
def render_page(dev_mode: bool, warning: str | None = None) -> tuple[str, str]:
    """The page's HTML and its Content-Security-Policy (without the connect origins).

    ``warning`` (development auth allowed off loopback) becomes a banner above everything.
    """
    html = _template().replace("__C2L_DEV_MODE__", "true" if dev_mode else "false")
    if warning:
        text = htmlmod.escape(warning[:1].upper() + warning[1:])
        banner = f'<div id="insecure-dev-auth" role="alert">{text}</div>'
        html = html.replace("<!--C2L_INSECURE_DEV_AUTH_BANNER-->", banner, 1)
    policy = (
        "default-src 'none'; "
        # 'self': the two vendored libraries the page loads (with their SRI hashes), from
        # /static/vendor/ only; every other script of this origin is JSON, never run.
        f"script-src 'self' {_csp_hash(html, 'script')}; "
        f"style-src {_csp_hash(html, 'style')}; "
        "img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, policy


def oidc_origin(gw: Gateway) -> str | None:
    """The issuer's origin when the page signs in with it (C2L_OIDC_CLIENT_ID, jwks mode).

    The page fetches the issuer's discovery document and its token endpoint, so that
    origin, and no other, joins ``connect-src``. The sign-in itself is a navigation.
    """
    if not gw.config.oidc_client_id_for_page or not gw.config.jwt_issuer:
        return None
    url = urlsplit(gw.config.jwt_issuer)
    if url.scheme not in ("http", "https") or not url.netloc:
        return None
    return f"{url.scheme}://{url.netloc}"


async def index(gw: Gateway) -> Response:
    """``GET /``: the chat page."""
    html, policy = render_page(gw.dev_issuer is not None, gw.config.dev_auth_warning)
    if gw.config.public_url:
        connect = f"connect-src 'self' {websocket_base(gw.config.public_url)}"
    else:
        host = request.host
        connect = f"connect-src 'self' ws://{host} wss://{host}"
    issuer = oidc_origin(gw)
    if issuer:
        connect += f" {issuer}"
    headers = {
        "Content-Security-Policy": f"{policy}; {connect}",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-cache",
    }
    return Response(html, 200, headers, mimetype="text/html")


#: The page's vendored libraries and their licences (``gateway/static/vendor/``).
VENDOR_FILES: dict[str, str] = {
    "marked.min.js": "text/javascript",
    "purify.min.js": "text/javascript",
    "marked.LICENSE.md": "text/plain",
    "dompurify.LICENSE": "text/plain",
}


@functools.cache
def _vendor_file(name: str) -> bytes:
    return (Path(__file__).parent / "static" / "vendor" / name).read_bytes()


async def vendor(name: str) -> Response:
    """``GET /static/vendor/<name>``: one of :data:`VENDOR_FILES`, else 404."""
    kind = VENDOR_FILES.get(name)
    if kind is None:
        raise ApiError(404, "not_found", "no such file")
    headers = {
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "public, max-age=3600",
        "Cross-Origin-Resource-Policy": "same-origin",
    }
    return Response(_vendor_file(name), 200, headers, content_type=f"{kind}; charset=utf-8")


async def dev_token(gw: Gateway) -> Response:
    """``POST /api/dev/token {"sub"}``: a token of the development issuer (dev mode only).

    Anyone who can reach a dev-mode gateway can sign in as anyone: that is what the
    development issuer is for, and why production gateways run ``C2L_AUTH_MODE=jwks``.
    """
    if gw.dev_issuer is None:
        raise ApiError(404, "not_found", "no such endpoint")
    try:
        body: Any = json.loads(await request.get_data(as_text=False) or b"null")
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser
        raise ApiError(400, "bad_json", 'send {"sub": "<user name>"}') from None
    sub = body.get("sub") if isinstance(body, dict) else None
    if not isinstance(sub, str) or not _SUB.match(sub):
        raise ApiError(
            400,
            "bad_request",
            "sub must be a user name of 1-128 letters, digits or . _ @ + -",
        )
    token = gw.dev_issuer.sign(sub, admin=False, ttl=DEV_TOKEN_TTL_S)
    log.info("dev token issued")  # never the token itself
    payload = {"token": token, "sub": sub, "expiresIn": DEV_TOKEN_TTL_S}
    return Response(
        json.dumps(payload), 200, {"Cache-Control": "no-store"}, mimetype="application/json"
    )


async def desktop_status(gw: Gateway) -> dict[str, Any]:
    """``GET /api/streaming/desktop``: is the caller's desktop agent on their session?

    Answers ``{"sessionId", "state", "desktop", "bridge", "tunnel", "desktops"}`` with
    ``desktop`` one of ``connected``, ``disconnected`` or ``unknown`` (no live session),
    ``bridge`` whether an agent's bridge is connected, ``tunnel`` the live tunnel
    registration the gateway would use (``url``, ``provider``, ``healthy``, ``checkedAt``,
    ``expiresAt``, ``name``) or null, and ``desktops`` every desktop of the user that is
    connected or has a tunnel (DESIGN.md section 2): ``{"name", "bridge", "tunnel",
    "models"}``. It neither creates a session nor counts as activity, so a page can poll it
    without keeping an idle session alive.
    """
    principal = await http_principal(gw)
    regs = await gw.direct.registrations(principal.user_hash)
    reg = await gw.direct.get(principal.user_hash)
    tunnel = _tunnel_dict(gw, reg)
    session = gw.orchestrator.get(principal.user_hash)
    if session is None or session.target is None:
        return {
            "sessionId": None,
            "state": None,
            "desktop": "unknown",
            "bridge": False,
            "tunnel": tunnel,
            "desktops": _desktops([], regs, gw),
        }
    desktop = "unknown"
    bridged: list[dict[str, Any]] = []
    try:
        status = 0
        with trio.move_on_after(_DESKTOP_PROBE_TIMEOUT_S):
            status, body = await proxy_get(session.target, "/health")
            if status == 200:
                desktop = "connected" if json.loads(body).get("desktop") else "disconnected"
                bridged = await _bridged(session.target, session.secret)
    except (OSError, ValueError, AttributeError) as exc:
        log.info("desktop status of session %s unavailable: %r", session.id, exc)
    return {
        "sessionId": session.id,
        "state": session.state,
        "desktop": desktop,
        "bridge": desktop == "connected",
        "tunnel": tunnel,
        "desktops": _desktops(bridged, regs, gw),
    }


def _tunnel_dict(gw: Gateway, reg: Registration | None) -> dict[str, Any] | None:
    tunnel = reg.as_dict(gw.direct.ttl) if reg is not None else None
    if tunnel is not None:
        del tunnel["ttl"]
    return tunnel


async def _bridged(target: Any, secret: str) -> list[dict[str, Any]]:
    """The desktops connected to the session's proxy (its ``GET /desktops``)."""
    status, body = await proxy_get(target, "/desktops", secret=secret)
    listed = json.loads(body).get("desktops") if status == 200 else None
    return [d for d in listed if isinstance(d, dict)] if isinstance(listed, list) else []


def _desktops(
    bridged: list[dict[str, Any]], regs: dict[str, Registration], gw: Gateway
) -> list[dict[str, Any]]:
    """The union, by name, of the bridge-connected desktops and the tunnel registrations."""
    out: dict[str, dict[str, Any]] = {}
    for d in bridged:
        name = d.get("name")
        if isinstance(name, str):
            models = d.get("models")
            out[name] = {
                "name": name,
                "bridge": True,
                "tunnel": None,
                "models": models if isinstance(models, list) else [],
            }
    for name, reg in regs.items():
        entry = out.setdefault(name, {"name": name, "bridge": False, "tunnel": None, "models": []})
        entry["tunnel"] = _tunnel_dict(gw, reg)
    return list(out.values())
