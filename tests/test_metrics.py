"""``/metrics`` (parsed with prometheus_client's own parser), admin rows, ``c2l sessions`` live.

``/metrics`` is served without a token on ``C2L_METRICS_ADDR`` (loopback by default) and,
on the main port, only to an admin token; it has no per-user (or per-session) labels.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

import wire
from c2l._sessions import SessionsError, cli_sessions
from c2lcore import Config, ConfigError, user_hash
from gateway import RunningGateway, serve_gateway
from gateway._auth import DevIssuer
from orchestrator import container_name
from orchestrator.testing import FakeRuntime, open_fake_runtime


@pytest.fixture
async def fake_runtime() -> AsyncIterator[FakeRuntime]:
    async with open_fake_runtime(run_proxies=True) as fake:
        yield fake


@pytest.fixture
async def gw(nursery: trio.Nursery, tmp_path: Path, fake_runtime: FakeRuntime) -> RunningGateway:
    config = Config(
        port=0,
        dev_key_path=tmp_path / "key.pem",
        podman_url="unix:///nonexistent",
        metrics_addr="127.0.0.1:0",
    )
    running: RunningGateway = await nursery.start(
        functools.partial(serve_gateway, config, runtime=fake_runtime)
    )
    return running


@pytest.fixture
def issuer(tmp_path: Path) -> DevIssuer:
    return DevIssuer.load_or_create(tmp_path / "key.pem")


def metrics_url(gw: RunningGateway) -> str:
    """``/metrics`` on the gateway's metrics address (no token needed there)."""
    url = gw.gateway.metrics.url
    assert url is not None, "the metrics address is not served"
    assert url.startswith("http://127.0.0.1:") and not url.endswith(gw.url.rsplit(":", 1)[1])
    return url + "/metrics"


def no_per_user_labels(text: str, *secrets: str) -> None:
    """No sample is labelled by user or session, and no user or session id appears at all."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert not {"user", "session"} & set(s.labels), s
    for secret in secrets:
        assert secret not in text


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_sessions_traffic_errors_and_auth_failures(
    gw: RunningGateway, issuer: DevIssuer, fake_runtime: FakeRuntime
) -> None:
    token = issuer.sign("alice")
    auth = {"Authorization": f"Bearer {token}"}
    scrape = metrics_url(gw)
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=gw.url) as http:
            created = await http.post("/api/streaming/create", headers=auth)
            assert created.status_code == 200
            # the in-memory proxy has no process: lend it this one's, for resource figures
            fake_runtime.pids[container_name(user_hash("alice"))] = os.getpid()
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
                r = await http.get(scrape)
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/plain")
                live_text = r.text
                live = samples(live_text)
                assert live[("c2l_connections", (("side", "stream"),))] == 1
            session = (await http.get("/api/streaming/status", headers=auth)).json()
            await http.delete(f"/api/streaming/{session['sessionId']}", headers=auth)
            after_text = (await http.get(scrape)).text
            after = samples(after_text)

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
    # resource figures of the live sessions, summed: no series per user or per session
    memory = live[("c2l_sessions_memory_bytes", ())]
    assert 1024**2 < memory < 64 * 1024**3
    assert live[("c2l_sessions_memory_max_bytes", ())] == memory  # one session
    assert live[("c2l_sessions_cpu_seconds", ())] > 0
    assert after[("c2l_sessions_memory_bytes", ())] == 0
    for text in (live_text, after_text):
        no_per_user_labels(text, "alice", user_hash("alice"), session["sessionId"])


async def test_metrics_on_the_main_port_need_an_admin_token(
    gw: RunningGateway, issuer: DevIssuer
) -> None:
    admin = {"Authorization": f"Bearer {issuer.sign('root', admin=True)}"}
    user = {"Authorization": f"Bearer {issuer.sign('bob')}"}
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=gw.url) as http:
            assert (await http.post("/api/streaming/create", headers=user)).status_code == 200
            for headers, status, code in (
                ({}, 401, "missing_token"),
                ({"Authorization": "Bearer not-a-jwt"}, 401, "malformed_token"),
                (user, 403, "forbidden"),
            ):
                r = await http.get("/metrics", headers=headers)
                assert r.status_code == status
                assert r.json()["error"] == code
                assert "c2l_" not in r.text
            r = await http.get("/metrics", headers=admin)
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain")
            assert samples(r.text)[("c2l_sessions_live", (("state", "ready"),))] == 1
            no_per_user_labels(r.text, "bob", user_hash("bob"))
            # the metrics address serves /metrics only, and no token is needed there
            plain = await http.get(metrics_url(gw))
            assert plain.status_code == 200
            assert samples(plain.text)[("c2l_sessions_live", (("state", "ready"),))] == 1
            base = metrics_url(gw).removesuffix("/metrics")
            for path in ("/", "/health", "/api/admin/streaming/sessions", "/metrics/x"):
                assert (await http.get(base + path)).status_code == 404, path
            assert (await http.post(base + "/metrics")).status_code == 405


def test_metrics_address_setting() -> None:
    assert Config().metrics_addr == "127.0.0.1:9464"
    assert Config.from_env({}).metrics_bind == ("127.0.0.1", 9464)
    assert Config.from_env({"C2L_METRICS_ADDR": "[::1]:9000"}).metrics_bind == ("::1", 9000)
    assert Config.from_env({}, metrics_addr="0.0.0.0:1234").metrics_bind == ("0.0.0.0", 1234)
    for bad in ("9464", "127.0.0.1:", ":9464", "127.0.0.1:99999", "127.0.0.1:x"):
        with pytest.raises(ConfigError, match="C2L_METRICS_ADDR"):
            Config.from_env({"C2L_METRICS_ADDR": bad})


async def test_a_busy_metrics_address_does_not_stop_the_gateway(
    nursery: trio.Nursery,
    tmp_path: Path,
    fake_runtime: FakeRuntime,
    issuer: DevIssuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        config = Config(
            port=0, dev_key_path=tmp_path / "key.pem", podman_url="unix:///x", metrics_addr=addr
        )
        with trio.fail_after(20):
            running: RunningGateway = await nursery.start(
                functools.partial(serve_gateway, config, runtime=fake_runtime)
            )
            admin = {"Authorization": f"Bearer {issuer.sign('root', admin=True)}"}
            async with httpx.AsyncClient(base_url=running.url) as http:
                assert (await http.get("/health")).status_code == 200
                assert (await http.get("/metrics", headers=admin)).status_code == 200
    assert running.gateway.metrics.url is None
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(addr in w and "C2L_METRICS_ADDR" in w for w in warned), warned


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
        with pytest.raises(SessionsError, match=r"403.*c2l:admin"):
            await trio.to_thread.run_sync(cli_sessions, not_admin)
