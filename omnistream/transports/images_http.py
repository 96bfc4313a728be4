"""OpenAI-compatible image and video routes over the offline generation service.

``POST /v1/images/generations`` and ``POST /v1/images/edits`` run ``text2image`` /
``image2image`` / ``inpaint`` / ``edit`` as one-shot sessions on the shared scheduler (the
same jobs ``/v1/generate`` makes); ``POST /v1/videos/generations`` takes OmniRT's shape;
``POST /v1/videos`` and ``GET|DELETE /v1/videos/{id}`` (+ ``/content``) are OpenAI's video
job API over the same jobs. Errors use OpenAI's ``{"error": {message, type, code}}``
shape, and every job records the caller's owner, so one key never sees another's videos.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import json
import logging
import re
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import FormData, UploadFile

from omnistream.auth import principal_of
from omnistream.jobs.errors import GenerateError
from omnistream.jobs.inputs import Upload
from omnistream.jobs.schemas import GenerateRequest
from omnistream.jobs.service import JobService
from omnistream.jobs.store import Job
from omnistream.transports.request_schemas import (
    ImageEditForm,
    ImageGenerationBody,
    VideoBody,
    VideoForm,
    body_of,
    json_body,
)
from omnistream.transports.state import get_state
from omnistream.transports.ws_common import off_loop

log = logging.getLogger(__name__)

router = APIRouter()
VIDEO_BODY = body_of({"application/json": VideoBody, "multipart/form-data": VideoForm})

#: Model names OpenAI clients send that mean "this server's default for the task".
OPENAI_IMAGE_ALIASES = frozenset(
    {"", "default", "dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5"}
)
OPENAI_VIDEO_ALIASES = frozenset({"", "default", "sora-2", "sora-2-pro"})
#: OpenAI's ``quality`` values mapped to our presets.
QUALITY_PRESETS = {
    "low": "fast",
    "standard": "balanced",
    "medium": "balanced",
    "auto": "balanced",
    "high": "quality",
    "hd": "quality",
    "xhigh": "quality",
    "max": "quality",
}
RESPONSE_FORMATS = ("url", "b64_json")
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
MULTIPART_OVERHEAD = 1024 * 1024
DEFAULT_VIDEO_FPS = 8


def openai_error(exc: GenerateError, request: Request, route: str) -> JSONResponse:
    """OpenAI's error shape with the error's status (and ``param`` when known)."""
    get_state(request).metrics.protocol_errors.labels(route, exc.code).inc()
    body = {"error": {**exc.as_dict(), "param": None}}
    headers = exc.headers()
    return JSONResponse(body, status_code=exc.status, headers=headers)


def _service(request: Request) -> JobService:
    return JobService.of(get_state(request))


def _size(value: Any) -> tuple[int, int] | None:
    if value is None or value == "auto" or value == "":
        return None
    match = _SIZE.match(str(value))
    if not match:
        raise GenerateError(
            400, "invalid_size", f"'size' must be 'WIDTHxHEIGHT' (e.g. 512x512), got {value!r}."
        )
    return int(match.group(1)), int(match.group(2))


def _int_field(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise GenerateError(400, "invalid_value", f"'{name}' must be an integer.")
    try:
        number = int(str(value)) if not isinstance(value, (int, float)) else value
        whole = int(number)  # OverflowError for infinity, ValueError for NaN
    except (ValueError, OverflowError) as exc:
        raise GenerateError(400, "invalid_value", f"'{name}' must be an integer.") from exc
    if whole != number:
        raise GenerateError(400, "invalid_value", f"'{name}' must be an integer.")
    return whole


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = await off_loop(json.loads, raw or b"null", size=len(raw))
    except ValueError as exc:
        raise GenerateError(400, "invalid_json", "Request body is not valid JSON.") from exc
    if not isinstance(body, dict):
        raise GenerateError(400, "invalid_request", "Request body must be a JSON object.")
    return body


async def _form(request: Request, service: JobService) -> FormData:
    limit = service.limits.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit * 3 + MULTIPART_OVERHEAD:
        raise GenerateError(413, "request_too_large", "Request body is too large.")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise GenerateError(400, "invalid_request", "Send multipart/form-data.")
    try:
        return await request.form(max_files=8, max_fields=64)
    except Exception as exc:
        raise GenerateError(400, "invalid_multipart", f"Malformed multipart body: {exc}") from exc


async def _upload(value: UploadFile, name: str, limit: int) -> Upload:
    data = await value.read(limit + 1)
    if len(data) > limit:
        raise GenerateError(
            413, "input_too_large", f"Upload '{name}' is larger than {limit} bytes."
        )
    return Upload(data=data, filename=value.filename or "", content_type=value.content_type or "")


def _owner(request: Request) -> str:
    return principal_of(request).owner


async def submit_owned(
    service: JobService,
    body: GenerateRequest,
    uploads: dict[str, Upload],
    *,
    mode: str,
    owner: str,
) -> Job:
    """Submit a job recording its owner, whichever way the job service takes one.

    A named model outside the server's tiers is a 403 before anything else (the task
    may look unavailable only because that model is hidden).
    """
    if body.model is not None:
        registry = service.state.registry
        spec = registry.get(body.model)
        if spec is not None and not registry.allowed(spec):
            allowed = ", ".join(sorted(registry.allowed_tiers))
            raise GenerateError(
                403,
                "model_tier_forbidden",
                f"Model '{body.model}' is tier '{spec.tier}', not in this server's allowed "
                f"tiers ({allowed}).",
            )
    if "owner" in inspect.signature(service.submit).parameters:
        job = await service.submit(body, uploads, mode=mode, owner=owner)  # type: ignore[call-arg]
    else:
        job = await service.submit(body, uploads, mode=mode)
    if getattr(job, "owner", None) is None:
        job.owner = owner
    return job


def _default_model(service: JobService, task: str, given: str | None, aliases: frozenset[str]
                   ) -> str | None:
    return None if given is None or given in aliases else given


def _failure(job: Job, request: Request, route: str) -> JSONResponse:
    error = job.error
    code = error.code if error else "runtime_error"
    message = error.message if error else "the run failed"
    status = 500 if code == "runtime_error" else (409 if code == "job_cancelled" else 400)
    exc = GenerateError(status, code, message)
    return openai_error(exc, request, route)


def _absolute(request: Request, url: str | None) -> str | None:
    if url is None or url.startswith(("http://", "https://")):
        return url
    return str(request.base_url).rstrip("/") + url


async def _image_data(job: Job, request: Request, response_format: str) -> list[dict[str, Any]]:
    assert job.result is not None
    data: list[dict[str, Any]] = []
    for artifact in job.result.outputs:
        if response_format == "b64_json":
            path = artifact.path or ""
            raw = await asyncio.to_thread(_read, path)
            data.append({"b64_json": base64.b64encode(raw).decode("ascii"), "revised_prompt": None})
        else:
            data.append({"url": _absolute(request, artifact.url), "revised_prompt": None})
    return data


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _images_response(job: Job, data: list[dict[str, Any]], fmt: str) -> JSONResponse:
    assert job.result is not None
    first = job.result.outputs[0] if job.result.outputs else None
    size = f"{first.width}x{first.height}" if first and first.width else None
    return JSONResponse(
        {
            "created": int(time.time()),
            "data": data,
            "output_format": fmt,
            "size": size,
            "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
        },
        headers={"x-job-id": job.id, "x-trace-id": job.trace_id},
    )


def _common_config(fields: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    """Config shared by both image routes, plus the response and file formats."""
    config: dict[str, Any] = {}
    n = _int_field(fields.get("n"), "n")
    if n is not None:
        config["num_images"] = n
    size = _size(fields.get("size"))
    if size is not None:
        config["width"], config["height"] = size
    seed = _int_field(fields.get("seed"), "seed")
    if seed is not None:
        config["seed"] = seed
    for name in ("num_inference_steps", "steps"):
        steps = _int_field(fields.get(name), name)
        if steps is not None:
            config["num_inference_steps"] = steps
    quality = fields.get("quality")
    if quality:
        if not isinstance(quality, str) or quality not in QUALITY_PRESETS:
            raise GenerateError(
                400, "invalid_value", f"'quality' must be one of {', '.join(QUALITY_PRESETS)}."
            )
        config["preset"] = QUALITY_PRESETS[str(quality)]
    for name in ("guidance_scale", "negative_prompt", "scheduler", "strength"):
        if fields.get(name) is not None and fields.get(name) != "":
            value = fields[name]
            if name in ("guidance_scale", "strength") and isinstance(value, str):
                try:
                    value = float(value)
                except ValueError as exc:
                    raise GenerateError(
                        400, "invalid_value", f"'{name}' must be a number."
                    ) from exc
            config[name] = value
    response_format = str(fields.get("response_format") or "url")
    if response_format not in RESPONSE_FORMATS:
        raise GenerateError(
            400, "invalid_value", f"'response_format' must be one of {', '.join(RESPONSE_FORMATS)}."
        )
    fmt = str(fields.get("output_format") or "png")
    if fmt not in ("png", "jpeg", "webp"):
        raise GenerateError(400, "invalid_value", "'output_format' must be png, jpeg or webp.")
    config["output_format"] = fmt
    return config, response_format, fmt


@router.post("/v1/images/generations", openapi_extra=json_body(ImageGenerationBody))
async def images_generations(request: Request) -> Response:
    """OpenAI image generation → a ``text2image`` job, answered when it finishes."""
    service = _service(request)
    try:
        fields = await _json_body(request)
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise GenerateError(400, "missing_prompt", "'prompt' is required.")
        config, response_format, fmt = _common_config(fields)
        model = fields.get("model")
        if model is not None and not isinstance(model, str):
            raise GenerateError(400, "invalid_value", "'model' must be a string.")
        body = GenerateRequest(
            task="text2image",
            model=_default_model(service, "text2image", model, OPENAI_IMAGE_ALIASES),
            backend=str(fields.get("backend") or "auto"),
            inputs={"prompt": prompt},
            config=config,
            adapters=fields.get("adapters"),
        )
        job = await submit_owned(service, body, {}, mode="sync", owner=_owner(request))
        await job.done.wait()
        if job.state != "succeeded" or job.result is None:
            return _failure(job, request, "images")
        return _images_response(job, await _image_data(job, request, response_format), fmt)
    except GenerateError as exc:
        return openai_error(exc, request, "images")
    except ValueError as exc:  # pydantic: unknown backend and such
        return openai_error(GenerateError(400, "invalid_request", str(exc)), request, "images")


def _openai_mask(data: bytes, max_pixels: int) -> bytes:
    """OpenAI masks are transparent where to edit; ours are white there. Convert if RGBA."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if "A" not in image.getbands() or image.width * image.height > max_pixels:
                return data  # too large: the task's decoding refuses it before decoding
            alpha = image.getchannel("A")
            mask = alpha.point(lambda a: 255 if a < 128 else 0)
            out = io.BytesIO()
            mask.save(out, format="PNG")
            return out.getvalue()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return data  # the task's own decoding answers with the precise 400


