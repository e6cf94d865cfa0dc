"""Binary bodies and blob uploads (issue 13, point 4), without Podman.

The wire messages (``bodyBase64``, ``bodyStream`` and ``body``, ``chunk.dataBase64``) and
their bad forms; the hub passing body pieces on; the real proxy server keeping a large
upload moving at the desktop's pace instead of queueing it; and ``/api/ollama`` end to end
in one process (gateway, real in-process proxy, real agent, fake Ollama over sockets):
blob uploads streamed in pieces and checked by digest, HEAD of a blob, a wrong digest, the
C2L_MAX_BLOB limit, and an answer that is not text coming back byte for byte.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio_websocket

import wire
from c2lcore import Config
from desktop import AgentConfig, DesktopAgent, StaticToken, serve_agent
from desktop._agent import coalesce
from desktop.testing import FakeOllama
from desktop.testing import serve_fake_ollama as serve_fake
from gateway import RunningGateway, serve_gateway
from gateway._auth import DevIssuer
from gateway._limits import BLOB_BUFFER_BYTES, PacedBody, PacedConnection
from orchestrator.testing import open_fake_runtime
from proxy import SECRET_HEADER, ProxyServer, run_proxy_server
from proxy._hub import Hub, Link

from .test_direct_gateway import Stack as DirectStack
from .test_direct_gateway import _register as register_tunnel
from .test_direct_gateway import _stack as direct_stack

SUB = "blob-user@example.com"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ----- wire ------------------------------------------------------------------------------


def test_binary_fields_round_trip_with_the_contract_names() -> None:
    blob = bytes(range(256))
    req = wire.Request("a", "POST", "/api/blobs/x", {"content-type": "x/y"}, None, b64(blob))
    obj = json.loads(wire.encode(req))
    assert obj["bodyBase64"] == b64(blob) and "bodyStream" not in obj
    assert wire.decode(wire.encode(req)) == req

    streamed = wire.Request("b", "POST", "/api/blobs/x", body_stream=True)
    obj = json.loads(wire.encode(streamed))
    assert obj["bodyStream"] is True and "bodyBase64" not in obj
    assert wire.decode(wire.encode(streamed)) == streamed

    piece = wire.Body("b", b64(blob), last=True)
    assert json.loads(wire.encode(piece)) == {
        "type": "body",
        "id": "b",
        "dataBase64": b64(blob),
        "last": True,
    }
    back = wire.decode(wire.encode(piece))
    assert isinstance(back, wire.Body) and back.data() == blob and back.last

    chunk = wire.Chunk("c", data_base64=b64(blob))
    obj = json.loads(wire.encode(chunk))
    assert obj == {"type": "chunk", "id": "c", "dataBase64": b64(blob)}  # no "data"
    back = wire.decode(wire.encode(chunk))
    assert isinstance(back, wire.Chunk) and back.raw() == blob
    # a text chunk is as before
    assert json.loads(wire.encode(wire.Chunk("c", "x\n"))) == {
        "type": "chunk",
        "id": "c",
        "data": "x\n",
    }
    # the largest piece fits a frame with room to spare
    big = wire.encode(wire.Body("r" * wire.MAX_ID_LENGTH, b64(b"\xff" * wire.BODY_PIECE_BYTES)))
    assert len(big) < wire.MAX_FRAME_BYTES // 2


@pytest.mark.parametrize(
    ("obj", "code"),
    [
        ({"type": "body", "id": "q", "dataBase64": "not base64!"}, "bad_message"),
        ({"type": "body", "id": "q", "dataBase64": "QUJ"}, "bad_message"),  # bad padding
        ({"type": "body", "id": "q"}, "missing_field"),
        ({"type": "body", "id": "q", "dataBase64": "", "last": "yes"}, "bad_message"),
        (
            {"type": "body", "id": "q", "dataBase64": b64(b"x" * (wire.BODY_PIECE_BYTES + 3))},
            "too_large",
        ),
        (
            {"type": "request", "id": "q", "method": "POST", "path": "/api/x", "body": {}}
            | {"bodyBase64": "AA=="},
            "bad_message",
        ),
        (
            {"type": "request", "id": "q", "method": "POST", "path": "/api/x"}
            | {"bodyBase64": "AA==", "bodyStream": True},
            "bad_message",
        ),
        (
            {"type": "request", "id": "q", "method": "POST", "path": "/api/x"}
            | {"bodyBase64": "%%%"},
            "bad_message",
        ),
        (
            {"type": "request", "id": "q", "method": "POST", "path": "/api/x", "bodyStream": 1},
            "bad_message",
        ),
        ({"type": "chunk", "id": "q", "data": "x", "dataBase64": "AA=="}, "bad_message"),
        ({"type": "chunk", "id": "q", "dataBase64": "A"}, "bad_message"),
    ],
)
def test_bad_binary_fields_are_refused_with_the_request_id(obj: dict[str, Any], code: str) -> None:
    with pytest.raises(wire.ProtocolError) as caught:
        wire.decode(json.dumps(obj))
    assert caught.value.code == code
    assert caught.value.id == "q"


# ----- the hub -------------------------------------------------------------------------


def _link(name: str) -> tuple[Link, list[wire.Message]]:
    seen: list[wire.Message] = []
    return Link(name, lambda frame: seen.append(wire.decode(frame))), seen


def test_hub_passes_body_pieces_to_the_desktop_under_its_id_and_refuses_strays() -> None:
    hub = Hub()
    desktop, to_desktop = _link("desktop")
    client, to_client = _link("client")
    hub.set_desktop(desktop)
    hub.add_client(client)
    hub.client_frame(client, wire.encode(wire.Request("mine", "POST", "/api/b", body_stream=True)))
    (forwarded,) = to_desktop
    assert isinstance(forwarded, wire.Request) and forwarded.body_stream
    hub.client_frame(client, wire.encode(wire.Body("mine", b64(b"abc"))))
    hub.client_frame(client, wire.encode(wire.Body("mine", "", last=True)))
    assert to_desktop[1:] == [
        wire.Body(forwarded.id, b64(b"abc")),
        wire.Body(forwarded.id, "", last=True),
    ]
    # a piece for no request of this client: an error, and the connection goes on
    hub.client_frame(client, wire.encode(wire.Body("other", b64(b"x"))))
    assert to_client[-1] == wire.Error(
        wire.ErrorCode.UNKNOWN_ID, "no request 'other' in flight", "other"
    )
    hub.client_frame(client, '{"type":"body","id":"mine","dataBase64":"@@"}')
    last = to_client[-1]
    assert isinstance(last, wire.Error) and last.code == "bad_message" and last.id == "mine"
    assert len(to_desktop) == 3  # neither reached the desktop
    hub.client_frame(client, wire.encode(wire.Ping(1.0)))
    assert to_client[-1] == wire.Pong(1.0)
    # after the answer ends, later pieces are strays too
    hub.desktop_frame(desktop, wire.encode(wire.ResponseEnd(forwarded.id)))
    hub.client_frame(client, wire.encode(wire.Body("mine", b64(b"late"))))
    assert to_client[-1] == wire.Error(
        wire.ErrorCode.UNKNOWN_ID, "no request 'mine' in flight", "mine"
    )


def test_the_agent_never_merges_chunks_of_bytes() -> None:
    # The agent's writer merges a request's consecutive text chunks; bytes stay apart
    # (merging them as text would lose them).
    a, b = wire.Chunk("r", data_base64=b64(b"\x00\x01")), wire.Chunk("r", data_base64=b64(b"\xff"))
    text = wire.Chunk("r", "line\n")
    batch: list[Any] = [(None, a), (None, b), (None, text), (None, text)]
    assert coalesce(batch) == [(None, a), (None, b), (None, wire.Chunk("r", "line\nline\n"))]


# ----- the real proxy server: an upload moves at the desktop's pace ---------------------


async def test_proxy_does_not_queue_an_upload_the_desktop_reads_slowly() -> None:
    size = 8 * 1024 * 1024
    blob = os.urandom(size)
    server = ProxyServer.bind("127.0.0.1", 0, secret="blob-secret-0123456789")
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(run_proxy_server, server))
        url = f"ws://127.0.0.1:{server.port}"
        headers = [(SECRET_HEADER, "blob-secret-0123456789")]
        async with (
            trio_websocket.open_websocket_url(
                url + "/ws/bridge", extra_headers=headers, max_message_size=wire.MAX_FRAME_BYTES
            ) as desktop,
            trio_websocket.open_websocket_url(
                url + "/ws/stream", extra_headers=headers, max_message_size=wire.MAX_FRAME_BYTES
            ) as client,
        ):
            sent_all = trio.Event()

            async def upload() -> None:
                await client.send_message(
                    wire.encode(wire.Request("up", "POST", "/api/blobs/x", body_stream=True))
                )
                step = wire.BODY_PIECE_BYTES
                for at in range(0, size, step):
                    piece = wire.Body("up", b64(blob[at : at + step]), last=at + step >= size)
                    await client.send_message(wire.encode(piece))
                sent_all.set()

            nursery.start_soon(upload)
            got = hashlib.sha256()
            received = 0
            pieces = 0
            with trio.fail_after(60):
                first = wire.decode(await desktop.get_message())
                assert isinstance(first, wire.Request) and first.body_stream
                while True:
                    msg = wire.decode(await desktop.get_message())
                    assert isinstance(msg, wire.Body) and msg.id == first.id
                    data = msg.data()
                    got.update(data)
                    received += len(data)
                    pieces += 1
                    if pieces == 4:
                        # The desktop stops reading for a while: the client's sending
                        # must stall rather than the proxy queueing the rest.
                        await trio.sleep(1.0)
                        assert not sent_all.is_set()
                        assert server.paused >= 1
                    await trio.sleep(0.01)  # a slow desktop
                    if msg.last:
                        break
            assert received == size and got.digest() == hashlib.sha256(blob).digest()
            assert pieces == size // wire.BODY_PIECE_BYTES
            # At most about two frames queued at any time, for an 8 MiB upload.
            assert server.peak_queued < 1024 * 1024, server.peak_queued
        nursery.cancel_scope.cancel()


# ----- the gateway: a blob body is received no faster than it is passed on -------------


async def test_gateway_stops_receiving_a_blob_body_the_route_does_not_read() -> None:
    body = PacedBody(None, 1024**3)
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        await trio.lowlevel.checkpoint()  # a client that sends as fast as it can
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    conn = object.__new__(PacedConnection)  # handle_messages needs nothing of its state
    request = SimpleNamespace(body=body)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.handle_messages, nursery, request, receive)
        await trio.sleep(0.2)
        # Nobody reads: it stopped at the buffer's size, not at the client's 64 MiB.
        assert body.unread <= BLOB_BUFFER_BYTES + 65536
        stalled = received
        await trio.sleep(0.1)
        assert received == stalled
        # The route reads: it receives again, and stops again at the mark.
        assert len(await body.__anext__()) == body_size(stalled)
        await trio.sleep(0.1)
        assert received > stalled
        assert body.unread <= BLOB_BUFFER_BYTES + 65536
        nursery.cancel_scope.cancel()


def body_size(messages: int) -> int:
    return messages * 65536


# ----- /api/ollama in one process --------------------------------------------------------


@attrs.define
class Rig:
    gw: RunningGateway
    fake: FakeOllama
    agent: DesktopAgent
    http: httpx.AsyncClient
    token: str
    issuer: DevIssuer

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
async def rig(
    request: pytest.FixtureRequest, nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[Rig]:
    """The stack in one process; ``Config`` settings come from an indirect parameter."""
    settings: dict[str, Any] = getattr(request, "param", {})
    config = Config(
        port=0, dev_key_path=tmp_path / "key.pem", podman_url="unix:///nonexistent", **settings
    )
    issuer = DevIssuer.load_or_create(config.dev_key_path)
    token = issuer.sign(SUB)
    async with open_fake_runtime(run_proxies=True) as rt:
        gw: RunningGateway = await nursery.start(
            functools.partial(serve_gateway, config, runtime=rt)
        )
        fake: FakeOllama = await nursery.start(
            functools.partial(serve_fake, "127.0.0.1", 0, delay=0.01)
        )
        agent_config = AgentConfig(gw.url, StaticToken(token), fake.url, probe_ollama=False)
        agent: DesktopAgent = await nursery.start(
            functools.partial(serve_agent, agent_config, status=lambda _: None)
        )
        with trio.fail_after(10):
            await agent.wait_until(lambda a: a.state == "connected")
        async with httpx.AsyncClient(base_url=gw.url + "/api/ollama", timeout=30) as http:
            yield Rig(gw, fake, agent, http, token, issuer)
        nursery.cancel_scope.cancel()


async def _pieces(data: bytes, step: int = 100_000) -> AsyncIterator[bytes]:
    for at in range(0, len(data), step):
        yield data[at : at + step]


async def test_blob_upload_streams_in_pieces_and_is_checked_by_digest(rig: Rig) -> None:
    blob = os.urandom(3 * 1024 * 1024 + 17)
    digest = digest_of(blob)
    with trio.fail_after(60):
        head = await rig.http.head(f"/api/blobs/{digest}", headers=rig.auth)
        assert head.status_code == 404
        assert head.headers["x-c2l-route"] == "cloud"
        # chunked (no Content-Length), as the async ollama client sends a file
        up = await rig.http.post(f"/api/blobs/{digest}", headers=rig.auth, content=_pieces(blob))
        assert up.status_code == 201, up.text
        record = rig.fake.blobs[digest]
        assert record.size == len(blob)
        # It reached Ollama as the agent's chunks, one per wire piece: streamed, not whole.
        assert record.chunks >= len(blob) // wire.BODY_PIECE_BYTES
        assert (await rig.http.head(f"/api/blobs/{digest}", headers=rig.auth)).status_code == 200

        # With a Content-Length (the sync client's file upload) it streams the same way.
        other = os.urandom(2 * 1024 * 1024)
        up = await rig.http.post(f"/api/blobs/{digest_of(other)}", headers=rig.auth, content=other)
        assert up.status_code == 201, up.text
        assert rig.fake.blobs[digest_of(other)].chunks >= 2

        # A wrong digest: Ollama's 400 and its message come through.
        wrong = "sha256:" + "0" * 64
        bad = await rig.http.post(f"/api/blobs/{wrong}", headers=rig.auth, content=_pieces(blob))
        assert bad.status_code == 400
        assert bad.json() == {"error": f'digest mismatch, expected "{wrong}", got "{digest}"'}
        assert wrong not in rig.fake.blobs

        # A small blob goes whole as the request's bodyBase64.
        small = bytes(range(256)) * 8
        up = await rig.http.post(f"/api/blobs/{digest_of(small)}", headers=rig.auth, content=small)
        assert up.status_code == 201
        assert rig.fake.blobs[digest_of(small)].size == len(small)

        # The tunnel still works for everything else.
        tags = await rig.http.get("/api/tags", headers=rig.auth)
        assert tags.status_code == 200


@pytest.mark.parametrize("rig", [{"max_blob": 1024 * 1024}], indirect=True)
async def test_blob_over_the_limit_is_refused_with_the_way_to_do_it(rig: Rig) -> None:
    blob = os.urandom(1024 * 1024 + 1)
    digest = digest_of(blob)
    with trio.fail_after(60):
        # Declared: refused before anything is sent to the desktop.
        r = await rig.http.post(f"/api/blobs/{digest}", headers=rig.auth, content=blob)
        assert r.status_code == 413
        assert r.json()["error"] == "blob_too_large"
        assert "ollama create" in r.json()["message"]
        assert not [q for q in rig.fake.requests if q.path.startswith("/api/blobs/")]
        # Undeclared (chunked): counted as it streams, refused when it passes the limit.
        r = await rig.http.post(f"/api/blobs/{digest}", headers=rig.auth, content=_pieces(blob))
        assert r.status_code == 413
        assert r.json()["error"] == "blob_too_large"
        assert digest not in rig.fake.blobs  # (its start may have reached the fake)
        # Up to the limit is fine, and other bodies keep their 1 MiB limit.
        ok = blob[:-1]
        r = await rig.http.post(f"/api/blobs/{digest_of(ok)}", headers=rig.auth, content=ok)
        assert r.status_code == 201
        r = await rig.http.post("/api/chat", headers=rig.auth, content=b"{" + b" " * 1024 * 1024)
        assert r.status_code == 413
        assert r.json()["error"] == "too_large"


async def test_an_answer_that_is_not_text_comes_back_byte_for_byte(rig: Rig) -> None:
    size = 300_001
    with trio.fail_after(30):
        r = await rig.http.get(f"/api/_fake/bytes?size={size}", headers=rig.auth)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.content == bytes(i % 256 for i in range(size))


async def test_a_non_json_body_goes_as_bytes(rig: Rig) -> None:
    with trio.fail_after(30):
        # Not JSON, with a type that says so: passed on, not refused as bad JSON. The
        # fake answers with its JSON error about it, which shows the bytes arrived.
        r = await rig.http.post(
            "/api/chat", headers={**rig.auth, "content-type": "text/plain"}, content=b"\xff\x00"
        )
        assert r.status_code == 400
        assert r.json() == {"error": "invalid JSON in request body"}
        # Without a type it must be JSON, as before.
        r = await rig.http.post("/api/chat", headers=rig.auth, content=b"\xff\x00")
        assert r.status_code == 400 and r.json()["error"] == "bad_json"


async def test_bad_body_messages_get_errors_and_the_connection_stays_up(rig: Rig) -> None:
    async with httpx.AsyncClient(base_url=rig.gw.url, timeout=10) as http:
        r = await http.post("/api/streaming/create", headers=rig.auth)
        session = r.json()
    with trio.fail_after(30):
        async with trio_websocket.open_websocket_url(
            session["endpoint"], max_message_size=wire.MAX_FRAME_BYTES
        ) as ws:
            await ws.send_message(wire.encode(wire.Auth(rig.token, session["sessionId"])))
            assert isinstance(wire.decode(await ws.get_message()), wire.AuthOk)

            async def answer() -> wire.Message:
                while True:
                    msg = wire.decode(await ws.get_message())
                    if not isinstance(msg, wire.Ping):
                        return msg

            await ws.send_message('{"type":"body","id":"x","dataBase64":"*not*"}')
            msg = await answer()
            assert isinstance(msg, wire.Error) and msg.code == "bad_message" and msg.id == "x"
            await ws.send_message(wire.encode(wire.Body("nobody", b64(b"abc"))))
            msg = await answer()
            assert isinstance(msg, wire.Error) and msg.code == "unknown_id"
            # A body after its last piece: the desktop refuses it and ends the request.
            await ws.send_message(
                wire.encode(wire.Request("up", "POST", "/api/blobs/x", body_stream=True))
            )
            await ws.send_message(wire.encode(wire.Body("up", b64(b"abc"), last=True)))
            await ws.send_message(wire.encode(wire.Body("up", b64(b"more"))))
            seen = [await answer()]
            while not isinstance(seen[-1], wire.Error | wire.ResponseEnd):
                seen.append(await answer())
            # Either the fake answered first (400: "x" is no digest) or the refusal came.
            assert seen[-1].id == "up"
            # And the connection still serves.
            await ws.send_message(wire.encode(wire.Request("tags", "GET", "/api/tags")))
            msgs = [await answer()]
            while not isinstance(msgs[-1], wire.ResponseEnd):
                msgs.append(await answer())
            starts = [m for m in msgs if isinstance(m, wire.ResponseStart) and m.id == "tags"]
            assert starts and starts[0].status == 200


# ----- the direct route ------------------------------------------------------------------


@pytest.fixture
async def direct(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[DirectStack]:
    async for s in direct_stack(nursery, tmp_path):
        yield s


async def test_the_direct_route_carries_small_bodies_as_bytes_and_refuses_streams(
    direct: DirectStack,
) -> None:
    with trio.fail_after(30):
        assert (await register_tunnel(direct)).status_code == 200
        small = bytes(range(256)) * 4 + b"\xff\xfe"
        r = await direct.http.post(
            f"/api/ollama/api/blobs/{digest_of(small)}", headers=direct.auth(), content=small
        )
        assert r.status_code == 200 and r.headers["x-c2l-route"] == "direct"
        assert direct.fake.seen[-1]["body"] == small  # byte for byte, not JSON
        big = os.urandom(wire.BODY_PIECE_BYTES + 1)
        r = await direct.http.post(
            f"/api/ollama/api/blobs/{digest_of(big)}", headers=direct.auth(), content=big
        )
        assert r.status_code == 503
        assert r.json()["error"] == "blob_needs_bridge"
        assert "ollama create" in r.json()["message"]
        assert direct.fake.seen[-1]["body"] == small  # the big one never went
