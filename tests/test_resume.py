"""Resumable streams (DESIGN.md section 2, issue 13 point 1) at the proxy: a real in-process
proxy spoken to over the gateway's own line link (:class:`gateway._upstream.ProxyLink`).

A link that just ends is a client that vanished (its answers are kept for the resume
window); a ``!close`` line is a client that closed cleanly (its requests are cancelled at
once). The desktop side is a plain link the test drives by hand, so every frame the
desktop sees (a ``cancel`` above all) is checked.
"""

from __future__ import annotations

import functools
import json

import httpx
import pytest
import trio

import wire
from gateway._upstream import ProxyLink, _handshake
from proxy import Hub, ProxyServer, run_proxy_server, serve_proxy

SECRET = "test-secret-0123456789"


async def start_proxy(nursery: trio.Nursery, **hub: float) -> tuple[int, Hub]:
    server = await trio.to_thread.run_sync(
        lambda: ProxyServer.bind("127.0.0.1", 0, secret=SECRET, hub=Hub(**hub))  # type: ignore[arg-type]
    )
    port: int = await nursery.start(run_proxy_server, server)
    return port, server.hub


async def link(port: int, side: str) -> ProxyLink:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    return await _handshake(stream, side, SECRET)


async def recv(conn: ProxyLink, timeout: float = 5) -> wire.Message:
    with trio.fail_after(timeout):
        return wire.decode(await conn.get_message())


async def send(conn: ProxyLink, msg: wire.Message) -> None:
    await conn.send_message(wire.encode(msg))


async def quiet(desktop: ProxyLink) -> None:
    """Nothing is queued for the desktop: a ping's pong is the next thing it reads."""
    await send(desktop, wire.Ping(7.0))
    assert await recv(desktop) == wire.Pong(7.0)


async def health(port: int) -> dict[str, int]:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"http://127.0.0.1:{port}/health")
    out: dict[str, int] = r.json()
    return out


async def started(port: int) -> tuple[ProxyLink, ProxyLink, str, str]:
    """A desktop and a client; the client's request ``c1`` answered with a start.

    Returns (desktop, client, desktop-side id, resume token)."""
    desktop = await link(port, "bridge")
    client = await link(port, "stream")
    await send(client, wire.Request("c1", "POST", "/api/chat", {}, {"model": "m"}))
    fwd = await recv(desktop)
    assert isinstance(fwd, wire.Request)
    await send(desktop, wire.ResponseStart(fwd.id, 200, {"content-type": "application/x-ndjson"}))
    start = await recv(client)
    assert isinstance(start, wire.ResponseStart) and start.id == "c1"
    assert start.route == "cloud"
    assert start.resume is not None and len(start.resume) >= 40  # unguessable
    return desktop, client, fwd.id, start.resume


def line(n: int) -> str:
    return json.dumps({"n": n}) + "\n"


async def test_chunks_are_numbered_and_every_answer_has_its_own_token(
    nursery: trio.Nursery,
) -> None:
    port, _ = await start_proxy(nursery)
    desktop, client, did, token = await started(port)
    for n in range(1, 4):
        await send(desktop, wire.Chunk(did, line(n)))
    assert [await recv(client) for _ in range(3)] == [
        wire.Chunk("c1", line(n), seq=n) for n in range(1, 4)
    ]
    await send(client, wire.Request("c2", "GET", "/api/ps"))
    fwd = await recv(desktop)
    assert isinstance(fwd, wire.Request)
    await send(desktop, wire.ResponseStart(fwd.id, 200, {}))
    other = await recv(client)
    assert isinstance(other, wire.ResponseStart) and other.resume not in (None, token)
    await send(desktop, wire.Chunk(fwd.id, "x\n"))
    assert await recv(client) == wire.Chunk("c2", "x\n", seq=1)  # per request


