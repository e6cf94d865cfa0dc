"""Closing a client's WebSocket: the expected failures are quiet, anything else is a bug."""

from __future__ import annotations

import logging

import pytest
import trio

import gateway._ws as ws_module


class _Socket:
    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc
        self.closed: list[tuple[int, str]] = []

    async def close(self, code: int, reason: str = "") -> None:
        await trio.lowlevel.checkpoint()
        self.closed.append((code, reason))
        if self.exc is not None:
            raise self.exc


@pytest.mark.parametrize(
    "exc",
    [
        None,
        trio.BrokenResourceError(),
        trio.ClosedResourceError(),
        RuntimeError("Cannot close websocket multiple times"),
    ],
)
async def test_closing_a_gone_or_closed_socket_is_quiet(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, exc: BaseException | None
) -> None:
    sock = _Socket(exc)
    monkeypatch.setattr(ws_module, "websocket", sock)
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(5):
        await ws_module._close(4003, "session ended")
    assert sock.closed == [(4003, "session ended")]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("exc", [ValueError("a bug"), RuntimeError("something else")])
async def test_an_unexpected_failure_to_close_is_logged_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, exc: BaseException
) -> None:
    monkeypatch.setattr(ws_module, "websocket", _Socket(exc))
    with trio.fail_after(5):
        await ws_module._close(1011, "internal")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, caplog.records
    assert errors[0].exc_info is not None and errors[0].exc_info[1] is exc
    assert "1011" in errors[0].getMessage()
