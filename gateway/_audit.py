"""The audit trail: one JSON object per line for security-relevant events.

Events: ``auth_failed``, ``access_denied``, ``session_created``, ``session_destroyed``,
``connection_opened`` and ``connection_closed``. A line never carries a token, a header or
message content: :func:`audit` accepts only the fields listed in :data:`FIELDS`, so a
careless caller cannot put a token into the trail.

The trail is shipped to log systems, so it names a user by a keyed hash: the first 16 hex
digits of HMAC-SHA256(key, user hash), with a key that the gateway keeps (0600, beside the
development key, the same across restarts). The plain user hash (sha256 of the ``sub``, on
Podman objects) of a guessable user name can be computed by anyone; the keyed one cannot.
Callers pass the plain hash as ``user``; :func:`audit` writes the keyed one, so no call
site can forget it. The key is set per gateway (:func:`use_audit_key`) in a context
variable, which every task of that gateway's requests inherits.
"""

from __future__ import annotations

import contextvars
import datetime
import hashlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from orchestrator import Session
    from orchestrator._orchestrator import SessionObserver

log = logging.getLogger("c2l.audit")

#: The only fields an audit line may carry (besides ``ts`` and ``event``).
FIELDS: Final = frozenset(
    {"user", "session", "side", "reason", "code", "endpoint", "method", "remote", "status"}
)
_MAX_VALUE = 200
_KEY_BYTES = 32

#: The audit key of the gateway whose request this task serves.
_audit_key: contextvars.ContextVar[bytes] = contextvars.ContextVar("c2l_audit_key")
#: For audit lines outside any gateway's requests: a key of this process only (still
#: keyed, never the plain hash; such lines are only comparable within the process).
_PROCESS_KEY: Final = secrets.token_bytes(_KEY_BYTES)


def load_or_create_audit_key(path: Path) -> bytes:
    """The audit key kept at ``path``, made (0600, directory 0700) on first use."""
    try:
        key = bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = secrets.token_bytes(_KEY_BYTES)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
        try:
            os.link(tmp, path)  # never replaces a key another process made meanwhile
        except FileExistsError:
            return load_or_create_audit_key(path)
        finally:
            tmp.unlink()
        return key
    except ValueError:
        raise ValueError(f"{path} does not hold an audit key (hex): remove it") from None
    if len(key) < 16:
        raise ValueError(f"{path} holds an audit key of {len(key)} bytes: remove it")
    return key


def use_audit_key(key: bytes) -> None:
    """Key the audit lines written by this task and the tasks it starts from now on."""
    _audit_key.set(key)


def keyed_user(user_hash: str) -> str:
    """The name of a user (given by its plain hash) in the audit trail."""
    key = _audit_key.get(_PROCESS_KEY)
    return hmac.new(key, user_hash.encode(), hashlib.sha256).hexdigest()[:16]


def audit(event: str, **fields: str | int | float | None) -> None:
    """Write one audit line; ``None`` fields are left out.

    ``user`` is the plain user hash: the line carries its keyed hash (:func:`keyed_user`).
    """
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
        if key == "user":
            value = keyed_user(str(value))
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


class AuditObserver:
    """The audit trail's view of sessions (an orchestrator ``SessionObserver``).

    A session is ``session_created`` once it is ready and ``session_destroyed`` once torn
    down; one that never became ready was never handed out, and leaves no line.
    """

    def session_admitted(self, session: Session) -> None:
        pass

    def session_ready(self, session: Session, seconds: float) -> None:
        audit("session_created", user=session.user_hash, session=session.id)

    def session_ended(self, session: Session) -> None:
        if session.ready_seconds is None:
            return
        reason = session.end_reason or "gateway stopped"
        audit("session_destroyed", user=session.user_hash, session=session.id, reason=reason)


class SessionObservers:
    """Several session observers as one: each is told every event, in order; one that
    fails is logged with its traceback and keeps the others from nothing."""

    def __init__(self, *observers: SessionObserver) -> None:
        self.observers = observers

    def _each(self, event: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(*args)
            except Exception:
                logging.getLogger("c2l.gateway").exception("session observer %r failed", observer)

    def session_admitted(self, session: Session) -> None:
        self._each("session_admitted", session)

    def session_ready(self, session: Session, seconds: float) -> None:
        self._each("session_ready", session, seconds)

    def session_ended(self, session: Session) -> None:
        self._each("session_ended", session)
