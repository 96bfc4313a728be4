"""Jobs: the record of one offline run, its event log, and the bounded store of them.

Every event a job emits is appended to its log and wakes its followers. The SSE and
WebSocket streams replay the log from the start and then wait for more, all on the event
loop, so nothing can slip between the replay and the follow. Retention is bounded by count
and age; jobs still queued or running are never dropped.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

from omnistream.auth import current_principal
from omnistream.jobs.errors import GenerateError
from omnistream.jobs.schemas import (
    TERMINAL_EVENTS,
    TERMINAL_STATES,
    GenerateRequest,
    GenerateResult,
    JobError,
    JobEvent,
    JobRecord,
    JobState,
    Span,
)


def now_ms() -> float:
    """Wall-clock milliseconds since the epoch (what job records carry)."""
    return round(time.time() * 1000.0, 3)


class Job:
    """One offline run: request, state, event log, spans and cancellation flag.

    Only touched from the event loop. Runner threads see :attr:`cancel_requested` through
    the ``is_stale`` callables the run passes with its work items (a plain bool read).
    """

    def __init__(
        self, request: GenerateRequest, model: str, *, mode: str, owner: str | None = None
    ) -> None:
        self.id = f"job_{secrets.token_hex(10)}"
        # The key that asked for the run (the request's caller unless given): only that
        # key, or an admin key, sees the job and its files.
        self.owner = owner if owner is not None else current_principal().owner
        self.trace_id = f"trace_{secrets.token_hex(12)}"
        self.request = request
        self.model = model
        self.mode = mode
        self.state: JobState = "queued"
        self.error: JobError | None = None
        self.result: GenerateResult | None = None
        self.events: list[JobEvent] = []
        self.spans: list[Span] = []
        self.enqueued_at_ms = now_ms()
        self.started_at_ms: float | None = None
        self.finished_at_ms: float | None = None
        self.cancel_requested = False
        self.cancelled = asyncio.Event()
        self.done = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.node: str | None = None  # the node that runs or ran it (its RunReport worker_id)
        self.started_data: dict[str, Any] = {}  # extra job_started data (a cluster's attempt)
        # Called with each event before followers wake (a cluster backend persists them).
        self.listeners: list[Callable[[JobEvent], None]] = []
        self._changed = asyncio.Event()

    # -- events ------------------------------------------------------------------------

    def emit(self, event: str, stage: str | None = None, **data: Any) -> JobEvent:
        """Append an event and wake everyone following the job."""
        record = JobEvent(
            event=event,
            job_id=self.id,
            seq=len(self.events),
            timestamp_ms=now_ms(),
            stage=stage,
            data=data,
        )
        for listener in list(self.listeners):
            listener(record)
        self.append(record)
        return record

    def append(self, record: JobEvent) -> None:
        """Add an event recorded elsewhere (a cluster node's log) and wake followers."""
        self.events.append(record)
        if record.event in TERMINAL_EVENTS:
            self.done.set()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def changed(self) -> asyncio.Event:
        """An event set at the next :meth:`emit` (take it, then check, then wait)."""
        return self._changed

    async def follow(self, start: int = 0) -> AsyncIterator[JobEvent]:
        """Yield every event from ``start`` on, then new ones, until the terminal event."""
        index = start
        while True:
            while index < len(self.events):
                event = self.events[index]
                index += 1
                yield event
                if event.event in TERMINAL_EVENTS:
                    return
            if self.done.is_set():
                return
            await self._changed.wait()

    # -- state -------------------------------------------------------------------------

    @property
    def terminal(self) -> bool:
        """Whether the job has finished one way or another."""
        return self.state in TERMINAL_STATES

    def is_stale(self) -> bool:
        """For runner items: drop this job's queued work once a cancel was asked for."""
        return self.cancel_requested

    def request_cancel(self) -> None:
        """Ask the run to stop at its next step (its own code finalises the state)."""
        self.cancel_requested = True
        self.cancelled.set()

    def finish(self, state: JobState, *, error: JobError | None = None) -> None:
        """Set the final state (the caller emits the matching terminal event)."""
        self.state = state
        self.error = error
        self.finished_at_ms = now_ms()

    def record(self, *, with_events: bool = True) -> JobRecord:
        """The public record of the job."""
        return JobRecord(
            id=self.id,
            state=self.state,
            trace_id=self.trace_id,
            task=self.request.task,
            model=self.model,
            request=self.request.model_dump(mode="json", exclude={"inputs"})
            | {"inputs": summarise_inputs(self.request.inputs)},
            error=self.error,
            result=self.result,
            events=list(self.events) if with_events else [],
            enqueued_at_ms=self.enqueued_at_ms,
            started_at_ms=self.started_at_ms,
            finished_at_ms=self.finished_at_ms,
            node=self.node,
            owner=self.owner,
        )


def summarise_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Inputs as a job record shows them: long strings (base64 media) summarised."""
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, str) and len(value) > 256:
            out[key] = f"<{len(value)} characters>"
        elif isinstance(value, dict) and any(
            isinstance(v, str) and len(v) > 256 for v in value.values()
        ):
            out[key] = {
                k: (f"<{len(v)} characters>" if isinstance(v, str) and len(v) > 256 else v)
                for k, v in value.items()
            }
        else:
            out[key] = value
    return out


class JobStore:
    """Jobs by id with bounded retention and a cap on how many may wait.

    Args:
        max_jobs: finished jobs kept (oldest finished go first).
        ttl_s: finished jobs older than this go.
        max_running: jobs that run at once; the rest wait in ``queued``.
        max_queued: jobs that may wait before new ones are refused with 429.
    """

    def __init__(self, *, max_jobs: int, ttl_s: float, max_running: int, max_queued: int) -> None:
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self.max_running = max_running
        self.max_queued = max_queued
        self.slots = asyncio.Semaphore(max_running)
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def add(self, request: GenerateRequest, model: str, *, mode: str) -> Job:
        """Create and register a queued job, or refuse with 429 when too many wait."""
        self.prune()
        waiting = sum(1 for j in self._jobs.values() if j.state == "queued")
        if waiting >= self.max_queued:
            raise GenerateError(
                429, "too_many_jobs", f"{waiting} jobs are already waiting; retry later."
            )
        job = Job(request, model, mode=mode)
        self._jobs[job.id] = job
        job.emit("job_enqueued", task=request.task, model=model, mode=mode)
        return job

    def get(self, job_id: str) -> Job | None:
        """A job by id (``None`` when unknown or expired)."""
        self.prune()
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        """Every job kept, oldest first."""
        self.prune()
        return list(self._jobs.values())

    def active(self) -> list[Job]:
        """Jobs queued or running."""
        return [j for j in self._jobs.values() if not j.terminal]

    def prune(self) -> None:
        """Drop finished jobs past the age limit, then the oldest past the count limit."""
        cutoff = now_ms() - self.ttl_s * 1000.0
        finished = [j for j in self._jobs.values() if j.terminal]
        for job in finished:
            if (job.finished_at_ms or 0.0) < cutoff:
                self._jobs.pop(job.id, None)
        finished = [j for j in self._jobs.values() if j.terminal]
        for job in finished[: max(0, len(finished) - self.max_jobs)]:
            self._jobs.pop(job.id, None)

    async def aclose(self) -> None:
        """Cancel every active job and wait (briefly) for them to stop."""
        tasks = []
        for job in self.active():
            job.request_cancel()
            if job.task is not None:
                tasks.append(job.task)
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        for task in tasks:
            task.cancel()
