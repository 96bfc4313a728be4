"""Per-key quotas: a token bucket for request rate and a counter of live sessions.

Both live on the event loop only (no locks): every caller is a coroutine of this process.
They are keyed by the key's name, so a reloaded key file keeps counting where it was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token buckets: ``rpm`` requests a minute sustained, a burst of up to ``rpm``.

    A full minute's allowance as the burst matches what "N requests per minute" means to
    a caller that sends them all at once, and refills continuously at ``rpm / 60``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, name: str, rpm: float) -> float:
        """Take one token for ``name``.

        Returns:
            0.0 when allowed, else the seconds until a token is due (for Retry-After).
        """
        now = self._clock()
        capacity = max(1.0, rpm)
        rate = rpm / 60.0
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _Bucket(capacity, now)
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds; never advertise 0 for a refusal."""
    return str(max(1, math.ceil(seconds)))


class SessionCounter:
    """Live sessions per key name (avatar, WebRTC, TTS WebSocket, realtime)."""

    def __init__(self) -> None:
        self._live: dict[str, int] = {}

    def live(self, name: str) -> int:
        """Sessions ``name`` holds now."""
        return self._live.get(name, 0)

    def try_acquire(self, name: str, limit: int | None) -> bool:
        """Count one more session for ``name`` unless it already holds ``limit``."""
        current = self._live.get(name, 0)
        if limit is not None and current >= limit:
            return False
        self._live[name] = current + 1
        return True

    def release(self, name: str) -> None:
        """One of ``name``'s sessions ended."""
        current = self._live.get(name, 0) - 1
        if current > 0:
            self._live[name] = current
        else:
            self._live.pop(name, None)
