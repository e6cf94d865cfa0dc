"""The sans-IO wire protocol: decoding, validation, encoding, stream tracking."""

from __future__ import annotations

import json

import pytest

import wire


def test_request_round_trip() -> None:
    req = wire.Request("a1", "POST", "/api/chat", {"x": "y"}, {"model": "m", "stream": True})
    frame = wire.encode(req)
    assert json.loads(frame) == {
        "type": "request",
        "id": "a1",
        "method": "POST",
        "path": "/api/chat",
        "headers": {"x": "y"},
        "body": {"model": "m", "stream": True},
    }
    assert wire.decode(frame) == req


@pytest.mark.parametrize(
    "msg",
    [
        wire.ResponseStart("1", 200, {"content-type": "application/x-ndjson"}),
        wire.Chunk("1", '{"done":false}'),
        wire.ResponseEnd("1"),
        wire.Cancel("1"),
        wire.Error("desktop_unavailable", "no desktop", "1"),
        wire.Error("bad_json", "nope"),
        wire.Ping(12.5),
        wire.Pong(3),
        wire.Auth("tok", "sess", 1700000000000),
        wire.AuthOk("sess"),
    ],
)
def test_every_message_round_trips(msg: wire.Message) -> None:
    assert wire.decode(wire.encode(msg)) == msg


def test_contract_field_names() -> None:
    assert json.loads(wire.encode(wire.Auth("t", "s", 5))) == {
        "type": "auth",
        "token": "t",
        "sessionId": "s",
        "timestamp": 5,
    }
    assert json.loads(wire.encode(wire.AuthOk("s"))) == {"type": "auth_ok", "sessionId": "s"}
    assert "id" not in json.loads(wire.encode(wire.Error("c", "m")))


@pytest.mark.parametrize(
    ("frame", "code", "rid"),
    [
        ("{not json", wire.ErrorCode.BAD_JSON, None),
        ("[1, 2]", wire.ErrorCode.BAD_MESSAGE, None),
        ('{"id": "x"}', wire.ErrorCode.MISSING_FIELD, "x"),
        ('{"type": "launch", "id": "q"}', wire.ErrorCode.UNKNOWN_TYPE, "q"),
        ('{"type": 7}', wire.ErrorCode.UNKNOWN_TYPE, None),
        ('{"type": "request", "id": "r", "path": "/api/chat"}', wire.ErrorCode.MISSING_FIELD, "r"),
        (
            '{"type": "request", "id": "r", "method": "GET", "path": "api"}',
            wire.ErrorCode.BAD_MESSAGE,
            "r",
        ),
        (
            '{"type": "request", "id": "r", "method": "GET", "path": "/a", "headers": [1]}',
            wire.ErrorCode.BAD_MESSAGE,
            "r",
        ),
        ('{"type": "request", "id": "", "method": "GET", "path": "/"}', "bad_message", None),
        ('{"type": "chunk", "id": "c", "data": 5}', wire.ErrorCode.BAD_MESSAGE, "c"),
        ('{"type": "response_start", "id": "c", "status": 99}', wire.ErrorCode.BAD_MESSAGE, "c"),
        ('{"type": "response_start", "id": "c", "status": true}', wire.ErrorCode.BAD_MESSAGE, "c"),
        ('{"type": "ping"}', wire.ErrorCode.MISSING_FIELD, None),
        ('{"type": "auth"}', wire.ErrorCode.MISSING_FIELD, None),
        ("[" * 100000, wire.ErrorCode.BAD_JSON, None),
    ],
)
def test_bad_frames_raise_protocol_errors(frame: str, code: str, rid: str | None) -> None:
    with pytest.raises(wire.ProtocolError) as info:
        wire.decode(frame)
    assert info.value.code == code
    assert info.value.id == rid
    err = info.value.to_message()
    assert wire.decode(wire.encode(err)) == err


def test_oversized_frame_is_too_large() -> None:
    with pytest.raises(wire.ProtocolError) as info:
        wire.decode('{"type":"chunk","id":"1","data":"' + "x" * wire.MAX_FRAME_BYTES + '"}')
    assert info.value.code == wire.ErrorCode.TOO_LARGE


def test_auth_repr_hides_token() -> None:
    assert "s3cret" not in repr(wire.Auth("s3cret", "sid"))


def test_stream_tracker() -> None:
    t = wire.StreamTracker(max_open=2)
    t.start(wire.Request("a", "GET", "/api/tags"))
    with pytest.raises(wire.ProtocolError) as info:
        t.start(wire.Request("a", "GET", "/api/tags"))
    assert info.value.code == wire.ErrorCode.DUPLICATE_ID
    t.start(wire.Request("b", "GET", "/api/tags"))
    with pytest.raises(wire.ProtocolError):
        t.start(wire.Request("c", "GET", "/api/tags"))
    assert "a" in t and len(t) == 2
    assert t.finish("a") is True
    assert t.finish("a") is False
    t.start(wire.Request("a", "GET", "/api/tags"))  # an id may be reused once its stream ended
    assert sorted(t.drain()) == ["a", "b"]
    assert len(t) == 0


