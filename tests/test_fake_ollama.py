"""The fake Ollama speaks Ollama's protocol and records abandoned streams."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

import httpx
import pytest
import trio

from desktop.testing import FakeOllama, make_tokens, serve_fake_ollama

TIMING_FIELDS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeOllama:
    server: FakeOllama = await nursery.start(serve_fake_ollama, "127.0.0.1", 0)
    server.delay = 0.001
    return server


@pytest.fixture
async def client(fake: FakeOllama) -> Any:
    async with httpx.AsyncClient(base_url=fake.url, timeout=5) as c:
        yield c


def test_make_tokens_echo_then_filler() -> None:
    assert make_tokens("hi there", 5) == ["You", " said:", " hi", " there", " token1"]
    assert "".join(make_tokens("a b c d e f", 3)) == "You said: a"
    assert make_tokens("x", 0) == []


async def test_tags_has_ollama_shape(client: httpx.AsyncClient) -> None:
    with trio.fail_after(5):
        r = await client.get("/api/tags")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    models = r.json()["models"]
    assert models, "at least one model"
    for m in models:
        assert set(m) == {"name", "model", "modified_at", "size", "digest", "details"}
        assert m["name"] == m["model"]
        assert isinstance(m["size"], int)
        details = m["details"]
        for key in ("format", "family", "families", "parameter_size", "quantization_level"):
            assert key in details
        assert isinstance(details["families"], list)


async def test_version_and_show(client: httpx.AsyncClient) -> None:
    with trio.fail_after(5):
        version = await client.get("/api/version")
        show = await client.post("/api/show", json={"model": "llama3.2"})
        missing = await client.post("/api/show", json={"model": "nope"})
    assert "version" in version.json()
    assert show.status_code == 200
    assert show.json()["details"]["family"] == "llama"
    assert missing.status_code == 404


async def _stream_lines(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> list[tuple[float, dict[str, Any]]]:
    lines = []
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        async for line in r.aiter_lines():
            if line:
                lines.append((trio.current_time(), json.loads(line)))
    return lines


async def test_chat_streams_one_line_per_token_incrementally(
    fake: FakeOllama, client: httpx.AsyncClient
) -> None:
    fake.delay = 0.05
    body = {
        "model": "llama3.2",
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "hello there"},
        ],
        "options": {"num_predict": 8},
    }
    with trio.fail_after(5):
        lines = await _stream_lines(client, "/api/chat", body)
    tokens, final = lines[:-1], lines[-1][1]
    assert len(tokens) == 8
    for _, obj in tokens:
        assert set(obj) == {"model", "created_at", "message", "done"}
        assert obj["done"] is False
        assert obj["model"] == "llama3.2:latest"
        assert obj["message"]["role"] == "assistant"
    text = "".join(obj["message"]["content"] for _, obj in tokens)
    assert text == "You said: hello there token1 token2 token3 token4"
    # Streaming, not buffering: the first line arrived well before the last was produced.
    assert lines[-1][0] - tokens[0][0] >= 7 * 0.05 * 0.8
    assert final["done"] is True
    assert final["done_reason"] == "stop"
    assert final["message"] == {"role": "assistant", "content": ""}
    for field in TIMING_FIELDS:
        assert isinstance(final[field], int)
        assert final[field] > 0
    assert final["eval_count"] == 8
    assert final["eval_duration"] >= 8 * 0.05 * 1e9 * 0.9
    with trio.fail_after(1):
        await fake.wait_until(lambda f: f.completed == 1)
    assert fake.cancelled == []


async def test_generate_streams_response_tokens(client: httpx.AsyncClient) -> None:
    with trio.fail_after(5):
        lines = await _stream_lines(
            client, "/api/generate", {"model": "qwen2.5:0.5b", "prompt": "why"}
        )
    objs = [obj for _, obj in lines]
    assert len(objs) == 12 + 1  # default num_predict, then the final line
    assert all(set(o) == {"model", "created_at", "response", "done"} for o in objs[:-1])
    assert "".join(o["response"] for o in objs[:-1]).startswith("You said: why token1")
    final = objs[-1]
    assert final["done"] is True
    assert final["done_reason"] == "stop"
    assert final["response"] == ""
    assert isinstance(final["context"], list)
    assert all(field in final for field in TIMING_FIELDS)


async def test_stream_false_returns_one_object(client: httpx.AsyncClient) -> None:
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "yo"}], "stream": False}
    gen = {"model": "llama3.2", "prompt": "yo", "stream": False, "options": {"num_predict": 4}}
    with trio.fail_after(5):
        r1 = await client.post("/api/chat", json=chat)
        r2 = await client.post("/api/generate", json=gen)
    assert r1.headers["content-type"].startswith("application/json")
    one = r1.json()
    assert one["done"] is True
    assert one["message"]["content"].startswith("You said: yo token1")
    assert all(field in one for field in TIMING_FIELDS)
    assert r2.json()["response"] == "You said: yo token1"


async def test_unknown_model_is_404_like_ollama(client: httpx.AsyncClient) -> None:
    with trio.fail_after(5):
        r = await client.post("/api/chat", json={"model": "x", "messages": []})
        g = await client.post("/api/generate", json={"model": "x", "prompt": "p"})
    assert r.status_code == 404
    assert r.json() == {"error": 'model "x" not found, try pulling it first'}
    assert g.status_code == 404


async def test_client_disconnect_mid_stream_is_recorded(
    fake: FakeOllama, client: httpx.AsyncClient
) -> None:
    fake.delay = 0.05
    body = {"model": "llama3.2", "prompt": "p", "options": {"num_predict": 100}}
    with trio.fail_after(5):
        async with client.stream("POST", "/api/generate", json=body) as r:
            seen = 0
            # Cancelling (rather than break) unwinds httpx's nested async generators.
            with trio.CancelScope() as reading:
                async for line in r.aiter_lines():
                    seen += 1 if line else 0
                    if seen == 3:
                        reading.cancel()
        # Closing the response closes the connection: the fake sees it within a second.
        with trio.fail_after(1):
            await fake.wait_until(lambda f: bool(f.cancelled))
    (cancelled,) = fake.cancelled
    assert cancelled.path == "/api/generate"
    assert cancelled.model == "llama3.2"
    assert 3 <= cancelled.tokens_sent < 100
    assert fake.completed == 0


async def test_stats_endpoint(fake: FakeOllama, client: httpx.AsyncClient) -> None:
    fake.delay = 0.05
    with trio.fail_after(5):
        await client.get("/api/tags")
        await client.post(
            "/api/generate",
            json={
                "model": "llama3.2",
                "prompt": "a",
                "stream": False,
                "options": {"num_predict": 2},
            },
        )
        async with client.stream(
            "POST", "/api/chat", json={"model": "llama3.2", "messages": []}
        ) as r:
            with trio.CancelScope() as reading:
                async for _ in r.aiter_lines():
                    reading.cancel()
        await fake.wait_until(lambda f: bool(f.cancelled))
        stats = (await client.get("/_fake/stats")).json()
    assert stats["requests"] == 3
    assert stats["completed"] == 1
    assert stats["cancelled"] == [
        {
            "path": "/api/chat",
            "model": "llama3.2",
            "tokens_sent": stats["cancelled"][0]["tokens_sent"],
        }
    ]
    assert stats["cancelled"][0]["tokens_sent"] >= 1
    assert [(q.path, q.model) for q in fake.requests] == [
        ("/api/tags", None),
        ("/api/generate", "llama3.2"),
        ("/api/chat", "llama3.2"),
    ]


async def test_openai_sse_and_models(client: httpx.AsyncClient) -> None:
    body = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hey"}],
        "stream": True,
        "max_tokens": 3,
    }
    with trio.fail_after(5):
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.headers["content-type"] == "text/event-stream"
            raw = b"".join([chunk async for chunk in r.aiter_bytes()]).decode()
        models = (await client.get("/v1/models")).json()
        missing = await client.post("/v1/chat/completions", json={**body, "model": "nope"})
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert len(chunks) == 4
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "You said: hey"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert models["object"] == "list"
    assert {m["id"] for m in models["data"]} >= {"llama3.2:latest"}
    assert missing.status_code == 404
    assert "not found" in missing.json()["error"]["message"]


async def test_cli_subprocess_reports_port_and_stops_on_sigterm() -> None:
    cmd = [sys.executable, "-m", "c2l", "fake-ollama", "--port", "0", "--delay", "0.01"]
    with trio.fail_after(20):
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            buf = b""
            while b"\n" not in buf:
                data = await proc.stdout.receive_some(1024)
                assert data, "process exited before printing its address"
                buf += data
            line = buf.split(b"\n", 1)[0].decode()
            assert line.startswith("fake Ollama listening on http://127.0.0.1:")
            url = line.rsplit(" ", 1)[1]
            async with httpx.AsyncClient(base_url=url) as c:
                stats = (await c.get("/_fake/stats")).json()
            assert stats == {"requests": 0, "cancelled": [], "completed": 0}
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            assert proc.stdout is not None
            await proc.stdout.aclose()


async def test_embed_embeddings_ps_and_head(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        r = await client.post("/api/embed", json={"model": "llama3.2", "input": "x"})
        assert r.status_code == 200
        vec = r.json()["embeddings"][0]
        assert abs(sum(v * v for v in vec) - 1) < 1e-3
        r = await client.post("/api/embeddings", json={"model": "llama3.2", "prompt": "x"})
        assert r.json()["embedding"] == vec
        assert (
            await client.post("/api/embed", json={"model": "zz", "input": "x"})
        ).status_code == 404
        ps = (await client.get("/api/ps")).json()["models"]
        assert ps[0]["size_vram"] > 0
        head = await client.head("/api/tags")
        assert head.status_code == 200
        assert head.content == b""


async def test_pull_streams_progress_then_success(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        r = await client.post("/api/pull", json={"model": "qwen2.5:0.5b"})
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert lines[0]["status"] == "pulling manifest"
        assert lines[-1]["status"] == "success"
        assert any(line.get("completed") == line.get("total") for line in lines[1:-1])
        r = await client.post("/api/pull", json={"model": "qwen2.5:0.5b", "stream": False})
        assert r.json() == {"status": "success"}
        r = await client.post("/api/pull", json={"model": "missing"})
        assert json.loads(r.text.splitlines()[-1])["error"]


async def test_error_mid_stream_on_demand(client: httpx.AsyncClient) -> None:
    body = {"model": "llama3.2", "prompt": "x", "options": {"fake_error_after": 2}}
    with trio.fail_after(10):
        r = await client.post("/api/generate", json=body)
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert [("response" in line) for line in lines] == [True, True, False]
        assert "error" in lines[-1]
        r = await client.post("/api/generate", json={**body, "stream": False})
        assert r.status_code == 500
        assert "error" in r.json()


async def test_openai_completions_and_embeddings(client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        r = await client.post(
            "/v1/completions", json={"model": "llama3.2", "prompt": "a", "stream": True}
        )
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        first = json.loads(events[0].removeprefix("data: "))
        assert first["object"] == "text_completion"
        r = await client.post("/v1/embeddings", json={"model": "llama3.2", "input": ["a", "b"]})
        assert [d["index"] for d in r.json()["data"]] == [0, 1]
        r = await client.post("/v1/embeddings", json={"model": "nope", "input": "a"})
        assert r.status_code == 404
        assert r.json()["error"]["message"]
