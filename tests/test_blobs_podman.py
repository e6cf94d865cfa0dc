"""Blob uploads end to end on real rootless Podman (issue 13, point 4).

A real ``c2l serve`` (with ``C2L_MAX_BLOB=6m``), the user's proxy in its Podman container, a
real ``c2l desktop`` agent and the fake Ollama: the official ``ollama`` client uploads a
4 MiB blob through ``/api/ollama``, which arrives at the fake in pieces and matches its
digest; ``HEAD`` of the blob says 404 before and 200 after, and ``create`` makes a model
of it; a wrong digest gets Ollama's
400; a blob over the limit gets 413 with the way to do it and never reaches the desktop;
an answer that is not text comes back byte for byte; bad ``body`` messages on the
WebSocket get errors and the connection goes on.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

import wire
from desktop.testing import FakeOllama, serve_fake_ollama

from ._stack import run_stack, wait_for_desktop

pytestmark = pytest.mark.podman

SUB = "blobs@example.com"
MAX_BLOB = 6 * 1024 * 1024


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeOllama:
    server: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=0.01)
    )
    return server


def _create_blob(url: str, token: str, path: Path) -> tuple[str | None, Any]:
    """The official client's ``create_blob``: (digest, None) or (None, its ResponseError)."""
    import ollama

    client = ollama.Client(
        host=f"{url}/api/ollama", headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    try:
        return client.create_blob(path), None
    except ollama.ResponseError as exc:
        return None, exc


def _create_model(url: str, token: str, files: dict[str, str]) -> str | None:
    """The official client's ``create`` of model ``mine`` from uploaded blobs."""
    import ollama

    client = ollama.Client(
        host=f"{url}/api/ollama", headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    return client.create(model="mine", files=files).status


async def test_blob_uploads_through_the_tunnel(tmp_path: Path, fake: FakeOllama) -> None:
    with run_stack(tmp_path, env={"C2L_MAX_BLOB": "6m"}) as stack:
        token = stack.token(SUB)
        auth = {"Authorization": f"Bearer {token}"}
        stack.start_agent(SUB, fake.url)
        blob = os.urandom(4 * 1024 * 1024 + 5)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        path = tmp_path / "model.bin"
        path.write_bytes(blob)
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
            session = await wait_for_desktop(http, token)
            with trio.fail_after(120):
                head = await http.head(f"/api/ollama/api/blobs/{digest}", headers=auth)
                assert head.status_code == 404
                assert head.headers["x-c2l-route"] == "cloud"

                got, error = await trio.to_thread.run_sync(_create_blob, stack.url, token, path)
                assert error is None, error
                assert got == digest
                record = fake.blobs[digest]
                assert record.size == len(blob)
                # Streamed: one HTTP chunk per wire piece reached Ollama, never the whole.
                assert record.chunks >= len(blob) // wire.BODY_PIECE_BYTES, record
                head = await http.head(f"/api/ollama/api/blobs/{digest}", headers=auth)
                assert head.status_code == 200
                # ... and a model made of it, which then answers (the fake's /api/create).
                status = await trio.to_thread.run_sync(
                    _create_model, stack.url, token, {"model.gguf": digest}
                )
                assert status == "success"
                tags = (await http.get("/api/ollama/api/tags", headers=auth)).json()
                assert "mine:latest" in [m["name"] for m in tags["models"]]

                wrong = "sha256:" + "1" * 64
                bad = await http.post(f"/api/ollama/api/blobs/{wrong}", headers=auth, content=blob)
                assert bad.status_code == 400
                assert bad.json() == {
                    "error": f'digest mismatch, expected "{wrong}", got "{digest}"'
                }

                # Over C2L_MAX_BLOB: 413 and the way to do it; nothing reaches the desktop.
                seen = len(fake.requests)
                big = tmp_path / "big.bin"
                big.write_bytes(os.urandom(MAX_BLOB + 1))
                got, error = await trio.to_thread.run_sync(_create_blob, stack.url, token, big)
                assert got is None and error is not None
                assert error.status_code == 413
                assert error.error == "blob_too_large"
                r = await http.post(
                    f"/api/ollama/api/blobs/{wrong}", headers=auth, content=big.read_bytes()
                )
                assert r.status_code == 413
                assert "ollama create" in r.json()["message"]
                assert len(fake.requests) == seen
                assert len(fake.blobs) == 1

                # An answer that is not text, byte for byte.
                size = 200_003
                r = await http.get(f"/api/ollama/api/_fake/bytes?size={size}", headers=auth)
                assert r.status_code == 200
                assert r.content == bytes(i % 256 for i in range(size))

                # Bad body messages on the WebSocket: errors, and the connection goes on.
                async with trio_websocket.open_websocket_url(session["endpoint"]) as ws:
                    await ws.send_message(wire.encode(wire.Auth(token, session["sessionId"])))
                    assert isinstance(wire.decode(await ws.get_message()), wire.AuthOk)
                    await ws.send_message('{"type":"body","id":"a","dataBase64":"%%"}')
                    err = wire.decode(await ws.get_message())
                    assert isinstance(err, wire.Error) and err.code == "bad_message"
                    piece = base64.b64encode(b"abc").decode()
                    await ws.send_message(wire.encode(wire.Body("nobody", piece)))
                    err = wire.decode(await ws.get_message())
                    assert isinstance(err, wire.Error) and err.code == "unknown_id"
                    await ws.send_message(wire.encode(wire.Request("t", "GET", "/api/tags")))
                    start = wire.decode(await ws.get_message())
                    assert isinstance(start, wire.ResponseStart) and start.status == 200
