"""Tasks of the hosted task API, run on the job engine.

A task is created by one call. A task type that takes no file is submitted to the job
engine at once (``queued``); one that takes files waits in ``awaiting_upload`` with one
signed upload slot per file, and is submitted when the last slot is filled. From then on
its status is its job's (``queued``, ``running``, ``succeeded``, ``failed``,
``cancelled``), read through :class:`~omnistream.jobs.service.JobService` only, so the
same code serves the embedded job backend and a cluster one.

Tasks live in this process's memory, bounded by count and by the job retention time;
uploaded files wait in a spool directory under the artifacts directory until their
task is submitted (or fails, or is cancelled).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import FileResponse, Response

from omnistream.auth import Principal, bind_principal, current_principal
from omnistream.auth.service import QuotaExceeded
from omnistream.jobs.errors import GenerateError
from omnistream.jobs.inputs import Upload
from omnistream.jobs.schemas import Artifact, GenerateRequest
from omnistream.jobs.service import JobService
from omnistream.jobs.store import Job
from omnistream.jobs.tasks import TASK_IMPLS
from omnistream.omni_api.catalog import Catalog, FileField, TaskType, load_groups
from omnistream.omni_api.errors import OmniError
from omnistream.omni_api.signing import SignatureError, UrlSigner
from omnistream.omni_api.uploads import CONTAINER_OF, Spool, matches, normalise_type
from omnistream.transports.state import AppState

log = logging.getLogger(__name__)

EXTRAS_KEY = "omni_api.service"
TaskStatus = Literal["awaiting_upload", "queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
#: Finished jobs of a task type whose run times make the wait estimate.
MEASURED_JOBS = 20
MAX_IDEMPOTENCY_KEY = 255


def iso(seconds: float | None) -> str | None:
    """Unix seconds as ISO 8601 in UTC (``None`` stays ``None``)."""
    if seconds is None:
        return None
    stamp = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


# -- the create request ---------------------------------------------------------------------


class FileToUpload(BaseModel):
    """One entry of ``files_to_upload``."""

    model_config = ConfigDict(extra="forbid")

    field: str = Field(max_length=64)
    filename: str = Field("", max_length=255)
    content_type: str = Field(max_length=128)


class CreateTaskBody(BaseModel):
    """``POST /api/omni/tasks/create``."""

    model_config = ConfigDict(extra="ignore")

    model_group: str = Field(max_length=64)
    task_type: str = Field(max_length=64)
    input: dict[str, Any] = Field(default_factory=dict)
    files_to_upload: list[FileToUpload] = Field(default_factory=list, max_length=8)


def parse_create(body: Any) -> CreateTaskBody:
    """The create body, or a 400 naming the field."""
    if not isinstance(body, dict):
        raise OmniError(400, "invalid_request", "The body must be a JSON object.")
    try:
        return CreateTaskBody.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(
            f"[{p}]" if isinstance(p, int) else str(p) for p in first.get("loc", ())
        ).replace(".[", "[")
        raise OmniError(
            400, "invalid_request", f"{where or 'body'}: {first.get('msg', 'invalid value')}."
        ) from exc


# -- task records ----------------------------------------------------------------------------


@dataclass
class Slot:
    """One upload slot of a task."""

    file: FileField
    filename: str
    content_type: str
    state: Literal["empty", "receiving", "filled"] = "empty"
    size: int = 0


@dataclass
class OmniTask:
    """A task: what was asked, its slots, its job, and its outcome once known."""

    id: str
    principal: Principal
    group: str
    task_type: TaskType
    job_task: str
    model: str
    inputs: dict[str, Any]
    slots: dict[str, Slot]
    created_at: float
    upload_expires: int
    body_hash: str
    status: TaskStatus = "awaiting_upload"
    job_id: str | None = None
    error: dict[str, str] | None = None
    outputs: list[Artifact] = field(default_factory=list)
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    idempotency: tuple[str, str] | None = None
    timer: asyncio.TimerHandle | None = None
    on_end: Callable[[OmniTask], None] | None = None

    @property
    def owner(self) -> str:
        """The key that created the task."""
        return self.principal.owner

    @property
    def terminal(self) -> bool:
        """Whether the task has finished one way or another."""
        return self.status in TERMINAL

    def fail(self, code: str, message: str, status: TaskStatus = "failed") -> None:
        """End the task before (or without) a job."""
        self.status = status
        self.error = {"code": code, "message": message}
        self.finished_at = time.time()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.on_end is not None:
            self.on_end(self)


def _translate(message: str, task_type: TaskType) -> str:
    """A job engine message in the task type's field names (``'image'`` → ``'source_image'``)."""
    for file in task_type.files:
        message = message.replace(f"'{file.job_input}'", f"'{file.field}'")
    for omni_name, job_name in task_type.renames.items():
        message = message.replace(f"'{job_name}'", f"'{omni_name}'")
    return message


