"""Which HTTP headers cross the tunnel, and the media types of streamed bodies (sans-IO).

The gateway's ``/api/ollama`` tunnel and the desktop agent both filter headers: requests on
their way to Ollama, responses on their way back. Both use these functions, so the two ends
agree on what never crosses (:data:`UNFORWARDED_REQUEST_HEADERS`,
:data:`UNFORWARDED_RESPONSE_HEADERS`). Standard library only: the proxy image ships ``wire``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, TypeAlias

from ._messages import UNFORWARDED_REQUEST_HEADERS, UNFORWARDED_RESPONSE_HEADERS

#: Headers given as a mapping or as (name, value) pairs (which may repeat a name).
Headers: TypeAlias = Mapping[str, str] | Iterable[tuple[str, str]]

#: Request headers about the client's connection to the gateway (and whatever reverse
#: proxy is in front of it): not the desktop's business, so they never cross either.
FORWARDING_REQUEST_HEADERS: Final = frozenset(
    {
        "expect",
        "remote-addr",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
    }
)

#: Request headers named ``x-c2l-*`` are the gateway's own and never cross.
RESERVED_HEADER_PREFIX: Final = "x-c2l-"

#: Response headers the gateway's HTTP server sets itself for the HTTP client.
SERVER_RESPONSE_HEADERS: Final = frozenset({"date", "server"})

#: Bodies of one JSON object per line (Ollama's native streams).
NDJSON_MEDIA_TYPES: Final = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl"}
)
#: Bodies of server-sent events (Ollama's OpenAI-compatible streams).
SSE_MEDIA_TYPE: Final = "text/event-stream"
#: Bodies that arrive piece by piece and must not be buffered on the way.
STREAMING_MEDIA_TYPES: Final = NDJSON_MEDIA_TYPES | {SSE_MEDIA_TYPE}

_DROPPED_REQUEST_HEADERS: Final = UNFORWARDED_REQUEST_HEADERS | FORWARDING_REQUEST_HEADERS
_DROPPED_HTTP_RESPONSE_HEADERS: Final = UNFORWARDED_RESPONSE_HEADERS | SERVER_RESPONSE_HEADERS


def _pairs(headers: Headers) -> Iterable[tuple[str, str]]:
    return headers.items() if isinstance(headers, Mapping) else headers


def _merge(headers: Headers, drop: frozenset[str], drop_prefix: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in _pairs(headers):
        name = key.lower()
        if name in drop or (drop_prefix is not None and name.startswith(drop_prefix)):
            continue
        # A repeated header is one comma-separated list (RFC 9110 section 5.3).
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def request_headers(headers: Headers) -> dict[str, str]:
    """The request headers that travel to the desktop's Ollama, with lower-case names.

    Drops the gateway's credentials and the framing of the client's own connection
    (:data:`UNFORWARDED_REQUEST_HEADERS`), what describes that connection
    (:data:`FORWARDING_REQUEST_HEADERS`) and the gateway's own ``x-c2l-*`` headers; a
    repeated name becomes one comma-separated value.
    """
    return _merge(headers, _DROPPED_REQUEST_HEADERS, RESERVED_HEADER_PREFIX)


def response_headers(headers: Headers) -> dict[str, str]:
    """Ollama's response headers that travel back in ``response_start``, lower-case names.

    Drops the framing of Ollama's own connection and its cookies
    (:data:`UNFORWARDED_RESPONSE_HEADERS`); a repeated name becomes one value.
    """
    return _merge(headers, UNFORWARDED_RESPONSE_HEADERS, None)


def http_response_headers(headers: Headers) -> dict[str, str]:
    """The headers of a ``response_start`` that reach an HTTP client of the gateway.

    As :func:`response_headers`, less the ones the gateway's HTTP server sets itself
    (:data:`SERVER_RESPONSE_HEADERS`); a streamed body (:data:`STREAMING_MEDIA_TYPES`) also
    gets ``cache-control: no-cache`` (unless it has one) and ``x-accel-buffering: no``, so
    that a reverse proxy in front of the gateway does not buffer a token stream.
    """
    out = _merge(headers, _DROPPED_HTTP_RESPONSE_HEADERS, None)
    if media_type(out.get("content-type", "")) in STREAMING_MEDIA_TYPES:
        out.setdefault("cache-control", "no-cache")
        out["x-accel-buffering"] = "no"
    return out


def media_type(content_type: str) -> str:
    """The media type of a ``Content-Type`` value, lower-case, without its parameters."""
    return content_type.split(";", 1)[0].strip().lower()


def media_type_of(headers: Headers) -> str:
    """The media type of the ``Content-Type`` among ``headers`` (any case); "" if none."""
    for key, value in _pairs(headers):
        if key.lower() == "content-type":
            return media_type(value)
    return ""


def is_json_media(kind: str) -> bool:
    """Whether media type ``kind`` (see :func:`media_type`) is JSON or NDJSON."""
    return kind == "application/json" or kind.endswith("+json") or kind in NDJSON_MEDIA_TYPES


def is_text_media(kind: str) -> bool:
    """Whether a body of media type ``kind`` travels as text (``chunk.data``).

    JSON, NDJSON, SSE and ``text/*`` do; so does a body without a type (Ollama's bodies
    all have one, and that keeps older peers' behaviour). Anything else (a blob, an
    image) goes as bytes in ``chunk.dataBase64``, byte for byte.
    """
    return not kind or kind.startswith("text/") or is_json_media(kind)
