"""A tiny HTTP server on 127.0.0.1 in front of a fake Ollama, for the client-side tests.

It plays either the desktop's tunnel (``GET /c2l/health`` and the Ollama paths, admitting
only a bearer JWT of its user, as the direct endpoint does) or a stand-in gateway
(``GET /health``, ``GET /api/desktop/tunnel`` and ``/api/ollama/*`` with ``X-C2L-Route``).
Requests are forwarded to the fake Ollama and the answer streamed back as it comes. It
records what it was asked (with the Authorization header, so tests can tell which token
crossed it), and can be told to fail: an HTTP status before the answer, or a cut after N
lines of it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import h11
import httpx
import jwt
import trio

from c2lcore import user_hash


@attrs.frozen
class Seen:
    """One request the front received."""

    method: str
    path: str
    authorization: str
    body: Any


def _sub(authorization: str) -> str | None:
    if not authorization.startswith("Bearer "):
        return None
    try:
        claims = jwt.decode(authorization[7:], options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    sub = claims.get("sub")
    return sub if isinstance(sub, str) else None


@attrs.define(eq=False)
class Front:
    """The running front; change its attributes to change how it answers."""

    ollama_url: str
    #: the desktop's user: only a token whose sub this is gets through
    sub: str
    #: "tunnel" or "gateway"
    role: str = "tunnel"
    port: int = 0
    #: gateway role: the X-C2L-Route it reports, and its tunnel registration (None: 404)
    route: str = "cloud"
    registration: dict[str, Any] | None = None
    #: answer the Ollama paths with this status (and an error body) instead
    fail_status: int | None = None
    #: forward this many lines of the answer, then drop the connection
    cut_after_lines: int | None = None
    seen: list[Seen] = attrs.field(factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def chats(self) -> list[Seen]:
        return [s for s in self.seen if s.path.endswith("/api/chat")]

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data and request is None:
                        return
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if request is None:
                return
            headers = {k.decode().lower(): v.decode() for k, v in request.headers}
            auth = headers.get("authorization", "")
            path = request.target.decode()
            method = request.method.decode()
            parsed: Any = json.loads(body) if body.strip() else None
            self.seen.append(Seen(method, path, auth, parsed))

            async def send(*events: h11.Event) -> None:
                for ev in events:
                    out = conn.send(ev)
                    if out:
                        await stream.send_all(out)

            async def reply(status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                hdrs = [
                    ("content-type", "application/json"),
                    ("content-length", str(len(data))),
                    ("connection", "close"),
                ]
                await send(h11.Response(status_code=status, headers=hdrs), h11.Data(data=data))
                await send(h11.EndOfMessage())

            mine = _sub(auth) == self.sub
            if self.role == "gateway":
                if path == "/health":
                    return await reply(200, {"status": "ok"})
                if path == "/api/desktop/tunnel":
                    if not mine:
                        return await reply(401, {"error": "unauthorized"})
                    if self.registration is None:
                        return await reply(404, {"error": "not_found"})
                    return await reply(200, self.registration)
                prefix = "/api/ollama"
            else:
                if path == "/c2l/health":
                    if not mine:
                        return await reply(401, {"error": "invalid_token"})
                    return await reply(200, {"status": "ok", "user": user_hash(self.sub)})
                prefix = ""
            if not path.startswith((prefix + "/api/", prefix + "/v1/")):
                return await reply(404, {"error": "not_found"})
            if not mine:
                return await reply(401, {"error": "invalid_token"})
            if self.fail_status is not None:
                return await reply(self.fail_status, {"error": "desktop_unavailable"})
            route = [("x-c2l-route", self.route)] if self.role == "gateway" else []
            async with trio.open_nursery() as nursery:
                # A caller that goes away cancels the forwarded request (as the direct
                # endpoint and the gateway do), so the fake Ollama records the cancel.
                async def watch() -> None:
                    with contextlib.suppress(trio.BrokenResourceError):
                        while await stream.receive_some(65536):
                            pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                with contextlib.suppress(httpx.HTTPError, trio.BrokenResourceError):
                    await self._forward(
                        send, method, self.ollama_url + path.removeprefix(prefix), body, route
                    )
                nursery.cancel_scope.cancel()

    async def _forward(
        self,
        send: Callable[..., Awaitable[None]],
        method: str,
        url: str,
        body: bytes,
        route: list[tuple[str, str]],
    ) -> None:
        async with (
            httpx.AsyncClient(timeout=60, trust_env=False) as client,
            client.stream(
                method, url, content=body, headers={"content-type": "application/json"}
            ) as answer,
        ):
            hdrs = [
                ("content-type", answer.headers.get("content-type", "application/json")),
                ("transfer-encoding", "chunked"),
                ("connection", "close"),
                *route,
            ]
            await send(h11.Response(status_code=answer.status_code, headers=hdrs))
            lines = 0
            async for line in answer.aiter_lines():
                if self.cut_after_lines is not None and lines >= self.cut_after_lines:
                    return  # the connection drops mid-answer (no final chunk)
                await send(h11.Data(data=(line + "\n").encode()))
                lines += 1
            await send(h11.EndOfMessage())


async def serve_front(
    front: Front, *, task_status: trio.TaskStatus[Front] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``front`` on 127.0.0.1 (its ``port``, 0: a free one) until cancelled."""
    listeners = await trio.open_tcp_listeners(front.port, host="127.0.0.1")
    front.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, front.handle, listeners)
        task_status.started(front)
