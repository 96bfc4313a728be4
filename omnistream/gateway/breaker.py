"""A circuit breaker per provider, and the provider's own rate-limit window.

A provider that keeps failing (connection errors, timeouts, 5xx) is not called again
until a cool-down passes: requests fail over to the next target of their combo at once,
or get ``503 circuit_open`` without waiting on a dead upstream. After the cool-down one
probe request goes through (half-open); its success closes the circuit, its failure
opens it for another cool-down. A 429 is not a fault of the provider: it sets a
"limited until" time from the upstream's ``Retry-After`` instead of counting as failure.

Everything runs on the event loop, so no locks are needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    """``closed`` passes calls, ``open`` refuses them, ``half_open`` lets one probe by."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures of one provider and opens after ``failure_threshold``.

    Args:
        failure_threshold: consecutive failures that open the circuit.
        cooldown_s: how long an open circuit refuses calls before a probe.
        clock: monotonic seconds (a parameter so the logic is testable without sleeping).
    """

    def __init__(
        self, failure_threshold: int = 5, cooldown_s: float = 30.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.cooldown_s = cooldown_s
        self._clock = clock or time.monotonic
        self.failures = 0
        self.opened_at: float | None = None
        self._probing = False
        self.limited_until = 0.0

    @property
    def state(self) -> BreakerState:
        """The state now (an open circuit past its cool-down reads as half-open)."""
        if self.opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self.opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when it would now)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - self._clock())

    def try_acquire(self) -> bool:
        """Whether a call may go to the provider now; a half-open circuit admits one probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._probing:
            return False
        self._probing = True
        return True

    def release_probe(self) -> None:
        """A probe ended without a verdict (the caller went away): let another one try."""
        self._probing = False

    def record_success(self) -> None:
        """A call worked: the circuit closes and the failure count restarts."""
        self.failures = 0
        self.opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        """A call failed; the threshold-th consecutive failure (or a failed probe) opens."""
        self.failures += 1
        if self._probing or self.failures >= self.failure_threshold:
            self.opened_at = self._clock()
        self._probing = False

    # -- rate limits ---------------------------------------------------------------------

    def record_rate_limit(self, retry_after: float | None) -> None:
        """The upstream said 429: skip it until its ``Retry-After`` (1 s when it gave none)."""
        wait = 1.0 if retry_after is None else min(max(retry_after, 0.0), 3600.0)
        self.limited_until = max(self.limited_until, self._clock() + wait)
        self._probing = False

    def limited_for(self) -> float:
        """Seconds this provider is still rate limited (0 when it is not)."""
        return max(0.0, self.limited_until - self._clock())
