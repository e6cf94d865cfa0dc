"""The audit trail: one JSON object per line for security-relevant events.

Events: ``auth_failed``, ``access_denied``, ``session_created``, ``session_destroyed``,
``connection_opened`` and ``connection_closed``. A line names the user only by its hash
(first 16 hex digits of sha256(sub)) and never carries a token, a header or message
content: :func:`audit` accepts only the fields listed in :data:`FIELDS`, so a careless
caller cannot put a token into the trail.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import IO, Final

log = logging.getLogger("c2l.audit")

#: The only fields an audit line may carry (besides ``ts`` and ``event``).
FIELDS: Final = frozenset(
    {"user", "session", "side", "reason", "code", "endpoint", "method", "remote", "status"}
)
_MAX_VALUE = 200


def audit(event: str, **fields: str | int | float | None) -> None:
    """Write one audit line; ``None`` fields are left out."""
    unknown = set(fields) - FIELDS
    if unknown:
        raise ValueError(f"audit fields {sorted(unknown)} are not allowed")
    record: dict[str, str | int | float] = {
        "ts": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "event": event,
    }
    for key, value in fields.items():
        if value is None:
            continue
        record[key] = value[:_MAX_VALUE] if isinstance(value, str) else value
    log.info("%s", json.dumps(record, separators=(",", ":"), ensure_ascii=True))


def configure_audit_log(stream: IO[str]) -> None:
    """Send audit lines to ``stream`` as bare JSON (one object per line).

    ``c2l serve`` calls this so that the trail is machine-readable without a log prefix;
    in-process users (tests) leave it alone and get the lines through the root logger.
    """
    if any(getattr(h, "_c2l_audit", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._c2l_audit = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
