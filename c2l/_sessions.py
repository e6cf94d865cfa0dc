"""``c2l sessions``: the gateway's live sessions as an aligned table (admin API)."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

ADMIN_PATH = "/api/admin/streaming/sessions"


class SessionsError(Exception):
    """The admin API could not be asked (no token, unreachable) or refused: one line each."""


COLUMNS = ("SESSION", "USER", "STATE", "AGE", "IDLE", "CONN", "IN", "OUT", "MEMORY", "CPU")


def human_bytes(n: float | None) -> str:
    """``1536`` -> ``1.5K``; None -> ``-``."""
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float | None) -> str:
    """``75`` -> ``1m15s``; None -> ``-``."""
    if s is None:
        return "-"
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _row(session: Mapping[str, Any], now: float) -> list[str]:
    conns = session.get("connections") or {}
    conn = "/".join(f"{side}:{n}" for side, n in sorted(conns.items())) or "-"
    created, last = session.get("created"), session.get("lastActivity")
    cpu = session.get("cpuSeconds")
    return [
        str(session.get("sessionId", "?")),
        str(session.get("userHash", "?")),
        str(session.get("state", "?")),
        human_seconds(now - created if isinstance(created, int | float) else None),
        human_seconds(now - last if isinstance(last, int | float) else None),
        conn,
        human_bytes(session.get("bytesIn")),
        human_bytes(session.get("bytesOut")),
        human_bytes(session.get("memoryBytes")),
        f"{cpu:.2f}s" if isinstance(cpu, int | float) else "-",
    ]


def format_table(sessions: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    """The sessions as an aligned text table with a header line."""
    now = time.time() if now is None else now
    rows = [list(COLUMNS), *(_row(s, now) for s in sessions)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            token = Path(args.token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise SessionsError(
                f"cannot read --token-file {args.token_file}: {exc.strerror}"
            ) from None
    else:
        token = (args.token or os.environ.get("C2L_TOKEN") or "").strip()
    if not token:
        raise SessionsError(
            "no admin token: pass --token, --token-file or set C2L_TOKEN"
            " (e.g. `c2l token --sub root --admin`)"
        )
    return token


def fetch_sessions(gateway: str, token: str, *, timeout: float = 10.0) -> dict[str, Any]:
    """``GET /api/admin/streaming/sessions``; raises :class:`SessionsError` with the reason."""
    url = gateway.rstrip("/") + ADMIN_PATH
    try:
        resp = httpx.get(
            url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout, trust_env=False
        )
    except httpx.HTTPError as exc:
        raise SessionsError(f"cannot reach {gateway}: {exc or type(exc).__name__}") from None
    if resp.status_code != 200:
        try:
            detail = resp.json().get("message") or resp.text
        except ValueError:
            detail = resp.text
        hint = {
            401: " (the token is missing, expired or not from this gateway's issuer)",
            403: " (the token needs the c2l:admin permission: c2l token --sub root --admin)",
        }.get(resp.status_code, "")
        raise SessionsError(f"{url} answered HTTP {resp.status_code}: {detail}{hint}")
    try:
        data: dict[str, Any] = resp.json()
    except ValueError:
        raise SessionsError(f"{url} did not answer JSON") from None
    return data


def cli_sessions(args: argparse.Namespace) -> int:
    """``c2l sessions``: print the live sessions (or their JSON with ``--json``)."""
    data = fetch_sessions(args.gateway, _token(args))
    sessions = data.get("sessions") or []
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(format_table(sessions))
    print(f"{len(sessions)} session{'' if len(sessions) == 1 else 's'}")
    return 0
