"""``/api/ollama/<path>`` end to end in one process: gateway, real proxy, agent, fake Ollama.

The gateway runs on the in-memory runtime with real in-process proxies, the desktop agent
is the real one, the fake Ollama speaks Ollama's protocol over real sockets, and the HTTP
client is httpx. Podman-free, so these run everywhere in a few seconds.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

import wire
from c2lcore import Config
from desktop import AgentConfig, DesktopAgent, StaticToken, serve_agent
from desktop.testing import RUNNER_ERROR, FakeOllama
from desktop.testing import serve_fake_ollama as serve_fake
from gateway import RunningGateway, serve_gateway
from gateway._auth import DevIssuer
from orchestrator import proxy_get
from orchestrator.testing import FakeRuntime, open_fake_runtime

SUB = "tunnel-user@example.com"
DELAY = 0.05


@attrs.define
class Rig:
    gw: RunningGateway
    fake: FakeOllama
    agent: DesktopAgent
    http: httpx.AsyncClient
    token: str
    runtime: FakeRuntime

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
async def rig(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Rig]:
    config = Config(port=0, dev_key_path=tmp_path / "key.pem", podman_url="unix:///nonexistent")
    issuer = DevIssuer.load_or_create(config.dev_key_path)
    token = issuer.sign(SUB)
    async with open_fake_runtime(run_proxies=True) as runtime:
        rt: FakeRuntime = runtime
        gw: RunningGateway = await nursery.start(
            functools.partial(serve_gateway, config, runtime=rt)
        )
        fake: FakeOllama = await nursery.start(
            functools.partial(serve_fake, "127.0.0.1", 0, delay=DELAY)
        )
        agent_config = AgentConfig(gw.url, StaticToken(token), fake.url, probe_ollama=False)
        agent: DesktopAgent = await nursery.start(
            functools.partial(serve_agent, agent_config, status=lambda _: None)
        )
        with trio.fail_after(10):
            await agent.wait_until(lambda a: a.state == "connected")
        async with httpx.AsyncClient(base_url=gw.url + "/api/ollama", timeout=10) as http:
            yield Rig(gw, fake, agent, http, token, rt)
        nursery.cancel_scope.cancel()


async def lines_with_times(resp: httpx.Response) -> list[tuple[float, str]]:
    """The body's non-empty lines with the trio time each arrived."""
    out = []
    async for line in resp.aiter_lines():
        if line:
            out.append((trio.current_time(), line))
    return out


async def test_native_json_endpoints_pass_through(rig: Rig) -> None:
    with trio.fail_after(20):
        r = await rig.http.get("/api/tags", headers=rig.auth)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/json")
        assert [m["name"] for m in r.json()["models"]] == ["llama3.2:latest", "qwen2.5:0.5b"]
        assert (await rig.http.get("/api/version", headers=rig.auth)).json()["version"]
        ps = (await rig.http.get("/api/ps", headers=rig.auth)).json()
        assert ps["models"][0]["name"] == "llama3.2:latest"
        assert "expires_at" in ps["models"][0]
        show = await rig.http.post("/api/show", headers=rig.auth, json={"model": "llama3.2"})
        assert show.json()["details"]["family"] == "llama"
        embed = await rig.http.post(
            "/api/embed", headers=rig.auth, json={"model": "llama3.2", "input": ["a", "b"]}
        )
        assert len(embed.json()["embeddings"]) == 2
        old = await rig.http.post(
            "/api/embeddings", headers=rig.auth, json={"model": "llama3.2", "prompt": "a"}
        )
        assert old.json()["embedding"] == embed.json()["embeddings"][0]
        whole = await rig.http.post(
            "/api/chat",
            headers=rig.auth,
            json={
                "model": "llama3.2",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": False,
            },
        )
        assert whole.status_code == 200
        body = whole.json()
        assert body["done"] is True
        assert body["message"]["content"].startswith("You said: hi")
        assert body["eval_count"] == 12


async def test_status_codes_headers_query_and_head_pass_through(rig: Rig) -> None:
    with trio.fail_after(20):
        missing = await rig.http.post(
            "/api/chat", headers=rig.auth, json={"model": "nope", "messages": []}
        )
        assert missing.status_code == 404
        assert missing.json() == {"error": 'model "nope" not found, try pulling it first'}
        assert (await rig.http.get("/api/nothing-here", headers=rig.auth)).status_code == 404
        assert (await rig.http.get("/api/chat", headers=rig.auth)).status_code == 405
        r = await rig.http.get(
            "/api/tags?verbose=1&x=a%20b",
            headers={**rig.auth, "X-Client-Trace": "t-42", "User-Agent": "ollama-python/0.6"},
        )
        assert r.status_code == 200
        seen = rig.fake.requests[-1]
        assert seen.query == "verbose=1&x=a%20b"
        assert seen.headers["x-client-trace"] == "t-42"
        assert seen.headers["user-agent"] == "ollama-python/0.6"
        # the gateway credential never leaves the gateway
        assert "authorization" not in seen.headers
        head = await rig.http.head("/api/version", headers=rig.auth)
        assert head.status_code == 200
        assert head.content == b""
        assert rig.fake.requests[-1].method == "HEAD"
        bad = await rig.http.post("/api/chat", headers=rig.auth, content=b"{not json")
        assert bad.status_code == 400
        assert set(bad.json()) == {"error", "message"}


