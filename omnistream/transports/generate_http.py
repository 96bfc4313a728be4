"""Offline generation routes: ``/v1/generate``, jobs, files, model list, transcriptions.

Thin edges over :class:`omnistream.jobs.service.JobService`: they parse the request (JSON
or multipart with uploaded files), apply the tier policy through ``resolve_model`` (HTTP
and WebSocket alike), and translate job state into responses, SSE and WebSocket events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from omnistream.auth import principal_of
from omnistream.jobs.errors import GenerateError
from omnistream.jobs.inputs import Upload
from omnistream.jobs.schemas import TASKS, TERMINAL_EVENTS, GenerateRequest, JobTrace
from omnistream.jobs.service import JobService
from omnistream.jobs.store import Job
from omnistream.transports.request_schemas import (
    GenerateBody,
    GenerateForm,
    TranscriptionForm,
    body_of,
)
from omnistream.transports.state import ModelAccessError, get_state
from omnistream.transports.ws_common import off_loop

log = logging.getLogger(__name__)

router = APIRouter()

SSE_KEEPALIVE_S = 15.0
MULTIPART_OVERHEAD = 1024 * 1024


def error_response(
    exc: GenerateError, route: str = "generate", request: Request | None = None
) -> JSONResponse:
    """``{"error": {code, message, type}}`` with the error's status."""
    if request is not None:
        get_state(request).metrics.protocol_errors.labels(route, exc.code).inc()
    headers = exc.headers()
    return JSONResponse({"error": exc.as_dict()}, status_code=exc.status, headers=headers)


def _service(conn: Request | WebSocket) -> JobService:
    return JobService.of(get_state(conn))


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "body"
        cause = (err.get("ctx") or {}).get("error")
        # Our own validators' messages, without pydantic's "Value error, " prefix.
        message = str(cause) if err.get("type") == "value_error" and cause else err.get("msg")
        parts.append(f"{loc}: {message or 'invalid'}")
    return "; ".join(parts)


async def _read_upload(upload: UploadFile, name: str, limit: int) -> Upload:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise GenerateError(
            413, "input_too_large", f"Upload '{name}' is larger than {limit} bytes."
        )
    return Upload(data=data, filename=upload.filename or "", content_type=upload.content_type or "")


def _check_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise GenerateError(413, "request_too_large", f"Request body is larger than {limit} bytes.")


async def parse_generate(
    request: Request, service: JobService
) -> tuple[GenerateRequest, dict[str, Upload]]:
    """A GenerateRequest from a JSON body, or from a multipart form with uploaded files.

    Multipart: either a ``request`` field holding the whole JSON request, or the fields
    ``task``, ``model``, ``backend``, ``async_run``, ``inputs`` (JSON) and ``config``
    (JSON); every file field is an input of that name (``audio``, ``image``…), and any
    other plain field is a text input (``prompt``, ``language``…).
    """
    limit = service.limits.max_upload_bytes
    _check_length(request, limit * 4 + MULTIPART_OVERHEAD)
    content_type = request.headers.get("content-type", "")
    uploads: dict[str, Upload] = {}
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=8, max_fields=64)
        except Exception as exc:
            raise GenerateError(
                400, "invalid_multipart", f"Malformed multipart body: {exc}"
            ) from exc
        body: dict[str, Any] = {}
        if "request" in form:
            try:
                body = json.loads(str(form["request"]))
            except ValueError as exc:
                raise GenerateError(
                    400, "invalid_json", "Field 'request' is not valid JSON."
                ) from exc
            if not isinstance(body, dict):
                raise GenerateError(
                    400, "invalid_request", "Field 'request' must be a JSON object."
                )
        inputs: dict[str, Any] = dict(body.get("inputs") or {})
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                uploads[key] = await _read_upload(value, key, limit)
            elif key == "request":
                continue
            elif key in ("inputs", "config"):
                try:
                    parsed = json.loads(value)
                except ValueError as exc:
                    raise GenerateError(
                        400, "invalid_json", f"Field '{key}' is not valid JSON."
                    ) from exc
                if key == "inputs" and isinstance(parsed, dict):
                    inputs.update(parsed)
                else:
                    body[key] = parsed
            elif key in ("task", "model", "backend"):
                body[key] = value
            elif key == "async_run":
                body[key] = value.lower() in ("1", "true", "yes", "on")
            else:
                inputs[key] = value
        body["inputs"] = inputs
    else:
        raw = await request.body()
        try:
            body = await off_loop(json.loads, raw or b"null", size=len(raw))
        except ValueError as exc:
            raise GenerateError(400, "invalid_json", "Request body is not valid JSON.") from exc
        if not isinstance(body, dict):
            raise GenerateError(400, "invalid_request", "Request body must be a JSON object.")
    task = body.get("task")
    if isinstance(task, str) and task not in TASKS:
        # Said here rather than by the schema: pydantic's wording ("Value error, …") and
        # its list of every task, runnable here or not, are no help to a client.
        raise GenerateError(
            400,
            "invalid_request",  # the code clients already match; the message is new
            f"Unknown task '{task}'. Tasks this server runs: "
            f"{', '.join(service.available_tasks()) or 'none'}.",
        )
    try:
        parsed_request = GenerateRequest.model_validate(body)
    except ValidationError as exc:
        raise GenerateError(400, "invalid_request", _validation_message(exc)) from exc
    return parsed_request, uploads