async def test_a_vanished_client_resumes_and_gets_the_whole_answer_once_in_order(
    nursery: trio.Nursery,
) -> None:
    port, _ = await start_proxy(nursery)
    desktop, client, did, token = await started(port)
    for n in range(1, 6):
        await send(desktop, wire.Chunk(did, line(n)))
    got = [await recv(client) for _ in range(2)]  # 3..5 are "lost in flight"
    await client.stream.aclose()  # no !close line: the client vanished
    await trio.sleep(0.2)
    assert (await health(port))["detached"] == 1
    for n in range(6, 9):  # the desktop goes on meanwhile, and is not cancelled
        await send(desktop, wire.Chunk(did, line(n)))
    await quiet(desktop)

    again = await link(port, "stream")
    await send(again, wire.Resume("n1", token, 2))
    start = await recv(again)
    assert isinstance(start, wire.ResponseStart)
    assert (start.id, start.status, start.resume, start.route) == ("n1", 200, token, "cloud")
    assert start.headers == {"content-type": "application/x-ndjson"}
    got += [await recv(again) for _ in range(6)]
    await send(desktop, wire.Chunk(did, line(9)))  # then live
    await send(desktop, wire.ResponseEnd(did))
    got += [await recv(again), await recv(again)]
    chunks = [m for m in got if isinstance(m, wire.Chunk)]
    assert [c.data for c in chunks] == [line(n) for n in range(1, 10)]
    assert [c.seq for c in chunks] == list(range(1, 10))
    assert all(c.id == "n1" for c in chunks[2:])
    assert got[-1] == wire.ResponseEnd("n1")
    # The answer is done, but its end may have been lost in flight too: for the window, a
    # resume still gets what follows `after` (here: nothing but the end), once.
    await send(again, wire.Resume("n2", token, 9))
    assert isinstance(await recv(again), wire.ResponseStart)
    assert await recv(again) == wire.ResponseEnd("n2")
    await send(again, wire.Resume("n3", token, 9))
    err = await recv(again)
    assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.RESUME_EXPIRED
    assert err.id == "n3"
    await quiet(desktop)  # never a cancel


async def test_an_answer_that_ended_while_the_client_was_away_is_still_delivered(
    nursery: trio.Nursery,
) -> None:
    port, _ = await start_proxy(nursery)
    desktop, client, did, token = await started(port)
    await client.stream.aclose()
    await trio.sleep(0.1)
    await send(desktop, wire.Chunk(did, line(1)))
    await send(desktop, wire.ResponseEnd(did))
    await quiet(desktop)
    again = await link(port, "stream")
    await send(again, wire.Resume("n1", token, 0))
    assert isinstance(await recv(again), wire.ResponseStart)
    assert await recv(again) == wire.Chunk("n1", line(1), seq=1)
    assert await recv(again) == wire.ResponseEnd("n1")


async def test_after_the_window_a_resume_expires_and_the_desktop_was_told_to_cancel(
    nursery: trio.Nursery,
) -> None:
    port, _ = await start_proxy(nursery, resume_window=0.5)
    desktop, client, did, token = await started(port)
    await send(desktop, wire.Chunk(did, line(1)))
    assert isinstance(await recv(client), wire.Chunk)
    t0 = trio.current_time()
    await client.stream.aclose()
    assert await recv(desktop, timeout=5) == wire.Cancel(did)
    waited = trio.current_time() - t0
    assert 0.4 <= waited < 3, waited  # kept for the window, not longer
    again = await link(port, "stream")
    await send(again, wire.Resume("n1", token, 1))
    err = await recv(again)
    assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.RESUME_EXPIRED
    assert err.id == "n1"
    assert (await health(port))["detached"] == 0


async def test_a_clean_close_cancels_at_once(nursery: trio.Nursery) -> None:
    port, _ = await start_proxy(nursery)  # a 30 s window
    desktop, client, did, token = await started(port)
    await client.close_cleanly()
    assert await recv(desktop, timeout=2) == wire.Cancel(did)
    again = await link(port, "stream")
    await send(again, wire.Resume("n1", token, 0))
    err = await recv(again)
    assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.RESUME_EXPIRED


async def test_a_request_not_yet_answered_is_cancelled_when_its_client_vanishes(
    nursery: trio.Nursery,
) -> None:
    # Before response_start the client holds no token: nothing could resume it.
    port, _ = await start_proxy(nursery)
    desktop = await link(port, "bridge")
    client = await link(port, "stream")
    await send(client, wire.Request("c1", "GET", "/api/ps"))
    fwd = await recv(desktop)
    assert isinstance(fwd, wire.Request)
    await client.stream.aclose()
    assert await recv(desktop) == wire.Cancel(fwd.id)