@router.post(
    "/v1/images/edits", openapi_extra=body_of({"multipart/form-data": ImageEditForm})
)
async def images_edits(request: Request) -> Response:
    """OpenAI image edit (multipart) → ``inpaint`` with a mask, else ``edit`` or ``image2image``."""
    service = _service(request)
    limit = service.limits.max_upload_bytes
    try:
        form = await _form(request, service)
        fields: dict[str, Any] = {}
        uploads: dict[str, Upload] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                name = "image" if key in ("image", "image[]") else key
                if name in ("image", "mask") and name not in uploads:
                    uploads[name] = await _upload(value, key, limit)
            else:
                fields[key] = value
        if "image" not in uploads:
            raise GenerateError(400, "missing_image", "Field 'image' (a file) is required.")
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise GenerateError(400, "missing_prompt", "'prompt' is required.")
        if "mask" in uploads:
            mask = uploads["mask"]
            uploads["mask"] = Upload(
                await asyncio.to_thread(_openai_mask, mask.data, service.limits.max_image_pixels),
                mask.filename,
                "image/png",
            )
        config, response_format, fmt = _common_config(fields)
        model = _default_model(service, "edit", fields.get("model"), OPENAI_IMAGE_ALIASES)
        task = _edit_task(service, model, "mask" in uploads)
        body = GenerateRequest(
            task=task,
            model=model,
            backend=str(fields.get("backend") or "auto"),
            inputs={"prompt": prompt},
            config=config,
        )
        job = await submit_owned(service, body, uploads, mode="sync", owner=_owner(request))
        await job.done.wait()
        if job.state != "succeeded" or job.result is None:
            return _failure(job, request, "images")
        return _images_response(job, await _image_data(job, request, response_format), fmt)
    except GenerateError as exc:
        return openai_error(exc, request, "images")
    except ValueError as exc:
        return openai_error(GenerateError(400, "invalid_request", str(exc)), request, "images")