def test_peek_type() -> None:
    assert wire.peek_type('{"type":"auth","token":"x"}') == "auth"
    assert wire.peek_type("nope") is None
    assert wire.peek_type("[]") is None


# -- headers that cross the tunnel (wire/_headers.py), shared by the gateway and the agent --


def test_request_headers_drop_credentials_framing_forwarding_and_our_own() -> None:
    given = [
        ("Authorization", "Bearer secret-token"),
        ("Cookie", "sid=1"),
        ("Host", "gw.example"),
        ("Content-Length", "12"),
        ("Connection", "keep-alive"),
        ("Accept-Encoding", "gzip"),
        ("Expect", "100-continue"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("Forwarded", "for=10.0.0.1"),
        ("X-Real-IP", "10.0.0.1"),
        ("X-C2L-Anything", "ours"),
        ("Content-Type", "application/json"),
        ("Accept", "application/x-ndjson"),
        ("accept", "text/event-stream"),
        ("User-Agent", "ollama-python/0.4"),
    ]
    out = wire.request_headers(given)
    assert out == {
        "content-type": "application/json",
        "accept": "application/x-ndjson, text/event-stream",
        "user-agent": "ollama-python/0.4",
    }
    # a mapping (a wire request's headers) is filtered alike
    assert wire.request_headers({"AUTHORIZATION": "x", "X-Test": "1"}) == {"x-test": "1"}


def test_response_headers_drop_framing_and_cookies_and_merge_repeats() -> None:
    given = [
        ("Content-Type", "application/x-ndjson"),
        ("Content-Length", "99"),
        ("Content-Encoding", "gzip"),
        ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Vary", "Origin"),
        ("Vary", "Accept"),
        ("Date", "Tue, 01 Dec 2026 12:00:00 GMT"),
    ]
    assert wire.response_headers(given) == {
        "content-type": "application/x-ndjson",
        "vary": "Origin, Accept",
        "date": "Tue, 01 Dec 2026 12:00:00 GMT",  # the desktop's; the gateway's HTTP drops it
    }


@pytest.mark.parametrize(
    "content_type",
    ["application/x-ndjson", "Application/NDJSON; charset=utf-8", "text/event-stream"],
)
def test_http_response_headers_keep_a_stream_unbuffered(content_type: str) -> None:
    out = wire.http_response_headers({"Content-Type": content_type, "Date": "x", "Server": "y"})
    assert out == {
        "content-type": content_type,
        "cache-control": "no-cache",
        "x-accel-buffering": "no",
    }
    # a cache-control the desktop sent (in any case) is kept, not doubled
    out = wire.http_response_headers({"Content-Type": content_type, "Cache-Control": "no-store"})
    assert out == {
        "content-type": content_type,
        "cache-control": "no-store",
        "x-accel-buffering": "no",
    }


def test_http_response_headers_leave_other_bodies_alone() -> None:
    given = {"content-type": "application/json", "content-length": "2", "etag": "e"}
    assert wire.http_response_headers(given) == {"content-type": "application/json", "etag": "e"}


def test_media_types() -> None:
    assert wire.media_type(" Text/Event-Stream ; charset=utf-8") == "text/event-stream"
    assert wire.media_type("") == ""
    assert wire.media_type_of([("X", "1"), ("CONTENT-TYPE", "application/jsonl")]) == (
        "application/jsonl"
    )
    assert wire.media_type_of({}) == ""
    assert wire.NDJSON_MEDIA_TYPES < wire.STREAMING_MEDIA_TYPES
    assert wire.SSE_MEDIA_TYPE in wire.STREAMING_MEDIA_TYPES


def test_the_agent_and_the_gateway_filter_alike() -> None:
    from desktop._agent import _request_headers

    given = {"Authorization": "Bearer t", "X-Forwarded-For": "1.2.3.4", "Accept": "*/*"}
    # the agent sends what the gateway would, with the Host Ollama accepts on loopback
    assert _request_headers(given) == {**wire.request_headers(given), "host": "localhost"}
    assert _request_headers(given) == {"accept": "*/*", "host": "localhost"}


def test_the_headers_module_stays_dependency_free() -> None:
    # The proxy image ships wire/: its header filters may use the standard library only.
    import ast
    import sys
    from pathlib import Path

    source = Path(wire.__file__).with_name("_headers.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots = {(node.module or "").split(".")[0]}
        else:
            continue
        assert roots <= sys.stdlib_module_names | {"__future__"}, roots