async def test_a_resume_takes_over_a_request_held_by_a_half_open_connection(
    nursery: trio.Nursery,
) -> None:
    port, _ = await start_proxy(nursery)
    desktop, old, did, token = await started(port)
    await send(desktop, wire.Chunk(did, line(1)))
    assert isinstance(await recv(old), wire.Chunk)
    await send(desktop, wire.Chunk(did, line(2)))  # the old connection never reads this
    new = await link(port, "stream")
    await send(new, wire.Resume("n1", token, 1))
    assert isinstance(await recv(new), wire.ResponseStart)
    assert await recv(new) == wire.Chunk("n1", line(2), seq=2)
    # The old connection got chunk 2 (queued before the move) and holds the request no
    # more: its cancel, and then its clean close, cancel nothing on the desktop.
    assert await recv(old) == wire.Chunk("c1", line(2), seq=2)
    await send(old, wire.Cancel("c1"))
    err = await recv(old)
    assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.UNKNOWN_ID
    await old.close_cleanly()
    await quiet(desktop)
    await send(desktop, wire.Chunk(did, line(3)))
    await send(desktop, wire.ResponseEnd(did))
    assert await recv(new) == wire.Chunk("n1", line(3), seq=3)
    assert await recv(new) == wire.ResponseEnd("n1")


async def test_a_token_of_another_session_is_unknown(nursery: trio.Nursery) -> None:
    # One proxy per user: another user's token names nothing in this user's proxy.
    port_a, _ = await start_proxy(nursery)
    port_b, _ = await start_proxy(nursery)
    desktop_a, client_a, did, token = await started(port_a)
    await send(desktop_a, wire.Chunk(did, "secret of a\n"))
    await client_a.stream.aclose()
    desktop_b = await link(port_b, "bridge")
    thief = await link(port_b, "stream")
    for token_tried, after in ((token, 0), ("x" * 43, 0), (token[:-1] + "A", 0)):
        await send(thief, wire.Resume("t", token_tried, after))
        err = await recv(thief)
        assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.RESUME_EXPIRED
        assert "secret" not in err.message
    await send(thief, wire.Ping(1.0))
    assert await recv(thief) == wire.Pong(1.0)  # nothing else came
    await quiet(desktop_b)


async def test_bad_resume_messages_are_answered_and_the_connection_stays(
    nursery: trio.Nursery,
) -> None:
    port, _ = await start_proxy(nursery)
    desktop, client, did, token = await started(port)
    for bad in (
        {"type": "resume", "id": "b", "resume": token},  # no after
        {"type": "resume", "id": "b", "resume": token, "after": -1},
        {"type": "resume", "id": "b", "resume": token, "after": "1"},
        {"type": "resume", "id": "b", "resume": 5, "after": 0},
        {"type": "resume", "id": "b", "resume": "t" * 129, "after": 0},
        {"type": "resume", "resume": token, "after": 0},
    ):
        await client.send_message(json.dumps(bad))
        err = await recv(client)
        assert isinstance(err, wire.Error)
        assert err.code in (wire.ErrorCode.BAD_MESSAGE, wire.ErrorCode.MISSING_FIELD), bad
    # An id in use on this connection is a duplicate; an `after` beyond the answer expires.
    await send(client, wire.Resume("c1", token, 0))
    err = await recv(client)
    assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.DUPLICATE_ID
    await send(client, wire.Resume("b", token, 99))
    err = await recv(client)
    assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.RESUME_EXPIRED
    await send(desktop, wire.Chunk(did, line(1)))
    assert await recv(client) == wire.Chunk("c1", line(1), seq=1)  # still streaming
    await quiet(desktop)


async def test_a_resume_older_than_the_replay_tail_expires(nursery: trio.Nursery) -> None:
    port, _ = await start_proxy(nursery, resume_max_bytes=1000)
    desktop, client, did, token = await started(port)
    for _ in range(10):
        await send(desktop, wire.Chunk(did, "x" * 199 + "\n"))  # 2000 bytes: 5 are kept
    for _ in range(10):
        await recv(client)
    await client.stream.aclose()
    await trio.sleep(0.1)
    again = await link(port, "stream")
    await send(again, wire.Resume("n1", token, 4))  # chunk 5 is gone
    err = await recv(again)
    assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.RESUME_EXPIRED
    await send(again, wire.Resume("n2", token, 5))  # 6..10 are there
    assert isinstance(await recv(again), wire.ResponseStart)
    assert [getattr(await recv(again), "seq", None) for _ in range(5)] == [6, 7, 8, 9, 10]


