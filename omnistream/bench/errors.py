"""Error bookkeeping shared by avatar and TTS runs.

A benchmark against a broken server must still finish and say what went wrong, so every
failure becomes a counted *kind* plus the first few messages verbatim, never an
exception that ends the run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

FIRST_MESSAGES = 5
"""How many messages of each log are kept verbatim (the counts are always complete)."""


@dataclass
class ErrorLog:
    """Counts of error kinds and the first messages, in order of occurrence."""

    counts: Counter[str] = field(default_factory=Counter)
    first: list[str] = field(default_factory=list)
    keep: int = FIRST_MESSAGES

    def add(self, kind: str, message: str) -> None:
        """Record one error of ``kind`` (``connect``, ``server_error``, ``malformed_vidx`` …)."""
        self.counts[kind] += 1
        if len(self.first) < self.keep:
            self.first.append(f"{kind}: {message}"[:300])

    @property
    def total(self) -> int:
        """Number of errors recorded."""
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"total", "by_kind", "first_messages"}``."""
        return {"total": self.total, "by_kind": dict(self.counts), "first_messages": self.first}

    @classmethod
    def merged(cls, logs: Iterable[ErrorLog], keep: int = 2 * FIRST_MESSAGES) -> ErrorLog:
        """One log summing ``logs``, keeping the first messages of each in turn."""
        out = cls(keep=keep)
        for log in logs:
            out.counts.update(log.counts)
            for message in log.first:
                if len(out.first) < keep and message not in out.first:
                    out.first.append(message)
        return out
