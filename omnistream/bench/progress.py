"""A live one-line progress display on stderr while a benchmark runs.

Runs take minutes under load; a silent terminal makes a hung server and a slow one look
the same. On a terminal the line is redrawn in place twice a second; when stderr is a
file or a pipe (CI logs) a plain line is written every few seconds instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TextIO


@dataclass
class Counters:
    """Live counts the workers update and the display reads (single event loop)."""

    sessions: int = 0
    started: int = 0
    planned: int = 0
    active: int = 0
    sent: int = 0
    received: int = 0
    late: int = 0
    errors: int = 0
    last_latency_ms: float | None = None


class Progress:
    """Renders :class:`Counters` on one line of stderr.

    Args:
        label: prefix of the line (``avatar N=8 [A]``).
        counters: what to show.
        total_s: expected run length, for the elapsed/total display.
        enabled: False makes every method a no-op (``--quiet``).
        stream: where to write (stderr by default).
    """

    REDRAW_S = 0.5
    PLAIN_EVERY_S = 5.0

    def __init__(
        self,
        label: str,
        counters: Counters,
        total_s: float,
        enabled: bool = True,
        stream: TextIO | None = None,
        unit: Callable[[Counters], str] | None = None,
    ) -> None:
        self.label = label
        self.counters = counters
        self.total_s = total_s
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.unit = unit
        self._start = time.monotonic()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self) -> str:
        """The current progress line."""
        c = self.counters
        elapsed = time.monotonic() - self._start
        last = "-" if c.last_latency_ms is None else f"{c.last_latency_ms:.0f}ms"
        body = (
            self.unit(c)
            if self.unit
            else f"sessions {c.active} live/{c.started} started/{c.sessions} chunks sent "
            f"{c.sent}/{c.planned} answered {c.received} late {c.late} err {c.errors} "
            f"last {last}"
        )
        clock = f"{elapsed:5.1f}/{self.total_s:.0f}s" if self.total_s else f"{elapsed:5.1f}s"
        return f"[bench {self.label}] {clock} {body}"

    def _write(self, final: bool = False) -> None:
        if self._tty:
            self.stream.write("\r\x1b[2K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Show the line while the body runs; write the final state at the end."""
        if not self.enabled:
            yield
            return
        self._start = time.monotonic()
        task = asyncio.create_task(self._loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._write(final=True)

    async def _loop(self) -> None:
        every = self.REDRAW_S if self._tty else self.PLAIN_EVERY_S
        while True:
            await asyncio.sleep(every)
            self._write()
