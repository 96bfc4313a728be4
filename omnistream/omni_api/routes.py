"""HTTP routes of the hosted task API (``/api/omni/…``), thin over :class:`TaskService`.

Keys are checked by the edge middleware (scope ``tasks``) except on three paths: the
public catalog (a key is optional there; ``?all=true`` needs an admin key), and the
signed upload and file URLs, which the route itself verifies before touching anything.
Every refusal is ``{"error":{"code","message"}}``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, Response

from omnistream.auth import principal_of
from omnistream.omni_api.errors import OmniError
from omnistream.omni_api.tasks import CreateTaskBody, TaskService
from omnistream.transports.request_schemas import json_body
from omnistream.transports.state import get_state
from omnistream.transports.ws_common import off_loop

router = APIRouter()

#: Create bodies carry parameters, never files (those go to the upload slots).
MAX_CREATE_BODY_BYTES = 1024 * 1024


def _service(request: Request) -> TaskService:
    return TaskService.of(get_state(request))


def _base_url(request: Request) -> str:
    """Scheme and host the client used (URLs handed back must reach this server)."""
    return str(request.base_url).rstrip("/")


def _refused(request: Request, exc: OmniError, route: str) -> Response:
    get_state(request).metrics.protocol_errors.labels(f"omni_{route}", exc.code).inc()
    return exc.response()


@router.get("/api/omni/models")
async def list_models(
    request: Request, show_all: bool = Query(False, alias="all")
) -> Response:
    """Model groups ready here, their task types and the JSON Schemas of input and output.

    ``?all=true`` (admin key) also lists groups and task types that cannot run here, each
    with the reason.
    """
    if show_all and not principal_of(request).is_admin:
        return _refused(
            request,
            OmniError(403, "admin_required", "?all=true lists hidden groups: send an admin key."),
            "models",
        )
    groups = _service(request).catalog.describe(include_hidden=show_all)
    return JSONResponse({"object": "list", "model_groups": groups})


@router.post("/api/omni/tasks/create", openapi_extra=json_body(CreateTaskBody))
async def create_task(request: Request) -> Response:
    """Create a task: queued at once, or ``awaiting_upload`` with one signed PUT URL per file."""
    service = _service(request)
    try:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_CREATE_BODY_BYTES:
            raise OmniError(
                413, "request_too_large",
                f"The create body is larger than {MAX_CREATE_BODY_BYTES} bytes; files go to "
                "the upload slots (files_to_upload), not into the body.",
            )
        raw = await request.body()
        if len(raw) > MAX_CREATE_BODY_BYTES:
            raise OmniError(413, "request_too_large", "The create body is too large.")
        try:
            body: Any = await off_loop(json.loads, raw or b"null", size=len(raw))
        except (ValueError, RecursionError) as exc:
            raise OmniError(400, "invalid_json", "The body is not valid JSON.") from exc
        task, replayed = await service.create(
            principal_of(request), body, request.headers.get("idempotency-key")
        )
        view = await service.view(task, _base_url(request))
    except OmniError as exc:
        return _refused(request, exc, "create")
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return JSONResponse(view, headers=headers)


@router.get("/api/omni/tasks/{task_id}")
async def get_task(request: Request, task_id: str) -> Response:
    """Status, queue position and wait estimate, progress, outputs (signed URLs), error."""
    service = _service(request)
    try:
        task = service.get(task_id, principal_of(request))
        return JSONResponse(await service.view(task, _base_url(request)))
    except OmniError as exc:
        return _refused(request, exc, "task")


async def _cancel(request: Request, task_id: str) -> Response:
    service = _service(request)
    try:
        task = service.get(task_id, principal_of(request))
        task = await service.cancel(task)
        view = await service.view(task, _base_url(request))
    except OmniError as exc:
        return _refused(request, exc, "cancel")
    return JSONResponse(view, status_code=200 if task.terminal else 202)


@router.delete("/api/omni/tasks/{task_id}")
async def delete_task(request: Request, task_id: str) -> Response:
    """Cancel (200 once stopped, 202 while a job elsewhere is still stopping; 409 if done)."""
    return await _cancel(request, task_id)


@router.post("/api/omni/tasks/{task_id}/cancel")
async def cancel_task(request: Request, task_id: str) -> Response:
    """The same as ``DELETE /api/omni/tasks/{id}``."""
    return await _cancel(request, task_id)


#: An upload slot takes the file's raw bytes, of the content type declared at create.
_RAW_BODY = {
    "requestBody": {
        "required": True,
        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.put("/api/omni/uploads/{task_id}/{field}", openapi_extra=_RAW_BODY)
async def upload(request: Request, task_id: str, field: str) -> Response:
    """Fill an upload slot with the raw body (signed URL, no key)."""
    service = _service(request)
    query = request.query_params
    try:
        task = await service.upload(
            task_id,
            field,
            expires=query.get("expires"),
            sig=query.get("sig"),
            content_type=request.headers.get("content-type"),
            content_length=request.headers.get("content-length"),
            body=request.stream(),
        )
    except OmniError as exc:
        return _refused(request, exc, "upload")
    slot = task.slots[field]
    return JSONResponse(
        {
            "portal_task_id": task.id,
            "field": field,
            "bytes": slot.size,
            "status": task.status,
            "error": task.error if task.status == "failed" else None,
        }
    )


@router.head("/api/omni/files/{task_id}/{file_id}", include_in_schema=False)
@router.get("/api/omni/files/{task_id}/{file_id}")
async def output_file(request: Request, task_id: str, file_id: str) -> Response:
    """An output file (signed URL, no key), with its content type and range requests."""
    query = request.query_params
    try:
        return await _service(request).file_response(
            task_id, file_id, expires=query.get("expires"), sig=query.get("sig")
        )
    except OmniError as exc:
        return _refused(request, exc, "file")
