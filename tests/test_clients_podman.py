"""The official ``ollama`` and ``openai`` Python clients through the gateway, on real Podman.

``c2l serve`` and ``c2l desktop`` are real processes (the Stack fixture of
``test_e2e_podman.py``), the user's proxy is a real rootless Podman container and the fake
Ollama speaks the real protocol. The clients are the unmodified official packages pointed
at ``<gateway>/api/ollama`` (Ollama) and ``<gateway>/api/ollama/v1`` (OpenAI) with the
user's token as a Bearer header. Their blocking APIs run in worker threads, and tokens are
timestamped as the client yields them, to show they arrive one by one.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import httpx
import pytest
import trio

from desktop.testing import FakeOllama, serve_fake_ollama

from ._stack import Stack, wait_for_desktop
from ._stack import stack as stack  # the fixture

pytestmark = pytest.mark.podman

DELAY = 0.05
SUB = "clients@example.com"


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeOllama:
    server: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=DELAY)
    )
    return server


async def _ready(stack: Stack, fake: FakeOllama) -> str:
    stack.start_agent(SUB, fake.url)
    token = stack.token(SUB)
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        await wait_for_desktop(http, token)
    return token


def _timed(items: Any) -> list[tuple[float, Any]]:
    return [(time.monotonic(), item) for item in items]


def _spread(stamps: list[tuple[float, Any]]) -> float:
    return stamps[-1][0] - stamps[0][0]


def _ollama_calls(url: str, token: str) -> dict[str, Any]:
    import ollama

    client = ollama.Client(
        host=f"{url}/api/ollama", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    out: dict[str, Any] = {}
    out["list"] = [m.model for m in client.list().models]
    out["show"] = client.show("llama3.2:latest")
    messages = [{"role": "user", "content": "why is the sky blue"}]
    out["chat"] = client.chat(model="llama3.2", messages=messages, options={"num_predict": 16})
    out["chat_stream"] = _timed(
        client.chat(model="llama3.2", messages=messages, stream=True, options={"num_predict": 16})
    )
    out["generate"] = client.generate(model="qwen2.5:0.5b", prompt="hi there")
    out["generate_stream"] = _timed(
        client.generate(model="qwen2.5:0.5b", prompt="hi there", stream=True)
    )
    out["embed"] = client.embed(model="llama3.2", input=["a", "b"])
    try:
        client.chat(model="no-such-model", messages=messages)
    except ollama.ResponseError as exc:
        out["missing"] = (exc.status_code, exc.error)
    return out


def _openai_calls(url: str, token: str) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=f"{url}/api/ollama/v1", api_key=token, timeout=30)
    out: dict[str, Any] = {}
    out["models"] = sorted(m.id for m in client.models.list())
    stream = client.chat.completions.create(
        model="llama3.2",
        messages=[{"role": "user", "content": "tell me a story"}],
        stream=True,
        max_tokens=20,
    )
    out["stream"] = _timed(stream)
    out["completion"] = client.completions.create(model="llama3.2", prompt="once", max_tokens=5)
    out["embedding"] = client.embeddings.create(model="llama3.2", input="hello")
    return out


def _abandon_stream(url: str, token: str) -> int:
    """Read three tokens of a long answer, then close the response (as a user's Ctrl-C)."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/api/ollama/v1", api_key=token, timeout=30)
    stream = client.chat.completions.create(
        model="llama3.2",
        messages=[{"role": "user", "content": "go on forever"}],
        stream=True,
        max_tokens=2000,
    )
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 3:
            break
    stream.close()
    return seen


async def test_official_ollama_client(stack: Stack, fake: FakeOllama) -> None:
    with trio.fail_after(120):
        token = await _ready(stack, fake)
        out = await trio.to_thread.run_sync(_ollama_calls, stack.url, token)
    assert out["list"] == ["llama3.2:latest", "qwen2.5:0.5b"]
    assert out["show"].details.family == "llama"
    chat = out["chat"]
    assert chat.done is True
    assert chat.message.content.startswith("You said: why is the sky blue")
    assert chat.eval_count == 16
    assert chat.total_duration and chat.total_duration > 0
    parts = out["chat_stream"]
    assert len(parts) == 17
    assert "".join(p.message.content for _, p in parts) == chat.message.content
    assert parts[-1][1].done is True
    assert parts[-1][1].eval_count == 16
    # incremental: 16 tokens at 50 ms spread over most of 0.8 s, not one burst
    print(f"ollama chat stream: {len(parts)} parts over {_spread(parts):.3f} s")
    assert _spread(parts) > 0.4, _spread(parts)
    gen = out["generate"]
    assert gen.response.startswith("You said: hi there")
    assert gen.done_reason == "stop"
    gparts = out["generate_stream"]
    assert "".join(p.response for _, p in gparts) == gen.response
    assert _spread(gparts) > 0.3, _spread(gparts)
    assert len(out["embed"].embeddings) == 2
    assert out["missing"][0] == 404
    assert "not found" in out["missing"][1]


async def test_official_openai_client(stack: Stack, fake: FakeOllama) -> None:
    with trio.fail_after(120):
        token = await _ready(stack, fake)
        out = await trio.to_thread.run_sync(_openai_calls, stack.url, token)
    assert out["models"] == ["llama3.2:latest", "qwen2.5:0.5b"]
    chunks = out["stream"]
    text = "".join(c.choices[0].delta.content or "" for _, c in chunks)
    assert text.startswith("You said: tell me a story")
    assert chunks[-1][1].choices[0].finish_reason == "stop"
    assert len(chunks) == 21
    print(f"openai chat stream: {len(chunks)} chunks over {_spread(chunks):.3f} s")
    assert _spread(chunks) > 0.6, _spread(chunks)
    assert out["completion"].choices[0].text.startswith("You said: once")
    assert len(out["embedding"].data[0].embedding) > 0


async def test_client_closing_mid_stream_cancels_on_the_desktop(
    stack: Stack, fake: FakeOllama
) -> None:
    with trio.fail_after(120):
        token = await _ready(stack, fake)
        seen = await trio.to_thread.run_sync(_abandon_stream, stack.url, token)
        assert seen == 3
        # 2000 tokens at 50 ms would take 100 s: the cancel reaches the fake at once
        with trio.fail_after(10):
            await fake.wait_until(lambda f: len(f.cancelled) == 1)
    assert fake.cancelled[0].path == "/v1/chat/completions"
    assert fake.cancelled[0].tokens_sent < 100
    assert fake.completed == 0
