"""The public shapes of offline generation (PROTOCOLS.md §5), as pydantic models.

Clients of the reference service read these field names, so they are kept verbatim;
every model allows extra fields on input where the protocol says unknown fields are
additions, and the report carries ``schema_version`` so readers can tell versions apart.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

RUN_REPORT_SCHEMA_VERSION = "1.0.0"

TASKS: tuple[str, ...] = (
    "text2image",
    "image2image",
    "inpaint",
    "edit",
    "text2video",
    "image2video",
    "audio2video",
    "text2audio",
    "audio2text",
)
"""Every task name the protocol defines (some have no model on this server)."""

BACKENDS: tuple[str, ...] = ("auto", "cuda", "cpu", "cpu-stub", "ascend")
"""Accepted names (OmniRT's set); ``ascend`` is refused at run time with a clear reason."""

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

EVENT_NAMES: tuple[str, ...] = (
    "job_enqueued",
    "job_started",
    "job_requeued",  # cluster: its node died, hung or drained; a job_started follows
    "stage_start",
    "stage_progress",
    "stage_end",
    "job_finished",
    "job_failed",
    "job_cancelled",
)
TERMINAL_EVENTS: frozenset[str] = frozenset({"job_finished", "job_failed", "job_cancelled"})


class GenerateRequest(BaseModel):
    """One offline generation: a task, a model and semantic inputs.

    ``inputs`` values are plain JSON: text, numbers, or media given as base64, a data URL,
    ``{"path": ...}`` under the server's allowed roots, ``{"file_id": ...}`` of an earlier
    artifact, or an uploaded multipart file of the same name. ``model`` may be left out to
    use the task's default model.
    """

    model_config = ConfigDict(extra="ignore")

    task: str
    model: str | None = None
    backend: str = "auto"
    inputs: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    adapters: list[Any] | dict[str, Any] | None = None
    async_run: bool = False

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            # A custom error: pydantic would prefix a ValueError's text with "Value error, ".
            raise PydanticCustomError(
                "unknown_task",
                "unknown task '{task}'; known tasks: {tasks} (`omnistream models` and "
                "GET /v1/models show which run here)",
                {"task": value, "tasks": ", ".join(TASKS)},
            )
        return value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in BACKENDS:
            raise PydanticCustomError(
                "unknown_backend",
                "unknown backend '{backend}'; backends: {backends}",
                {"backend": value, "backends": ", ".join(BACKENDS)},
            )
        return value


class Artifact(BaseModel):
    """One output of a run: where to fetch it and what it is."""

    kind: Literal["image", "video", "audio", "text"]
    url: str | None = None
    path: str | None = None
    mime: str
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    duration_s: float | None = None
    id: str | None = None
    bytes: int | None = None
    text: str | None = None
    data: dict[str, Any] | None = None


class StreamEvent(BaseModel):
    """An event of a run as recorded in its report."""

    event: str
    stage: str | None = None
    timestamp_ms: float
    data: dict[str, Any] = Field(default_factory=dict)


class RunReport(BaseModel):
    """What a one-shot run did: timings per stage, memory, batching, placement, events."""

    model_config = ConfigDict(extra="allow")

    run_id: str
    task: str
    model: str
    backend: str
    job_id: str | None = None
    trace_id: str
    worker_id: str
    execution_mode: Literal["sync", "async", "cli"] = "sync"
    timings: dict[str, float] = Field(default_factory=dict)
    memory: dict[str, int] = Field(default_factory=dict)
    cache_hits: list[str] = Field(default_factory=list)
    device_placement: dict[str, str] = Field(default_factory=dict)
    batch_size: int = 1
    stream_events: list[StreamEvent] = Field(default_factory=list)
    error: str | None = None
    schema_version: str = RUN_REPORT_SCHEMA_VERSION


class GenerateResult(BaseModel):
    """The answer to a synchronous generate call, and a succeeded job's ``result``."""

    outputs: list[Artifact]
    metadata: RunReport


class JobEvent(BaseModel):
    """One event of a job as the SSE and WebSocket streams send it."""

    event: str
    job_id: str
    seq: int
    timestamp_ms: float
    stage: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class JobError(BaseModel):
    """Why a job failed (or was cancelled)."""

    code: str
    message: str


class JobRecord(BaseModel):
    """A job as ``GET /v1/jobs/{id}`` shows it."""

    id: str
    state: JobState
    trace_id: str
    task: str
    model: str
    request: dict[str, Any]
    error: JobError | None = None
    result: GenerateResult | None = None
    events: list[JobEvent] = Field(default_factory=list)
    enqueued_at_ms: float
    started_at_ms: float | None = None
    finished_at_ms: float | None = None
    node: str | None = None
    """The node that runs or ran the job (its RunReport ``worker_id``)."""
    owner: str | None = None
    """The key (by name: ``key:<name>``) whose job this is; ``anonymous`` without keys."""
    backend: str = "auto"
    """The request's backend: OmniRT's job parser reads ``record["backend"]``."""

    @model_validator(mode="after")
    def _backend_from_request(self) -> JobRecord:
        if "backend" not in self.model_fields_set:
            self.backend = str(self.request.get("backend") or "auto")
        return self


class Span(BaseModel):
    """One timed stage of a job's trace."""

    span_id: str
    parent_id: str | None = None
    name: str
    start_ms: float
    end_ms: float | None = None
    duration_ms: float | None = None
    status: Literal["ok", "error", "cancelled", "running"] = "ok"
    attributes: dict[str, Any] = Field(default_factory=dict)


class JobTrace(BaseModel):
    """``GET /v1/jobs/{id}/trace``: the job's spans, root first."""

    trace_id: str
    job_id: str
    spans: list[Span]