async def test_a_detached_answer_under_a_fast_producer_stays_within_its_bound(
    nursery: trio.Nursery,
) -> None:
    port, _ = await start_proxy(nursery)
    desktop, client, did, token = await started(port)
    await client.stream.aclose()
    await trio.sleep(0.1)
    piece = "y" * (16 * 1024 - 1) + "\n"
    cancelled = trio.Event()

    async def watch_desktop() -> None:
        assert await recv(desktop, timeout=30) == wire.Cancel(did)
        cancelled.set()

    async with trio.open_nursery() as inner:
        inner.start_soon(watch_desktop)
        sent = 0
        with trio.fail_after(30):
            while not cancelled.is_set() and sent < 4 * wire.RESUME_MAX_BYTES:
                await send(desktop, wire.Chunk(did, piece))  # as fast as the link takes
                sent += len(piece)
    assert cancelled.is_set(), "the desktop was never told to cancel"
    assert sent <= wire.RESUME_MAX_BYTES + 512 * 1024  # cancelled soon once past the bound
    status = await health(port)
    assert status["detached_peak_bytes"] <= wire.RESUME_MAX_BYTES + len(piece)
    assert status["detached_peak_bytes"] > wire.RESUME_MAX_BYTES - len(piece)
    assert status["resume_overflows"] == 1 and status["detached"] == 0
    assert status["detached_bytes"] == 0  # the buffer is freed
    again = await link(port, "stream")
    await send(again, wire.Resume("n1", token, 0))
    err = await recv(again)
    assert isinstance(err, wire.Error) and err.code == wire.ErrorCode.RESUME_EXPIRED


async def test_a_websocket_client_closing_without_a_close_frame_can_resume(
    nursery: trio.Nursery,
) -> None:
    # The proxy's WebSocket side (tools, tests) tells the two ends apart the same way.
    import trio_websocket

    port: int = await nursery.start(functools.partial(serve_proxy, "127.0.0.1", 0, secret=SECRET))
    desktop = await link(port, "bridge")
    headers = [(wire.SECRET_HEADER, SECRET)]
    async with trio_websocket.open_websocket(
        "127.0.0.1", port, "/ws/stream", use_ssl=False, extra_headers=headers
    ) as ws:
        await ws.send_message(wire.encode(wire.Request("c1", "GET", "/api/ps")))
        fwd = await recv(desktop)
        assert isinstance(fwd, wire.Request)
        await send(desktop, wire.ResponseStart(fwd.id, 200, {}))
        start = wire.decode(await ws.get_message())
        assert isinstance(start, wire.ResponseStart) and start.resume
        await ws._stream.aclose()  # the TCP connection ends: no close frame
    await send(desktop, wire.Chunk(fwd.id, line(1)))
    await quiet(desktop)  # not cancelled
    again = await link(port, "stream")
    await send(again, wire.Resume("n1", start.resume, 0))
    assert isinstance(await recv(again), wire.ResponseStart)
    assert await recv(again) == wire.Chunk("n1", line(1), seq=1)
    # ... and a close frame cancels at once.
    async with trio_websocket.open_websocket(
        "127.0.0.1", port, "/ws/stream", use_ssl=False, extra_headers=headers
    ) as ws:
        await ws.send_message(wire.encode(wire.Request("c2", "GET", "/api/ps")))
        fwd2 = await recv(desktop)
        assert isinstance(fwd2, wire.Request)
        await send(desktop, wire.ResponseStart(fwd2.id, 200, {}))
        wire.decode(await ws.get_message())
    assert await recv(desktop) == wire.Cancel(fwd2.id)


@pytest.mark.parametrize("text", ["", "x", "-1", "1e9"])
def test_the_proxy_reads_its_resume_window_from_its_environment(text: str) -> None:
    from proxy._server import _resume_window

    assert _resume_window(text) == wire.RESUME_WINDOW_S
    assert _resume_window("2.5") == 2.5


def test_the_resume_window_is_configured_like_the_other_options() -> None:
    from c2l._cli import build_parser
    from c2lcore import Config, ConfigError
    from orchestrator import _k8s_objects as k8s

    assert Config.from_env({}).resume_window == wire.RESUME_WINDOW_S
    assert Config.from_env({"C2L_RESUME_WINDOW": "5"}).resume_window == 5.0
    for bad in ("x", "-1", "1e9"):
        with pytest.raises(ConfigError, match="C2L_RESUME_WINDOW"):
            Config.from_env({"C2L_RESUME_WINDOW": bad})
    args = build_parser().parse_args(["serve", "--resume-window", "7"])
    assert args.resume_window == 7.0
    assert Config.from_env({}, resume_window=args.resume_window).resume_window == 7.0
    pod = k8s.session_pod(
        user_hash="0" * 16,
        session_id="s1",
        replica="r1",
        image="i",
        namespace="ns",
        secret_name="sec",
        memory=1,
        cpus=1.0,
        resume_window=7.0,
    )
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["C2L_RESUME_WINDOW"] == "7"


