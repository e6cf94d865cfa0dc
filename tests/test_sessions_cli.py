"""``c2l sessions`` without a gateway: the table and the errors (the live table is in
test_metrics.py, against a running gateway)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from c2l._sessions import SessionsError, cli_sessions, format_table


def test_c2l_sessions_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("C2L_TOKEN", raising=False)
    args = argparse.Namespace(gateway="http://127.0.0.1:9", token=None, token_file=None, json=False)
    with pytest.raises(SessionsError, match="C2L_TOKEN"):
        cli_sessions(args)


def test_format_table_figures() -> None:
    row = {
        "sessionId": "s1",
        "userHash": "abcd",
        "state": "ready",
        "created": 1000.0,
        "lastActivity": 1075.0,
        "connections": {"bridge": 1, "stream": 2},
        "bytesIn": 1536,
        "bytesOut": 3 * 1024 * 1024,
        "memoryBytes": None,
        "cpuSeconds": 0.25,
    }
    table = format_table([row], now=1100.0)
    cells = table.splitlines()[1].split()
    assert cells == [
        "s1", "abcd", "ready", "1m40s", "25s", "bridge:1/stream:2", "1.5K", "3.0M", "-", "0.25s"
    ]  # fmt: skip


def test_c2l_sessions_unreachable_gateway_is_one_line_exit_1() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "c2l",
            "sessions",
            "--gateway",
            "http://127.0.0.1:9",
            "--token",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("c2l sessions: cannot reach http://127.0.0.1:9")
    assert "Traceback" not in result.stderr