def _edit_task(service: JobService, model: str | None, has_mask: bool) -> str:
    """Which task an OpenAI edit is, by what the model (or the server) serves."""
    registry = service.state.registry
    if model is not None:
        spec = registry.get(model)
        tasks = spec.tasks if spec is not None else ()
        if has_mask and "inpaint" in tasks:
            return "inpaint"
        if "edit" in tasks:
            return "edit"
        if "image2image" in tasks:
            return "image2image"
        return "inpaint" if has_mask else "edit"  # resolve() answers with what exists
    if has_mask:
        return "inpaint"
    usable = [s for s in registry.specs("edit") if s.unavailable_reason() is None]
    return "edit" if usable else "image2image"


# -- videos ------------------------------------------------------------------------------


def _video_request(fields: dict[str, Any], uploads: dict[str, Upload]) -> GenerateRequest:
    prompt = fields.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise GenerateError(400, "invalid_value", "'prompt' must be a string.")
    image = fields.get("image") or fields.get("input_reference")
    has_image = "image" in uploads or image is not None
    if not has_image and not (prompt or "").strip():
        raise GenerateError(400, "missing_prompt", "'prompt' is required (or an 'image').")
    config: dict[str, Any] = {}
    size = _size(fields.get("size"))
    if size is not None:
        config["width"], config["height"] = size
    for name in ("width", "height", "num_frames", "fps", "seed", "num_inference_steps"):
        value = _int_field(fields.get(name), name)
        if value is not None:
            config[name] = value
    for name in ("guidance_scale", "negative_prompt", "scheduler", "preset"):
        if fields.get(name) is not None:
            config[name] = fields[name]
    seconds = fields.get("seconds")
    if seconds is not None and "num_frames" not in config:
        try:
            duration = float(str(seconds))
        except ValueError as exc:
            raise GenerateError(400, "invalid_value", "'seconds' must be a number.") from exc
        if not 0 < duration <= 60:
            raise GenerateError(400, "invalid_value", "'seconds' must be between 0 and 60.")
        config["num_frames"] = max(1, round(duration * int(config.get("fps", DEFAULT_VIDEO_FPS))))
    inputs: dict[str, Any] = {}
    if prompt:
        inputs["prompt"] = prompt
    if image is not None and "image" not in uploads:
        inputs["image"] = image
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise GenerateError(400, "invalid_value", "'model' must be a string.")
    return GenerateRequest(
        task="image2video" if has_image else "text2video",
        model=None if model is None or model in OPENAI_VIDEO_ALIASES else model,
        backend=str(fields.get("backend") or "auto"),
        inputs=inputs,
        config=config,
        adapters=fields.get("adapters"),
    )


