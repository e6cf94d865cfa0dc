"""The WebSocket wire protocol of DESIGN.md section 2, sans-IO.

Every message is one JSON object in a text frame with a ``type`` field. This module turns
frames into validated, immutable message objects and back; it has no sockets in it, so
the gateway, the proxy and the desktop agent share exactly one definition of the
protocol and its tests need no network.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any, ClassVar, Final, TypeAlias

import attrs

#: Largest text frame any component accepts. A bigger frame closes the connection
#: with code 1009 (message too big).
MAX_FRAME_BYTES: Final = 1024 * 1024

#: Raw bytes in one ``body`` message (and the most a gateway puts in one request's
#: ``bodyBase64``): base64 makes 342 KiB of text of them, well under ``MAX_FRAME_BYTES``.
#: A bigger body is streamed: its ``request`` says ``"bodyStream": true`` and the bytes
#: follow in ``body`` messages of at most this size, the last with ``"last": true``.
BODY_PIECE_BYTES: Final = 256 * 1024

#: The most bytes one streamed request body may have in all (a blob upload); more is
#: answered with ``too_large`` by the desktop agent. The gateway's own limit
#: (``C2L_MAX_BLOB``) is at most this.
MAX_STREAMED_BODY_BYTES: Final = 1024**3

#: Longest request id accepted; ids are echoed in every response message.
MAX_ID_LENGTH: Final = 128

#: Most headers a ``request`` or ``response_start`` message may carry, and the longest
#: header (name plus value) in bytes; more is answered with ``too_large``.
MAX_HEADERS: Final = 64
MAX_HEADER_BYTES: Final = 8 * 1024

#: Most requests in flight at once through one user's proxy (all of the user's
#: connections together); more are answered with ``too_many_requests``.
MAX_INFLIGHT_PER_SESSION: Final = 128

#: Longest ``path`` of a ``request`` message.
MAX_PATH_LENGTH: Final = 8 * 1024

#: Longest ``resume`` token accepted (the proxy makes 43-character ones).
MAX_RESUME_TOKEN: Final = 128

#: Most bytes of one answer's chunks the proxy keeps for a resume (DESIGN.md section 2,
#: resumable streams): the replay tail of a request, and what a detached request may buffer.
RESUME_MAX_BYTES: Final = 1024 * 1024

#: Default resume window in seconds (``C2L_RESUME_WINDOW``).
RESUME_WINDOW_S: Final = 30.0

#: How long a browser has to send its ``auth`` message after the upgrade.
AUTH_TIMEOUT_S: Final = 10.0

# WebSocket close codes used by the project (RFC 6455 section 7.4.1).
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY: Final = 1008  # authentication failed or expired
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
CLOSE_TRY_AGAIN: Final = 1013
#: A newer desktop agent of the same user took over; the replaced agent stops for good.
CLOSE_REPLACED: Final = 4001
#: This client read too slowly and was dropped; the session is alive: reconnect.
CLOSE_BACKLOG: Final = 4002
#: The session ended (its proxy died or was removed).
CLOSE_SESSION_ENDED: Final = 4003


#: Request headers that never cross the tunnel to Ollama: the client's credentials for
#: the gateway and the framing of the client's own connection. The gateway strips them
#: (the token must not leave it) and the desktop agent strips them again.
UNFORWARDED_REQUEST_HEADERS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "accept-encoding",
    }
)


#: Response headers that never cross back from Ollama: the framing of Ollama's own HTTP
#: connection (the tunnel re-frames the body, already decompressed) and its cookies.
UNFORWARDED_RESPONSE_HEADERS: Final = frozenset(
    {
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "trailer",
        "upgrade",
        "set-cookie",
    }
)


#: The routes an answer can take (``X-C2L-Route``, ``response_start.route``).
ROUTES: Final = ("cloud", "direct")


class ErrorCode:
    """The ``code`` values of ``error`` messages and HTTP error bodies."""

    BAD_JSON: Final = "bad_json"
    BAD_MESSAGE: Final = "bad_message"
    UNKNOWN_TYPE: Final = "unknown_type"
    MISSING_FIELD: Final = "missing_field"
    DUPLICATE_ID: Final = "duplicate_id"
    UNKNOWN_ID: Final = "unknown_id"
    TOO_LARGE: Final = "too_large"
    AUTH_FAILED: Final = "auth_failed"
    AUTH_TIMEOUT: Final = "auth_timeout"
    TOKEN_EXPIRED: Final = "token_expired"
    NOT_FOUND: Final = "not_found"
    TOO_MANY_REQUESTS: Final = "too_many_requests"
    BAD_PATH: Final = "bad_path"
    DESKTOP_UNAVAILABLE: Final = "desktop_unavailable"
    DESKTOP_REPLACED: Final = "desktop_replaced"
    OLLAMA_UNAVAILABLE: Final = "ollama_unavailable"
    UPSTREAM_ERROR: Final = "upstream_error"
    PROXY_UNAVAILABLE: Final = "proxy_unavailable"
    SESSION_ENDED: Final = "session_ended"
    SESSION_IDLE: Final = "session_idle"
    CANCELLED: Final = "cancelled"
    RESUME_EXPIRED: Final = "resume_expired"
    INTERNAL: Final = "internal"


class ProtocolError(Exception):
    """A frame that is not a valid message.

    ``code`` is an :class:`ErrorCode` value and ``id`` the request id the bad frame named,
    when it could be read, so the peer can tell which request the error is about.
    """

    def __init__(self, code: str, message: str, id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id

    def to_message(self) -> Error:
        """The ``error`` message that answers the bad frame."""
        return Error(code=self.code, message=self.message, id=self.id)


class _TooLarge(Exception):
    pass


def _headers(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise TypeError("headers must be an object of strings")
    if len(value) > MAX_HEADERS:
        raise _TooLarge(f"more than {MAX_HEADERS} headers")
    for k, v in value.items():
        if len(k) + len(v) > MAX_HEADER_BYTES:
            raise _TooLarge(f"header {k[:40]!r} is over {MAX_HEADER_BYTES} bytes")
    return dict(value)


@attrs.frozen
class Request:
    """A client's HTTP request for the desktop's Ollama, e.g. ``POST /api/chat``."""

    TYPE: ClassVar[str] = "request"
    id: str
    method: str
    path: str
    headers: dict[str, str] = attrs.field(factory=dict)
    body: Any = None
    #: A body that is not JSON (a blob, a form), base64 (JSON ``bodyBase64``); never
    #: together with ``body``.
    body_base64: str | None = None
    #: The body follows in :class:`Body` messages (JSON ``bodyStream``): it may be larger
    #: than a frame, and no component holds it whole. Then ``body`` and ``body_base64``
    #: are unset.
    body_stream: bool = False


@attrs.frozen
class Body:
    """A piece of the streamed body of request ``id`` (client to desktop), in order.

    ``data_base64`` is at most :data:`BODY_PIECE_BYTES` bytes once decoded; ``last`` ends
    the body. A ``body`` for a request that does not stream one, or after the last piece,
    is answered with an ``error`` (the connection stays up).
    """

    TYPE: ClassVar[str] = "body"
    id: str
    data_base64: str
    last: bool = False

    def data(self) -> bytes:
        """The piece's bytes (checked when the message was decoded)."""
        return base64.b64decode(self.data_base64)


