"""Several desktops per user, in the proxy (issue 13, point 2; DESIGN.md section 2).

The user's proxy runs in-process; desktops and web clients are real WebSocket peers that
speak the wire protocol by hand, so each test says exactly what each desktop sees and
answers. The end-to-end test with real agents, fake Ollamas and Podman is
``test_desktops_podman.py``.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

import wire
from c2l._cli import main
from c2lcore import user_hash
from desktop import AgentConfig, AgentConfigError, StaticToken, default_desktop_name
from gateway._direct import TUNNEL_KIND, Registration, parse_tunnel_url
from proxy import SECRET_HEADER, Hub, serve_proxy
from proxy._hub import Link, merge_listing, model_key

from .test_direct_gateway import Stack as DirectStack
from .test_direct_gateway import _stack as direct_stack

SECRET = "test-secret-0123456789"


@pytest.fixture
async def proxy_port(nursery: trio.Nursery) -> int:
    port: int = await nursery.start(
        functools.partial(serve_proxy, "127.0.0.1", 0, secret=SECRET, hub=Hub(listing_timeout_s=1))
    )
    return port


@asynccontextmanager
async def ws(port: int, path: str, name: str | None = None) -> AsyncIterator[Any]:
    headers = [(SECRET_HEADER, SECRET)]
    if name is not None:
        headers.append((wire.DESKTOP_NAME_HEADER, name))
    async with trio_websocket.open_websocket(
        "127.0.0.1", port, path, use_ssl=False, extra_headers=headers
    ) as conn:
        yield conn


async def recv(conn: Any) -> wire.Message:
    with trio.fail_after(5):
        return wire.decode(await conn.get_message())


async def send(conn: Any, msg: wire.Message) -> None:
    await conn.send_message(wire.encode(msg))


def tags(*names: str) -> dict[str, Any]:
    return {"models": [{"name": n, "model": n, "size": len(n)} for n in names]}


async def answer_json(desktop: Any, rid: str, body: dict[str, Any], status: int = 200) -> None:
    await send(desktop, wire.ResponseStart(rid, status, {"content-type": "application/json"}))
    text = json.dumps(body)
    for i in range(0, len(text), 7):  # in pieces, as the agent cuts a body
        await send(desktop, wire.Chunk(rid, text[i : i + 7]))
    await send(desktop, wire.ResponseEnd(rid))


async def expect_request(desktop: Any, path: str | None = None) -> wire.Request:
    msg = await recv(desktop)
    assert isinstance(msg, wire.Request), msg
    if path is not None:
        assert msg.path == path
    return msg


async def learn(laptop: Any, workstation: Any, port: int) -> None:
    """Answer the hub's own look at both desktops' models (asked once there are two), and
    wait until the proxy has taken both answers in (they race a client's next request)."""
    q = await expect_request(laptop, "/api/tags")
    await answer_json(laptop, q.id, tags("alpha:latest", "shared:7b"))
    q = await expect_request(workstation, "/api/tags")
    await answer_json(workstation, q.id, tags("beta:latest", "shared:7b"))
    with trio.fail_after(5):
        while not all(d["models"] for d in (await desktops(port)).values()):
            await trio.sleep(0.01)


async def desktops(port: int) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"http://127.0.0.1:{port}/desktops", headers={SECRET_HEADER: SECRET})
    assert r.status_code == 200
    return {d["name"]: d for d in r.json()["desktops"]}


def chat(rid: str, model: str) -> wire.Request:
    return wire.Request(rid, "POST", "/api/chat", {}, {"model": model, "messages": []})


def test_model_names_are_normalised_as_ollama_does() -> None:
    assert model_key("llama3") == "llama3:latest"
    assert model_key("llama3:8b") == "llama3:8b"
    assert model_key("registry.local:5000/ns/m") == "registry.local:5000/ns/m:latest"


def test_the_merge_lists_each_model_once_with_its_desktops() -> None:
    merged = merge_listing(
        "/api/tags",
        {"laptop": tags("a:latest", "s"), "workstation": tags("s:latest", "b:1")},
    )
    assert [(m["name"], m["desktops"]) for m in merged["models"]] == [
        ("a:latest", ["laptop"]),
        ("s", ["laptop", "workstation"]),
        ("b:1", ["workstation"]),
    ]
    v1 = merge_listing(
        "/v1/models",
        {
            "x": {"object": "list", "data": [{"id": "m:latest"}, "junk", {"id": 5}]},
            "y": {"object": "list", "data": [{"id": "m:latest"}]},
        },
    )
    assert v1 == {"object": "list", "data": [{"id": "m:latest", "desktops": ["x", "y"]}]}


