"""The gateway-to-proxy line link (wire._link): its framing, and a real proxy spoken to
through the gateway's own :class:`gateway._upstream.ProxyLink`."""

from __future__ import annotations

import contextlib
import functools
import json

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import wire
from gateway._upstream import ProxyClosed, ProxyLink, ProxyUnreachable, _handshake
from proxy import serve_proxy

SECRET = "test-secret-0123456789"


# ----- framing (sans-IO) -------------------------------------------------------------------


def test_lines_are_split_across_reads_and_decoded() -> None:
    reader = wire.LineReader(100)
    assert reader.feed(b'{"a":') == []
    assert reader.pending == 5
    assert reader.feed(b'1}\n{"b":2}\n{"c"') == ['{"a":1}', '{"b":2}']
    assert reader.feed(b":3}\n") == ['{"c":3}']
    assert reader.pending == 0
    assert reader.feed(b"caf\xc3\xa9 \xff\n") == ["café \ufffd"]  # bad UTF-8 is replaced


def test_a_line_over_the_limit_is_refused_before_its_end_arrives() -> None:
    reader = wire.LineReader(10)
    reader.feed(b"0123456789")  # exactly the limit: fine so far
    with pytest.raises(wire.LineTooLong):
        reader.feed(b"0")
    with pytest.raises(wire.LineTooLong):
        wire.LineReader(10).feed(b"short\n" + b"x" * 11 + b"\nshort\n")


def test_a_raw_newline_never_splits_a_message() -> None:
    pretty = json.dumps({"type": "ping", "timestamp": 1}, indent=2)
    assert "\n" in pretty
    line = wire.link_line(pretty)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    (back,) = wire.LineReader(1000).feed(line)
    assert json.loads(back) == {"type": "ping", "timestamp": 1}  # \r is JSON whitespace
    # A newline inside a string was an error and stays one (a control character).
    with pytest.raises(json.JSONDecodeError):
        json.loads(wire.LineReader(1000).feed(wire.link_line('{"a":"x\ny"}'))[0])
    assert wire.link_line("lone \udc80") == b"lone ?\n"  # never a crash


def test_close_lines() -> None:
    (line,) = wire.LineReader(100).feed(wire.close_line(4001, "replaced"))
    assert wire.is_control(line)
    assert wire.parse_close(line) == (4001, "replaced")
    assert wire.parse_close("!close 12 x") is None
    assert wire.parse_close('{"type":"ping"}') is None
    assert not wire.is_control(wire.encode(wire.Ping(1)))


# ----- a real proxy over the link ----------------------------------------------------------


@pytest.fixture
async def proxy_port(nursery: trio.Nursery) -> int:
    port: int = await nursery.start(functools.partial(serve_proxy, "127.0.0.1", 0, secret=SECRET))
    return port


async def link(port: int, side: str, secret: str = SECRET) -> ProxyLink:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    return await _handshake(stream, side, secret)


async def recv(conn: ProxyLink) -> wire.Message:
    with trio.fail_after(5):
        return wire.decode(await conn.get_message())


async def test_a_wrong_secret_is_refused(proxy_port: int) -> None:
    with trio.fail_after(5):
        for secret in ("", "wrong"):
            with pytest.raises(ProxyUnreachable, match="403"):
                await link(proxy_port, "stream", secret)


async def test_a_request_and_its_answer_cross_the_link(proxy_port: int) -> None:
    desktop = await link(proxy_port, "bridge")
    client = await link(proxy_port, "stream")
    request = wire.Request("c1", "POST", "/api/chat", {}, {"model": "m"})
    # As a client may send it: pretty-printed, raw newlines and all.
    await client.send_message(json.dumps(wire.to_dict(request), indent=2))
    got = await recv(desktop)
    assert isinstance(got, wire.Request)
    assert got.path == "/api/chat" and got.body == {"model": "m"}
    did = got.id
    await desktop.send_message(wire.encode(wire.ResponseStart(did, 200, {})))
    await desktop.send_message(wire.encode(wire.Chunk(did, "a\nb\n")))
    await desktop.send_message(wire.encode(wire.ResponseEnd(did)))
    start, chunk, end = [await recv(client) for _ in range(3)]
    assert isinstance(start, wire.ResponseStart) and start.id == "c1"
    assert chunk == wire.Chunk("c1", "a\nb\n", seq=1)
    assert isinstance(end, wire.ResponseEnd) and end.id == "c1"
    await client.aclose()
    # The client's end cancels nothing now (its request was done); the desktop stays.
    await desktop.send_message(wire.encode(wire.Ping(5)))
    assert await recv(desktop) == wire.Pong(5)
    await desktop.aclose()


async def test_a_closed_client_link_cancels_its_request_on_the_desktop(proxy_port: int) -> None:
    desktop = await link(proxy_port, "bridge")
    client = await link(proxy_port, "stream")
    await client.send_message(wire.encode(wire.Request("c1", "POST", "/api/chat", {}, {})))
    got = await recv(desktop)
    await client.aclose()
    assert await recv(desktop) == wire.Cancel(got.id)  # type: ignore[attr-defined]
    await desktop.aclose()


async def test_a_replaced_desktop_hears_4001_then_the_end(proxy_port: int) -> None:
    old = await link(proxy_port, "bridge")
    new = await link(proxy_port, "bridge")
    with trio.fail_after(5):
        with pytest.raises(ProxyClosed) as info:
            await old.get_message()
    assert (info.value.reason.code, info.value.reason.reason) == (wire.CLOSE_REPLACED, "replaced")
    with pytest.raises(ProxyClosed):  # and it stays closed
        await old.send_message(wire.encode(wire.Ping(1)))
    await old.aclose()
    await new.send_message(wire.encode(wire.Ping(2)))
    assert await recv(new) == wire.Pong(2)
    await new.aclose()


async def test_a_line_over_the_frame_limit_closes_with_1009(proxy_port: int) -> None:
    client = await link(proxy_port, "stream")
    with trio.fail_after(10):
        with contextlib.suppress(ProxyClosed):  # the proxy may stop reading half-way
            await client.send_message("x" * (wire.MAX_FRAME_BYTES + 10))
        with pytest.raises(ProxyClosed) as info:
            await client.get_message()
    assert info.value.reason.code == wire.CLOSE_TOO_BIG
    await client.aclose()


@settings(max_examples=25, deadline=None)
@given(
    side=st.sampled_from(["stream", "bridge"]),
    blobs=st.lists(
        st.one_of(
            st.binary(max_size=300),
            st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace") + b"\n"),
            st.sampled_from([b"!close 4001 x\n", b"!\n", b"\n\n", b"{\n", b"\xff\xfe\n"]),
        ),
        max_size=8,
    ),
)
async def test_random_bytes_on_a_link_never_stop_the_proxy(side: str, blobs: list[bytes]) -> None:
    """Whatever a link carries, the proxy answers with errors or closes that link only;
    another link of the same proxy is served all along."""
    # Each example runs in a trio run of its own: the proxy too (no fixture).
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                functools.partial(serve_proxy, "127.0.0.1", 0, secret=SECRET)
            )
            other = await link(port, "stream")
            hostile = await link(port, side)
            for blob in blobs:
                try:
                    await hostile.stream.send_all(blob)
                except trio.BrokenResourceError:
                    break  # the proxy closed this link (a line too long): fine
            await hostile.aclose()
            await other.send_message(wire.encode(wire.Ping(7)))
            assert await recv(other) == wire.Pong(7)
            await other.aclose()
            nursery.cancel_scope.cancel()