async def _video_fields(
    request: Request, service: JobService
) -> tuple[dict[str, Any], dict[str, Upload]]:
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await _form(request, service)
        fields: dict[str, Any] = {}
        uploads: dict[str, Upload] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key in ("image", "input_reference") and "image" not in uploads:
                    uploads["image"] = await _upload(value, key, service.limits.max_upload_bytes)
            else:
                fields[key] = value
        return fields, uploads
    return await _json_body(request), {}


@router.post("/v1/videos/generations", openapi_extra=VIDEO_BODY)
async def videos_generations(request: Request) -> Response:
    """OmniRT's video route: ``text2video`` (or ``image2video`` with an image), sync or async.

    Sync answers ``{"created", "data": [{"url", ...}], "id"}``; ``async_run: true`` answers
    the job record at once (follow it on ``/v1/jobs/{id}``).
    """
    service = _service(request)
    try:
        fields, uploads = await _video_fields(request, service)
        body = _video_request(fields, uploads)
        async_run = str(fields.get("async_run", "")).lower() in ("1", "true", "yes", "on")
        mode = "async" if async_run else "sync"
        job = await submit_owned(service, body, uploads, mode=mode, owner=_owner(request))
        if async_run:
            return JSONResponse(job.record().model_dump(mode="json"))
        await job.done.wait()
        if job.state != "succeeded" or job.result is None:
            return _failure(job, request, "videos")
        data = [
            {
                "url": _absolute(request, a.url),
                "mime": a.mime,
                "width": a.width,
                "height": a.height,
                "num_frames": a.num_frames,
                "duration_s": a.duration_s,
            }
            for a in job.result.outputs
        ]
        return JSONResponse(
            {
                "id": job.id,
                "created": int(time.time()),
                "data": data,
                "metadata": job.result.metadata.model_dump(mode="json"),
            },
            headers={"x-job-id": job.id, "x-trace-id": job.trace_id},
        )
    except GenerateError as exc:
        return openai_error(exc, request, "videos")
    except ValueError as exc:
        return openai_error(GenerateError(400, "invalid_request", str(exc)), request, "videos")


