"""The one-shot session: what a task sees while it runs, and how its steps are submitted.

An offline task is the same pipeline as a live session with a file source and a file sink:
it submits its work to the model's shared runner at :attr:`Priority.OFFLINE`, one small
step at a time (one second of avatar frames, one sentence of speech, one utterance of
transcription). A runner always serves queued realtime items first, so a live session
overtakes the job at its next step; a cancel is noticed at the next step too, and work the
job already queued is dropped by the runner through ``is_stale``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import resource
import secrets
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from omnistream.engine.registry import ModelSpec
from omnistream.engine.runner import ModelRunner, Priority, StaleWork, WorkResult
from omnistream.jobs.artifacts import ArtifactStore, Reservation
from omnistream.jobs.errors import JobCancelled
from omnistream.jobs.schemas import Span, StreamEvent
from omnistream.jobs.store import Job, now_ms

T = TypeVar("T")

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"

#: Niceness added to the threads that decode inputs and encode outputs of offline jobs.
OFFLINE_NICE = 10
OFFLINE_THREADS = max(1, min(4, os.cpu_count() or 1))
_offline_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _lower_thread_priority() -> None:
    """Make the calling thread yield the CPU to everything else (Linux: per-thread nice).

    Runner priority orders model steps, but an offline job also decodes and encodes
    (x264, AAC, WAV) outside the runners; at nice 10 that work only gets the cores that
    live sessions' rendering and JPEG threads leave idle.
    """
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + OFFLINE_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


def offline_executor() -> ThreadPoolExecutor:
    """The shared low-priority thread pool for offline jobs' blocking work."""
    global _offline_pool
    with _pool_lock:
        if _offline_pool is None:
            _offline_pool = ThreadPoolExecutor(
                OFFLINE_THREADS, thread_name_prefix="offline-io", initializer=_lower_thread_priority
            )
        return _offline_pool