def _job_status(job: Job) -> int:
    if job.state == "succeeded":
        return 200
    if job.error is not None and job.error.code == "job_cancelled":
        return 409
    return 500 if job.error is None or job.error.code == "runtime_error" else 400


@router.post(
    "/v1/generate",
    openapi_extra=body_of(
        {"application/json": GenerateBody, "multipart/form-data": GenerateForm}
    ),
)
async def generate(request: Request) -> Response:
    """Run a task synchronously (GenerateResult) or as a job (``async_run``: job record)."""
    service = _service(request)
    try:
        body, uploads = await parse_generate(request, service)
        if body.async_run:
            job = await service.submit(body, uploads, mode="async")
            return JSONResponse(job.record().model_dump(mode="json"))
        job = await service.run_sync(body, uploads)
    except GenerateError as exc:
        return error_response(exc, "generate", request)
    if job.state == "succeeded" and job.result is not None:
        return JSONResponse(
            job.result.model_dump(mode="json"),
            headers={"x-job-id": job.id, "x-trace-id": job.trace_id},
        )
    error = job.error
    code = error.code if error else "runtime_error"
    message = error.message if error else "the run failed"
    return JSONResponse(
        {"error": {"code": code, "message": message, "type": "generation_error", "job_id": job.id}},
        status_code=_job_status(job),
    )


async def _job_or_error(request: Request | WebSocket, job_id: str) -> Job:
    job = await _service(request).find(job_id)
    # Another key's job is answered exactly like one that does not exist.
    if job is None or not principal_of(request).may_see(job.owner):
        raise GenerateError(404, "job_not_found", f"No job with id '{job_id}'.")
    try:  # the tier policy covers jobs too: a server narrowed since hides the others
        get_state(request).resolve_model(job.model)
    except ModelAccessError as exc:
        if exc.status == 403:
            raise GenerateError(403, exc.code, exc.message) from exc
    return job


@router.get("/v1/jobs")
async def list_jobs(request: Request) -> dict[str, Any]:
    """Jobs still kept, newest first (records without their event logs)."""
    caller = principal_of(request)
    jobs = [j for j in await _service(request).list_jobs() if caller.may_see(j.owner)]
    return {
        "object": "list",
        "data": [j.record(with_events=False).model_dump(mode="json") for j in reversed(jobs)],
    }


