"""The job service: resolves a request's model, prepares inputs, runs one-shot sessions.

One instance per app, created lazily in ``AppState.extras`` by the first route that needs
it. It owns the job store, the artifacts directory and the avatar reference cache, and
registers a shutdown hook that cancels running jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from omnistream.auth import current_principal
from omnistream.auth.service import QuotaExceeded
from omnistream.engine.devices import pick_device
from omnistream.engine.registry import CheckpointRefused, ModelSpec
from omnistream.jobs.artifacts import ArtifactStore
from omnistream.jobs.backend import JobBackend, LocalJobBackend
from omnistream.jobs.errors import GenerateError, JobCancelled
from omnistream.jobs.inputs import InputLimits, Upload
from omnistream.jobs.runtime import WORKER_ID, RunContext, peak_rss_bytes, run_offline
from omnistream.jobs.schemas import (
    TASKS,
    Artifact,
    GenerateRequest,
    GenerateResult,
    JobError,
    RunReport,
)
from omnistream.jobs.store import Job, JobStore, now_ms
from omnistream.jobs.tasks import TASK_IMPLS, Prepared
from omnistream.transports.state import AppState, ModelAccessError

log = logging.getLogger(__name__)

EXTRAS_KEY = "jobs.service"
CANCEL_WAIT_S = 10.0


class JobService:
    """Offline generation for one server."""

    def __init__(self, state: AppState) -> None:
        settings = state.settings
        self.state = state
        self.store = JobStore(
            max_jobs=settings.max_jobs,
            ttl_s=settings.job_ttl_s,
            max_running=settings.max_running_jobs,
            max_queued=settings.max_queued_jobs,
        )
        self.artifacts = ArtifactStore(
            settings.artifacts_dir,
            max_files=settings.artifacts_max_files,
            ttl_s=settings.artifacts_ttl_s,
        )
        self.limits = InputLimits(
            max_upload_bytes=settings.max_upload_bytes,
            max_audio_s=settings.max_input_audio_s,
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_text_chars=settings.max_text_chars,
            roots=[Path(r) for r in settings.input_roots],
            artifacts_dir=self.artifacts.directory,
        )
        self.base_url = ""
        self._dir_ready = False
        # The node id in RunReports and job records; a cluster node sets its own.
        self.worker_id = WORKER_ID
        # Embedded by default; `serve --redis-url` swaps in the cluster backend at start-up.
        self.backend: JobBackend = LocalJobBackend(self)

    @classmethod
    def of(cls, state: AppState) -> JobService:
        """The app's job service, created on first use."""
        service = state.extras.get(EXTRAS_KEY)
        if service is None:
            service = cls(state)
            state.extras[EXTRAS_KEY] = service
            state.extras.setdefault("shutdown_hooks", []).append(service.aclose)
        assert isinstance(service, JobService)
        return service

    async def aclose(self) -> None:
        """Cancel running jobs (server shutdown)."""
        await self.backend.aclose()
        await self.store.aclose()

    async def find(self, job_id: str) -> Job | None:
        """A job by id, wherever it runs (``None`` when unknown or expired)."""
        return await self.backend.find(job_id)

    async def list_jobs(self) -> list[Job]:
        """Every job kept, oldest first."""
        return await self.backend.list_jobs()

    # -- resolving -------------------------------------------------------------------

    def available_tasks(self) -> list[str]:
        """Tasks this server can run: implemented here and served by an allowed model."""
        return [t for t in TASKS if t in TASK_IMPLS and self.state.registry.specs(t)]

    def resolve(self, request: GenerateRequest) -> ModelSpec:
        """The model a request runs on, tier policy applied.

        Raises:
            GenerateError: 400 task not available or model unknown (listing what exists),
                403 model outside the allowed tiers, 503 model unavailable here.
        """
        task = request.task
        available = self.available_tasks()
        if task not in available:
            raise GenerateError(
                400,
                "task_not_available",
                f"Task '{task}' is not available on this server. Available tasks: "
                f"{', '.join(available) or 'none'}.",
            )
        model_id = request.model
        if not model_id:
            setting = TASK_IMPLS[task].default_model_setting
            preferred = getattr(self.state.settings, setting, None) if setting else None
            candidates = self.state.registry.specs(task)
            usable = [s for s in candidates if s.unavailable_reason() is None]
            chosen = next((s for s in usable if s.id == preferred), None) or (
                usable[0] if usable else candidates[0]
            )
            model_id = chosen.id
        try:
            spec, _ = self.state.resolve_checkpoint(
                model_id, task, request.config.get("model_path")
            )
            return spec
        except ModelAccessError as exc:
            status = 400 if exc.status == 404 else exc.status
            found = self.state.registry.get(model_id)
            if status == 503 and found is not None:
                # e.g. a models-dir entry that holds no usable pipeline: the client's to fix
                status = int(found.capabilities.get("unavailable_status", 503))
            raise GenerateError(status, exc.code, exc.message) from exc
        except CheckpointRefused as exc:
            raise GenerateError(400, "invalid_config", str(exc)) from exc

    async def prepare(
        self, request: GenerateRequest, spec: ModelSpec, uploads: dict[str, Upload]
    ) -> tuple[Prepared, float]:
        """Decode and check the inputs in a worker thread; returns them and the time taken."""
        if request.backend == "ascend":
            raise GenerateError(
                400,
                "backend_not_available",
                "Backend 'ascend' is not available on this server (it has no Ascend NPU "
                "support); use auto, cuda or cpu.",
            )
        try:
            pick_device(request.backend, spec.devices)
        except ValueError as exc:
            raise GenerateError(400, "invalid_backend", str(exc)) from exc
        impl = TASK_IMPLS[request.task]
        started = time.perf_counter()
        prepared = await run_offline(impl.prepare, request, uploads, self.limits, spec)
        return prepared, (time.perf_counter() - started) * 1000.0

    # -- running ----------------------------------------------------------------------

    async def submit(
        self, request: GenerateRequest, uploads: dict[str, Upload] | None = None, *, mode: str
    ) -> Job:
        """Check, prepare and enqueue a run; returns its job at once (state ``queued``)."""
        await self._check_key_quota()
        spec = self.resolve(request)
        prepared, inputs_ms = await self.prepare(request, spec, uploads or {})
        if not self._dir_ready:
            await run_offline(self.artifacts.ensure_dir)
            await run_offline(self.artifacts.sweep)  # what expired while the server was down
            self._dir_ready = True
        job = self.store.add(request, spec.id, mode=mode)
        await self.backend.start(job, spec, prepared, inputs_ms, uploads or {})
        return job

    async def _check_key_quota(self) -> None:
        """Refuse (429) when the calling key already has its ``max_queued_jobs`` active."""
        caller = current_principal()
        if caller.max_queued_jobs is None:
            return
        active = sum(
            1 for j in await self.backend.list_jobs()
            if j.owner == caller.owner and j.state in ("queued", "running")
        )
        try:
            self.state.auth.check_queued_jobs(caller, active)
        except QuotaExceeded as exc:
            raise GenerateError(429, "rate_limited", exc.message, exc.retry_after) from exc

    async def run_sync(
        self, request: GenerateRequest, uploads: dict[str, Upload] | None = None
    ) -> Job:
        """Submit and wait for the end without blocking the loop."""
        job = await self.submit(request, uploads, mode="sync")
        await job.done.wait()
        return job

    async def cancel(self, job: Job) -> Job:
        """Stop a queued or running job (at its next step); returns it once it stopped,
        or (a job running on another node) still stopping.

        Raises:
            GenerateError: 409 when the job has already finished.
        """
        if job.terminal:
            raise GenerateError(
                409,
                "job_finished",
                f"Job {job.id} already finished ({job.state}); nothing to cancel.",
            )
        return await self.backend.cancel(job)

    async def cancel_local(self, job: Job) -> Job:
        """Cancel a job of this process and wait (bounded) for it to stop."""
        if job.terminal:
            return job
        job.request_cancel()
        if job.state == "queued":
            self._finish_cancelled(job, "cancelled before it started")
            if job.task is not None:
                job.task.cancel()
            return job
        try:
            await asyncio.wait_for(asyncio.shield(job.done.wait()), CANCEL_WAIT_S)
        except TimeoutError:
            log.warning("job %s did not stop within %.0fs of its cancel", job.id, CANCEL_WAIT_S)
        return job

    def _finish_cancelled(self, job: Job, message: str) -> None:
        if job.terminal:
            return
        job.finish("cancelled", error=JobError(code="job_cancelled", message=message))
        job.emit("job_cancelled", message=message)

    async def run_local(
        self, job: Job, spec: ModelSpec, prepared: Prepared, inputs_ms: float
    ) -> None:
        """Run a job in this process once a job slot is free (its state ends terminal).

        A Runtime Profile's ``concurrency`` for the model also bounds how many of its jobs
        run at once; the others wait queued (a job never holds a server-wide slot while
        it waits for its model's).
        """
        try:
            async with self._model_slot(spec.id), self.store.slots:
                if job.terminal:
                    return
                await self._run_started(job, spec, prepared, inputs_ms)
        except asyncio.CancelledError:
            self._finish_cancelled(job, "cancelled")
        finally:
            metrics = self.state.metrics
            metrics.jobs_total.labels(job.request.task, job.state).inc()
            if job.started_at_ms is not None and job.finished_at_ms is not None:
                seconds = (job.finished_at_ms - job.started_at_ms) / 1000.0
                metrics.job_seconds.labels(job.request.task).observe(seconds)

    def _model_slot(self, model_id: str) -> contextlib.AbstractAsyncContextManager[Any]:
        """The model's job-concurrency semaphore (a no-op when the model has no limit)."""
        limit = self.state.sessions.model_limits.get(model_id)
        if limit is None:
            return contextlib.nullcontext()
        slots: dict[str, asyncio.Semaphore] = self.state.extras.setdefault("jobs.model_slots", {})
        return slots.setdefault(model_id, asyncio.Semaphore(limit))

    async def _run_started(
        self, job: Job, spec: ModelSpec, prepared: Prepared, inputs_ms: float
    ) -> None:
        request = job.request
        job.state = "running"
        job.started_at_ms = now_ms()
        job.node = self.worker_id
        queued_ms = job.started_at_ms - job.enqueued_at_ms
        ctx: RunContext | None = None
        try:
            device = pick_device(request.backend, spec.devices)
            try:
                model_path = request.config.get("model_path")
                engine = self.state.engine
                checkpoint = None if model_path is None else engine.checkpoint(spec.id, model_path)
                runner = engine.runner(spec.id, request.backend, checkpoint=checkpoint)
            except CheckpointRefused as exc:
                raise GenerateError(400, "invalid_config", str(exc)) from exc
            ctx = RunContext(job, spec, runner, device, self.artifacts, self)
            if request.model and request.model != spec.id:  # a profile's degrade_to
                ctx.extra["degraded_from"] = request.model
            ctx.emit("job_started", model=spec.id, device=device, **job.started_data)
            ctx.add_time("inputs", inputs_ms)
            ctx.add_time("job_queue", queued_ms)
            started = time.perf_counter()
            outputs = await TASK_IMPLS[request.task].run(ctx, prepared)
            ctx.check()
            await asyncio.to_thread(self._commit_all, ctx, outputs)
            ctx.add_time("total", (time.perf_counter() - started) * 1000.0)
            ctx.end_root("ok")
            job.result = GenerateResult(outputs=outputs, metadata=self._report(ctx, job, None))
            job.finish("succeeded")
            job.emit(
                "job_finished",
                outputs=len(outputs),
                # OmniRT clients read the results off this event: the URLs, not just a count
                artifacts=[a.model_dump(mode="json", exclude_none=True) for a in outputs],
                urls=[a.url for a in outputs if a.url],
            )
        except (JobCancelled, asyncio.CancelledError):
            if ctx is not None:
                ctx.end_root("cancelled")
                await asyncio.to_thread(self._discard_all, ctx)
            self._finish_cancelled(job, "cancelled by request")
        except GenerateError as exc:
            self._fail(job, ctx, exc.code, exc.message)
        except Exception as exc:
            log.exception("job %s failed", job.id)
            self._fail(job, ctx, "runtime_error", f"{type(exc).__name__}: {exc}")

    def _fail(self, job: Job, ctx: RunContext | None, code: str, message: str) -> None:
        if ctx is not None:
            ctx.end_root("error")
            for reservation in ctx.reservations:
                self.artifacts.discard(reservation)
            job.result = None
            report = self._report(ctx, job, message)
            job.finish("failed", error=JobError(code=code, message=message))
            job.emit(
                "job_failed", code=code, message=message, report=report.model_dump(mode="json")
            )
        else:
            job.finish("failed", error=JobError(code=code, message=message))
            job.emit("job_failed", code=code, message=message)

    def _commit_all(self, ctx: RunContext, outputs: list[Artifact]) -> None:
        by_id = {r.id: r for r in ctx.reservations}
        for artifact in outputs:
            reservation = by_id.get(artifact.id or "")
            if reservation is None:
                continue
            artifact.bytes = self.artifacts.commit(reservation)
            artifact.path = str(reservation.final_path)
            artifact.url = f"{self.base_url}/v1/files/{reservation.id}"

    def _discard_all(self, ctx: RunContext) -> None:
        for reservation in ctx.reservations:
            self.artifacts.discard(reservation)

    def _report(self, ctx: RunContext, job: Job, error: str | None) -> RunReport:
        return RunReport(
            run_id=ctx.run_id,
            task=job.request.task,
            model=ctx.spec.id,
            backend=job.request.backend,
            job_id=job.id,
            trace_id=job.trace_id,
            worker_id=self.worker_id,
            execution_mode="async"
            if job.mode == "async"
            else ("cli" if job.mode == "cli" else "sync"),
            timings=dict(ctx.timings),
            memory={"peak_bytes": peak_rss_bytes()},
            cache_hits=list(ctx.cache_hits),
            device_placement=dict(ctx.device_placement),
            batch_size=max(1, ctx.max_batch_size),
            stream_events=list(ctx.stream_events),
            error=error,
            steps=ctx.steps,
            priority="offline",
            **{k: v for k, v in ctx.extra.items() if k not in RunReport.model_fields},
        )


def job_service(state: AppState) -> JobService:
    """Shorthand for :meth:`JobService.of`."""
    return JobService.of(state)


__all__ = ["EXTRAS_KEY", "Any", "JobService", "job_service"]
