"""``/metrics`` (parsed with prometheus_client's own parser), admin rows, ``c2l sessions`` live."""

from __future__ import annotations

import argparse
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

import wire
from c2l import Config
from c2l._cli import CommandError
from c2l._sessions import cli_sessions
from gateway import RunningGateway, serve_gateway
from gateway._auth import DevIssuer
from orchestrator import FakeRuntime, open_fake_runtime


@pytest.fixture
async def fake_runtime() -> AsyncIterator[FakeRuntime]:
    async with open_fake_runtime(run_proxies=True) as fake:
        yield fake


@pytest.fixture
async def gw(nursery: trio.Nursery, tmp_path: Path, fake_runtime: FakeRuntime) -> RunningGateway:
    config = Config(port=0, dev_key_path=tmp_path / "key.pem", podman_url="unix:///nonexistent")
    running: RunningGateway = await nursery.start(
        functools.partial(serve_gateway, config, runtime=fake_runtime)
    )
    return running


@pytest.fixture
def issuer(tmp_path: Path) -> DevIssuer:
    return DevIssuer.load_or_create(tmp_path / "key.pem")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_sessions_traffic_errors_and_auth_failures(
    gw: RunningGateway, issuer: DevIssuer
) -> None:
    token = issuer.sign("alice")
    auth = {"Authorization": f"Bearer {token}"}
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=gw.url) as http:
            assert (await http.post("/api/streaming/create", headers=auth)).status_code == 200
            bad = {"Authorization": "Bearer not-a-jwt"}
            assert (await http.post("/api/streaming/create", headers=bad)).status_code == 401
            url = gw.url.replace("http://", "ws://") + "/ws/stream"
            async with trio_websocket.open_websocket_url(
                url, extra_headers=[(b"Authorization", f"Bearer {token}".encode())]
            ) as ws:
                assert isinstance(wire.decode(await ws.get_message()), wire.AuthOk)
                # no desktop: the proxy answers desktop_unavailable
                await ws.send_message(wire.encode(wire.Request("a", "GET", "/api/tags")))
                err = wire.decode(await ws.get_message())
                assert isinstance(err, wire.Error)
                r = await http.get("/metrics")
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/plain")
                live = samples(r.text)
                assert live[("c2l_connections", (("side", "stream"),))] == 1
            session = (await http.get("/api/streaming/status", headers=auth)).json()
            await http.delete(f"/api/streaming/{session['sessionId']}", headers=auth)
            after = samples((await http.get("/metrics")).text)

    assert live[("c2l_sessions_live", (("state", "ready"),))] == 1
    assert after[("c2l_sessions_live", (("state", "ready"),))] == 0
    assert after[("c2l_sessions_created_total", ())] == 1
    assert after[("c2l_sessions_destroyed_total", (("reason", "deleted"),))] == 1
    assert after[("c2l_session_create_seconds_count", ())] == 1
    assert after[("c2l_session_create_seconds_bucket", (("le", "+Inf"),))] == 1
    assert after[("c2l_connections", (("side", "stream"),))] == 0
    assert after[("c2l_messages_relayed_total", (("direction", "in"), ("side", "stream")))] == 1
    assert after[("c2l_messages_relayed_total", (("direction", "out"), ("side", "stream")))] == 1
    assert after[("c2l_bytes_relayed_total", (("direction", "in"), ("side", "stream")))] > 20
    assert after[("c2l_errors_total", (("code", "desktop_unavailable"),))] == 1
    assert sum(v for (n, _), v in after.items() if n == "c2l_auth_failures_total") == 1
    # per-session figures while it lived: bytes each way, labelled by user hash only
    per_session = [k for k in live if k[0] == "c2l_session_relayed_bytes"]
    assert len(per_session) == 2
    assert all(dict(labels)["user"] != "alice" for _, labels in per_session)


async def test_admin_rows_and_c2l_sessions_table(
    gw: RunningGateway, issuer: DevIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=gw.url) as http:
            for sub in ("alice", "bob"):
                auth = {"Authorization": f"Bearer {issuer.sign(sub)}"}
                assert (await http.post("/api/streaming/create", headers=auth)).status_code == 200
            admin = {"Authorization": f"Bearer {issuer.sign('root', admin=True)}"}
            rows = (await http.get("/api/admin/streaming/sessions", headers=admin)).json()
        assert rows["count"] == 2
        for row in rows["sessions"]:
            assert {"memoryBytes", "cpuSeconds", "bytesIn", "bytesOut", "connections"} <= set(row)

        args = argparse.Namespace(
            gateway=gw.url, token=issuer.sign("root", admin=True), token_file=None, json=False
        )
        assert await trio.to_thread.run_sync(cli_sessions, args) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == [
            "SESSION", "USER", "STATE", "AGE", "IDLE", "CONN", "IN", "OUT", "MEMORY", "CPU"
        ]  # fmt: skip
        assert len(out) == 4 and out[-1] == "2 sessions"
        # aligned: every column starts at the same offset on every line
        starts = [out[0].index("STATE")] + [line.index("ready") for line in out[1:3]]
        assert len(set(starts)) == 1

        not_admin = argparse.Namespace(
            gateway=gw.url, token=issuer.sign("bob"), token_file=None, json=False
        )
        with pytest.raises(CommandError, match=r"403.*c2l:admin"):
            await trio.to_thread.run_sync(cli_sessions, not_admin)
