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