async def test_listings_are_the_union_of_every_desktop(proxy_port: int) -> None:
    async with (
        ws(proxy_port, "/ws/bridge", "laptop") as laptop,
        ws(proxy_port, "/ws/bridge", "workstation") as workstation,
        ws(proxy_port, "/ws/stream") as client,
    ):
        await learn(laptop, workstation, proxy_port)
        await send(client, wire.Request("t", "GET", "/api/tags"))
        a = await expect_request(laptop, "/api/tags")
        b = await expect_request(workstation, "/api/tags")
        await answer_json(workstation, b.id, tags("beta:latest", "shared:7b", "new:1"))
        await answer_json(laptop, a.id, tags("alpha:latest", "shared:7b"))
        start = await recv(client)
        assert start == wire.ResponseStart("t", 200, {"content-type": "application/json"}, "cloud")
        chunk = await recv(client)
        assert isinstance(chunk, wire.Chunk)
        assert await recv(client) == wire.ResponseEnd("t")
        listed = {m["name"]: m["desktops"] for m in json.loads(chunk.data)["models"]}
        assert listed == {
            "alpha:latest": ["laptop"],
            "shared:7b": ["laptop", "workstation"],
            "beta:latest": ["workstation"],
            "new:1": ["workstation"],
        }
        # The listing refreshed what the hub knows of each desktop's models.
        known = await desktops(proxy_port)
        assert known["workstation"]["models"] == ["beta:latest", "new:1", "shared:7b"]

        await send(client, wire.Request("v", "GET", "/v1/models"))
        for desktop, ids in ((laptop, ["alpha:latest"]), (workstation, ["beta:latest"])):
            q = await expect_request(desktop, "/v1/models")
            await answer_json(
                desktop,
                q.id,
                {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]},
            )
        assert isinstance(await recv(client), wire.ResponseStart)
        chunk = await recv(client)
        assert isinstance(chunk, wire.Chunk)
        assert json.loads(chunk.data) == {
            "object": "list",
            "data": [
                {"id": "alpha:latest", "object": "model", "desktops": ["laptop"]},
                {"id": "beta:latest", "object": "model", "desktops": ["workstation"]},
            ],
        }


async def test_a_desktop_that_fails_or_stays_silent_is_left_out(proxy_port: int) -> None:
    async with (
        ws(proxy_port, "/ws/bridge", "laptop") as laptop,
        ws(proxy_port, "/ws/bridge", "workstation") as workstation,
        ws(proxy_port, "/ws/stream") as client,
    ):
        await learn(laptop, workstation, proxy_port)
        await send(client, wire.Request("t1", "GET", "/api/tags"))
        a = await expect_request(laptop, "/api/tags")
        b = await expect_request(workstation, "/api/tags")
        await send(workstation, wire.Error(wire.ErrorCode.OLLAMA_UNAVAILABLE, "down", b.id))
        await answer_json(laptop, a.id, tags("alpha:latest"))
        assert isinstance(await recv(client), wire.ResponseStart)
        chunk = await recv(client)
        assert isinstance(chunk, wire.Chunk)
        assert [m["desktops"] for m in json.loads(chunk.data)["models"]] == [["laptop"]]
        assert await recv(client) == wire.ResponseEnd("t1")

        # The workstation does not answer at all: after the listing's timeout (1 s here)
        # the laptop's models come alone, and the workstation's request is cancelled.
        await send(client, wire.Request("t2", "GET", "/api/tags"))
        a = await expect_request(laptop, "/api/tags")
        b = await expect_request(workstation, "/api/tags")
        await answer_json(laptop, a.id, tags("alpha:latest"))
        with trio.fail_after(3):
            assert isinstance(await recv(client), wire.ResponseStart)
        assert await recv(workstation) == wire.Cancel(b.id)
        chunk = await recv(client)
        assert isinstance(chunk, wire.Chunk)
        assert [m["name"] for m in json.loads(chunk.data)["models"]] == ["alpha:latest"]
        assert await recv(client) == wire.ResponseEnd("t2")

        # No desktop answers: the client gets the desktop's error, as with one desktop.
        await send(client, wire.Request("t3", "GET", "/api/tags"))
        for desktop in (laptop, workstation):
            q = await expect_request(desktop, "/api/tags")
            await send(desktop, wire.Error(wire.ErrorCode.OLLAMA_UNAVAILABLE, "down", q.id))
        err = await recv(client)
        assert isinstance(err, wire.Error)
        assert (err.id, err.code) == ("t3", wire.ErrorCode.OLLAMA_UNAVAILABLE)