@attrs.frozen
class ResponseStart:
    """Status line and headers of Ollama's answer to request ``id``."""

    TYPE: ClassVar[str] = "response_start"
    id: str
    status: int
    headers: dict[str, str] = attrs.field(factory=dict)
    #: How the answer came (DESIGN.md section 5): ``cloud`` (the bridge, stamped by the
    #: proxy) or ``direct`` (the desktop's tunnel, stamped by the gateway); None: unsaid.
    route: str | None = None
    #: The token a client presents in a ``resume`` message to get the rest of this answer
    #: after its connection dropped (stamped by the proxy; None: not resumable).
    resume: str | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class Chunk:
    """One NDJSON line or SSE event of the answer to request ``id``, in order.

    A body that is not text (not JSON, NDJSON, SSE or ``text/*``) comes as raw bytes in
    ``data_base64`` (JSON ``dataBase64``) instead; on the wire a chunk has exactly one of
    ``data`` and ``dataBase64`` (``data`` is then ``""`` here).
    """

    TYPE: ClassVar[str] = "chunk"
    id: str
    data: str = ""
    data_base64: str | None = None
    #: 1, 2, 3... per request (stamped by the proxy), so a resuming client can say which
    #: chunks it has; None: not numbered.
    seq: int | None = attrs.field(default=None, kw_only=True)

    def raw(self) -> bytes:
        """The chunk's bytes as the HTTP client gets them."""
        if self.data_base64 is not None:
            return base64.b64decode(self.data_base64)
        return self.data.encode()