@router.get("/v1/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> Response:
    """The job record (state, events, result once succeeded)."""
    try:
        job = await _job_or_error(request, job_id)
    except GenerateError as exc:
        return error_response(exc, "jobs", request)
    return JSONResponse(job.record().model_dump(mode="json"))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(request: Request, job_id: str) -> Response:
    """Cancel a queued or running job; it stops at its next step. 409 once finished.

    200 with the stopped job; 202 when it runs on another node and is still stopping.
    """
    service = _service(request)
    try:
        job = await _job_or_error(request, job_id)
        job = await service.cancel(job)
    except GenerateError as exc:
        return error_response(exc, "jobs", request)
    return JSONResponse(
        job.record().model_dump(mode="json"), status_code=200 if job.terminal else 202
    )


@router.get("/v1/jobs/{job_id}/trace")
async def job_trace(request: Request, job_id: str) -> Response:
    """The job's spans: the run, then one per stage, with durations and status."""
    try:
        job = await _job_or_error(request, job_id)
    except GenerateError as exc:
        return error_response(exc, "jobs", request)
    trace = JobTrace(trace_id=job.trace_id, job_id=job.id, spans=list(job.spans))
    return JSONResponse(trace.model_dump(mode="json"))


def _sse(event: Any) -> bytes:
    data = event.model_dump_json()
    return f"id: {event.seq}\nevent: {event.event}\ndata: {data}\n\n".encode()


async def _event_stream(job: Job, start: int) -> AsyncIterator[bytes]:
    """Replay the log from ``start``, then follow until the terminal event."""
    index = start
    while True:
        while index < len(job.events):
            event = job.events[index]
            index += 1
            yield _sse(event)
            if event.event in TERMINAL_EVENTS:
                return
        if job.done.is_set():
            return
        waiter = job.changed()  # the loop is single-threaded: nothing can slip in between
        try:
            await asyncio.wait_for(waiter.wait(), SSE_KEEPALIVE_S)
        except TimeoutError:
            yield b": keepalive\n\n"


@router.get("/v1/jobs/{job_id}/events")
async def job_events(request: Request, job_id: str) -> Response:
    """Server-sent events: every event so far, then new ones; ends with the job."""
    try:
        job = await _job_or_error(request, job_id)
    except GenerateError as exc:
        return error_response(exc, "jobs", request)
    start = 0
    last = request.headers.get("last-event-id")
    if last is not None and last.strip().isdigit():
        start = int(last) + 1
    return StreamingResponse(
        _event_stream(job, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.websocket("/v1/jobs/{job_id}/stream")
async def job_stream(websocket: WebSocket, job_id: str) -> None:
    """Job events over a WebSocket; the client may send ``{"action":"cancel"}`` meanwhile.

    One task sends events in order while another reads client messages, so a cancel
    never makes the sender skip an event. The socket closes after the terminal event.
    """
    state = get_state(websocket)
    try:
        job = await _job_or_error(websocket, job_id)
    except GenerateError as exc:
        # Refuse the handshake with the HTTP status (404 unknown, 403 tier policy), the
        # same way the avatar WebSocket routes refuse a model.
        try:
            await websocket.send_denial_response(
                JSONResponse({"error": exc.as_dict()}, status_code=exc.status)
            )
        except RuntimeError:  # server without the denial extension
            await websocket.close(code=1008)
        return
    await websocket.accept()
    send_lock = asyncio.Lock()

    async def send(message: dict[str, Any]) -> None:
        async with send_lock:
            await websocket.send_json(message)

    cancelling: set[asyncio.Future[Job]] = set()

    async def reader() -> None:
        service = JobService.of(state)
        while True:
            try:
                text = await websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError):
                return
            try:
                message = json.loads(text)
                action = message.get("action") or message.get("type")
            except (ValueError, AttributeError):
                await send({"type": "error", "code": "bad_json", "message": "Invalid JSON"})
                continue
            if action == "cancel":
                if job.terminal:
                    message = f"Job {job.id} already finished ({job.state}); nothing to cancel."
                    await send({"type": "error", "code": "job_finished", "message": message})
                    continue
                # Cancel in the background: this reader keeps reading, the writer keeps
                # sending every event up to and including job_cancelled.
                cancelling.add(asyncio.ensure_future(service.cancel(job)))
                await send({"type": "cancel_ok", "job_id": job.id})
            elif action == "ping":
                await send({"type": "pong"})
            else:
                await send(
                    {
                        "type": "error",
                        "code": "unsupported_message",
                        "message": f"Unknown action: {action}",
                    }
                )

    async def writer() -> None:
        async for event in job.follow():
            await send({"type": "event", **event.model_dump(mode="json")})
        await send({"type": "end", "job": job.record(with_events=False).model_dump(mode="json")})

    read_task = asyncio.create_task(reader())
    try:
        await writer()
        with contextlib.suppress(Exception):
            await websocket.close(1000)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await read_task


@router.get("/v1/files/{file_id}")
async def get_file(request: Request, file_id: str) -> Response:
    """An artifact written by a run (404 once expired or for ids that are not ids)."""
    service = _service(request)
    caller = principal_of(request)
    owner = None if caller.is_admin else caller.owner
    path = await asyncio.to_thread(service.artifacts.find, file_id, owner)
    if path is None:
        remote = await service.backend.file_response(file_id, owner)  # on another node
        if remote is not None:
            return remote
        return error_response(
            GenerateError(404, "file_not_found", f"No file with id '{file_id}'."), "files", request
        )
    return FileResponse(path, media_type=service.artifacts.mime_of(path), filename=path.name)


# -- models ------------------------------------------------------------------------------


def _model_entries(request: Request) -> list[dict[str, Any]]:
    state = get_state(request)
    entries = []
    for spec in state.registry.specs():
        reason = spec.unavailable_reason()
        for task in spec.tasks:
            entries.append(
                {
                    "id": spec.id,
                    "object": "model",
                    "created": 0,
                    "owned_by": spec.owned_by,
                    "task": task,
                    "tier": str(spec.tier),
                    "maturity": spec.maturity,
                    "summary": spec.summary,
                    "available": reason is None,
                    "reason": reason or "",
                    **(
                        {"license": spec.capabilities["license"]}
                        if spec.capabilities.get("license")
                        else {}
                    ),
                }
            )
    return entries


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """OpenAI-shaped model list, narrowed to the server's allowed tiers, plus the
    gateway's upstream models, aliases and combos."""
    from omnistream.transports.gateway_http import gateway_model_entries

    return {"object": "list", "data": _model_entries(request) + gateway_model_entries(request)}


@router.get("/v1/models/{model_id}")
async def get_model(request: Request, model_id: str) -> Response:
    """One model (404 unknown, 403 outside the allowed tiers)."""
    state = get_state(request)
    spec = state.registry.get(model_id)
    if spec is not None and not state.registry.allowed(spec):
        exc = GenerateError(
            403,
            "model_tier_forbidden",
            f"Model '{model_id}' is tier '{spec.tier}', not allowed here.",
        )
        return error_response(exc, "models", request)
    entries = [e for e in _model_entries(request) if e["id"] == model_id]
    if not entries:
        return error_response(
            GenerateError(404, "model_not_found", f"Unknown model '{model_id}'."), "models", request
        )
    first = dict(entries[0])
    first["tasks"] = [e["task"] for e in entries]
    return JSONResponse(first)


# -- OpenAI transcriptions -------------------------------------------------------------

OPENAI_STT_ALIASES = ("whisper-1", "whisper", "default")
TRANSCRIPTION_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


def _timestamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def subtitles(segments: list[dict[str, Any]], fmt: str) -> str:
    """SRT or WebVTT from transcript segments."""
    lines: list[str] = ["WEBVTT", ""] if fmt == "vtt" else []
    sep = "." if fmt == "vtt" else ","
    for index, seg in enumerate(segments, start=1):
        if fmt == "srt":
            lines.append(str(index))
        lines.append(f"{_timestamp(seg['start'], sep)} --> {_timestamp(seg['end'], sep)}")
        lines.append(str(seg["text"]).strip())
        lines.append("")
    return "\n".join(lines)


@router.post(
    "/v1/audio/transcriptions",
    openapi_extra=body_of({"multipart/form-data": TranscriptionForm}),
)
async def transcriptions(request: Request) -> Response:
    """OpenAI transcription: multipart ``file``, ``model``, ``language``, ``response_format``.

    Runs as a one-shot ``audio2text`` session on the shared scheduler.
    """
    service = _service(request)
    try:
        _check_length(request, service.limits.max_upload_bytes + MULTIPART_OVERHEAD)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise GenerateError(
                400, "invalid_request", "Send multipart/form-data with a 'file' field."
            )
        try:
            form = await request.form(max_files=2, max_fields=16)
        except Exception as exc:
            raise GenerateError(
                400, "invalid_multipart", f"Malformed multipart body: {exc}"
            ) from exc
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise GenerateError(400, "missing_file", "Field 'file' (the audio) is required.")
        fmt = str(form.get("response_format") or "json")
        if fmt not in TRANSCRIPTION_FORMATS:
            raise GenerateError(
                400,
                "invalid_response_format",
                f"response_format must be one of {', '.join(TRANSCRIPTION_FORMATS)}.",
            )
        model = str(form.get("model") or "")
        if model in OPENAI_STT_ALIASES:
            model = ""
        inputs: dict[str, Any] = {}
        if form.get("language"):
            inputs["language"] = str(form.get("language"))
        if form.get("prompt"):
            inputs["reference_text"] = str(form.get("prompt"))
        uploads = {"audio": await _read_upload(upload, "file", service.limits.max_upload_bytes)}
        body = GenerateRequest(task="audio2text", model=model or None, inputs=inputs)
        job = await service.run_sync(body, uploads)
    except GenerateError as exc:
        return error_response(exc, "transcriptions", request)
    if job.state != "succeeded" or job.result is None:
        code = job.error.code if job.error else "runtime_error"
        message = job.error.message if job.error else "transcription failed"
        status = _job_status(job)
        return JSONResponse(
            {"error": {"code": code, "message": message, "type": "server_error"}},
            status_code=status,
        )
    artifact = job.result.outputs[0]
    data = artifact.data or {}
    segments = list(data.get("segments", []))
    text = artifact.text or ""
    if fmt == "text":
        return PlainTextResponse(text)
    if fmt in ("srt", "vtt"):
        media = "text/vtt" if fmt == "vtt" else "application/x-subrip"
        return PlainTextResponse(subtitles(segments, fmt), media_type=media)
    result = {
        "text": text,
        "language": data.get("language", "en"),
        "duration": data.get("duration", artifact.duration_s),
        "segments": segments,
    }
    if fmt == "verbose_json":
        result["task"] = "transcribe"
    return JSONResponse(result)