async def test_a_request_goes_to_a_desktop_that_has_its_model(proxy_port: int) -> None:
    async with (
        ws(proxy_port, "/ws/bridge", "laptop") as laptop,
        ws(proxy_port, "/ws/bridge", "workstation") as workstation,
        ws(proxy_port, "/ws/stream") as client,
    ):
        await learn(laptop, workstation, proxy_port)
        await send(client, chat("1", "beta"))  # "beta" is "beta:latest"
        got = await expect_request(workstation, "/api/chat")
        assert got.body["model"] == "beta"
        await send(client, chat("2", "alpha:latest"))
        await expect_request(laptop, "/api/chat")
        # Both have "shared:7b": the one with fewer requests in flight gets it. The
        # workstation serves "1", the laptop "2" and then "3": "4" goes to the workstation.
        await send(client, chat("3", "shared:7b"))
        third = await expect_request(laptop, "/api/chat")
        await send(client, chat("4", "shared:7b"))
        await expect_request(workstation, "/api/chat")
        assert {n: d["inflight"] for n, d in (await desktops(proxy_port)).items()} == {
            "laptop": 2,
            "workstation": 2,
        }
        # The laptop finishes "3": it has fewer in flight now, and gets "5".
        await send(laptop, wire.ResponseStart(third.id, 200, {}))
        await send(laptop, wire.ResponseEnd(third.id))
        assert isinstance(await recv(client), wire.ResponseStart)
        assert await recv(client) == wire.ResponseEnd("3")
        await send(client, chat("5", "shared"))  # unknown as named ("shared:latest")
        await expect_request(laptop, "/api/chat")
        # A model nobody has, or no model at all: the home desktop (the first by name),
        # however busy (the laptop has 3 in flight now, the workstation 2), so that the
        # steps of one task (a blob's HEAD and POST, the create using it) meet there.
        await send(client, wire.Request("6", "GET", "/api/ps"))
        await expect_request(laptop, "/api/ps")
        await send(client, chat("7", "nobody-has-it"))
        await expect_request(laptop, "/api/chat")
        blob = "/api/blobs/sha256:" + "0" * 64
        await send(client, wire.Request("8", "HEAD", blob))
        await expect_request(laptop, blob)


async def test_a_dropped_desktop_errors_only_its_own_requests(proxy_port: int) -> None:
    async with (
        ws(proxy_port, "/ws/bridge", "workstation") as workstation,
        ws(proxy_port, "/ws/stream") as client,
    ):
        async with ws(proxy_port, "/ws/bridge", "laptop") as laptop:
            # (the hub asks both for their models once there are two)
            q = await expect_request(workstation, "/api/tags")
            await answer_json(workstation, q.id, tags("beta"))
            q = await expect_request(laptop, "/api/tags")
            await answer_json(laptop, q.id, tags("alpha"))
            with trio.fail_after(5):
                while not all(d["models"] for d in (await desktops(proxy_port)).values()):
                    await trio.sleep(0.01)
            await send(client, chat("a", "alpha"))
            await send(client, chat("b", "beta"))
            on_laptop = await expect_request(laptop, "/api/chat")
            on_ws = await expect_request(workstation, "/api/chat")
            for desktop, rid in ((laptop, on_laptop.id), (workstation, on_ws.id)):
                await send(desktop, wire.ResponseStart(rid, 200, {}))
                await send(desktop, wire.Chunk(rid, '{"n":0}\n'))
            got = [await recv(client) for _ in range(4)]
            assert {m.id for m in got if isinstance(m, wire.ResponseStart)} == {"a", "b"}
        # The laptop is gone mid-stream: its request errs, the workstation's goes on.
        err = await recv(client)
        assert isinstance(err, wire.Error)
        assert (err.id, err.code) == ("a", wire.ErrorCode.DESKTOP_UNAVAILABLE)
        await send(workstation, wire.Chunk(on_ws.id, '{"n":1}\n'))
        await send(workstation, wire.ResponseEnd(on_ws.id))
        assert await recv(client) == wire.Chunk("b", '{"n":1}\n', seq=2)
        assert await recv(client) == wire.ResponseEnd("b")
        assert list(await desktops(proxy_port)) == ["workstation"]