async def test_ndjson_arrives_line_by_line_as_produced(rig: Rig) -> None:
    tokens = 60
    body = {"model": "llama3.2", "prompt": "count", "options": {"num_predict": tokens}}
    got: list[str] = []
    with trio.fail_after(60):
        async with rig.http.stream("POST", "/api/generate", headers=rig.auth, json=body) as r:
            assert r.headers["content-type"] == "application/x-ndjson"
            assert r.headers["x-accel-buffering"] == "no"
            async for line in r.aiter_lines():
                if not line:
                    continue
                if not got:
                    # Not buffered: the first line is here while the desktop still has
                    # 59 tokens to go (3 s at 50 ms each, whatever the machine's load).
                    assert rig.fake.completed == 0
                got.append(line)
    assert rig.fake.completed == 1
    objs = [json.loads(line) for line in got]
    assert len(objs) == tokens + 1
    assert "".join(o["response"] for o in objs).startswith("You said: count")
    final = objs[-1]
    assert final["done"] is True
    for field in ("total_duration", "eval_count", "eval_duration", "prompt_eval_count"):
        assert field in final


async def test_pull_progress_streams(rig: Rig) -> None:
    with trio.fail_after(20):
        async with rig.http.stream(
            "POST", "/api/pull", headers=rig.auth, json={"model": "llama3.2"}
        ) as r:
            got = [json.loads(line) for _, line in await lines_with_times(r)]
        assert got[0] == {"status": "pulling manifest"}
        progress = [g["completed"] for g in got if "completed" in g]
        assert progress == sorted(progress)
        assert progress[-1] == got[1]["total"]
        assert got[-1] == {"status": "success"}
        async with rig.http.stream(
            "POST", "/api/pull", headers=rig.auth, json={"model": "no-such-model"}
        ) as r:
            failed = [json.loads(line) for _, line in await lines_with_times(r)]
        assert failed[-1] == {"error": "pull model manifest: file does not exist"}


async def test_error_mid_stream_reaches_the_client_in_ollamas_shape(rig: Rig) -> None:
    body = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "x"}],
        "options": {"fake_error_after": 3},
    }
    with trio.fail_after(20):
        async with rig.http.stream("POST", "/api/chat", headers=rig.auth, json=body) as r:
            assert r.status_code == 200
            objs = [json.loads(line) for _, line in await lines_with_times(r)]
    assert len(objs) == 4
    assert objs[-1] == {"error": RUNNER_ERROR}
    sse = {"model": "llama3.2", "prompt": "x", "stream": True, "fake_error_after": 2}
    with trio.fail_after(20):
        async with rig.http.stream("POST", "/v1/completions", headers=rig.auth, json=sse) as r:
            events = [line for _, line in await lines_with_times(r)]
    assert len(events) == 3
    assert json.loads(events[-1].removeprefix("data: "))["error"]["message"] == RUNNER_ERROR


