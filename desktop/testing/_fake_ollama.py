"""A fake Ollama for development and tests, speaking Ollama's real HTTP protocol on trio.

It answers ``/api/tags``, ``/api/version``, ``/api/show``, ``/api/ps``, ``/api/chat`` and
``/api/generate`` (streaming NDJSON by default, one object per token, then a final
``"done": true`` line with Ollama's timing fields), ``/api/pull`` (a progress stream),
``/api/embed`` and ``/api/embeddings``, and the OpenAI-compatible ``/v1/chat/completions``
and ``/v1/completions`` (SSE ending with ``data: [DONE]``), ``/v1/embeddings`` and
``/v1/models``; ``HEAD`` of ``/``, ``/api/tags`` and ``/api/version``; blobs as Ollama
takes them: ``HEAD /api/blobs/sha256:<hex>`` (200 when the fake has it, else 404) and
``POST`` of the same (the body is hashed as it streams in, never kept: 201 when it matches
the digest, 200 when the blob was there already, 400 ``digest mismatch`` otherwise), each
upload recorded in :attr:`FakeOllama.blobs` with its size and how it arrived; and
``/api/create`` of a model from such blobs (``files``), which then answers like the
others. A fake-only ``GET /api/_fake/bytes?size=N`` answers N bytes of
``application/octet-stream`` (every byte value, not UTF-8) for tests of bodies that are
not text.

The tokens are deterministic: the words of ``"You said: <last user message>"`` followed
by numbered filler tokens, ``num_predict`` (or ``max_tokens``) of them in all, one every
``delay`` seconds.

Errors have Ollama's shapes: ``{"error": "..."}`` with 400/404 (an unknown model is 404),
OpenAI's ``{"error": {"message": ...}}`` under ``/v1``. A generation can be told to fail
mid-stream, as Ollama does when a runner dies: ``options.fake_error_after`` (native API) or
``fake_error_after`` (OpenAI API) = N sends N tokens, then an ``{"error": ...}`` line (SSE:
a ``data: {"error": {...}}`` event) and ends the body. Pulling a model the fake does not
know streams ``pulling manifest`` and then Ollama's error line.

It is written on raw h11 rather than a framework so that a client that disconnects
mid-stream is seen at once (a reader watches the socket while the response streams) and
recorded in :attr:`FakeOllama.cancelled`; ``GET /_fake/stats`` serves the same records to a
test that runs the fake as a subprocess.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import math
import re
import signal
import time
from collections.abc import Callable
from typing import Any, Final

import attrs
import h11
import trio

#: Tokens generated when the request does not say (``options.num_predict``, ``max_tokens``).
DEFAULT_NUM_PREDICT: Final = 12
#: The version string ``/api/version`` reports.
FAKE_VERSION: Final = "0.5.7-fake"
#: What a generation told to fail mid-stream reports, as Ollama does when its runner dies.
RUNNER_ERROR: Final = "an error was encountered while running the model: unexpected EOF"
#: Length of the fake's embedding vectors.
EMBEDDING_DIMS: Final = 8
_MAX_BODY: Final = 16 * 1024 * 1024
_RECEIVE: Final = 65536
_JSON: Final = "application/json; charset=utf-8"
_TEXT: Final = "text/plain; charset=utf-8"


@attrs.frozen
class FakeModel:
    """One model the fake pretends to have pulled."""

    name: str
    size: int
    digest: str
    family: str
    parameter_size: str
    quantization_level: str
    modified_at: str = "2024-09-25T12:00:00.000000Z"

    def tags_entry(self) -> dict[str, Any]:
        """The model's entry in ``/api/tags``, in Ollama's exact shape."""
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }

    def details(self) -> dict[str, Any]:
        """The ``details`` object of ``/api/tags`` and ``/api/show``."""
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


DEFAULT_MODELS: Final = (
    FakeModel(
        name="llama3.2:latest",
        size=2019393189,
        digest="a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
        family="llama",
        parameter_size="3.2B",
        quantization_level="Q4_K_M",
    ),
    FakeModel(
        name="qwen2.5:0.5b",
        size=397821319,
        digest="a8b0c51577010a279d933d14c2a8ab4b268079d44c5c8830c0a93900f1827c67",
        family="qwen2",
        parameter_size="494.03M",
        quantization_level="Q4_K_M",
    ),
)


def fake_models(*names: str) -> tuple[FakeModel, ...]:
    """Models called ``names`` (``:latest`` implied), for a fake with a model list of its own
    (e.g. two desktops with different models)."""
    out = []
    for i, name in enumerate(names):
        full = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
        digest = hashlib.sha256(full.encode()).hexdigest()
        out.append(FakeModel(full, 1_000_000 * (i + 1), digest, "llama", "1B", "Q4_K_M"))
    return tuple(out)


@attrs.frozen
class RecordedRequest:
    """A request the fake received (``/_fake/*`` excluded)."""

    method: str
    path: str
    model: str | None
    #: the query string, without ``?``
    query: str = ""
    #: the request's headers, names in lower case
    headers: dict[str, str] = attrs.field(factory=dict)
    #: the chat messages of a request that had them (``/api/chat``), as received
    messages: list[Any] | None = None


@attrs.frozen
class BlobRecord:
    """A blob the fake took: its digest and size, and how its body arrived."""

    digest: str
    size: int
    #: h11 ``Data`` events (socket reads) the body came in
    reads: int
    #: HTTP/1.1 chunks of a chunked body (0 for a body with Content-Length)
    chunks: int


@attrs.define
class _BlobUpload:
    """A blob body being hashed as it arrives (none of it is kept)."""

    sha: Any = attrs.field(factory=hashlib.sha256)
    size: int = 0
    reads: int = 0
    chunks: int = 0

    def feed(self, event: h11.Data) -> None:
        self.sha.update(event.data)
        self.size += len(event.data)
        self.reads += 1
        self.chunks += 1 if event.chunk_end else 0


_BLOB_DIGEST: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
#: Where Ollama takes blobs.
BLOB_PREFIX: Final = "/api/blobs/"


@attrs.frozen
class CancelledRequest:
    """A generation whose client disconnected before the final line was sent."""

    path: str
    model: str | None
    tokens_sent: int


class _HTTPError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


@attrs.frozen
class _Piece:
    """One write of a generated response: wait, send ``data``, count ``tokens``.

    ``render``, when set, makes the bytes at send time, so that ``created_at`` is the
    moment the token is produced, as with a real Ollama (benchmarks measure from it).
    """

    wait: float
    data: bytes
    tokens: int = 0
    render: Callable[[], bytes] | None = None

    def bytes_now(self) -> bytes:
        """The bytes to send now."""
        return self.render() if self.render is not None else self.data


@attrs.frozen
class _Reply:
    status: int
    content_type: str
    pieces: tuple[_Piece, ...]
    streaming: bool
    generation: bool = False


def _openai_usage(prompt: str, tokens: list[str]) -> dict[str, int]:
    """OpenAI's ``usage`` object of a non-streamed completion."""
    prompt_tokens = max(1, len(prompt.split()))
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(tokens),
        "total_tokens": prompt_tokens + len(tokens),
    }


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json_line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _sse(obj: Any) -> bytes:
    payload = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def make_tokens(text: str, count: int) -> list[str]:
    """The fake's tokens for a prompt: ``"You said: <text>"`` word by word, then fillers.

    Tokens carry their leading space, as a real tokenizer's do, so joining them gives the
    text. Exactly ``count`` tokens are returned (the echo is cut short if it is longer).
    """
    # Each word with the whitespace before it (a newline too: a Markdown answer keeps
    # its lines); runs of spaces count as one, as before.
    words = re.findall(r"\s*\S+", f"You said: {text}")
    tokens = [
        w.lstrip() if i == 0 else ("\n" * w.count("\n") or " ") + w.lstrip()
        for i, w in enumerate(words)
    ]
    tokens += [f" token{i + 1}" for i in range(max(0, count - len(tokens)))]
    return tokens[:count]


def _error_after(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def fake_embedding(text: str, dims: int = EMBEDDING_DIMS) -> list[float]:
    """A deterministic unit vector for ``text`` (same text, same vector)."""
    seed = hashlib.sha256(text.encode()).digest()
    raw = [(seed[i % len(seed)] - 127.5) / 127.5 for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def _num_predict(value: Any, default: int = DEFAULT_NUM_PREDICT) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return default


@attrs.define(eq=False)
class FakeOllama:
    """The running fake: its address and what it has seen.

    ``requests`` lists every request, ``cancelled`` every generation the client abandoned
    before the final line, ``completed`` counts generations that sent their final line.
    """

    host: str
    port: int
    delay: float = 0.02
    models: tuple[FakeModel, ...] = DEFAULT_MODELS
    #: Tokens generated when a request does not say how many.
    default_tokens: int = DEFAULT_NUM_PREDICT
    requests: list[RecordedRequest] = attrs.field(factory=list)
    cancelled: list[CancelledRequest] = attrs.field(factory=list)
    completed: int = 0
    #: digest -> the blob uploaded under it (the fake "has" these blobs)
    blobs: dict[str, BlobRecord] = attrs.field(factory=dict)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:11434``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        """What ``GET /_fake/stats`` answers."""
        return {
            "requests": len(self.requests),
            "cancelled": [attrs.asdict(c) for c in self.cancelled],
            "completed": self.completed,
        }

    async def wait_until(self, predicate: Callable[[FakeOllama], bool]) -> None:
        """Block until ``predicate(self)`` holds; it is re-checked after every record."""
        while not predicate(self):
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def find_model(self, name: Any) -> FakeModel:
        """The model called ``name`` (``:latest`` implied), or a 404 as Ollama answers it."""
        if not isinstance(name, str) or not name:
            raise _HTTPError(400, {"error": "model is required"})
        full = name if ":" in name else f"{name}:latest"
        for model in self.models:
            if model.name == full:
                return model
        raise _HTTPError(404, {"error": f'model "{name}" not found, try pulling it first'})

    # ----- HTTP connection handling ---------------------------------------------------

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve HTTP/1.1 requests on one connection until the client closes it."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_RECEIVE)
        try:
            while True:
                got = await self._read_request(conn, stream)
                if got is None:
                    return
                request, body, upload = got
                await self._respond(conn, stream, request, body, upload)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def _read_request(
        self, conn: h11.Connection, stream: trio.abc.Stream
    ) -> tuple[h11.Request, bytes, _BlobUpload | None] | None:
        request: h11.Request | None = None
        body = bytearray()
        upload: _BlobUpload | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(_RECEIVE)
                conn.receive_data(bytes(data))
                if not data and conn.their_state is h11.IDLE:
                    return None
            elif isinstance(event, h11.Request):
                request = event
                if event.method == b"POST" and event.target.startswith(BLOB_PREFIX.encode()):
                    upload = _BlobUpload()
                    # Recorded as it starts: a test sees an upload that never finished.
                    path = event.target.decode().partition("?")[0]
                    headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                    self.requests.append(RecordedRequest("POST", path, None, "", headers))
                    self._notify()
            elif isinstance(event, h11.Data) and upload is not None:
                upload.feed(event)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_BODY:
                    raise h11.RemoteProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body), upload
            else:  # ConnectionClosed or PAUSED: nothing more to serve
                return None

    async def _respond(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        request: h11.Request,
        raw: bytes,
        upload: _BlobUpload | None = None,
    ) -> None:
        method = request.method.decode()
        path, _, query = request.target.decode().partition("?")
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
        model: str | None = None
        try:
            body: Any = None
            if path.startswith((BLOB_PREFIX, "/api/_fake/")):
                if upload is None:  # an upload was recorded as it started
                    self.requests.append(RecordedRequest(method, path, None, query, headers))
                    self._notify()
                reply = self._blob(method, path, query, upload)
                if method == "HEAD":
                    reply = attrs.evolve(reply, pieces=())
                await self._send_reply(conn, stream, reply, path, None)
                return
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise _HTTPError(400, {"error": "invalid JSON in request body"}) from None
            if isinstance(body, dict):
                found = body.get("model", body.get("name"))
                model = found if isinstance(found, str) else None
            if not path.startswith("/_fake/"):
                messages = body.get("messages") if isinstance(body, dict) else None
                self.requests.append(
                    RecordedRequest(
                        method,
                        path,
                        model,
                        query,
                        headers,
                        messages if isinstance(messages, list) else None,
                    )
                )
                self._notify()
            # HEAD is GET without the body, as in Ollama's router.
            route = "GET" if method == "HEAD" else method
            reply = self._route(route, path, body if isinstance(body, dict) else {})
        except _HTTPError as exc:
            reply = self._json_reply(exc.status, exc.body)
        if method == "HEAD":
            reply = attrs.evolve(reply, pieces=(), streaming=False, generation=False)
        await self._send_reply(conn, stream, reply, path, model)

    def _blob(self, method: str, path: str, query: str, upload: _BlobUpload | None) -> _Reply:
        """Blobs as Ollama's ``HeadBlobHandler`` and ``CreateBlobHandler`` answer."""
        if path == "/api/_fake/bytes" and method == "GET":
            match = re.fullmatch(r"size=(\d{1,8})", query)
            size = int(match.group(1)) if match else 1024
            data = bytes(i % 256 for i in range(size))
            return _Reply(200, "application/octet-stream", (_Piece(0, data),), False)
        digest = path.removeprefix(BLOB_PREFIX)
        if not path.startswith(BLOB_PREFIX) or method not in ("HEAD", "POST"):
            return _Reply(404, "text/plain", (_Piece(0, b"404 page not found"),), False)
        if not _BLOB_DIGEST.match(digest):
            return self._json_reply(400, {"error": "invalid digest format"})
        if method == "HEAD":
            if digest in self.blobs:
                return _Reply(200, _TEXT, (), False)
            return self._json_reply(404, {"error": f'blob "{digest}" not found'})
        if digest in self.blobs:
            return _Reply(200, _TEXT, (), False)  # Ollama has it already: nothing to do
        assert upload is not None
        got = f"sha256:{upload.sha.hexdigest()}"
        if got != digest:
            error = f'digest mismatch, expected "{digest}", got "{got}"'
            return self._json_reply(400, {"error": error})
        self.blobs[digest] = BlobRecord(digest, upload.size, upload.reads, upload.chunks)
        self._notify()
        return _Reply(201, _TEXT, (), False)

    def _json_reply(self, status: int, obj: Any) -> _Reply:
        return _Reply(
            status, "application/json; charset=utf-8", (_Piece(0, _json_body(obj)),), False
        )

    def _route(self, method: str, path: str, body: dict[str, Any]) -> _Reply:
        routes: dict[tuple[str, str], Callable[[dict[str, Any]], _Reply]] = {
            ("GET", "/api/tags"): lambda _: self._json_reply(
                200, {"models": [m.tags_entry() for m in self.models]}
            ),
            ("GET", "/api/version"): lambda _: self._json_reply(200, {"version": FAKE_VERSION}),
            ("GET", "/api/ps"): self._ps,
            ("POST", "/api/show"): self._show,
            ("POST", "/api/chat"): self._chat,
            ("POST", "/api/generate"): self._generate,
            ("POST", "/api/pull"): self._pull,
            ("POST", "/api/create"): self._create,
            ("POST", "/api/embed"): self._embed,
            ("POST", "/api/embeddings"): self._embeddings,
            ("POST", "/v1/chat/completions"): self._openai_chat,
            ("POST", "/v1/completions"): self._openai_completions,
            ("POST", "/v1/embeddings"): self._openai_embeddings,
            ("GET", "/v1/models"): self._openai_models,
            ("GET", "/_fake/stats"): lambda _: self._json_reply(200, self.stats()),
        }
        if method == "GET" and path == "/":
            return _Reply(
                200, "text/plain; charset=utf-8", (_Piece(0, b"Ollama is running"),), False
            )
        if method == "GET" and path.startswith("/v1/models/"):
            return self._openai_model(path.removeprefix("/v1/models/"))
        handler = routes.get((method, path))
        if handler is not None:
            return handler(body)
        if any(p == path for _, p in routes):
            return _Reply(405, "text/plain", (_Piece(0, b"405 method not allowed"),), False)
        return _Reply(404, "text/plain", (_Piece(0, b"404 page not found"),), False)

    def _ps(self, _: dict[str, Any]) -> _Reply:
        expires = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ"
        )
        loaded = [
            {**m.tags_entry(), "expires_at": expires, "size_vram": m.size} for m in self.models[:1]
        ]
        for entry in loaded:
            entry.pop("modified_at", None)
        return self._json_reply(200, {"models": loaded})

    def _pull(self, body: dict[str, Any]) -> _Reply:
        name = body.get("model", body.get("name"))
        if not isinstance(name, str) or not name:
            raise _HTTPError(400, {"error": "model is required"})
        streaming = body.get("stream", True) is not False
        try:
            model = self.find_model(name)
        except _HTTPError:
            error = {"error": "pull model manifest: file does not exist"}
            if not streaming:
                raise _HTTPError(500, error) from None
            failing = (
                _Piece(0, _json_line({"status": "pulling manifest"})),
                _Piece(self.delay, _json_line(error)),
            )
            return _Reply(200, "application/x-ndjson", failing, True)
        digest = f"sha256:{model.digest}"
        steps = 4
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        lines += [
            {
                "status": f"pulling {model.digest[:12]}",
                "digest": digest,
                "total": model.size,
                "completed": model.size * i // steps,
            }
            for i in range(1, steps + 1)
        ]
        lines += [
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        if not streaming:
            whole = _json_body({"status": "success"})
            return _Reply(200, _JSON, (_Piece(self.delay * len(lines), whole),), False)
        pieces = tuple(_Piece(self.delay, _json_line(line)) for line in lines)
        return _Reply(200, "application/x-ndjson", pieces, True)

    def _create(self, body: dict[str, Any]) -> _Reply:
        """``/api/create`` from uploaded blobs (``files``: name -> digest), as Ollama's.

        Every digest must be a blob the fake took; the new model then answers like the
        others (its family is ``llama``).
        """
        name = body.get("model", body.get("name"))
        if not isinstance(name, str) or not name:
            raise _HTTPError(400, {"error": "model is required"})
        files = body.get("files")
        if not isinstance(files, dict) or not files:
            raise _HTTPError(400, {"error": "neither 'from' or 'files' was specified"})
        blobs = []
        for digest in files.values():
            blob = self.blobs.get(digest) if isinstance(digest, str) else None
            if blob is None:
                raise _HTTPError(400, {"error": f"blob {digest} not found"})
            blobs.append(blob)
        full = name if ":" in name else f"{name}:latest"
        joined = "".join(b.digest for b in blobs).encode()
        model = FakeModel(
            full,
            sum(b.size for b in blobs),
            hashlib.sha256(joined).hexdigest(),
            "llama",
            "1B",
            "F16",
        )
        self.models = (*(m for m in self.models if m.name != full), model)
        self._notify()
        lines: list[dict[str, Any]] = [{"status": "parsing GGUF"}]
        lines += [{"status": f"using existing layer {b.digest}"} for b in blobs]
        lines += [{"status": "writing manifest"}, {"status": "success"}]
        if body.get("stream", True) is False:
            return self._json_reply(200, {"status": "success"})
        pieces = tuple(_Piece(self.delay, _json_line(line)) for line in lines)
        return _Reply(200, "application/x-ndjson", pieces, True)

    def _embed(self, body: dict[str, Any]) -> _Reply:
        model = self.find_model(body.get("model"))
        given = body.get("input", "")
        inputs = given if isinstance(given, list) else [given]
        if not all(isinstance(i, str) for i in inputs):
            raise _HTTPError(400, {"error": "invalid input type"})
        return self._json_reply(
            200,
            {
                "model": model.name,
                "embeddings": [fake_embedding(i) for i in inputs],
                "total_duration": 1_500_000,
                "load_duration": 500_000,
                "prompt_eval_count": sum(max(1, len(i.split())) for i in inputs),
            },
        )

    def _embeddings(self, body: dict[str, Any]) -> _Reply:
        self.find_model(body.get("model"))
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise _HTTPError(400, {"error": "prompt must be a string"})
        return self._json_reply(200, {"embedding": fake_embedding(prompt)})

    def _show(self, body: dict[str, Any]) -> _Reply:
        model = self.find_model(body.get("model", body.get("name")))
        return self._json_reply(
            200,
            {
                "license": "fake",
                "modelfile": f"FROM {model.name}\n",
                "parameters": 'stop                           "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": model.details(),
                "model_info": {"general.architecture": model.family},
                "modified_at": model.modified_at,
            },
        )

    # ----- generation ------------------------------------------------------------------

    def _timings(self, prompt: str, count: int) -> dict[str, int]:
        eval_ns = max(1, int(count * self.delay * 1e9))
        prompt_ns, load_ns = 1_000_000, 500_000
        return {
            "total_duration": load_ns + prompt_ns + eval_ns,
            "load_duration": load_ns,
            "prompt_eval_count": max(1, len(prompt.split())),
            "prompt_eval_duration": prompt_ns,
            "eval_count": count,
            "eval_duration": eval_ns,
        }

    def _generation(
        self,
        tokens: list[str],
        streaming: bool,
        line: Callable[[str], dict[str, Any]],
        final: Callable[[str], dict[str, Any]],
        error_after: int | None = None,
    ) -> _Reply:
        if error_after is not None and error_after < len(tokens):
            if not streaming:
                raise _HTTPError(500, {"error": RUNNER_ERROR})
            pieces = [
                _Piece(self.delay, b"", 1, functools.partial(lambda t: _json_line(line(t)), t))
                for t in tokens[:error_after]
            ]
            pieces.append(_Piece(self.delay, _json_line({"error": RUNNER_ERROR})))
            return _Reply(200, "application/x-ndjson", tuple(pieces), True, True)
        if not streaming:
            whole = _json_body(final("".join(tokens)))
            piece = _Piece(self.delay * len(tokens), whole, len(tokens))
            return _Reply(200, "application/json; charset=utf-8", (piece,), False, True)
        pieces = [
            _Piece(self.delay, b"", 1, functools.partial(lambda t: _json_line(line(t)), t))
            for t in tokens
        ]
        pieces.append(_Piece(0, b"", 0, lambda: _json_line(final(""))))
        return _Reply(200, "application/x-ndjson", tuple(pieces), True, True)

    def _chat(self, body: dict[str, Any]) -> _Reply:
        model = self.find_model(body.get("model"))
        messages = body.get("messages") or []
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        prompt = str(users[-1].get("content", "")) if users else ""
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        tokens = make_tokens(
            prompt, _num_predict((options or {}).get("num_predict"), self.default_tokens)
        )
        timings = self._timings(prompt, len(tokens))

        def line(tok: str) -> dict[str, Any]:
            return {
                "model": model.name,
                "created_at": _now_iso(),
                "message": {"role": "assistant", "content": tok},
                "done": False,
            }

        def final(content: str) -> dict[str, Any]:
            return {
                **line(content),
                "done_reason": "stop",
                "done": True,
                **timings,
            }

        error_after = _error_after((options or {}).get("fake_error_after"))
        streaming = body.get("stream", True) is not False
        return self._generation(tokens, streaming, line, final, error_after)

    def _generate(self, body: dict[str, Any]) -> _Reply:
        model = self.find_model(body.get("model"))
        prompt = str(body.get("prompt", ""))
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        tokens = make_tokens(
            prompt, _num_predict((options or {}).get("num_predict"), self.default_tokens)
        )
        timings = self._timings(prompt, len(tokens))

        def line(tok: str) -> dict[str, Any]:
            return {"model": model.name, "created_at": _now_iso(), "response": tok, "done": False}

        def final(content: str) -> dict[str, Any]:
            return {
                **line(content),
                "done": True,
                "done_reason": "stop",
                "context": list(range(1, len(tokens) + 1)),
                **timings,
            }

        error_after = _error_after((options or {}).get("fake_error_after"))
        streaming = body.get("stream", True) is not False
        return self._generation(tokens, streaming, line, final, error_after)

    def _openai_model_for(self, name: Any) -> FakeModel:
        try:
            return self.find_model(name)
        except _HTTPError as exc:
            raise _HTTPError(exc.status, _openai_error(exc.body["error"])) from None

    def _openai_stream(
        self, tokens: list[str], chunk: Callable[[str, str | None], dict[str, Any]], body: Any
    ) -> _Reply:
        error_after = _error_after(body.get("fake_error_after"))
        if error_after is not None and error_after < len(tokens):
            pieces = [_Piece(self.delay, _sse(chunk(t, None)), 1) for t in tokens[:error_after]]
            pieces.append(_Piece(self.delay, _sse(_openai_error(RUNNER_ERROR))))
            return _Reply(200, "text/event-stream", tuple(pieces), True, True)
        pieces = [_Piece(self.delay, _sse(chunk(t, None)), 1) for t in tokens]
        pieces.append(_Piece(0, _sse(chunk("", "stop")) + _sse("[DONE]")))
        return _Reply(200, "text/event-stream", tuple(pieces), True, True)

    def _openai_chat(self, body: dict[str, Any]) -> _Reply:
        model = self._openai_model_for(body.get("model"))
        messages = body.get("messages") or []
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        prompt = str(users[-1].get("content", "")) if users else ""
        tokens = make_tokens(prompt, _num_predict(body.get("max_tokens"), self.default_tokens))
        created = int(time.time())
        cid = f"chatcmpl-{len(self.requests)}"
        base = {
            "id": cid,
            "created": created,
            "model": model.name,
            "system_fingerprint": "fp_ollama",
        }

        def chunk(content: str, finish: str | None) -> dict[str, Any]:
            return {
                **base,
                "object": "chat.completion.chunk",
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": content},
                        "finish_reason": finish,
                    }
                ],
            }

        if body.get("stream") is True:
            return self._openai_stream(tokens, chunk, body)
        whole = {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(tokens)},
                    "finish_reason": "stop",
                }
            ],
            "usage": _openai_usage(prompt, tokens),
        }
        piece = _Piece(self.delay * len(tokens), _json_body(whole), len(tokens))
        return _Reply(200, "application/json", (piece,), False, True)

    def _openai_completions(self, body: dict[str, Any]) -> _Reply:
        model = self._openai_model_for(body.get("model"))
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            prompt = " ".join(str(p) for p in prompt)
        prompt = str(prompt)
        tokens = make_tokens(prompt, _num_predict(body.get("max_tokens"), self.default_tokens))
        base = {
            "id": f"cmpl-{len(self.requests)}",
            "created": int(time.time()),
            "model": model.name,
            "system_fingerprint": "fp_ollama",
            "object": "text_completion",
        }

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {**base, "choices": [{"text": text, "index": 0, "finish_reason": finish}]}

        if body.get("stream") is True:
            return self._openai_stream(tokens, chunk, body)
        whole = {
            **chunk("".join(tokens), "stop"),
            "usage": _openai_usage(prompt, tokens),
        }
        piece = _Piece(self.delay * len(tokens), _json_body(whole), len(tokens))
        return _Reply(200, "application/json", (piece,), False, True)

    def _openai_embeddings(self, body: dict[str, Any]) -> _Reply:
        model = self._openai_model_for(body.get("model"))
        given = body.get("input", "")
        inputs = given if isinstance(given, list) else [given]
        if not inputs or not all(isinstance(i, str) for i in inputs):
            raise _HTTPError(400, _openai_error("invalid input type"))
        count = sum(max(1, len(i.split())) for i in inputs)
        data = [
            {"object": "embedding", "embedding": fake_embedding(text), "index": i}
            for i, text in enumerate(inputs)
        ]
        return self._json_reply(
            200,
            {
                "object": "list",
                "data": data,
                "model": model.name,
                "usage": {"prompt_tokens": count, "total_tokens": count},
            },
        )

    def _openai_models(self, _: dict[str, Any]) -> _Reply:
        created = int(time.time())
        data = [
            {"id": m.name, "object": "model", "created": created, "owned_by": "library"}
            for m in self.models
        ]
        return self._json_reply(200, {"object": "list", "data": data})

    def _openai_model(self, name: str) -> _Reply:
        model = self._openai_model_for(name)
        return self._json_reply(
            200,
            {
                "id": model.name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "library",
            },
        )

    # ----- response writing ------------------------------------------------------------

    async def _send_reply(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        reply: _Reply,
        path: str,
        model: str | None,
    ) -> None:
        headers = [("Content-Type", reply.content_type), ("Date", _http_date())]
        if not reply.streaming:
            length = sum(len(p.data) for p in reply.pieces)
            headers.append(("Content-Length", str(length)))
        sent_tokens = 0
        finished = False
        # A watcher reads the socket while the response is written, so a client that
        # goes away is seen at once, even between two slow tokens.
        disconnected = False
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal disconnected
                try:
                    while data := await stream.receive_some(_RECEIVE):
                        conn.receive_data(bytes(data))  # a pipelined request: kept for later
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                disconnected = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                await stream.send_all(
                    conn.send(h11.Response(status_code=reply.status, headers=headers))
                )
                for piece in reply.pieces:
                    if piece.wait:
                        await trio.sleep(piece.wait)
                    await stream.send_all(conn.send(h11.Data(data=piece.bytes_now())))
                    sent_tokens += piece.tokens
                # The final line is out: the generation counts as completed even if the
                # client leaves before the end of the chunked body.
                finished = True
                await stream.send_all(conn.send(h11.EndOfMessage()))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                disconnected = True
            nursery.cancel_scope.cancel()
        if reply.generation:
            if finished:
                self.completed += 1
            else:
                self.cancelled.append(CancelledRequest(path, model, sent_tokens))
            self._notify()
        if disconnected or conn.our_state is not h11.DONE:
            raise trio.BrokenResourceError("client went away")


def _openai_error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "api_error", "param": None, "code": None}}


def _json_body(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _http_date() -> str:
    return dt.datetime.now(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


async def serve_fake_ollama(
    host: str,
    port: int,
    *,
    delay: float = 0.02,
    models: tuple[FakeModel, ...] = DEFAULT_MODELS,
    default_tokens: int = DEFAULT_NUM_PREDICT,
    task_status: trio.TaskStatus[FakeOllama] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the fake Ollama on ``host:port`` (0: a free port) until cancelled.

    ``task_status.started()`` gets the :class:`FakeOllama`, whose ``port`` is the real one.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound: int = listeners[0].socket.getsockname()[1]
    fake = FakeOllama(
        host=host, port=bound, delay=delay, models=models, default_tokens=default_tokens
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, fake.handle_connection, listeners)
        task_status.started(fake)


def run_fake_ollama(host: str, port: int, *, delay: float) -> None:
    """Serve a fake Ollama until Ctrl-C or SIGTERM (the entry point of ``c2l fake-ollama``).

    Raises :class:`OSError` when it cannot listen on ``host:port``.
    """

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                fake: FakeOllama = await nursery.start(
                    functools.partial(serve_fake_ollama, host, port, delay=delay)
                )
                print(f"fake Ollama listening on {fake.url}", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except* OSError as group:
        exc: BaseException = group
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        raise exc from None
