"""The gateway's limits: sizes of requests, and the token buckets that pace users.

:class:`TokenBucket` is sans-IO: it is given the time and answers how long to wait, and the
caller decides whether to wait (the per-user frame budget) or to refuse (the session
creation budget). Tests drive it on trio's MockClock.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio
from quart import request

from ._errors import ApiError

#: Largest HTTP request body accepted (413 beyond).
MAX_BODY_BYTES = 1024 * 1024
#: Most request headers, and the longest header (name + value), of an HTTP request or
#: WebSocket upgrade; Hypercorn caps the whole head at ``MAX_HEAD_BYTES`` before that.
MAX_REQUEST_HEADERS = 100
MAX_HEADER_BYTES = 8 * 1024
MAX_HEAD_BYTES = 64 * 1024
#: New sessions a user may start: a burst of ``SESSION_CREATE_BURST``, refilled at one per
#: ``SESSION_CREATE_PERIOD_S`` seconds (a token bucket). Returning the live session is free.
SESSION_CREATE_BURST = 10
SESSION_CREATE_PERIOD_S = 6.0
#: Frames per second read from one user's connections together (all sides, HTTP requests
#: included), and the burst above that rate (about 1,000 streamed chunks a second per user
#: leaves room for the others; a flood of tens of thousands is read at this pace).
USER_FRAME_RATE = 2000.0
USER_FRAME_BURST = 2000.0


@attrs.define(weakref_slot=True)
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up (sans-IO: the caller waits).

    :meth:`take` always spends, and may go into debt, so that callers sharing a bucket
    queue up behind each other; :meth:`try_take` spends only a whole token that is there.
    """

    rate: float
    burst: float
    tokens: float = attrs.field()
    stamp: float = attrs.field(factory=trio.current_time)

    @tokens.default
    def _full(self) -> float:
        return self.burst

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float) -> float:
        """Spend one token at trio time ``now``; the seconds to wait before going on."""
        self._refill(now)
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def try_take(self, now: float) -> float:
        """Spend one token if there is one (0.0); else spend nothing and say how long
        until there is one."""
        self._refill(now)
        if self.tokens < 1:
            return (1 - self.tokens) / self.rate
        self.tokens -= 1
        return 0.0

    def is_full(self, now: float) -> bool:
        """True when the bucket is full again at ``now`` (its state can be forgotten)."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


def check_header_limits(headers: Any) -> None:
    """Raise ApiError 431 when a request has too many headers or one that is too long."""
    items = list(headers.items())  # werkzeug Headers: every pair, repeats included
    if len(items) > MAX_REQUEST_HEADERS:
        raise ApiError(431, "headers_too_large", f"more than {MAX_REQUEST_HEADERS} request headers")
    for name, value in items:
        if len(name) + len(value) > MAX_HEADER_BYTES:
            raise ApiError(
                431,
                "headers_too_large",
                f"header {name[:40]!r} is over {MAX_HEADER_BYTES} bytes",
            )


async def check_request_limits() -> None:
    """``before_request`` hook: header limits, and a declared body over the limit (413)."""
    check_header_limits(request.headers)
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"request body over {MAX_BODY_BYTES} bytes")
