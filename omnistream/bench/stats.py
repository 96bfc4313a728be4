"""Order statistics used by every report.

Percentiles use linear interpolation between closest ranks (numpy's default), so
p50 ≤ p95 ≤ p99 ≤ max always holds and a report can be checked for consistency.
Empty inputs give ``None`` rather than 0, because "no data" and "zero latency" must not
look alike in a report.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0–100) of ``values``, or None when there are none."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        return None
    return float(np.percentile(data, q))


def describe(values: Iterable[float], digits: int = 2) -> dict[str, Any]:
    """count, mean, p50, p95, p99, max and min of ``values`` (None fields when empty)."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        return {
            "count": 0,
            "mean": None,
            "min": None,
            "p50": None,
            "p95": None,
            "p99": None,
            "max": None,
        }
    p50, p95, p99 = (float(v) for v in np.percentile(data, [50, 95, 99]))
    return {
        "count": int(data.size),
        "mean": round(float(data.mean()), digits),
        "min": round(float(data.min()), digits),
        "p50": round(p50, digits),
        "p95": round(p95, digits),
        "p99": round(p99, digits),
        "max": round(float(data.max()), digits),
    }


CLIENT_SLIP_FRACTION = 0.05
"""Share of a client's timing samples that may exceed its bound before it is 'behind'."""


def client_slipped(values: Iterable[float], bound: float) -> tuple[bool, int, int]:
    """Whether a client's timing samples say it fell behind.

    One preempted wake-up on a shared machine does not invalidate a run (latency is
    measured from the actual send), but a client that is late again and again does:
    behind means at least two samples, and more than 5 % of them, over ``bound``.

    Returns:
        ``(behind, samples over the bound, samples)``.
    """
    data = list(values)
    over = sum(1 for v in data if v > bound)
    return over >= 2 and over > CLIENT_SLIP_FRACTION * len(data), over, len(data)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the divisor is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)
