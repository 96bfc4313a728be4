"""Where jobs wait, run and are looked up: the embedded backend, and the interface a
cluster backend implements.

The job service and its routes talk only to :class:`JobBackend`. The embedded backend
(:class:`LocalJobBackend`) runs each job as a task in this process and finds jobs in the
in-memory :class:`~omnistream.jobs.store.JobStore`, exactly as a single server always
has. ``omnistream serve --redis-url`` swaps in :class:`omnistream.cluster.jobs.RedisJobBackend`
at start-up (jobs on Redis Streams, state and events in Redis, any node answers); nothing
above the interface knows which one runs, and this module never imports Redis.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from starlette.responses import Response

from omnistream.jobs.inputs import Upload
from omnistream.jobs.store import Job

if TYPE_CHECKING:
    from omnistream.engine.registry import ModelSpec
    from omnistream.jobs.service import JobService
    from omnistream.jobs.tasks import Prepared


class JobBackend(Protocol):
    """What the job service needs from wherever jobs live."""

    async def start(
        self,
        job: Job,
        spec: ModelSpec,
        prepared: Prepared,
        inputs_ms: float,
        uploads: dict[str, Upload],
    ) -> None:
        """Have a freshly created (queued) job run, here or on whichever node has room."""

    async def find(self, job_id: str) -> Job | None:
        """A job by id, wherever it runs (``None`` when unknown or expired)."""

    async def list_jobs(self) -> list[Job]:
        """Every job kept, oldest first."""

    async def cancel(self, job: Job) -> Job:
        """Stop a job that has not finished; returns it (terminal, or still stopping)."""

    async def file_response(self, file_id: str, owner: str | None = None) -> Response | None:
        """An artifact this process does not hold, fetched from where it is (or ``None``).

        ``owner``: the caller's owner id (``None`` for an admin): another owner's file is
        ``None`` (404), as it is locally.
        """

    async def aclose(self) -> None:
        """Stop background work (server shutdown)."""


class LocalJobBackend:
    """The embedded backend: one process, jobs as asyncio tasks, the in-memory store."""

    def __init__(self, service: JobService) -> None:
        self.service = service

    async def start(
        self,
        job: Job,
        spec: ModelSpec,
        prepared: Prepared,
        inputs_ms: float,
        uploads: dict[str, Upload],
    ) -> None:
        """Run the job as a task of this process (it waits for one of the job slots)."""
        job.task = asyncio.create_task(
            self.service.run_local(job, spec, prepared, inputs_ms), name=job.id
        )

    async def find(self, job_id: str) -> Job | None:
        """The job from the in-memory store."""
        return self.service.store.get(job_id)

    async def list_jobs(self) -> list[Job]:
        """Jobs in the in-memory store, oldest first."""
        return self.service.store.all()

    async def cancel(self, job: Job) -> Job:
        """Cancel in this process (waits until the job has stopped)."""
        return await self.service.cancel_local(job)

    async def file_response(self, file_id: str, owner: str | None = None) -> Response | None:
        """Every artifact lives in this process's directory: nothing to fetch."""
        return None

    async def aclose(self) -> None:
        """Nothing runs in the background here (the store cancels running jobs)."""
