"""Retry delays: capped exponential backoff, with or without full jitter (sans-IO).

One implementation for every retry loop in the project (the desktop agent's reconnects, the
orchestrator's container exit watch, the janitor's removals, the leftover sweep's listing).
Nothing here sleeps or reads a clock: the caller asks for the next delay and sleeps it, and
reports how long a connection lasted, so the schedule is tested on trio's MockClock or with
no clock at all.
"""

from __future__ import annotations

import random

import attrs

#: Exponents past this are clamped: ``factor ** attempt`` overflows after a long outage.
_MAX_EXPONENT = 64


@attrs.frozen
class BackoffPolicy:
    """Delays exponential from ``base`` by ``factor``, capped at ``cap``.

    With ``jitter`` (the default, for clients that many hosts run at once) each delay is
    drawn uniformly from ``[0, ceiling]`` ("full jitter"), so a restarted server is not hit
    by every client in the same instant; without it the delay is the ceiling itself. The
    attempt count resets after a connection that stayed up ``reset_after`` seconds.
    """

    base: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    reset_after: float = 30.0
    jitter: bool = True

    def ceiling(self, attempt: int) -> float:
        """The longest delay after ``attempt`` earlier failures (0 for the first retry)."""
        exponent = min(max(attempt, 0), _MAX_EXPONENT)
        return float(min(self.cap, self.base * self.factor**exponent))


@attrs.define
class Backoff:
    """The retry state of one loop under a :class:`BackoffPolicy` (the caller sleeps)."""

    policy: BackoffPolicy = attrs.field(factory=BackoffPolicy)
    rng: random.Random = attrs.field(factory=random.Random)
    attempt: int = 0

    def ceiling(self) -> float:
        """Upper bound of the next delay."""
        return self.policy.ceiling(self.attempt)

    def next_delay(self) -> float:
        """The next delay (jittered if the policy says so), then one more attempt."""
        ceiling = self.ceiling()
        delay = self.rng.uniform(0.0, ceiling) if self.policy.jitter else ceiling
        self.attempt += 1
        return delay

    def connection_lasted(self, seconds: float) -> None:
        """Report how long the last connection stayed up; a long one resets the backoff."""
        if seconds >= self.policy.reset_after:
            self.reset()

    def reset(self) -> None:
        """Start over from ``base`` (the next delay is the first step again)."""
        self.attempt = 0