async def run_offline(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking work of an offline job on the low-priority pool, off the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(offline_executor(), functools.partial(fn, *args))


def peak_rss_bytes() -> int:
    """The process's peak resident memory (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RunContext:
    """Everything a task needs while it runs, and what it measures for the RunReport.

    Args:
        job: the job being run (events, cancellation).
        spec: the model the task uses.
        runner: the model's shared runner.
        device: where the runner placed the model.
        artifacts: where outputs are written.
        services: shared caches and settings the tasks may use (``JobService``).
    """

    def __init__(
        self,
        job: Job,
        spec: ModelSpec,
        runner: ModelRunner,
        device: str,
        artifacts: ArtifactStore,
        services: Any,
    ) -> None:
        self.job = job
        self.spec = spec
        self.runner = runner
        self.device = device
        self.artifacts = artifacts
        self.services = services
        self.run_id = f"run_{secrets.token_hex(8)}"
        self.timings: dict[str, float] = {}
        self.cache_hits: list[str] = []
        self.device_placement: dict[str, str] = {spec.id: device}
        self.max_batch_size = 0
        self.steps = 0
        self.reservations: list[Reservation] = []
        self.stream_events: list[StreamEvent] = []
        self.extra: dict[str, Any] = {}
        self._root_span = Span(
            span_id=secrets.token_hex(8),
            name=f"job.{job.request.task}",
            start_ms=now_ms(),
            status="running",
            attributes={"model": spec.id, "device": device},
        )
        job.spans.append(self._root_span)

    # -- measuring -----------------------------------------------------------------------

    def add_time(self, name: str, ms: float) -> None:
        """Accumulate ``<name>_ms`` in the report's timings."""
        key = f"{name}_ms"
        self.timings[key] = round(self.timings.get(key, 0.0) + ms, 3)

    def emit(self, event: str, stage: str | None = None, **data: Any) -> None:
        """Emit a job event and keep it in the report's ``stream_events``."""
        record = self.job.emit(event, stage, **data)
        self.stream_events.append(
            StreamEvent(event=event, stage=stage, timestamp_ms=record.timestamp_ms, data=data)
        )

    @contextlib.asynccontextmanager
    async def stage(self, name: str, **attributes: Any) -> AsyncIterator[None]:
        """Time one stage: emits ``stage_start``/``stage_end`` and records a span."""
        self.check()
        span = Span(
            span_id=secrets.token_hex(8),
            parent_id=self._root_span.span_id,
            name=name,
            start_ms=now_ms(),
            status="running",
            attributes=dict(attributes),
        )
        self.job.spans.append(span)
        self.emit("stage_start", name, **attributes)
        started = time.perf_counter()
        status = "ok"
        try:
            yield
        except JobCancelled:
            status = "cancelled"
            raise
        except BaseException:
            status = "error"
            raise
        finally:
            elapsed = (time.perf_counter() - started) * 1000.0
            span.end_ms = now_ms()
            span.duration_ms = round(elapsed, 3)
            span.status = status  # type: ignore[assignment]
            self.add_time(name, elapsed)
            if status == "ok":
                self.emit("stage_end", name, duration_ms=round(elapsed, 3))

    def progress(self, stage: str, done: int, total: int, **data: Any) -> None:
        """Emit ``stage_progress`` (``done`` of ``total`` units)."""
        fraction = 1.0 if total <= 0 else min(1.0, done / total)
        self.emit(
            "stage_progress", stage, done=done, total=total, fraction=round(fraction, 4), **data
        )

    def end_root(self, status: str) -> None:
        """Close the root span of the trace."""
        self._root_span.end_ms = now_ms()
        self._root_span.duration_ms = round(self._root_span.end_ms - self._root_span.start_ms, 3)
        self._root_span.status = status  # type: ignore[assignment]

    # -- steps -----------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`JobCancelled` when a cancel was requested (between steps)."""
        if self.job.cancel_requested:
            raise JobCancelled(self.job.id)

    async def submit(self, payload: Any, *, cost: float | None = None) -> WorkResult[Any]:
        """Run one step on the shared runner at offline priority.

        Returns as soon as the step is done, or raises :class:`JobCancelled` as soon as a
        cancel arrives (the queued item is abandoned; one already running finishes in its
        thread and its result is dropped).
        """
        self.check()
        future = self.runner.submit(
            payload, priority=Priority.OFFLINE, is_stale=self.job.is_stale, cost=cost
        )
        cancel_wait: asyncio.Future[Any] = asyncio.ensure_future(self.job.cancelled.wait())
        waiting: set[asyncio.Future[Any]] = {future, cancel_wait}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            future.cancel()
            raise
        finally:
            cancel_wait.cancel()
        if not future.done():
            future.cancel()
            raise JobCancelled(self.job.id)
        try:
            result = future.result()
        except StaleWork as exc:
            raise JobCancelled(self.job.id) from exc
        self.steps += 1
        self.max_batch_size = max(self.max_batch_size, result.batch_size)
        self.add_time("queue", result.queue_ms)
        self.add_time("infer", result.infer_ms)
        return result

    async def await_cancellable(self, work: asyncio.Future[T]) -> T:
        """Await a multi-step operation that stops when cancelled (e.g. a TTS stream)."""
        self.check()
        cancel_wait: asyncio.Future[Any] = asyncio.ensure_future(self.job.cancelled.wait())
        waiting: set[asyncio.Future[Any]] = {work, cancel_wait}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            raise
        finally:
            cancel_wait.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
            raise JobCancelled(self.job.id)
        return work.result()

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work (file writes, encoding) on the low-priority offline pool."""
        return await run_offline(fn, *args)

    def reserve(self, ext: str) -> Reservation:
        """Reserve an artifact path; discarded automatically if the run does not succeed."""
        reservation = self.artifacts.reserve(ext, self.job.owner)
        self.reservations.append(reservation)
        return reservation
