"""The gateway's HTTP and WebSocket surface (DESIGN.md section 2), on Quart-Trio.

The gateway authenticates every request and WebSocket, asks the orchestrator for the
user's session and relays the connection to that user's proxy over loopback. It moves
frames without re-framing them; the proxy validates every message.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from quart import Response, has_websocket_context, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

import wire
from c2lcore import DIRECT_AUDIENCE, DIRECT_ISSUER
from orchestrator import (
    OrchestratorError,
)

from . import _closes
from ._audit import load_or_create_audit_key, use_audit_key
from ._auth import DEV_AUDIENCE, DEV_ISSUER
from ._errors import ApiError, error_response, session_error
from ._limits import (
    MAX_BODY_BYTES,
    PacedConnection,
    blob_request_class,
    check_request_limits,
)
from ._metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ._page import desktop_status, dev_token, index, vendor
from ._state import Gateway, endpoints, http_principal, public_base
from ._tunnel import ollama_request
from ._ws import serve_websocket

log = logging.getLogger("c2l.gateway")


def _refusal(exc: HTTPException) -> ApiError:
    """The JSON error for a werkzeug refusal (routing, method, size)."""
    if exc.code == 404:
        return ApiError(404, "not_found", "no such endpoint")
    if has_websocket_context():
        # A WebSocket upgrade on an HTTP-only route (werkzeug's WebsocketMismatch, or a
        # route without GET): a bad request of the client's, never a server error.
        text = "this endpoint takes no WebSocket upgrade: use /ws/stream or /ws/bridge"
        return ApiError(400, "bad_request", text)
    if exc.code == 405:
        return ApiError(405, "method_not_allowed", "method not allowed here")
    if exc.code == 413:
        return ApiError(413, "too_large", f"request body over {MAX_BODY_BYTES} bytes")
    status = exc.code if exc.code is not None and 400 <= exc.code < 500 else 400
    return ApiError(status, "bad_request", (exc.name or "bad request").lower())


def create_app(gw: Gateway) -> QuartTrio:
    """The Quart-Trio application of one gateway.

    Also keys the audit lines of the calling task (and of the tasks it starts) with this
    gateway's audit key (:func:`gateway._audit.use_audit_key`).
    """
    app = QuartTrio("c2l-gateway")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.request_class = blob_request_class(app.request_class, gw.config.max_blob)  # type: ignore[assignment]
    app.asgi_http_class = PacedConnection
    app.config["RESPONSE_TIMEOUT"] = None  # streamed answers last as long as the model talks
    app.config["BODY_TIMEOUT"] = 30
    _install_hooks(app, gw)
    _add_api_routes(app, gw)
    _add_client_routes(app, gw)
    # A client's close frame vs a vanished client (resumable streams: gateway._closes).
    _closes.install()
    app.asgi_app = _closes.PeerCloseRecorder(app.asgi_app)  # type: ignore[method-assign]
    return app


def _install_hooks(app: QuartTrio, gw: Gateway) -> None:
    """Audit keying, request limits, public-URL redirects and the JSON error handlers."""
    audit_key = gw.audit_key or load_or_create_audit_key(gw.config.audit_key_path)
    # The task that serves this app (serve_gateway) and every task it starts from now on
    # key their audit lines with this gateway's key...
    use_audit_key(audit_key)

    async def _key_the_audit_trail() -> None:
        # ...and so does each request and WebSocket, whoever runs the app: several gateways
        # in one process (tests) each keep their own key.
        use_audit_key(audit_key)

    app.before_request(_key_the_audit_trail)
    app.before_websocket(_key_the_audit_trail)
    app.before_request(check_request_limits)

    @app.after_request
    async def _redirect_to_the_public_url(response: Response) -> Response:
        # werkzeug's own redirects (merged slashes) are absolute URLs built from the Host
        # header: send clients to C2L_PUBLIC_URL instead, or to a path on this same host.
        location = response.headers.get("Location")
        if location is not None and 300 <= response.status_code < 400:
            url = urlsplit(location)
            path = urlunsplit(("", "", url.path or "/", url.query, ""))
            response.headers["Location"] = (gw.config.public_url or "") + path
        return response

    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> Response:
        gw.metrics.errors.labels(exc.code).inc()
        return error_response(exc)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        # Routing and protocol refusals: client errors answered as JSON, never a traceback.
        return error_response(_refusal(exc))

    @app.errorhandler(Exception)
    async def _internal(exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        return error_response(ApiError(500, "internal", "internal error"))


def _add_api_routes(app: QuartTrio, gw: Gateway) -> None:
    """Health, the local issuer's keys, the session API, and the admin's views."""

    @app.get("/health")
    async def health() -> Response:
        body = {
            "status": "healthy",
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
            "sessions": len(gw.orchestrator.sessions()),
        }
        return Response(json.dumps(body), 200, mimetype="application/json")

    @app.get("/.well-known/jwks.json")
    async def jwks() -> Response:
        if gw.dev_issuer is None:
            raise ApiError(404, "not_found", "this gateway has no local issuer (jwks mode)")
        return Response(json.dumps(gw.dev_issuer.jwks()), 200, mimetype="application/json")

    @app.get("/.well-known/c2l-jwks.json")
    async def direct_jwks() -> Response:
        # The key of the gateway's direct-route tokens (DESIGN.md section 5), in every mode.
        return Response(json.dumps(gw.direct.key.jwks()), 200, mimetype="application/json")

    @app.get("/api/config/auth")
    async def auth_config() -> dict[str, Any]:
        # Public: what a desktop agent needs to verify tokens at its direct endpoint.
        base = public_base(gw.config.public_url)
        if gw.config.auth_mode == "jwks":
            issuer, audience = gw.config.jwt_issuer, gw.config.jwt_audience
            jwks_url = gw.config.jwks_url
        else:
            issuer, audience, jwks_url = DEV_ISSUER, DEV_AUDIENCE, f"{base}/.well-known/jwks.json"
        return {
            "mode": gw.config.auth_mode,
            "issuer": issuer,
            "audience": audience,
            "jwksUrl": jwks_url,
            # the web page's client id at the issuer (jwks mode only): it offers Sign in
            "oidcClientId": gw.config.oidc_client_id_for_page,
            "direct": {
                "issuer": DIRECT_ISSUER,
                "audience": DIRECT_AUDIENCE,
                "jwksUrl": f"{base}/.well-known/c2l-jwks.json",
            },
        }

    @app.put("/api/desktop/tunnel")
    async def tunnel_register() -> dict[str, Any]:
        principal = await http_principal(gw)
        try:
            body = json.loads(await request.get_data(as_text=False) or b"null")
        except (ValueError, RecursionError):
            raise ApiError(400, "bad_json", "the request body is not valid JSON") from None
        reg = await gw.direct.register(principal, body)
        return reg.as_dict(gw.direct.ttl)

    @app.get("/api/desktop/tunnel")
    async def tunnel_get() -> dict[str, Any]:
        principal = await http_principal(gw)
        # ?name=: that desktop's registration; without it the one the gateway would use
        reg = await gw.direct.get(principal.user_hash, _desktop_name_arg())
        if reg is None:
            raise ApiError(404, "not_found", "no tunnel is registered for your desktop")
        return reg.as_dict(gw.direct.ttl)

    @app.delete("/api/desktop/tunnel")
    async def tunnel_delete() -> Response:
        principal = await http_principal(gw)
        # ?name=: that desktop's registration; without it every one of the user's
        if not await gw.direct.remove(principal.user_hash, _desktop_name_arg()):
            raise ApiError(404, "not_found", "no tunnel is registered for your desktop")
        return Response("", 204)

    @app.post("/api/streaming/create")
    async def create() -> tuple[dict[str, Any], int]:
        principal = await http_principal(gw)
        try:
            session = await gw.ensure_session(principal)
        except OrchestratorError as exc:
            raise session_error(exc) from None
        return endpoints(session, gw.config.public_url), 200

    @app.get("/api/streaming/status")
    async def status() -> dict[str, Any]:
        principal = await http_principal(gw)
        session = gw.orchestrator.get(principal.user_hash)
        if session is None:
            raise ApiError(404, "not_found", "you have no live session: POST /api/streaming/create")
        return endpoints(session, gw.config.public_url)

    @app.delete("/api/streaming/<session_id>")
    async def delete(session_id: str) -> Response:
        principal = await http_principal(gw)
        if not await gw.orchestrator.delete(principal.user_hash, session_id, reason="deleted"):
            raise ApiError(404, "not_found", "no such session")
        return Response("", 204)

    @app.get("/api/admin/streaming/sessions")
    async def admin_sessions() -> dict[str, Any]:
        principal = await http_principal(gw)
        if not principal.admin:
            raise ApiError(403, "forbidden", "this needs the c2l:admin permission")
        usage = await gw.orchestrator.usage_all()
        rows = []
        for s in gw.orchestrator.sessions():
            row = s.as_dict()
            row.update(usage[s.id].as_dict() if s.id in usage else {})
            rows.append(row)
        return {"sessions": rows, "count": len(rows)}

    @app.get("/metrics")
    async def metrics() -> Response:
        # Without a token on C2L_METRICS_ADDR (serve_metrics); here, to admins only.
        principal = await http_principal(gw)
        if not principal.admin:
            raise ApiError(403, "forbidden", "this needs the c2l:admin permission")
        return Response(await gw.metrics.render(), 200, content_type=METRICS_CONTENT_TYPE)


def _add_client_routes(app: QuartTrio, gw: Gateway) -> None:
    """The clients' surface: both WebSockets, the page, and the Ollama-compatible API."""

    @app.websocket("/ws/stream")
    async def ws_stream() -> None:
        await serve_websocket(gw, "stream")

    @app.websocket("/ws/bridge")
    async def ws_bridge() -> None:
        await serve_websocket(gw, "bridge")

    # The web chat page (issue 5): the page, its desktop status, and dev-mode tokens.
    @app.get("/")
    async def page() -> Response:
        return await index(gw)

    @app.get("/static/vendor/<name>")
    async def vendored(name: str) -> Response:
        return await vendor(name)

    @app.get("/api/streaming/desktop")
    async def desktop() -> dict[str, Any]:
        return await desktop_status(gw)

    if gw.dev_issuer is not None:  # only with C2L_AUTH_MODE=dev

        @app.post("/api/dev/token")
        async def token() -> Response:
            return await dev_token(gw)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]

    @app.route("/api/ollama/<path:path>", methods=methods)
    async def ollama(path: str) -> Response:
        return await ollama_request(gw, path)


def _desktop_name_arg() -> str | None:
    """The request's ``name`` query parameter (a desktop's name), checked; None if absent."""
    name = request.args.get("name")
    if name is not None and not wire.valid_desktop_name(name):
        raise ApiError(400, "bad_request", "name must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return name