async def test_openai_endpoints(rig: Rig) -> None:
    with trio.fail_after(20):
        models = (await rig.http.get("/v1/models", headers=rig.auth)).json()
        assert models["object"] == "list"
        assert {m["id"] for m in models["data"]} == {"llama3.2:latest", "qwen2.5:0.5b"}
        one = await rig.http.get("/v1/models/llama3.2:latest", headers=rig.auth)
        assert one.json()["id"] == "llama3.2:latest"
        emb = await rig.http.post(
            "/v1/embeddings", headers=rig.auth, json={"model": "llama3.2", "input": "hello"}
        )
        assert emb.json()["data"][0]["object"] == "embedding"
        comp = await rig.http.post(
            "/v1/completions",
            headers=rig.auth,
            json={"model": "llama3.2", "prompt": "p", "max_tokens": 4},
        )
        assert comp.json()["choices"][0]["finish_reason"] == "stop"
        chat = {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "hey"}],
            "stream": True,
            "max_tokens": 6,
        }
        async with rig.http.stream(
            "POST", "/v1/chat/completions", headers=rig.auth, json=chat
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            raw = [line async for line in r.aiter_lines()]
        missing = await rig.http.post(
            "/v1/chat/completions", headers=rig.auth, json={"model": "nope", "messages": []}
        )
        assert missing.status_code == 404
        assert "not found" in missing.json()["error"]["message"]
    data = [line.removeprefix("data: ") for line in raw if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    deltas = [json.loads(d)["choices"][0]["delta"]["content"] for d in data[:-1]]
    assert "".join(deltas).startswith("You said: hey")


async def open_raw_stream(rig: Rig, path: str, body: Any) -> trio.SocketStream:
    """POST with a bare socket (httpx leaves generators behind when a stream is abandoned)."""
    host, port = rig.gw.url.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    stream = await trio.open_tcp_stream(host, int(port))
    head = (
        f"POST /api/ollama{path} HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {rig.token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    await stream.send_all(head.encode() + data)
    return stream


@pytest.mark.parametrize("read_first", [3, 0])
async def test_client_leaving_mid_stream_cancels_on_the_desktop(rig: Rig, read_first: int) -> None:
    """The HTTP client closes the connection; the fake Ollama records the cancellation."""
    tokens = 4000  # 200 s at 50 ms: only a cancellation ends it within the bound below
    body: dict[str, Any] = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "long"}],
        "options": {"num_predict": tokens},
    }
    with trio.fail_after(90):
        stream = await open_raw_stream(rig, "/api/chat", body)
        got = b""
        while got.count(b'"done":false') < read_first or b"\r\n\r\n" not in got:
            got += await stream.receive_some(65536)
        assert got.startswith(b"HTTP/1.1 200")
        await stream.aclose()
        # generous for a busy machine, and still a small part of the 200 s generation
        with trio.fail_after(60):
            await rig.fake.wait_until(lambda f: len(f.cancelled) == 1)
    cancelled = rig.fake.cancelled[0]
    assert cancelled.path == "/api/chat"
    assert cancelled.tokens_sent < tokens // 3
    assert rig.fake.completed == 0


# -- one upstream per session (issue 9 point 3) ---------------------------------------------