@attrs.frozen
class ResponseEnd:
    """The answer to request ``id`` is complete."""

    TYPE: ClassVar[str] = "response_end"
    id: str


@attrs.frozen
class Cancel:
    """The client gave up on request ``id``; the desktop aborts the Ollama request."""

    TYPE: ClassVar[str] = "cancel"
    id: str


@attrs.frozen(repr=False)
class Resume:
    """A client whose connection dropped asks for the rest of an answer, under a new id.

    ``resume`` is the token of the answer's ``response_start``; ``after`` the last ``seq``
    the client received (0: none). The token is a capability: never in a log line.
    """

    TYPE: ClassVar[str] = "resume"
    id: str
    resume: str
    after: int = 0

    def __repr__(self) -> str:
        return f"Resume(id={self.id!r}, resume=<redacted>, after={self.after!r})"


@attrs.frozen
class Error:
    """Something went wrong, about request ``id`` when it is set."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    id: str | None = None


@attrs.frozen
class Ping:
    """Heartbeat; the peer answers with :class:`Pong` carrying the same timestamp."""

    TYPE: ClassVar[str] = "ping"
    timestamp: float


@attrs.frozen
class Pong:
    """Answer to :class:`Ping`."""

    TYPE: ClassVar[str] = "pong"
    timestamp: float


@attrs.frozen(repr=False)
class Auth:
    """A browser's first message: its token, since browsers cannot set headers on upgrade."""

    TYPE: ClassVar[str] = "auth"
    token: str
    session_id: str | None = None
    timestamp: float | None = None

    def __repr__(self) -> str:  # never let a token reach a log line
        return f"Auth(token=<redacted>, session_id={self.session_id!r})"


@attrs.frozen
class AuthOk:
    """The connection is authenticated and attached to session ``session_id``."""

    TYPE: ClassVar[str] = "auth_ok"
    session_id: str


Message: TypeAlias = (
    Request
    | Body
    | ResponseStart
    | Chunk
    | ResponseEnd
    | Cancel
    | Error
    | Ping
    | Pong
    | Auth
    | AuthOk
    | Resume
)

#: Messages that carry a request id and belong to one request stream.
RequestScoped: TypeAlias = Request | Body | ResponseStart | Chunk | ResponseEnd | Cancel


def _need(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], rid: str | None) -> Any:
    if key not in obj:
        raise ProtocolError(ErrorCode.MISSING_FIELD, f"field {key!r} is missing", rid)
    value = obj[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {key!r} has the wrong type", rid)
    return value


def _opt(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], rid: str | None) -> Any:
    if obj.get(key) is None:
        return None
    return _need(obj, key, kind, rid)


def _id(obj: Mapping[str, Any]) -> str:
    rid = _need(obj, "id", str, None)
    if not rid or len(rid) > MAX_ID_LENGTH:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"field 'id' must be 1 to {MAX_ID_LENGTH} characters"
        )
    return str(rid)


def _number(obj: Mapping[str, Any], key: str, rid: str | None) -> float:
    try:
        return float(_need(obj, key, (int, float), rid))
    except OverflowError:  # an integer too big for a float
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {key!r} is out of range", rid) from None


def _method(value: str, rid: str) -> str:
    method = value.upper()
    if not 0 < len(method) <= 16 or not method.isascii() or not method.isalpha():
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "field 'method' is not an HTTP method", rid)
    return method


def _path(value: str, rid: str) -> str:
    if not value.startswith("/"):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "field 'path' must start with '/'", rid)
    if len(value) > MAX_PATH_LENGTH:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"path over {MAX_PATH_LENGTH} characters", rid)
    if any(c <= " " or c == "\x7f" for c in value):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, "field 'path' holds whitespace or control characters", rid
        )
    return value


