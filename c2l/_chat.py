"""``c2l chat``: a streamed chat in the terminal through the fallback hierarchy.

Each answer goes through the first route of :func:`c2l.routes.routes` that answers; a
route that fails before its first token (no connection, HTTP 5xx, an error line, or no
line within the first-token timeout) hands over to the next one. Once a token has been
printed an error ends the answer: trying elsewhere would start the generation again. The
route that answered is said on stderr, the tokens go to stdout as they arrive.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Any, Final, TextIO

import attrs
import httpx
import trio

from .routes import DEFAULT_OLLAMA_URL, PROBE_TIMEOUT_S, Route, routes

#: How long a route may take to send its first line before the next one is tried.
FIRST_TOKEN_TIMEOUT_S: Final = 60.0


class ChatError(Exception):
    """The answer could not be had (no route, or it broke after its first token)."""


class _NoAnswer(Exception):
    """A route failed before its first token: the next one may be tried."""


@attrs.frozen
class ChatOptions:
    """What ``c2l chat`` was asked to use."""

    gateway: str | None
    token: str | None = attrs.field(repr=False)
    model: str
    prefer_local: bool = False
    ollama_url: str | None = DEFAULT_OLLAMA_URL
    cache_path: Path | None = None
    probe_timeout: float = PROBE_TIMEOUT_S
    first_token_timeout: float = FIRST_TOKEN_TIMEOUT_S


def _error_line(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:200]
    if isinstance(data, dict):
        detail = data.get("message") or data.get("error")
        if isinstance(detail, dict):
            detail = detail.get("message")
        return str(detail or data)[:200]
    return str(data)[:200]


def _name(route: Route, response: httpx.Response) -> str:
    """How the answer came: the gateway says cloud or direct in ``X-C2L-Route``."""
    if route.level == "cloud":
        said = response.headers.get("X-C2L-Route", "").strip().lower()
        return said if said in ("cloud", "direct") else "cloud"
    return route.level


async def _stream(
    route: Route,
    options: ChatOptions,
    messages: list[dict[str, str]],
    out: TextIO,
    err: TextIO,
) -> str:
    """One answer from ``route``, printed as it comes; raises :class:`_NoAnswer` when it
    fails before its first token, :class:`ChatError` after."""
    body = {"model": options.model, "messages": messages, "stream": True}
    timeout = httpx.Timeout(options.first_token_timeout, connect=options.probe_timeout)
    answer: list[str] = []
    started = False
    try:
        async with (
            httpx.AsyncClient(timeout=timeout, trust_env=False) as client,
            client.stream(
                "POST", route.base_url + "/api/chat", json=body, headers=dict(route.headers)
            ) as response,
        ):
            if response.status_code >= 500:
                await response.aread()
                raise _NoAnswer(f"HTTP {response.status_code}: {_error_line(response)}")
            if response.status_code != 200:
                await response.aread()
                raise ChatError(
                    f"the {route.level} route ({route.base_url}) answered HTTP"
                    f" {response.status_code}: {_error_line(response)}"
                )
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                try:
                    obj: Any = json.loads(line)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    if not started:
                        raise _NoAnswer("not an Ollama answer")
                    raise ChatError("the answer broke off: a line that is not Ollama's JSON")
                if obj.get("error"):
                    if not started:
                        raise _NoAnswer(f"error: {obj['error']}")
                    raise ChatError(f"the answer broke off: {obj['error']}")
                if not started:
                    started = True
                    err.write(f"c2l chat: route {_name(route, response)} ({route.base_url})\n")
                    err.flush()
                message = obj.get("message")
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, str) and content:
                    answer.append(content)
                    out.write(content)
                    out.flush()
                if obj.get("done") is True:
                    out.write("\n")
                    out.flush()
                    return "".join(answer)
    except httpx.TimeoutException:
        if not started:
            raise _NoAnswer(f"no answer within {options.first_token_timeout:g} s") from None
        raise ChatError("the answer broke off: the route stopped sending") from None
    except httpx.HTTPError as exc:
        if not started:
            raise _NoAnswer(f"{type(exc).__name__} {exc}".rstrip()) from None
        raise ChatError(f"the answer broke off: {type(exc).__name__} {exc}".rstrip()) from None
    if not started:
        raise _NoAnswer("the answer ended before its first token")
    raise ChatError("the answer broke off before its end")


async def answer(
    options: ChatOptions,
    messages: list[dict[str, str]],
    out: TextIO,
    err: TextIO,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> str:
    """Stream one answer to ``messages`` through the first route that gives one."""
    tried: list[str] = []
    candidates = routes(
        options.gateway,
        options.token,
        prefer_local=options.prefer_local,
        ollama_url=options.ollama_url,
        cache_path=options.cache_path,
        probe_timeout=options.probe_timeout,
        transport=transport,
        tried=tried,
    )
    async with contextlib.aclosing(candidates):
        async for route in candidates:
            try:
                return await _stream(route, options, messages, out, err)
            except _NoAnswer as exc:
                note = f"{route.level} {route.base_url}: {exc}"
                tried.append(note)
                err.write(f"c2l chat: {note}; trying the next route\n")
                err.flush()
    raise ChatError("no route to your model answered: " + "; ".join(tried or ["nothing to try"]))


def _read_token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        path = Path(args.token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ChatError(f"cannot read --token-file {path}: {exc.strerror}") from None
        if not token:
            raise ChatError(f"--token-file {path} is empty: write your token there")
        return token
    token = (args.token or "").strip()
    return token or None


def cli_chat(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    """``c2l chat``: one message (``--message``) or an interactive loop on stdin."""
    token = _read_token(args)
    if args.gateway and not token:
        raise ChatError("--token is empty: pass your JWT (or --token-file)")
    options = ChatOptions(
        gateway=args.gateway,
        token=token,
        model=args.model,
        prefer_local=bool(args.prefer_local),
        ollama_url=args.ollama,
        first_token_timeout=args.first_token_timeout,
    )
    out, err = sys.stdout, sys.stderr
    if args.message is not None:
        messages = [{"role": "user", "content": args.message}]
        trio.run(functools.partial(answer, options, messages, out, err))
        return 0
    stdin = sys.stdin if stdin is None else stdin
    interactive = stdin.isatty()
    history: list[dict[str, str]] = []
    status = 0
    while True:
        if interactive:
            err.write("> ")
            err.flush()
        line = stdin.readline()
        if not line:
            return status
        text = line.strip()
        if not text:
            continue
        turn = [*history, {"role": "user", "content": text}]
        try:
            said = trio.run(functools.partial(answer, options, turn, out, err))
        except ChatError as exc:
            # The conversation goes on without this turn; the user may ask again.
            err.write(f"c2l chat: {exc}\n")
            err.flush()
            status = 1
            continue
        status = 0
        history = [*turn, {"role": "assistant", "content": said}]