_STATUS = {"queued": "queued", "running": "in_progress", "succeeded": "completed",
           "failed": "failed", "cancelled": "failed"}


def video_object(job: Job) -> dict[str, Any]:
    """A job as OpenAI's ``Video`` object."""
    request = job.request
    progress = 0
    for event in reversed(job.events):
        if event.event == "stage_progress" and event.stage == "denoise":
            progress = int(100 * float(event.data.get("fraction", 0.0)) * 0.95)
            break
    if job.state == "succeeded":
        progress = 100
    width = request.config.get("width")
    height = request.config.get("height")
    frames = request.config.get("num_frames")
    fps = request.config.get("fps") or DEFAULT_VIDEO_FPS
    if job.result is not None and job.result.outputs:
        first = job.result.outputs[0]
        width, height = first.width, first.height
        seconds = str(round(first.duration_s or 0.0, 3))
    else:
        seconds = str(round(frames / fps, 3)) if frames else ""
    error = None
    if job.error is not None:
        error = {"code": job.error.code, "message": job.error.message}
    return {
        "id": job.id,
        "object": "video",
        "model": job.model,
        "status": _STATUS.get(job.state, "queued"),
        "progress": progress,
        "created_at": int(job.enqueued_at_ms / 1000),
        "completed_at": int(job.finished_at_ms / 1000) if job.finished_at_ms else None,
        "expires_at": None,
        "prompt": request.inputs.get("prompt"),
        "seconds": seconds,
        "size": f"{width}x{height}" if width and height else "",
        "error": error,
        "remixed_from_video_id": None,
    }


@router.post("/v1/videos", openapi_extra=VIDEO_BODY)
async def create_video(request: Request) -> Response:
    """OpenAI video job: answers the ``Video`` object at once (``status: queued``)."""
    service = _service(request)
    try:
        fields, uploads = await _video_fields(request, service)
        body = _video_request(fields, uploads)
        job = await submit_owned(service, body, uploads, mode="async", owner=_owner(request))
        return JSONResponse(video_object(job))
    except GenerateError as exc:
        return openai_error(exc, request, "videos")
    except ValueError as exc:
        return openai_error(GenerateError(400, "invalid_request", str(exc)), request, "videos")


def _video_job(request: Request, video_id: str) -> Job:
    job = _service(request).store.get(video_id)
    if job is None or job.request.task not in ("text2video", "image2video"):
        raise GenerateError(404, "video_not_found", f"No video with id '{video_id}'.")
    if not principal_of(request).may_see(getattr(job, "owner", None)):
        raise GenerateError(404, "video_not_found", f"No video with id '{video_id}'.")
    return job


@router.get("/v1/videos/{video_id}")
async def get_video(request: Request, video_id: str) -> Response:
    """The job as a ``Video`` object (status and progress)."""
    try:
        return JSONResponse(video_object(_video_job(request, video_id)))
    except GenerateError as exc:
        return openai_error(exc, request, "videos")


@router.get("/v1/videos/{video_id}/content")
async def get_video_content(request: Request, video_id: str) -> Response:
    """The MP4 once the job completed (404 before; ``variant=video`` only)."""
    try:
        variant = request.query_params.get("variant", "video")
        if variant != "video":
            raise GenerateError(400, "invalid_value", "Only variant 'video' is available.")
        job = _video_job(request, video_id)
        if job.state != "succeeded" or job.result is None or not job.result.outputs:
            raise GenerateError(
                404, "video_not_ready", f"Video '{video_id}' is {video_object(job)['status']}."
            )
        path = job.result.outputs[0].path
        if not path or not await asyncio.to_thread(_exists, path):
            raise GenerateError(404, "video_expired", f"Video '{video_id}' has expired.")
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")
    except GenerateError as exc:
        return openai_error(exc, request, "videos")


def _exists(path: str) -> bool:
    import os

    return os.path.isfile(path)


@router.delete("/v1/videos/{video_id}")
async def delete_video(request: Request, video_id: str) -> Response:
    """Cancel the job if it still runs and delete its file."""
    service = _service(request)
    try:
        job = _video_job(request, video_id)
        if not job.terminal:
            await service.cancel(job)
        if job.result is not None:
            for artifact in job.result.outputs:
                if artifact.path:
                    await asyncio.to_thread(_unlink, artifact.path)
        return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": True})
    except GenerateError as exc:
        return openai_error(exc, request, "videos")


def _unlink(path: str) -> None:
    import contextlib
    import os

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