async def test_a_newer_agent_of_the_same_name_replaces_only_that_one(proxy_port: int) -> None:
    async with (
        ws(proxy_port, "/ws/bridge", "laptop") as old,
        ws(proxy_port, "/ws/bridge", "workstation") as workstation,
    ):
        await learn(old, workstation, proxy_port)
        async with ws(proxy_port, "/ws/bridge", "laptop") as new:
            with trio.fail_after(5):
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await old.get_message()
            assert closed.value.reason is not None
            assert closed.value.reason.code == wire.CLOSE_REPLACED
            # The new laptop's models are asked for; the workstation is known already.
            q = await expect_request(new, "/api/tags")
            await answer_json(new, q.id, tags("gamma"))
            with trio.fail_after(5):
                while not (known := await desktops(proxy_port))["laptop"]["models"]:
                    await trio.sleep(0.01)
            assert sorted(known) == ["laptop", "workstation"]
            assert known["laptop"]["models"] == ["gamma:latest"]
            await send(workstation, wire.Ping(1.0))
            assert await recv(workstation) == wire.Pong(1.0)  # still connected


async def test_an_unnamed_desktop_is_default_and_names_are_checked(proxy_port: int) -> None:
    async with ws(proxy_port, "/ws/bridge"):
        assert list(await desktops(proxy_port)) == [wire.DEFAULT_DESKTOP_NAME]
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        SECRET_HEADER: SECRET,
    }
    async with httpx.AsyncClient() as http:
        for bad in ("", "a b", "x" * 65, "ä".encode(), "a/b"):
            r = await http.get(
                f"http://127.0.0.1:{proxy_port}/ws/bridge",
                headers={**headers, wire.DESKTOP_NAME_HEADER: bad},
            )
            assert r.status_code == 400, bad
            assert "desktop name" in r.json()["message"]
        # The list of desktops (their models are the user's data) needs the secret.
        r = await http.get(f"http://127.0.0.1:{proxy_port}/desktops")
        assert r.status_code == 403
        r = await http.get(
            f"http://127.0.0.1:{proxy_port}/desktops", headers={SECRET_HEADER: "wrong"}
        )
        assert r.status_code == 403
        health = (await http.get(f"http://127.0.0.1:{proxy_port}/health")).json()
        assert (health["desktop"], health["desktops"]) == (False, 0)


def test_valid_desktop_names() -> None:
    assert wire.valid_desktop_name("laptop")
    assert wire.valid_desktop_name("work-station_2.local")
    assert wire.valid_desktop_name("x" * 64)
    for bad in ("", "x" * 65, "a b", "a\r\nb", "é", None, 5):
        assert not wire.valid_desktop_name(bad)


# ---- the gateway: names on the bridge, tunnels per desktop, the desktops' status ---------