@dataclass
class _KeyLock:
    """Serialises creates that carry the same Idempotency-Key (dropped when unused)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


# -- the service ----------------------------------------------------------------------------


class TaskService:
    """The hosted task API of one server: catalog, tasks, upload slots, signed URLs."""

    def __init__(self, state: AppState) -> None:
        settings = state.settings
        self.state = state
        self.jobs = JobService.of(state)
        self.signer = UrlSigner(settings.omni_signing_secret)
        if self.signer.ephemeral:
            log.warning(
                "OMNISTREAM_OMNI_SIGNING_SECRET is not set: upload and output URLs are signed "
                "with a random per-process secret and stop working when the server restarts"
            )
        preferred = {
            task: getattr(settings, impl.default_model_setting, None)
            if impl.default_model_setting
            else None
            for task, impl in TASK_IMPLS.items()
        }
        self.catalog = Catalog(
            load_groups(settings.omni_groups_file), state.registry, preferred, TASK_IMPLS
        )
        self.spool = Spool(Path(settings.artifacts_dir).resolve() / "omni-uploads")
        self.upload_ttl_s = settings.omni_upload_ttl_s
        self.output_ttl_s = settings.omni_output_url_ttl_s
        self.max_tasks = settings.omni_max_tasks
        self.max_awaiting = settings.omni_max_awaiting_upload
        self.retention_s = settings.job_ttl_s
        self._tasks: OrderedDict[str, OmniTask] = OrderedDict()
        self._idempotency: dict[tuple[str, str], str] = {}
        self._idem_locks: dict[tuple[str, str], _KeyLock] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        registry = state.metrics.registry
        self.created_total = Counter(
            "omnistream_omni_tasks_created_total", "Hosted API tasks created, by task type",
            ["task_type"], registry=registry,
        )
        self.ended_total = Counter(
            "omnistream_omni_tasks_ended_total",
            "Hosted API tasks that ended, by task type and status", ["task_type", "status"],
            registry=registry,
        )
        self.uploads_total = Counter(
            "omnistream_omni_uploads_total",
            "Upload slot PUTs, by outcome ('ok' or the refusal's code)", ["outcome"],
            registry=registry,
        )

    @classmethod
    def of(cls, state: AppState) -> TaskService:
        """The app's task service, created on first use."""
        service = state.extras.get(EXTRAS_KEY)
        if service is None:
            service = cls(state)
            state.extras[EXTRAS_KEY] = service
            state.extras.setdefault("shutdown_hooks", []).insert(0, service.aclose)
        assert isinstance(service, TaskService)
        return service

    async def aclose(self) -> None:
        """Stop timers and watchers; delete the files of tasks still waiting for uploads."""
        for watcher in list(self._watchers):
            watcher.cancel()
        waiting = [t for t in self._tasks.values() if t.status == "awaiting_upload"]
        for task in waiting:
            task.fail("server_shutdown", "The server stopped before every file was uploaded.")
        await asyncio.to_thread(self._discard_all, waiting)

    def _discard_all(self, tasks: list[OmniTask]) -> None:
        for task in tasks:
            self.spool.discard(task.id, list(task.slots))

    # -- lookup -------------------------------------------------------------------------

    def get(self, task_id: str, caller: Principal) -> OmniTask:
        """A task the caller may see (another key's task is a 404, like a missing one)."""
        self._prune()
        task = self._tasks.get(task_id)
        if task is None or not caller.may_see(task.owner):
            raise OmniError(404, "task_not_found", f"No task with id '{task_id}'.")
        return task

    def _prune(self) -> None:
        cutoff = time.time() - self.retention_s
        done = [t for t in self._tasks.values() if t.terminal]
        expired = [t for t in done if (t.finished_at or 0.0) < cutoff]
        keep = [t for t in done if (t.finished_at or 0.0) >= cutoff]  # oldest first
        expired += keep[: max(0, len(self._tasks) - len(expired) - self.max_tasks)]
        for task in expired:
            self._tasks.pop(task.id, None)
            if task.idempotency is not None:
                self._idempotency.pop(task.idempotency, None)

    # -- create -------------------------------------------------------------------------

    async def create(
        self, caller: Principal, raw: Any, idempotency_key: str | None
    ) -> tuple[OmniTask, bool]:
        """Create a task (or, for a repeated ``Idempotency-Key``, return the first one).

        Returns:
            The task and whether it is a replay of an earlier create.

        Raises:
            OmniError: 400 bad body or input, 409 key reused with another body, 429 quota,
                503 no model for the task type; any refusal of the job engine.
        """
        body = parse_create(raw)
        body_hash = hashlib.sha256(
            json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        if idempotency_key is None:
            return await self._create(caller, body, body_hash, None), False
        if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise OmniError(
                400, "invalid_idempotency_key",
                f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters.",
            )
        key = (caller.owner, idempotency_key)
        held = self._idem_locks.setdefault(key, _KeyLock())
        held.users += 1
        try:
            async with held.lock:  # a retry waits for the first create to finish
                self._prune()
                known = self._tasks.get(self._idempotency.get(key, ""))
                if known is not None:
                    if known.body_hash != body_hash:
                        raise OmniError(
                            409, "idempotency_key_reused",
                            "This Idempotency-Key was used for a different request; use a new "
                            "key for a new task.",
                        )
                    return known, True
                task = await self._create(caller, body, body_hash, key)
                self._idempotency[key] = task.id
                return task, False
        finally:
            held.users -= 1
            if held.users == 0:
                self._idem_locks.pop(key, None)

    async def _create(
        self, caller: Principal, body: CreateTaskBody, body_hash: str,
        idempotency: tuple[str, str] | None,
    ) -> OmniTask:
        self._prune()
        resolved = self.catalog.resolve(body.model_group, body.task_type, caller.tiers)
        task_type = resolved.task_type
        inputs = task_type.validate(body.input)
        slots = self._slots(task_type, body.files_to_upload)
        await self._check_quota(caller)
        now = time.time()
        task = OmniTask(
            id=f"pt_{secrets.token_hex(12)}",
            principal=caller,
            group=resolved.group.id,
            task_type=task_type,
            job_task=resolved.job_task,
            model=resolved.model,
            inputs=inputs,
            slots=slots,
            created_at=now,
            upload_expires=int(now + self.upload_ttl_s) + 1,
            body_hash=body_hash,
            idempotency=idempotency,
            on_end=self._ended,
        )
        if slots:
            waiting = sum(1 for t in self._tasks.values() if t.status == "awaiting_upload")
            if waiting >= self.max_awaiting:
                raise OmniError(
                    429, "too_many_pending_uploads",
                    f"{waiting} tasks are already waiting for uploads; retry later.", 5.0,
                )
            loop = asyncio.get_running_loop()
            task.timer = loop.call_later(
                max(0.0, task.upload_expires - time.time()), self._expire, task.id
            )
        else:
            await self._submit(task, {})
        self._tasks[task.id] = task
        self.created_total.labels(task_type.name).inc()
        return task

    def _ended(self, task: OmniTask) -> None:
        self.ended_total.labels(task.task_type.name, task.status).inc()

    @staticmethod
    def _slots(task_type: TaskType, files: list[FileToUpload]) -> dict[str, Slot]:
        slots: dict[str, Slot] = {}
        for index, entry in enumerate(files):
            where = f"files_to_upload[{index}]"
            spec = task_type.file(entry.field)
            if spec is None:
                takes = ", ".join(f.field for f in task_type.files) or "none"
                raise OmniError(
                    400, "invalid_file_field",
                    f"{where}.field: {task_type.name} takes no file {entry.field!r}; its files: "
                    f"{takes}.",
                )
            if entry.field in slots:
                raise OmniError(
                    400, "invalid_file_field",
                    f"{where}.field: {entry.field!r} is declared twice.",
                )
            content_type = normalise_type(entry.content_type)
            if content_type not in spec.content_types or content_type not in CONTAINER_OF:
                raise OmniError(
                    400, "invalid_content_type",
                    f"{where}.content_type: {entry.content_type!r} is not accepted for "
                    f"{entry.field}; send one of {', '.join(spec.content_types)}.",
                )
            slots[entry.field] = Slot(spec, entry.filename, content_type)
        for spec in task_type.files:
            if spec.required and spec.field not in slots:
                raise OmniError(
                    400, "missing_file",
                    f"files_to_upload: {task_type.name} needs the file {spec.field!r} "
                    f"({spec.summary.rstrip('.')}); declare it with its content_type.",
                )
        return slots

    async def _check_quota(self, caller: Principal) -> None:
        """The key's ``max_queued_jobs`` counts its unfinished jobs and its tasks that
        wait for uploads."""
        if caller.max_queued_jobs is None:
            return
        jobs = await self.jobs.list_jobs()
        active = sum(1 for j in jobs if j.owner == caller.owner and not j.terminal)
        active += sum(
            1 for t in self._tasks.values()
            if t.owner == caller.owner and t.status == "awaiting_upload"
        )
        try:
            self.state.auth.check_queued_jobs(caller, active)
        except QuotaExceeded as exc:
            raise OmniError(429, "rate_limited", exc.message, exc.retry_after) from exc

    async def _submit(self, task: OmniTask, uploads: dict[str, Upload]) -> None:
        """Hand the task to the job engine as its creator (owner and tier policy)."""
        request = GenerateRequest(task=task.job_task, model=task.model, inputs=dict(task.inputs))
        previous = current_principal()
        bind_principal(task.principal)
        try:
            job = await self.jobs.submit(request, uploads, mode="async")
        except GenerateError as exc:
            raise OmniError(
                exc.status, exc.code, _translate(exc.message, task.task_type),
                5.0 if exc.status == 429 else None,
            ) from exc
        finally:
            bind_principal(previous)
        task.job_id = job.id
        if task.terminal:  # cancelled while it was being submitted
            await self.jobs.cancel(job)
            return
        task.status = "queued"
        task.queued_at = job.enqueued_at_ms / 1000.0
        self._background(self._watch(task, job), f"omni-{task.id}")

    async def _watch(self, task: OmniTask, job: Job) -> None:
        """Record the outcome as soon as the job ends (retention and quotas read it)."""
        await job.done.wait()
        self._apply(task, job)

    # -- uploads ------------------------------------------------------------------------

    def upload_url(self, base_url: str, task: OmniTask, field_name: str) -> str:
        """The signed PUT URL of one slot (the same URL every time it is asked for)."""
        query = self.signer.sign("upload", task.id, field_name, expires=task.upload_expires)
        return f"{base_url}/api/omni/uploads/{task.id}/{field_name}?{query.encode()}"

    def _expire(self, task_id: str) -> None:
        task = self._tasks.get(task_id)
        if task is None or task.status != "awaiting_upload":
            return
        missing = [name for name, slot in task.slots.items() if slot.state != "filled"]
        task.timer = None
        task.fail(
            "upload_expired",
            f"The upload slot(s) {', '.join(missing)} were not filled before "
            f"{iso(task.upload_expires)}; create the task again.",
        )
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, self.spool.discard, task.id, list(task.slots))

    async def upload(
        self,
        task_id: str,
        field_name: str,
        *,
        expires: str | None,
        sig: str | None,
        content_type: str | None,
        content_length: str | None,
        body: AsyncIterator[bytes],
    ) -> OmniTask:
        """Fill one slot (see :meth:`_upload`), counting the outcome."""
        try:
            task = await self._upload(
                task_id, field_name, expires=expires, sig=sig, content_type=content_type,
                content_length=content_length, body=body,
            )
        except OmniError as exc:
            self.uploads_total.labels(exc.code).inc()
            raise
        self.uploads_total.labels("ok").inc()
        return task

    async def _upload(
        self,
        task_id: str,
        field_name: str,
        *,
        expires: str | None,
        sig: str | None,
        content_type: str | None,
        content_length: str | None,
        body: AsyncIterator[bytes],
    ) -> OmniTask:
        """Fill one slot with the request's body; submits the task when it was the last.

        Raises:
            OmniError: 403 bad signature, 410 expired URL (the task fails with
                ``upload_expired``), 404 task gone, 409 slot already filled or task no
                longer waiting, 415 content type other than declared, 413 too large,
                400 empty or not the declared format.
        """
        try:
            self.signer.verify("upload", task_id, field_name, expires=expires, sig=sig)
        except SignatureError as exc:
            if exc.status == 410:
                self._expire(task_id)
                raise OmniError(
                    410, "upload_expired", "This upload URL has expired; create the task again."
                ) from exc
            raise OmniError(exc.status, exc.code, exc.message) from exc
        task = self._tasks.get(task_id)
        slot = task.slots.get(field_name) if task is not None else None
        if task is None or slot is None:
            raise OmniError(404, "task_not_found", f"No task with id '{task_id}'.")
        if slot.state == "filled":
            raise OmniError(
                409, "already_uploaded",
                f"The file for '{field_name}' was already uploaded; a slot takes one upload.",
            )
        if slot.state == "receiving":
            raise OmniError(
                409, "upload_in_progress", f"The file for '{field_name}' is being uploaded."
            )
        if task.status != "awaiting_upload":
            raise OmniError(
                409, "task_not_awaiting_upload",
                f"Task {task.id} is {task.status}; it takes no more uploads.",
            )
        if normalise_type(content_type) != slot.content_type:
            raise OmniError(
                415, "content_type_mismatch",
                f"'{field_name}' was declared as {slot.content_type}; send that Content-Type "
                f"(got {content_type or 'none'}).",
            )
        limit = self.state.settings.max_upload_bytes
        if content_length is not None and content_length.isdigit() and int(content_length) > limit:
            raise OmniError(
                413, "file_too_large", f"'{field_name}' is larger than {limit} bytes."
            )
        slot.state = "receiving"
        try:
            data = await self._read(body, field_name, limit)
            if not data:
                raise OmniError(400, "empty_file", f"The upload for '{field_name}' is empty.")
            if not matches(slot.content_type, data):
                raise OmniError(
                    400, "invalid_file",
                    f"The bytes uploaded for '{field_name}' are not {slot.content_type} "
                    f"({CONTAINER_OF[slot.content_type].upper()}).",
                )
            await asyncio.to_thread(self.spool.write, task.id, field_name, data)
        except BaseException:
            slot.state = "empty"
            raise
        if task.status != "awaiting_upload":  # expired or cancelled while the body came in
            slot.state = "empty"
            await asyncio.to_thread(self.spool.discard, task.id, [field_name])
            code = 410 if task.error and task.error["code"] == "upload_expired" else 409
            raise OmniError(
                code, task.error["code"] if task.error else "task_not_awaiting_upload",
                task.error["message"] if task.error else f"Task {task.id} is {task.status}.",
            )
        slot.state = "filled"
        slot.size = len(data)
        if all(s.state == "filled" for s in task.slots.values()):
            # The client's PUT is done once its bytes are stored: decoding and queueing
            # run on, and a problem with the file fails the task (seen when polling).
            task.status = "queued"
            if task.timer is not None:
                task.timer.cancel()
                task.timer = None
            self._background(self._start_uploaded(task), f"omni-submit-{task.id}")
        return task

    def _background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        runner = asyncio.create_task(work, name=name)
        self._watchers.add(runner)
        runner.add_done_callback(self._watchers.discard)

    @staticmethod
    async def _read(body: AsyncIterator[bytes], field_name: str, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in body:
            size += len(chunk)
            if size > limit:
                raise OmniError(
                    413, "file_too_large", f"'{field_name}' is larger than {limit} bytes."
                )
            parts.append(chunk)
        return b"".join(parts)

    async def _start_uploaded(self, task: OmniTask) -> None:
        """Every slot is filled: submit the job with the files (or fail the task)."""
        fields = list(task.slots)

        def read_all() -> dict[str, Upload]:
            return {
                slot.file.job_input: Upload(
                    self.spool.read(task.id, name), slot.filename, slot.content_type
                )
                for name, slot in task.slots.items()
            }

        try:
            uploads = await asyncio.to_thread(read_all)
            if task.terminal:  # cancelled meanwhile
                return
            await self._submit(task, uploads)
        except OmniError as exc:
            if not task.terminal:
                task.fail(exc.code, exc.message)
        except Exception as exc:  # the spool vanished, a bug: the task must still end
            log.exception("task %s could not be submitted", task.id)
            if not task.terminal:
                task.fail("runtime_error", f"The task could not be started ({type(exc).__name__}).")
        finally:
            await asyncio.to_thread(self.spool.discard, task.id, fields)

    # -- status -------------------------------------------------------------------------

    def _apply(self, task: OmniTask, job: Job) -> None:
        """Copy the job's state (and outcome, once it ended) onto the task."""
        if task.terminal:
            return
        task.status = job.state
        if job.started_at_ms is not None:
            task.started_at = job.started_at_ms / 1000.0
        if job.terminal:
            self._ended(task)
            task.finished_at = (job.finished_at_ms or time.time() * 1000.0) / 1000.0
            if job.error is not None:
                task.error = {"code": job.error.code, "message": _translate(
                    job.error.message, task.task_type)}
            if job.result is not None:
                task.outputs = list(job.result.outputs)

    async def refresh(self, task: OmniTask) -> Job | None:
        """Bring the task up to date with its job; returns the job while it is known."""
        if task.job_id is None or task.terminal:
            return None
        job = await self.jobs.find(task.job_id)
        if job is None:
            task.fail("job_lost", "The job running this task is no longer known to the server.")
            return None
        self._apply(task, job)
        return job

    async def queue_info(self, job: Job) -> dict[str, Any]:
        """Position, tasks ahead, running tasks and a wait estimate from measured runs."""
        jobs = await self.jobs.list_jobs()
        queued = sorted(
            (j for j in jobs if j.state == "queued"), key=lambda j: j.enqueued_at_ms
        )
        ahead = [j for j in queued[: next(
            (i for i, j in enumerate(queued) if j.id == job.id), len(queued))]]
        running = [j for j in jobs if j.state == "running"]
        durations: dict[str, list[float]] = {}
        for j in sorted(
            (j for j in jobs if j.state == "succeeded" and j.started_at_ms and j.finished_at_ms),
            key=lambda j: j.finished_at_ms or 0.0,
        ):
            durations.setdefault(j.request.task, []).append(
                ((j.finished_at_ms or 0.0) - (j.started_at_ms or 0.0)) / 1000.0
            )
        means = {t: sum(v[-MEASURED_JOBS:]) / len(v[-MEASURED_JOBS:]) for t, v in durations.items()}
        info: dict[str, Any] = {
            "position": len(ahead) + 1,
            "tasks_ahead": len(ahead),
            "running": len(running),
            "estimated_wait_s": None,
        }
        needed = {j.request.task for j in [*ahead, *running]}
        if all(t in means for t in needed):
            now_ms = time.time() * 1000.0
            slots = max(1, self.state.settings.max_running_jobs)
            free = [
                max(0.0, means[r.request.task] - (now_ms - (r.started_at_ms or now_ms)) / 1000.0)
                for r in running
            ]
            free += [0.0] * max(0, slots - len(free))
            heapq.heapify(free)
            for j in ahead:
                heapq.heappush(free, heapq.heappop(free) + means[j.request.task])
            info["estimated_wait_s"] = round(free[0], 2)
            info["estimate_basis"] = (
                f"mean run time of up to {MEASURED_JOBS} recent finished tasks of each kind "
                f"ahead, over {slots} job slot{'s' * (slots > 1)}"
            )
        else:
            info["estimate_basis"] = "not yet measured: no finished task of a kind ahead"
        return info

    @staticmethod
    def _progress(job: Job) -> dict[str, Any] | None:
        for event in reversed(job.events):
            if event.event == "stage_progress":
                data = event.data
                return {
                    "stage": event.stage,
                    "done": data.get("done"),
                    "total": data.get("total"),
                    "fraction": data.get("fraction"),
                }
        return None

    def _output(self, base_url: str, task: OmniTask, artifact: Artifact) -> dict[str, Any]:
        expires = int(time.time() + self.output_ttl_s)
        file_id = artifact.id or ""
        query = self.signer.sign("file", task.id, file_id, expires=expires)
        out: dict[str, Any] = {
            "kind": artifact.kind,
            "url": f"{base_url}/api/omni/files/{task.id}/{file_id}?{query.encode()}",
            "mime": artifact.mime,
            "width": artifact.width,
            "height": artifact.height,
            "duration_s": artifact.duration_s,
            "num_frames": artifact.num_frames,
            "bytes": artifact.bytes,
            "expires_at": iso(expires),
        }
        if artifact.text is not None:
            out["text"] = artifact.text
        return out

    async def view(self, task: OmniTask, base_url: str) -> dict[str, Any]:
        """The task as the API shows it (status, queue, progress, uploads, outputs)."""
        job = await self.refresh(task)
        queue = None
        progress = None
        if job is not None and task.status == "queued":
            queue = await self.queue_info(job)
        if job is not None and task.status == "running":
            progress = self._progress(job)
        uploads = []
        for name, slot in task.slots.items():
            entry: dict[str, Any] = {
                "field": name,
                "filename": slot.filename,
                "content_type": slot.content_type,
                "uploaded": slot.state == "filled" or task.job_id is not None,
            }
            if task.status == "awaiting_upload" and slot.state != "filled":
                entry.update(
                    upload_url=self.upload_url(base_url, task, name),
                    method="PUT",
                    headers={"Content-Type": slot.content_type},
                    expires_at=iso(task.upload_expires),
                    max_bytes=self.state.settings.max_upload_bytes,
                )
            uploads.append(entry)
        return {
            "portal_task_id": task.id,
            "object": "task",
            "model_group": task.group,
            "task_type": task.task_type.name,
            "model": task.model,
            "status": task.status,
            "queue": queue,
            "progress": progress,
            "uploads": uploads,
            "outputs": [self._output(base_url, task, a) for a in task.outputs]
            if task.status == "succeeded"
            else [],
            "error": task.error if task.status in ("failed", "cancelled") else None,
            "created_at": iso(task.created_at),
            "queued_at": iso(task.queued_at),
            "started_at": iso(task.started_at),
            "finished_at": iso(task.finished_at),
        }

    # -- cancel -------------------------------------------------------------------------

    async def cancel(self, task: OmniTask) -> OmniTask:
        """Cancel a task that has not finished (its job stops at its next step).

        Raises:
            OmniError: 409 ``task_finished`` once it has ended.
        """
        job = await self.refresh(task)
        if task.terminal:
            raise OmniError(
                409, "task_finished", f"Task {task.id} already finished ({task.status})."
            )
        if job is None:
            task.fail("cancelled", "Cancelled before its files were uploaded.", "cancelled")
            await asyncio.to_thread(self.spool.discard, task.id, list(task.slots))
            return task
        try:
            job = await self.jobs.cancel(job)
        except GenerateError as exc:
            raise OmniError(409, "task_finished", exc.message) from exc
        self._apply(task, job)
        return task

    # -- files --------------------------------------------------------------------------

    async def file_response(
        self, task_id: str, file_id: str, *, expires: str | None, sig: str | None
    ) -> Response:
        """An output behind a signed URL (no key needed), with range requests.

        Raises:
            OmniError: 403 bad signature, 410 expired, 404 file gone.
        """
        try:
            self.signer.verify("file", task_id, file_id, expires=expires, sig=sig)
        except SignatureError as exc:
            raise OmniError(exc.status, exc.code, exc.message) from exc
        artifacts = self.jobs.artifacts
        path = await asyncio.to_thread(artifacts.find, file_id, None)
        if path is None:
            remote = await self.jobs.backend.file_response(file_id)  # on another node
            if remote is not None:
                return remote
            raise OmniError(404, "file_not_found", "The file has expired or no longer exists.")
        return FileResponse(
            path,
            media_type=artifacts.mime_of(path),
            headers={"Cache-Control": "private, max-age=300"},
        )
