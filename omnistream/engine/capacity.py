"""Measured capacity, so that admission control refuses sessions before they fall behind.

Every stage that burns CPU for a session (rendering, JPEG encoding) records the thread CPU
seconds it spent per unit of work. The sum, times the units a session needs per second,
is that session's share of the machine; a new session is admitted only while the total
stays under ``cores × target_utilisation``.

An accelerator is a resource of its own: a GPU runner also records the seconds its device
is busy per unit (the runner's one thread keeps one batch at a time on it), and the
sessions on that device must stay under ``target_utilisation`` of its time. Each stage
belongs to one resource (``cpu`` unless its meter was created for a device), and a
session is admitted only if every resource it uses has room.

What no meter sees (building and sending WebSocket messages, thread hand-offs, the event
loop, the garbage collector) still costs CPU, and once rendering got cheap it became half
of a frame's cost. :meth:`CapacityPlanner.calibrate` compares the process's own CPU time
with what the meters recorded over the same window and scales CPU demands by that ratio,
so admission prices the whole server, not just its metered stages.
"""

from __future__ import annotations

import os
import threading
import time

#: Metered CPU seconds a calibration window needs before it updates the overhead.
OVERHEAD_MIN_METERED_S = 0.25
#: The overhead factor is held to [1, this]: unmetered work that is not the sessions'
#: (an offline job's own threads) must not shut live admission out.
MAX_OVERHEAD = 2.5
OVERHEAD_ALPHA = 0.3


class CapacityMeter:
    """An exponentially weighted average of CPU seconds per unit of work."""

    def __init__(self, alpha: float = 0.05, warmup: int = 2) -> None:
        self.alpha = alpha
        self.warmup = warmup  # first observations pay one-off costs (lazy init, caches)
        self._seen = 0
        self._per_unit: float | None = None
        self.cpu_seconds_total = 0.0  # every second recorded, warm-up included
        self._lock = threading.Lock()

    def record(self, cpu_seconds: float, units: float) -> None:
        """Add one observation (thread CPU seconds spent on ``units`` of work)."""
        if units <= 0:
            return
        sample = cpu_seconds / units
        with self._lock:
            self.cpu_seconds_total += cpu_seconds
            self._seen += 1
            if self._seen <= self.warmup:
                return
            if self._per_unit is None:
                self._per_unit = sample
            else:
                self._per_unit += self.alpha * (sample - self._per_unit)

    @property
    def seconds_per_unit(self) -> float | None:
        """Current estimate, or ``None`` before the first observation."""
        return self._per_unit


class CapacityPlanner:
    """Sums the meters of a pipeline and answers "can one more session run in real time?".

    Args:
        cores: CPU cores available to the process (defaults to the affinity mask).
        target_utilisation: fraction of the cores live sessions may use; the rest is
            headroom for the event loop, the network and bursts.
    """

    def __init__(self, cores: int | None = None, target_utilisation: float = 0.85) -> None:
        self.cores = cores or len(os.sched_getaffinity(0)) or 1
        self.target_utilisation = target_utilisation
        self.meters: dict[str, CapacityMeter] = {}
        self.resources: dict[str, str] = {}  # stage → "cpu" or a device ("cuda")
        self.overhead = 1.0  # process CPU per metered CPU second (see calibrate)
        self._window: tuple[float, float] | None = None

    def calibrate(self, process_cpu_s: float | None = None) -> float:
        """Update :attr:`overhead` from the process CPU spent since the window opened.

        Call it periodically (the session manager does, every second). A window closes
        once the meters recorded :data:`OVERHEAD_MIN_METERED_S` of CPU; until then the
        factor stays as it was, so an idle server keeps its last measurement.
        """
        process = time.process_time() if process_cpu_s is None else process_cpu_s
        metered = sum(
            m.cpu_seconds_total for stage, m in list(self.meters.items())
            if self.resources.get(stage, "cpu") == "cpu"
        )
        if self._window is None:
            self._window = (process, metered)
            return self.overhead
        d_process, d_metered = process - self._window[0], metered - self._window[1]
        if d_metered < OVERHEAD_MIN_METERED_S:
            return self.overhead
        ratio = min(MAX_OVERHEAD, max(1.0, d_process / d_metered))
        self.overhead += OVERHEAD_ALPHA * (ratio - self.overhead)
        self._window = (process, metered)
        return self.overhead

    def meter(self, stage: str, resource: str = "cpu") -> CapacityMeter:
        """The meter for one stage of the pipeline, created on first use.

        ``resource`` is what the stage's seconds are spent on: CPU cores, or a device's
        time (``"cuda"``).
        """
        self.resources.setdefault(stage, resource)
        return self.meters.setdefault(stage, CapacityMeter())

    def seconds_per_unit(self, stages: list[str], resource: str = "cpu") -> float | None:
        """Seconds of ``resource`` per unit summed over a pipeline's stages.

        ``None`` until every stage of the pipeline (on any resource) is measured.
        """
        demands = self.demands(stages, 1.0)
        if demands is None:
            return None
        return demands.get(resource, 0.0)

    def demands(self, stages: list[str], units_per_s: float) -> dict[str, float] | None:
        """What a session needing ``units_per_s`` uses of each resource, per second.

        ``None`` until every one of its stages is measured.
        """
        out: dict[str, float] = {}
        if not stages:
            return None
        for stage in stages:
            meter = self.meters.get(stage)
            per_unit = meter.seconds_per_unit if meter is not None else None
            if per_unit is None:
                return None
            resource = self.resources.get(stage, "cpu")
            out[resource] = out.get(resource, 0.0) + per_unit * units_per_s
        if "cpu" in out:
            out["cpu"] *= self.overhead
        return out

    def budget(self, resource: str) -> float:
        """Seconds per second of ``resource`` live sessions may use together."""
        if resource == "cpu":
            return self.budget_cores
        return self.target_utilisation  # one device: a fraction of its time

    def max_units_per_second(self, stages: list[str]) -> float | None:
        """Units per second the machine sustains for this pipeline within its target."""
        per_unit = self.seconds_per_unit(stages)
        if not per_unit:
            return None
        return self.cores * self.target_utilisation / per_unit

    @property
    def budget_cores(self) -> float:
        """CPU cores live sessions may use together."""
        return self.cores * self.target_utilisation

    def demand(self, stages: list[str], units_per_s: float) -> float | None:
        """Cores a session needing ``units_per_s`` uses, ``None`` until its stages are measured."""
        demands = self.demands(stages, units_per_s)
        return None if demands is None else demands.get("cpu", 0.0)
