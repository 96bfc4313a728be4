"""The session manager: admission control, the live-session table, idle expiry.

Capacity is admitted, not hoped for (house rule 6): a new realtime session is refused
with :class:`CapacityExceeded` when the static ``max_sessions`` cap is reached, or when the
measured CPU (or device) cost of the sessions already live plus the new one would exceed
the target utilisation. Refusing one client is better than letting every live one fall behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from omnistream.engine.capacity import CapacityPlanner
from omnistream.metrics import Metrics

log = logging.getLogger(__name__)

#: How often the capacity planner compares process CPU with its meters.
CALIBRATE_INTERVAL_S = 1.0


class CapacityExceeded(Exception):
    """No room for another realtime session; retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ManagedSession(Protocol):
    """What the manager needs from any realtime session."""

    id: str
    kind: str
    last_activity: float

    @property
    def units_per_second(self) -> float:
        """Work units (frames, samples…) the session needs per second of real time."""

    @property
    def capacity_stages(self) -> list[str]:
        """Capacity meters that price this session's units."""

    async def expire(self, reason: str) -> None:
        """Close the session because the server decided so (idle, shutdown)."""


class SessionManager:
    """Tracks every live realtime session and decides who may start one."""

    def __init__(
        self,
        planner: CapacityPlanner,
        metrics: Metrics,
        *,
        max_sessions: int,
        idle_timeout_s: float,
    ) -> None:
        self.planner = planner
        self.metrics = metrics
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._live: dict[str, ManagedSession] = {}
        self._reaper: asyncio.Task[None] | None = None
        #: Live sessions allowed per model id (a Runtime Profile's ``concurrency``).
        self.model_limits: dict[str, int] = {}

    def admit(self, session: ManagedSession) -> None:
        """Register a session, or raise :class:`CapacityExceeded` without registering it."""
        model_id = getattr(session, "model_id", None)
        limit = self.model_limits.get(model_id) if isinstance(model_id, str) else None
        if limit is not None and self.live_for_model(model_id) >= limit:
            self.metrics.sessions_refused.labels(session.kind, "model_concurrency").inc()
            raise CapacityExceeded(
                f"Model '{model_id}' is at its limit of {limit} concurrent session(s) "
                "(the Runtime Profile's concurrency)."
            )
        if len(self._live) >= self.max_sessions:
            self.metrics.sessions_refused.labels(session.kind, "max_sessions").inc()
            raise CapacityExceeded(f"Server is at its limit of {self.max_sessions} live sessions.")
        # Every live session, whatever its kind, is priced by the meters of its own
        # pipeline, in CPU cores and in device time; each resource's sum must stay inside
        # its budget. A pipeline not measured yet is admitted (the static cap still
        # applies), so a cold server never refuses.
        new = self.planner.demands(session.capacity_stages, session.units_per_second)
        if new is not None:
            load = self.load()
            for resource, need in sorted(new.items()):
                live = load.get(resource, 0.0)
                budget = self.planner.budget(resource)
                if live + need > budget:
                    self.metrics.sessions_refused.labels(session.kind, "capacity").inc()
                    unit = "cores" if resource == "cpu" else f"of the {resource} device's time"
                    raise CapacityExceeded(
                        "Server is at measured capacity: another session would push live "
                        f"sessions past real time ({live:.2f} of {budget:.2f} {unit} in use, "
                        f"this session needs {need:.2f})."
                    )
        self._live[session.id] = session
        self.metrics.sessions_total.labels(session.kind).inc()
        self.metrics.live_sessions.labels(session.kind).inc()

    def live_for_model(self, model_id: str | None) -> int:
        """Live sessions (of any kind) on one model."""
        return sum(1 for s in self._live.values() if getattr(s, "model_id", None) == model_id)

    def load(self) -> dict[str, float]:
        """What the live sessions use of each resource together (unmeasured ones count 0)."""
        total: dict[str, float] = {}
        for live in self._live.values():
            demands = self.planner.demands(live.capacity_stages, live.units_per_second) or {}
            for resource, amount in demands.items():
                total[resource] = total.get(resource, 0.0) + amount
        return total

    def load_cores(self) -> float:
        """Measured CPU cores the live sessions use together (unmeasured ones count 0)."""
        return self.load().get("cpu", 0.0)

    def admit_unchecked(self, session: ManagedSession) -> None:
        """Register a session whose slot was already admitted (swapping a placeholder)."""
        self._live[session.id] = session
        self.metrics.live_sessions.labels(session.kind).inc()

    def release(self, session: ManagedSession) -> None:
        """Forget a session; idempotent so every close path may call it."""
        if self._live.pop(session.id, None) is not None:
            self.metrics.live_sessions.labels(session.kind).dec()

    def get(self, session_id: str) -> ManagedSession | None:
        """A live session by id."""
        return self._live.get(session_id)

    def live(self, kind: str | None = None) -> list[ManagedSession]:
        """Live sessions, optionally of one kind."""
        return [s for s in self._live.values() if kind is None or s.kind == kind]

    def start(self) -> None:
        """Start the idle reaper (call from the running loop)."""
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap(), name="session-reaper")

    async def aclose(self) -> None:
        """Stop the reaper and expire every live session (server shutdown)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for session in list(self._live.values()):
            with contextlib.suppress(Exception):
                await session.expire("server shutting down")
            self.release(session)

    async def _reap(self) -> None:
        interval = max(0.5, min(5.0, self.idle_timeout_s / 4))
        next_reap = time.monotonic() + interval
        while True:
            await asyncio.sleep(CALIBRATE_INTERVAL_S)
            # What the meters miss (framing, sends, the loop) is priced in as well.
            self.planner.calibrate()
            now = time.monotonic()
            if now < next_reap:
                continue
            next_reap = now + interval
            for session in list(self._live.values()):
                if now - session.last_activity > self.idle_timeout_s:
                    log.info("session %s idle for %.0fs: closing", session.id, self.idle_timeout_s)
                    try:
                        await session.expire("idle timeout")
                    except Exception:
                        log.exception("expiring session %s failed", session.id)
                    self.release(session)
