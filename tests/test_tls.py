"""TLS: ``c2l serve --tls-cert --tls-key`` serves HTTPS and WSS (real Podman, processes).

A throwaway certificate authority (trustme) signs the gateway's certificate. The desktop
agent and a client that trust it stream through; a client that does not is refused.
"""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
import trustme

import wire
from desktop.testing import FakeOllama, make_tokens, serve_fake_ollama

from ._stack import Stack, run_stack

pytestmark = pytest.mark.podman


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def stack(tmp_path: Path, ca: trustme.CA, client_ctx: ssl.SSLContext) -> Iterator[Stack]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    certfile, keyfile, cafile = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    with certfile.open("wb") as f:
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    cert.private_key_pem.write_to_path(str(keyfile))
    ca.cert_pem.write_to_path(str(cafile))
    args = ("--tls-cert", str(certfile), "--tls-key", str(keyfile))
    # the agent subprocess trusts the CA through OpenSSL's SSL_CERT_FILE
    env = {"SSL_CERT_FILE": str(cafile)}
    with run_stack(tmp_path, *args, scheme="https", verify=client_ctx, env=env) as s:
        yield s


@pytest.fixture
async def fake_ollama(nursery: trio.Nursery) -> FakeOllama:
    fake: FakeOllama = await nursery.start(
        functools.partial(serve_fake_ollama, "127.0.0.1", 0, delay=0.005)
    )
    return fake


async def test_https_and_wss_with_a_trusted_ca_and_refused_without(
    stack: Stack, fake_ollama: FakeOllama, client_ctx: ssl.SSLContext
) -> None:
    sub = "tls-user@example.com"
    token = stack.token(sub)
    auth = {"Authorization": f"Bearer {token}"}
    stack.start_agent(sub, fake_ollama.url)
    async with httpx.AsyncClient(base_url=stack.url, timeout=30, verify=client_ctx) as http:
        with trio.fail_after(90):
            r = await http.post("/api/streaming/create", headers=auth)
            assert r.status_code == 200, r.text
            session = r.json()
            assert session["endpoint"].startswith("wss://localhost:")
            assert session["bridgeEndpoint"].startswith("wss://")
            # stream a chat over WSS, once the agent (itself on WSS) is attached
            prompt = "over tls"
            body = {
                "model": "llama3.2:latest",
                "messages": [{"role": "user", "content": prompt}],
                "options": {"num_predict": 10},
            }
            while True:
                async with trio_websocket.open_websocket_url(
                    session["endpoint"], ssl_context=client_ctx
                ) as ws:
                    await ws.send_message(wire.encode(wire.Auth(token, session["sessionId"])))
                    assert isinstance(wire.decode(await ws.get_message()), wire.AuthOk)
                    await ws.send_message(
                        wire.encode(wire.Request("t", "POST", "/api/chat", {}, body))
                    )
                    start = wire.decode(await ws.get_message())
                    if isinstance(start, wire.Error):
                        assert start.code == wire.ErrorCode.DESKTOP_UNAVAILABLE
                        await trio.sleep(0.2)
                        continue
                    assert isinstance(start, wire.ResponseStart) and start.status == 200
                    text = ""
                    while not isinstance(
                        msg := wire.decode(await ws.get_message()), wire.ResponseEnd
                    ):
                        assert isinstance(msg, wire.Chunk)
                        for raw in msg.data.splitlines():  # one or more lines a chunk
                            line = json.loads(raw)
                            text += "" if line["done"] else line["message"]["content"]
                    assert text == "".join(make_tokens(prompt, 10))
                    break
            # and over HTTPS
            r = await http.post(
                "/api/ollama/api/generate",
                headers=auth,
                json={"model": "llama3.2:latest", "prompt": "x", "stream": False},
            )
            assert r.status_code == 200

            # a client that does not trust the CA is refused, over HTTPS and WSS
            async with httpx.AsyncClient(timeout=10) as untrusting:
                with pytest.raises(httpx.ConnectError) as refused:
                    await untrusting.get(f"{stack.url}/health")
            assert _caused_by(refused.value, ssl.SSLCertVerificationError)
            # (the WebSocket upgrade rides on the same TLS handshake, which fails first)
            port = int(stack.url.rsplit(":", 1)[1])
            tls = await trio.open_ssl_over_tcp_stream(
                "localhost", port, ssl_context=ssl.create_default_context()
            )
            with pytest.raises(trio.BrokenResourceError) as broken:
                await tls.do_handshake()
            assert _caused_by(broken.value, ssl.SSLCertVerificationError)
            await trio.aclose_forcefully(tls)
            # and plain HTTP on the TLS port gets no answer from the application
            async with httpx.AsyncClient(timeout=5) as plain:
                with pytest.raises(httpx.HTTPError):
                    await plain.get(stack.url.replace("https://", "http://") + "/health")


def _caused_by(exc: BaseException | None, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is anywhere in ``exc``'s chain of causes."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, kind):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