def _base64(obj: Mapping[str, Any], key: str, rid: str, limit: int) -> str:
    """Field ``key``: valid base64 of at most ``limit`` bytes (ProtocolError if not)."""
    text = _need(obj, key, str, rid)
    if len(text) > (limit + 2) // 3 * 4:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"field {key!r} is over {limit} bytes", rid)
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {key!r} is not base64", rid) from None
    return str(text)


def _request(obj: Mapping[str, Any]) -> Request:
    i = _id(obj)
    method = _method(_need(obj, "method", str, i), i)
    path = _path(_need(obj, "path", str, i), i)
    headers = _headers(obj.get("headers"))
    body = obj.get("body")
    raw = None
    if obj.get("bodyBase64") is not None:
        raw = _base64(obj, "bodyBase64", i, MAX_FRAME_BYTES)
    stream = _opt(obj, "bodyStream", bool, i) or False
    if sum((body is not None, raw is not None, stream)) > 1:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, "a request has one of body, bodyBase64 and bodyStream", i
        )
    return Request(i, method, path, headers, body, raw, stream)


def _chunk(obj: Mapping[str, Any]) -> Chunk:
    i = _id(obj)
    seq = _opt(obj, "seq", int, i)
    if seq is not None and seq < 0:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "field 'seq' must not be negative", i)
    if "dataBase64" in obj:
        if "data" in obj:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "a chunk has data or dataBase64", i)
        return Chunk(i, "", _base64(obj, "dataBase64", i, MAX_FRAME_BYTES), seq=seq)
    return Chunk(i, _need(obj, "data", str, i), seq=seq)


def _from_dict(obj: Mapping[str, Any]) -> Message:
    kind = obj.get("type")
    # The id is read first so that every later complaint can name the request it is about.
    peek = obj.get("id")
    rid = peek if isinstance(peek, str) and 0 < len(peek) <= MAX_ID_LENGTH else None
    try:
        if kind == "request":
            return _request(obj)
        if kind == "body":
            i = _id(obj)
            data = _base64(obj, "dataBase64", i, BODY_PIECE_BYTES)
            return Body(i, data, _opt(obj, "last", bool, i) or False)
        if kind == "response_start":
            i = _id(obj)
            status = _need(obj, "status", int, i)
            if not 100 <= status <= 599:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"status {status} out of range", i)
            route = obj.get("route")
            if route is not None and route not in ROUTES:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "route must be cloud or direct", i)
            token = _opt(obj, "resume", str, i)
            if token is not None and not 0 < len(token) <= MAX_RESUME_TOKEN:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "field 'resume' has a bad length", i)
            return ResponseStart(i, status, _headers(obj.get("headers")), route, resume=token)
        if kind == "chunk":
            return _chunk(obj)
        if kind == "resume":
            i = _id(obj)
            token = _need(obj, "resume", str, i)
            if not 0 < len(token) <= MAX_RESUME_TOKEN:
                raise ProtocolError(
                    ErrorCode.BAD_MESSAGE,
                    f"field 'resume' must be 1 to {MAX_RESUME_TOKEN} characters",
                    i,
                )
            after = _need(obj, "after", int, i)
            if after < 0:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "field 'after' must not be negative", i)
            return Resume(i, token, after)
        if kind == "response_end":
            return ResponseEnd(_id(obj))
        if kind == "cancel":
            return Cancel(_id(obj))
        if kind == "error":
            return Error(
                _need(obj, "code", str, rid), str(obj.get("message", "")), _opt(obj, "id", str, rid)
            )
        if kind == "ping":
            return Ping(_number(obj, "timestamp", None))
        if kind == "pong":
            return Pong(_number(obj, "timestamp", None))
        if kind == "auth":
            ts = obj.get("timestamp")
            return Auth(
                _need(obj, "token", str, None),
                _opt(obj, "sessionId", str, None),
                _number(obj, "timestamp", None)
                if isinstance(ts, int | float) and not isinstance(ts, bool)
                else None,
            )
        if kind == "auth_ok":
            return AuthOk(_need(obj, "sessionId", str, None))
    except TypeError as exc:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc), rid) from None
    except _TooLarge as exc:
        raise ProtocolError(ErrorCode.TOO_LARGE, str(exc), rid) from None
    if "type" not in obj:
        raise ProtocolError(ErrorCode.MISSING_FIELD, "field 'type' is missing", rid)
    shown = kind if isinstance(kind, str) else type(kind).__name__
    raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {shown[:40]!r}", rid)


