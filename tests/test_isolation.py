"""Users kept apart, in process (fake runtime, real in-process proxies), no Podman needed.

A WebSocket ``auth`` naming another user's session id is refused (``not_found``, 1008);
the audit trail names users only by a keyed hash (an HMAC with the gateway's own key,
kept 0600 beside the development key), never by the ``sub`` nor by the plain hash that
Podman labels carry, so a guessable user name cannot be recognised in shipped logs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket

import wire
from c2lcore import user_hash
from gateway import DevIssuer, RunningGateway

from ._hostile import open_gateway, recv, ws_url

ALICE = "alice@example.com"
MALLORY = "mallory@example.com"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def audit_lines() -> Iterator[list[str]]:
    """Every audit line written while the test runs."""
    logger = logging.getLogger("c2l.audit")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def keyed(key_path: Path, sub: str) -> str:
    key = bytes.fromhex(key_path.read_text())
    return hmac.new(key, user_hash(sub).encode(), hashlib.sha256).hexdigest()[:16]


async def _traffic(gw: RunningGateway, issuer: DevIssuer) -> str:
    """Alice creates a session, connects both sides and leaves; Mallory pries. Her session id."""
    alice = issuer.sign(ALICE)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        created = await http.post("/api/streaming/create", headers=bearer(alice))
        assert created.status_code == 200
        sid: str = created.json()["sessionId"]
        async with trio_websocket.open_websocket_url(ws_url(gw, "bridge")) as bridge:
            await bridge.send_message(wire.encode(wire.Auth(alice, sid)))
            assert isinstance(await recv(bridge), wire.AuthOk)
            async with trio_websocket.open_websocket_url(ws_url(gw, "stream")) as stream:
                await stream.send_message(wire.encode(wire.Auth(alice, sid)))
                assert await recv(stream) == wire.AuthOk(sid)
        r = await http.get("/api/streaming/status", headers=bearer("not-a-token"))
        assert r.status_code == 401
        r = await http.delete(f"/api/streaming/{sid}", headers=bearer(issuer.sign(MALLORY)))
        assert r.status_code == 404
        r = await http.delete(f"/api/streaming/{sid}", headers=bearer(alice))
        assert r.status_code == 204
    return sid


async def test_a_websocket_naming_another_users_session_is_refused(
    tmp_path: Path, audit_lines: list[str]
) -> None:
    issuer = DevIssuer.load_or_create(tmp_path / "key.pem")
    alice, mallory = issuer.sign(ALICE), issuer.sign(MALLORY)
    with trio.fail_after(30):
        async with (
            open_gateway(tmp_path, metrics_addr="127.0.0.1:0") as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=10) as http,
        ):
            r = await http.post("/api/streaming/create", headers=bearer(alice))
            sid = r.json()["sessionId"]
            # Mallory has a session of her own, so "no session at all" is not the reason
            assert (await http.post("/api/streaming/create", headers=bearer(mallory))).is_success
            for side in ("stream", "bridge"):
                for how in ("message", "header"):
                    if how == "message":
                        conn_cm = trio_websocket.open_websocket_url(ws_url(gw, side))
                    else:
                        conn_cm = trio_websocket.open_websocket_url(
                            ws_url(gw, side), extra_headers=[(b"authorization", b"")]
                        )
                    async with conn_cm as conn:
                        await conn.send_message(wire.encode(wire.Auth(mallory, sid)))
                        err = await recv(conn)
                        assert isinstance(err, wire.Error), (side, how, err)
                        assert err.code == wire.ErrorCode.NOT_FOUND
                        with pytest.raises(trio_websocket.ConnectionClosed) as info:
                            await recv(conn)
                        assert info.value.reason.code == wire.CLOSE_POLICY
            # Alice's session is untouched and still hers
            status = await http.get("/api/streaming/status", headers=bearer(alice))
            assert status.json()["sessionId"] == sid
            async with trio_websocket.open_websocket_url(ws_url(gw, "stream")) as conn:
                await conn.send_message(wire.encode(wire.Auth(alice, sid)))
                assert await recv(conn) == wire.AuthOk(sid)
    denied = [json.loads(line) for line in audit_lines if '"access_denied"' in line]
    assert len(denied) == 4
    assert {d["user"] for d in denied} == {keyed(tmp_path / "audit-hmac-key", MALLORY)}


async def test_audit_lines_carry_the_keyed_user_hash_never_the_sub(
    tmp_path: Path, audit_lines: list[str]
) -> None:
    issuer = DevIssuer.load_or_create(tmp_path / "key.pem")
    key_path = tmp_path / "audit-hmac-key"
    with trio.fail_after(30):
        async with open_gateway(tmp_path, metrics_addr="127.0.0.1:0") as gw:
            sid = await _traffic(gw, issuer)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert len(key_path.read_bytes()) >= 32
    events = [json.loads(line) for line in audit_lines]
    kinds = {e["event"] for e in events}
    assert {"session_created", "connection_opened", "connection_closed"} <= kinds, kinds
    assert {"session_destroyed", "auth_failed"} <= kinds, kinds
    alice = keyed(key_path, ALICE)
    mine = [e for e in events if e.get("session") == sid and "user" in e]
    assert len(mine) >= 5 and {e["user"] for e in mine} == {alice}
    assert alice != user_hash(ALICE)
    text = "\n".join(audit_lines)
    for secret in (ALICE, MALLORY, user_hash(ALICE), user_hash(MALLORY), "alice", "mallory"):
        assert secret not in text

    # the key outlives the gateway: a restart names the same user the same way...
    audit_lines.clear()
    with trio.fail_after(30):
        async with open_gateway(tmp_path, metrics_addr="127.0.0.1:0") as gw:
            await _traffic(gw, issuer)
    assert {json.loads(line).get("user") for line in audit_lines} >= {alice}
    # ...and another gateway's key (another config directory) names them differently
    other = tmp_path / "other"
    other.mkdir()
    (other / "key.pem").write_bytes((tmp_path / "key.pem").read_bytes())
    audit_lines.clear()
    with trio.fail_after(30):
        async with open_gateway(other, metrics_addr="127.0.0.1:0") as gw:
            await _traffic(gw, issuer)
    users = {json.loads(line).get("user") for line in audit_lines} - {None}
    assert keyed(other / "audit-hmac-key", ALICE) in users
    assert alice not in users
