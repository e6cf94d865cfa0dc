"""What may reach the local Ollama: the path allow-list and the request headers (sans-IO).

The bridge (:mod:`desktop._agent`) and the direct endpoint (:mod:`desktop._direct`) both
forward requests to Ollama; both go through these checks, so the two routes admit exactly
the same paths and send exactly the same headers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final
from urllib.parse import unquote, urlsplit

import wire

#: The only paths the agent forwards: Ollama's native API and its OpenAI-compatible API.
ALLOWED_PATH_PREFIXES: Final = ("/api/", "/v1/")


class BadPath(ValueError):
    """A tunnelled request's path that the agent will not send to Ollama."""


def safe_path(path: str) -> str:
    """``path`` if it is a plain Ollama API path (with an optional query), else BadPath.

    The request comes from the network, so it may try to reach something other than the
    configured Ollama: an absolute or scheme-relative URL (another host), ``..`` or ``.``
    segments (also percent-encoded), backslashes, control characters, or any path outside
    ``/api/*`` and ``/v1/*``. All of those are refused.
    """
    if not path.startswith("/") or path.startswith("//"):
        raise BadPath(f"path {path[:60]!r} must be a path such as /api/chat, not a URL")
    if "#" in path:
        raise BadPath("a path may not have a fragment")
    route = path.split("?", 1)[0]
    decoded = route
    for _ in range(3):  # double encoding (%252e) is decoded too
        decoded = unquote(decoded)
    if "://" in decoded or "\\" in decoded or any(c < " " or c == "\x7f" for c in decoded):
        raise BadPath(f"path {route[:60]!r} holds a URL, a backslash or control characters")
    if any(seg in (".", "..") for seg in decoded.split("/")):
        raise BadPath(f"path {route[:60]!r} has '.' or '..' segments")
    if not decoded.startswith(ALLOWED_PATH_PREFIXES):
        raise BadPath(
            f"path {route[:60]!r} is outside Ollama's API: only /api/* and /v1/* are forwarded"
        )
    return path


def ollama_url(base: str, path: str) -> str:
    """The URL of ``path`` on the Ollama at ``base``; BadPath if it would leave that host."""
    url = base + safe_path(path)
    want, got = urlsplit(base), urlsplit(url)
    if (got.scheme, got.netloc) != (want.scheme, want.netloc) or not got.path.startswith(want.path):
        raise BadPath(f"path {path[:60]!r} would leave {base}")
    return url


def ollama_request_headers(
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
) -> dict[str, str]:
    """The request headers sent to Ollama: :func:`wire.request_headers`, and ``Host: localhost``."""
    out = wire.request_headers(headers)
    # Ollama refuses other Host values on loopback (DNS rebinding protection).
    out["host"] = "localhost"
    return out