def test_a_binary_answer_resumes_byte_for_byte() -> None:
    """Chunks of bytes (``dataBase64``) are numbered, kept and replayed as they came."""
    import base64

    from proxy._hub import Link

    sent: dict[str, list[wire.Message]] = {"desktop": [], "c1": [], "c2": []}

    def link(name: str) -> Link:
        return Link(name, lambda text: sent[name].append(wire.decode(text)))

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    hub = Hub()
    desktop, first, second = link("desktop"), link("c1"), link("c2")
    hub.set_desktop(desktop)
    hub.add_client(first)
    hub.client_frame(first, wire.encode(wire.Request("a", "GET", "/api/x")))
    (fwd,) = sent["desktop"]
    hub.desktop_frame(desktop, wire.encode(wire.ResponseStart(fwd.id, 200, {})))
    hub.desktop_frame(desktop, wire.encode(wire.Chunk(fwd.id, data_base64=b64(b"\x00\xff"))))
    start = sent["c1"][0]
    assert isinstance(start, wire.ResponseStart) and start.resume
    assert sent["c1"][1] == wire.Chunk("a", data_base64=b64(b"\x00\xff"), seq=1)
    hub.remove_client(first, abrupt=True)
    hub.desktop_frame(desktop, wire.encode(wire.Chunk(fwd.id, data_base64=b64(b"\x01"))))
    hub.add_client(second)
    hub.client_frame(second, wire.encode(wire.Resume("b", start.resume, 0)))
    chunks = [m for m in sent["c2"] if isinstance(m, wire.Chunk)]
    assert [(c.seq, c.raw()) for c in chunks] == [(1, b"\x00\xff"), (2, b"\x01")]


def test_detached_answers_expire_in_the_order_they_were_left() -> None:
    """The window runs from the latest detachment: an answer resumed and dropped again
    outlives one dropped once before it."""
    import time as _time

    from proxy._hub import Link

    sent: dict[str, list[wire.Message]] = {"desktop": [], "c1": [], "c2": [], "c3": []}

    def link(name: str) -> Link:
        return Link(name, lambda text: sent[name].append(wire.decode(text)))

    hub = Hub(resume_window=10.0)
    desktop = link("desktop")
    hub.set_desktop(desktop)
    first = link("c1")
    hub.add_client(first)
    for rid in ("a", "b"):
        hub.client_frame(first, wire.encode(wire.Request(rid, "POST", "/api/chat")))
    dids = [m.id for m in sent["desktop"] if isinstance(m, wire.Request)]
    for did in dids:
        hub.desktop_frame(desktop, wire.encode(wire.ResponseStart(did, 200, {})))
    tokens = [m.resume for m in sent["c1"] if isinstance(m, wire.ResponseStart)]
    assert len(tokens) == 2 and all(tokens)
    before = _time.monotonic()
    hub.remove_client(first, abrupt=True)
    left = _time.monotonic()
    # "a" comes back on another connection, which then vanishes too, later
    second = link("c2")
    hub.add_client(second)
    hub.client_frame(second, wire.encode(wire.Resume("a2", tokens[0] or "", 0)))
    _time.sleep(0.05)
    hub.remove_client(second, abrupt=True)
    due = hub.next_deadline()
    assert due is not None and before + 10.0 <= due <= left + 10.0  # "b" first
    hub.expire(due)
    cancels = [m.id for m in sent["desktop"] if isinstance(m, wire.Cancel)]
    assert cancels == [dids[1]]  # "b" only
    third = link("c3")
    hub.add_client(third)
    hub.client_frame(third, wire.encode(wire.Resume("a3", tokens[0] or "", 0)))
    hub.client_frame(third, wire.encode(wire.Resume("b3", tokens[1] or "", 0)))
    assert isinstance(sent["c3"][0], wire.ResponseStart)
    assert sent["c3"][1] == wire.Error(wire.ErrorCode.RESUME_EXPIRED, sent["c3"][1].message, "b3")