@pytest.fixture
async def gw_stack(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[DirectStack]:
    """An in-process gateway whose sessions' proxies run in-process (the direct-route
    tests' stack, with loopback tunnels allowed and a fake direct endpoint)."""
    async for s in direct_stack(nursery, tmp_path):
        yield s


async def test_the_gateway_keeps_desktops_of_different_names_and_checks_names(
    gw_stack: DirectStack,
) -> None:
    s = gw_stack
    if True:
        url = str(s.http.base_url).replace("http://", "ws://").rstrip("/") + "/ws/bridge"
        token = s.auth()["Authorization"].encode()

        def bridge(name: bytes) -> Any:
            headers = [(b"authorization", token), (wire.DESKTOP_NAME_HEADER.encode(), name)]
            return trio_websocket.open_websocket_url(url, extra_headers=headers)

        with trio.fail_after(30):
            async with bridge(b"bad name") as bad:
                err = wire.decode(await bad.get_message())
                assert isinstance(err, wire.Error) and "desktop name" in err.message
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    await bad.get_message()
                assert closed.value.reason.code == wire.CLOSE_POLICY
            async with bridge(b"laptop") as laptop, bridge(b"workstation") as workstation:
                for agent in (laptop, workstation):
                    assert isinstance(wire.decode(await agent.get_message()), wire.AuthOk)
                while True:
                    status = (await s.http.get("/api/streaming/desktop", headers=s.auth())).json()
                    names = {d["name"]: d["bridge"] for d in status["desktops"]}
                    if len(names) == 2:
                        break
                    await trio.sleep(0.05)
                assert names == {"laptop": True, "workstation": True}
                assert status["bridge"] is True
                # The hub asks both for their models (two desktops): the laptop answers.
                asked = {}
                for agent in (laptop, workstation):
                    q = wire.decode(await agent.get_message())
                    assert isinstance(q, wire.Request) and q.path == "/api/tags"
                    asked[agent] = q
                await answer_json(laptop, asked[laptop].id, tags("alpha"))
                # Both stay connected: neither was replaced by the other.
                for agent in (laptop, workstation):
                    await agent.send_message(wire.encode(wire.Ping(2.0)))
                    assert wire.decode(await agent.get_message()) == wire.Pong(2.0)
                while True:
                    status = (await s.http.get("/api/streaming/desktop", headers=s.auth())).json()
                    models = {d["name"]: d["models"] for d in status["desktops"]}
                    if models["laptop"]:
                        break
                    await trio.sleep(0.05)
                assert models == {"laptop": ["alpha:latest"], "workstation": []}


async def test_each_desktop_registers_a_tunnel_of_its_own(gw_stack: DirectStack) -> None:
    s = gw_stack
    if True:

        async def put(name: str | None) -> httpx.Response:
            body = {"url": s.tunnel_url, "provider": "url"}
            if name is not None:
                body["name"] = name
            return await s.http.put("/api/desktop/tunnel", json=body, headers=s.auth())

        async def get(name: str | None) -> httpx.Response:
            params = {"name": name} if name is not None else {}
            return await s.http.get("/api/desktop/tunnel", params=params, headers=s.auth())

        async def delete(name: str | None) -> httpx.Response:
            params = {"name": name} if name is not None else {}
            return await s.http.delete("/api/desktop/tunnel", params=params, headers=s.auth())

        for name in ("laptop", "workstation"):
            r = await put(name)
            assert r.status_code == 200, r.text
            assert r.json()["name"] == name
        assert (await get("laptop")).json()["name"] == "laptop"
        assert (await get("workstation")).json()["name"] == "workstation"
        assert (await get("nope")).status_code == 404
        assert (await get("a b")).status_code == 400
        assert (await put("a b")).status_code == 400
        assert (await get(None)).json()["name"] in ("laptop", "workstation")
        status = (await s.http.get("/api/streaming/desktop", headers=s.auth())).json()
        assert {d["name"]: (d["bridge"], d["tunnel"]["url"]) for d in status["desktops"]} == {
            "laptop": (False, s.tunnel_url),
            "workstation": (False, s.tunnel_url),
        }
        # One desktop's removal leaves the other's.
        assert (await delete("laptop")).status_code == 204
        assert (await get("laptop")).status_code == 404
        assert (await get("workstation")).status_code == 200
        assert (await delete("laptop")).status_code == 404
        # A registration without a name is the "default" desktop's; DELETE without a
        # name removes every one.
        assert (await put(None)).json()["name"] == wire.DEFAULT_DESKTOP_NAME
        assert (await delete(None)).status_code == 204
        assert (await get(None)).status_code == 404
        assert (await get("workstation")).status_code == 404

        # A record kept before desktops had names reads as the default desktop's.
        direct = s.running.gateway.direct
        uh = user_hash("kim")
        old = Registration(
            parse_tunnel_url(s.tunnel_url, allow_private=True), "url", time.time(), time.time() + 60
        )
        await direct.state.put(TUNNEL_KIND, uh, old.record(), old.expires_at)
        assert list(await direct.registrations(uh)) == [wire.DEFAULT_DESKTOP_NAME]


def test_the_agent_sends_its_name_and_checks_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert wire.valid_desktop_name(default_desktop_name())
    with pytest.raises(AgentConfigError):
        AgentConfig("http://127.0.0.1:1", StaticToken("t"), name="bad name")
    code = main(["desktop", "--gateway", "http://127.0.0.1:1", "--token", "t", "--name", "a/b"])
    assert code == 2
    assert "--name 'a/b': a desktop name is 1-64 characters" in capsys.readouterr().err


def test_a_dropped_clients_request_is_kept_and_cancelled_on_its_own_desktop() -> None:
    """Resume meets several desktops: a request detached by a vanished client stays with
    the desktop that serves it, a resume carries on from it, and once the window passes
    the cancel goes to that desktop only."""
    sent: dict[str, list[wire.Message]] = {"laptop": [], "workstation": [], "c1": [], "c2": []}

    def link(name: str) -> Link:
        return Link(name, lambda text: sent[name].append(wire.decode(text)))

    hub = Hub(resume_window=30.0)
    laptop, workstation = link("laptop"), link("workstation")
    hub.set_desktop(laptop, "laptop")
    hub.set_desktop(workstation, "workstation")
    hub.models.update(laptop=frozenset({"alpha:latest"}), workstation=frozenset({"beta:latest"}))
    sent["laptop"].clear()
    sent["workstation"].clear()
    first = link("c1")
    hub.add_client(first)
    hub.client_frame(
        first, wire.encode(wire.Request("a", "POST", "/api/chat", {}, {"model": "beta"}))
    )
    (fwd,) = sent["workstation"]
    assert isinstance(fwd, wire.Request) and not sent["laptop"]
    hub.desktop_frame(workstation, wire.encode(wire.ResponseStart(fwd.id, 200, {})))
    hub.desktop_frame(workstation, wire.encode(wire.Chunk(fwd.id, "1\n")))
    start = sent["c1"][0]
    assert isinstance(start, wire.ResponseStart) and start.resume
    hub.remove_client(first, abrupt=True)
    hub.desktop_frame(workstation, wire.encode(wire.Chunk(fwd.id, "2\n")))
    assert not any(isinstance(m, wire.Cancel) for m in sent["workstation"])
    # a resume on another connection gets the missed chunk and the rest live
    second = link("c2")
    hub.add_client(second)
    hub.client_frame(second, wire.encode(wire.Resume("b", start.resume, 1)))
    hub.desktop_frame(workstation, wire.encode(wire.Chunk(fwd.id, "3\n")))
    assert [m for m in sent["c2"] if isinstance(m, wire.Chunk)] == [
        wire.Chunk("b", "2\n", seq=2),
        wire.Chunk("b", "3\n", seq=3),
    ]
    # vanished again, and the window passes: the workstation hears the cancel, not the laptop
    hub.remove_client(second, abrupt=True)
    assert hub.next_deadline() is not None
    hub.expire(time.monotonic() + 29)
    assert wire.Cancel(fwd.id) not in sent["workstation"]
    hub.expire(time.monotonic() + 31)
    assert wire.Cancel(fwd.id) in sent["workstation"]
    assert wire.Cancel(fwd.id) not in sent["laptop"]


def test_a_lone_desktops_listing_that_is_no_listing_passes_as_it_came() -> None:
    """With one desktop, an answer to ``/api/tags`` that cannot be merged (Ollama's own
    error, an empty body) reaches the client as the desktop sent it, status and all."""
    sent: dict[str, list[wire.Message]] = {"desktop": [], "client": []}

    def link(name: str) -> Link:
        return Link(name, lambda text: sent[name].append(wire.decode(text)))

    hub = Hub()
    desktop, client = link("desktop"), link("client")
    hub.set_desktop(desktop, "laptop")
    hub.add_client(client)
    hub.client_frame(client, wire.encode(wire.Request("t", "GET", "/api/tags")))
    (fwd,) = sent["desktop"]
    error = '{"error":"something went wrong"}\n'
    hub.desktop_frame(desktop, wire.encode(wire.ResponseStart(fwd.id, 500, {"x-a": "b"})))
    hub.desktop_frame(desktop, wire.encode(wire.Chunk(fwd.id, error)))
    hub.desktop_frame(desktop, wire.encode(wire.ResponseEnd(fwd.id)))
    assert sent["client"] == [
        wire.ResponseStart("t", 500, {"x-a": "b"}, "cloud"),
        wire.Chunk("t", error),
        wire.ResponseEnd("t"),
    ]