def _json_or_none(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None  # a chunk-size line, or a header


def _scrape(text: str, name: str, labels: dict[str, str]) -> float:
    """One sample of the Prometheus text exposition ``text`` (0.0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def test_concurrent_http_requests_share_one_proxy_connection_beside_a_web_client(
    rig: Rig,
) -> None:
    import trio_websocket

    import wire
    from c2lcore import user_hash

    prompts = [f"question{i}" for i in range(4)]
    firsts: dict[str, str] = {}
    all_started = trio.Event()
    health: dict[str, Any] = {}
    done = trio.Event()
    with trio.fail_after(60):
        ws_url = rig.gw.url.replace("http://", "ws://") + "/ws/stream"
        async with (
            trio_websocket.open_websocket_url(
                ws_url, extra_headers=[(b"Authorization", f"Bearer {rig.token}".encode())]
            ) as web,
            trio.open_nursery() as nursery,
        ):
            assert isinstance(wire.decode(await web.get_message()), wire.AuthOk)

            async def stream(prompt: str) -> None:
                # Long generations (200 s), so that all of them are in flight together.
                body = {"model": "llama3.2", "prompt": prompt, "options": {"num_predict": 4000}}
                raw = await open_raw_stream(rig, "/api/generate", body)
                got = b""
                while got.count(b'"done":false') < 4:  # "You", " said:", " <prompt>", ...
                    got += await raw.receive_some(65536)
                assert got.startswith(b"HTTP/1.1 200")
                lines = [_json_or_none(line) for line in got.split(b"\n")]
                firsts[prompt] = "".join(o["response"] for o in lines if isinstance(o, dict))
                if len(firsts) == len(prompts):
                    all_started.set()
                await done.wait()
                await raw.aclose()  # leaves mid-stream: cancelled on the desktop

            for prompt in prompts:
                nursery.start_soon(stream, prompt)
            await all_started.wait()
            # The web client is served beside them, over a connection of its own.
            await web.send_message(wire.encode(wire.Request("w1", "GET", "/api/tags")))
            while not isinstance(msg := wire.decode(await web.get_message()), wire.ResponseStart):
                assert isinstance(msg, wire.Ping), msg
            assert msg.id == "w1" and msg.status == 200
            session = rig.gw.gateway.orchestrator.get(user_hash(SUB))
            assert session is not None
            assert session.socket_path is not None
            health = json.loads((await proxy_get(session.socket_path))[1])
            metrics = (await rig.gw.gateway.metrics.render()).decode()
            done.set()
    # Each HTTP request got its own answer...
    for prompt in prompts:
        assert firsts[prompt].startswith(f"You said: {prompt}"), firsts
    # ...and the proxy saw two clients: the web client and ONE connection for all four
    # HTTP requests (one each before: five), with the four requests in flight at once.
    assert health["clients"] == 2, health
    assert health["inflight"] >= len(prompts), health
    # The HTTP path's traffic is counted like the WebSocket path's.
    http_in = {"side": "http", "direction": "in"}
    http_out = {"side": "http", "direction": "out"}
    assert _scrape(metrics, "c2l_messages_relayed_total", http_in) >= len(prompts)
    assert _scrape(metrics, "c2l_bytes_relayed_total", http_in) > 0
    assert _scrape(metrics, "c2l_bytes_relayed_total", http_out) > 0
    assert _scrape(metrics, "c2l_connections", {"side": "http"}) == len(prompts)


async def test_the_http_upstream_ends_with_its_session_and_the_next_session_gets_its_own(
    rig: Rig,
) -> None:
    from c2lcore import user_hash

    gw = rig.gw.gateway
    with trio.fail_after(60):
        assert (await rig.http.get("/api/tags", headers=rig.auth)).status_code == 200
        session = gw.orchestrator.get(user_hash(SUB))
        assert session is not None
        upstream = gw._http[session.id]
        assert not upstream.closed
        assert session.connections.get("http", 0) == 0  # no request in flight
        # a second request reuses it
        assert (await rig.http.get("/api/version", headers=rig.auth)).status_code == 200
        assert gw._http[session.id] is upstream
        # The upstream is the session's own task: it is closed before the session's
        # teardown begins, not once the proxy is gone (removal is slowed down here, so an
        # upstream that merely noticed the proxy's end would still be open).
        rig.runtime.inject("remove_pod", "delay", seconds=2.0)
        async with httpx.AsyncClient(base_url=rig.gw.url) as api, trio.open_nursery() as n:
            delete = functools.partial(api.delete, headers=rig.auth)
            n.start_soon(delete, f"/api/streaming/{session.id}")
            while not rig.runtime.method_calls("remove_pod"):
                await trio.sleep(0.01)
            assert upstream.closed
            assert session.id not in gw._http
            assert not session.ended.is_set()  # still being torn down
        # The next request starts a new session, and the parked agent is attached to it.
        while (await rig.http.get("/api/tags", headers=rig.auth)).status_code != 200:
            await trio.sleep(0.05)  # 503 desktop_unavailable until the agent is attached
        again = gw.orchestrator.get(user_hash(SUB))
        assert again is not None and again.id != session.id
        assert gw._http[again.id] is not upstream


async def test_an_http_client_that_reads_nothing_is_dropped_and_the_others_go_on(
    rig: Rig,
) -> None:
    """All of a session's HTTP requests share one upstream: a client that reads nothing
    holds the others up for ``slow_http_client_s`` at most, then its request alone is
    dropped and cancelled on the desktop."""
    from c2lcore import user_hash
    from gateway._upstream import REQUEST_QUEUE

    gw = rig.gw.gateway
    gw.slow_http_client_s = 1.0  # before the session's first request opens its upstream
    with trio.fail_after(60):
        assert (await rig.http.get("/api/version", headers=rig.auth)).status_code == 200
        session = gw.orchestrator.get(user_hash(SUB))
        assert session is not None
        upstream = gw._http[session.id]
        assert upstream.slow_client_s == 1.0
        # A long generation (200 s) whose caller never reads its answer.
        body = {"model": "llama3.2", "prompt": "stalled", "options": {"num_predict": 4000}}
        headers = {"content-type": "application/json"}
        stalled = await upstream.call("POST", "/api/generate", headers, body)
        try:
            while stalled.answer.statistics().current_buffer_used < REQUEST_QUEUE:
                await trio.sleep(0.02)  # its queue fills up; then the upstream waits for it
            t0 = trio.current_time()
            other = await rig.http.post(
                "/api/generate",
                json={"model": "llama3.2", "prompt": "other", "stream": False},
                headers=rig.auth,
            )
            waited = trio.current_time() - t0
            assert other.status_code == 200, other.text
            assert other.json()["response"].startswith("You said: other")
            # The stalled request was dropped and cancelled on the desktop...
            await rig.fake.wait_until(lambda f: len(f.cancelled) >= 1)
            assert rig.fake.cancelled[0].tokens_sent < 4000
            # ...and what it was given ends there: nothing more than its full queue.
            got = [msg async for msg in stalled.answer]
            assert len(got) <= REQUEST_QUEUE
            assert not any(isinstance(m, wire.ResponseEnd) for m in got)
        finally:
            stalled.close()
    # The other request was held up by the stalled one for about the bound, not longer.
    assert waited < 1.0 + 10, waited
    assert upstream is gw._http.get(session.id)  # the shared upstream itself lives on