def decode(frame: str | bytes) -> Message:
    """Parse one text frame into a message, or raise :class:`ProtocolError`."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame over {MAX_FRAME_BYTES} bytes")
    try:
        obj = json.loads(frame)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_JSON, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "frame must be a JSON object")
    return _from_dict(obj)


def to_dict(msg: Message) -> dict[str, Any]:
    """The JSON object for ``msg``, with the contract's field names."""
    if isinstance(msg, Auth):
        d: dict[str, Any] = {"type": "auth", "token": msg.token}
        if msg.session_id is not None:
            d["sessionId"] = msg.session_id
        if msg.timestamp is not None:
            d["timestamp"] = msg.timestamp
        return d
    if isinstance(msg, AuthOk):
        return {"type": "auth_ok", "sessionId": msg.session_id}
    d = {"type": msg.TYPE}
    d.update(attrs.asdict(msg, recurse=False))
    if isinstance(msg, Error) and msg.id is None:
        del d["id"]
    if isinstance(msg, ResponseStart) and msg.route is None:
        del d["route"]
    if isinstance(msg, ResponseStart) and msg.resume is None:
        del d["resume"]
    if isinstance(msg, Chunk) and msg.seq is None:
        del d["seq"]
    if isinstance(msg, Request):
        raw, stream = d.pop("body_base64"), d.pop("body_stream")
        if raw is not None:
            d["bodyBase64"] = raw
        if stream:
            d["bodyStream"] = True
    if isinstance(msg, Chunk | Body):
        raw = d.pop("data_base64")
        if raw is not None:
            d["dataBase64"] = raw
            d.pop("data", None)
    return d


def encode(msg: Message) -> str:
    """One text frame for ``msg``."""
    return json.dumps(to_dict(msg), separators=(",", ":"), ensure_ascii=False)


def peek_type(frame: str) -> str | None:
    """The ``type`` of a frame without validating the rest, or None if unreadable.

    Relays use this to spot control messages cheaply; anything they forward is still
    fully validated by :func:`decode` at the receiving end.
    """
    try:
        obj = json.loads(frame)
    except (ValueError, RecursionError):
        return None
    kind = obj.get("type") if isinstance(obj, dict) else None
    return kind if isinstance(kind, str) else None


@attrs.define
class StreamTracker:
    """The open request ids of one side of a connection.

    A sans-IO helper in the spirit of h11's Connection: feed it the request-scoped messages
    as they pass and it says which requests are still open, rejects a reused id while the
    first is in flight, and ends a stream on ``response_end``, ``error`` or ``cancel``.
    """

    max_open: int = 256
    _open: dict[str, None] = attrs.field(factory=dict)

    def start(self, req: Request) -> None:
        """Record a new request, or raise :class:`ProtocolError` for a duplicate id."""
        self.start_id(req.id)

    def start_id(self, rid: str) -> None:
        """:meth:`start` by id alone (a ``resume`` opens a stream under a new id)."""
        if rid in self._open:
            raise ProtocolError(
                ErrorCode.DUPLICATE_ID, f"request id {rid!r} is already in flight", rid
            )
        if len(self._open) >= self.max_open:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"more than {self.max_open} requests in flight", rid
            )
        self._open[rid] = None

    def finish(self, rid: str) -> bool:
        """Mark ``rid`` done; False if it was not open."""
        return self._open.pop(rid, 0) is None

    def __contains__(self, rid: object) -> bool:
        return rid in self._open

    def __len__(self) -> int:
        return len(self._open)

    def drain(self) -> list[str]:
        """Forget every open request and return their ids (e.g. when the peer is gone)."""
        ids = list(self._open)
        self._open.clear()
        return ids
