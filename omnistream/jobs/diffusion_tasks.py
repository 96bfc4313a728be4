"""The image and video tasks: text2image, image2image, inpaint, edit, text2video, image2video.

Like every offline task, each is a one-shot session on the model's shared runner at
offline priority: encode the prompt, then one work item per denoising step (so a live
session's work overtakes it between steps and a cancel stops it at the next one), then
decode and export. Steps of requests to the same Stable Diffusion model at the same size
share one UNet call; the RunReport's ``batch_size`` says how many requests the largest
shared call carried.

``prepare`` checks every input and config value before a job exists, so a bad value is a
400 that names what to change, and never a failed job.
"""

from __future__ import annotations

import io
import json
import math
import re
import secrets
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from omnistream.jobs.errors import GenerateError
from omnistream.jobs.inputs import (
    InputLimits,
    Upload,
    decode_image_input,
    media_bytes,
    resolve_path,
)
from omnistream.jobs.runtime import RunContext
from omnistream.jobs.schemas import Artifact, GenerateRequest
from omnistream.jobs.tasks import Prepared, TaskDef

DEFAULT_SIZE = 512
DEFAULT_VIDEO_FRAMES = 16
DEFAULT_FPS = 8
MAX_GUIDANCE = 50.0
MAX_ADAPTERS = 4
SIZE_MULTIPLE = 8
MIN_SIDE = 16
#: (steps, guidance) per preset; turbo/lightning checkpoints are distilled to few steps.
PRESETS: dict[str, tuple[int, float]] = {
    "fast": (12, 5.0),
    "balanced": (30, 7.5),
    "quality": (50, 7.5),
}
TURBO_PRESETS: dict[str, tuple[int, float]] = {
    "fast": (1, 0.0),
    "balanced": (2, 0.0),
    "quality": (4, 0.0),
}
DTYPES = ("auto", "float32", "float16", "bfloat16")
IMAGE_FORMATS = {"png": ("image/png", ".png"), "jpeg": ("image/jpeg", ".jpg"),
                 "webp": ("image/webp", ".webp")}
_LORA_KEY = re.compile(r"lora|\.alpha$", re.IGNORECASE)

NEEDS_IMAGE = frozenset({"image2image", "inpaint", "edit", "image2video"})
NEEDS_PROMPT = frozenset({"text2image", "image2image", "inpaint", "edit", "text2video"})
VIDEO = frozenset({"text2video", "image2video"})


def _limits(spec: Any) -> dict[str, int]:
    return dict(spec.capabilities.get("limits") or {})


def _value(request: GenerateRequest, *names: str) -> Any:
    """A value from ``inputs`` first (semantic inputs), then ``config``, by any alias."""
    for name in names:
        if request.inputs.get(name) is not None:
            return request.inputs[name]
    for name in names:
        if request.config.get(name) is not None:
            return request.config[name]
    return None


def _int(request: GenerateRequest, name: str, default: int, low: int, high: int,
         *aliases: str, hint: str = "") -> int:
    value = _value(request, name, *aliases)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))  # int() of inf/NaN raises
        or int(value) != value
    ):
        raise GenerateError(400, "invalid_config", f"'{name}' must be an integer, got {value!r}.")
    if not low <= int(value) <= high:
        raise GenerateError(
            400, "invalid_config", f"'{name}' must be between {low} and {high}, got {value}.{hint}"
        )
    return int(value)


def _float(request: GenerateRequest, name: str, default: float, low: float, high: float) -> float:
    value = _value(request, name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GenerateError(400, "invalid_config", f"'{name}' must be a number, got {value!r}.")
    if not low <= value <= high:  # float() of a huge int raises
        raise GenerateError(
            400, "invalid_config", f"'{name}' must be between {low:g} and {high:g}, got {value}."
        )
    return float(value)


def _text(request: GenerateRequest, name: str, limit: int, required: bool) -> str | None:
    value = _value(request, name)
    if value is None:
        if required:
            raise GenerateError(400, "missing_input", f"Input '{name}' is required for this task.")
        return None
    if not isinstance(value, str):
        raise GenerateError(400, "invalid_input", f"Input '{name}' must be a string.")
    if required and not value.strip():
        raise GenerateError(400, "missing_input", f"Input '{name}' is empty.")
    if len(value) > limit:
        raise GenerateError(
            400,
            "prompt_too_long",
            f"Input '{name}' has {len(value)} characters; the limit is {limit}. Shorten it.",
        )
    return value


def check_lora_file(path: Path) -> str | None:
    """Why a file is not a LoRA adapter this server loads, or None (reads the header only).

    A safetensors file starts with an 8-byte header length and a JSON header naming every
    tensor; a LoRA names ``lora_A``/``lora_down``… tensors. Nothing is loaded here.
    """
    if path.suffix.lower() != ".safetensors":
        return "LoRA adapters must be .safetensors files"
    try:
        with path.open("rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                return "not a safetensors file (too short)"
            (length,) = struct.unpack("<Q", raw)
            if length <= 0 or length > 100 * 1024 * 1024:
                return "not a safetensors file (bad header length)"
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as exc:
        return f"not a safetensors file ({type(exc).__name__})"
    if not isinstance(header, dict):
        return "not a safetensors file (header is not an object)"
    names = [k for k in header if k != "__metadata__"]
    if not names or not any(_LORA_KEY.search(k) for k in names):
        return "the file holds no LoRA tensors (no lora_A/lora_down weights)"
    return None


def _adapters(request: GenerateRequest, limits: InputLimits) -> tuple[tuple[str, float], ...]:
    raw = request.adapters
    if raw is None:
        return ()
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or len(raw) > MAX_ADAPTERS:
        raise GenerateError(
            400,
            "invalid_adapter",
            f"'adapters' must be a list of at most {MAX_ADAPTERS} {{\"path\", \"scale\"}} objects.",
        )
    out: list[tuple[str, float]] = []
    for index, entry in enumerate(raw):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise GenerateError(
                400, "invalid_adapter", f"adapters[{index}] needs a 'path' string."
            )
        scale = entry.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not -4 <= scale <= 4:
            raise GenerateError(
                400, "invalid_adapter", f"adapters[{index}].scale must be a number in [-4, 4]."
            )
        try:
            path = resolve_path(entry["path"], f"adapters[{index}]", limits)
        except GenerateError as exc:
            raise GenerateError(400, "invalid_adapter", exc.message) from exc
        reason = check_lora_file(path)
        if reason is not None:
            raise GenerateError(400, "invalid_adapter", f"adapters[{index}]: {reason}.")
        out.append((str(path), float(scale)))
    return tuple(out)


def _scheduler_names(spec: Any) -> list[str]:
    base = str(spec.capabilities.get("scheduler") or "")
    try:
        import diffusers

        cls = getattr(diffusers, base)
        return sorted({c.__name__ for c in cls().compatibles} | {base})
    except Exception:
        return [base] if base else []


def _image(
    name: str, request: GenerateRequest, uploads: dict[str, Upload], limits: InputLimits
) -> npt.NDArray[np.uint8] | None:
    media = media_bytes(name, request.inputs.get(name), uploads, limits)
    if media is None:
        return None
    return decode_image_input(media.data, name, limits)


def _running_dtype(spec: Any, backend: str) -> str:
    """The dtype the model's runner holds its weights in for this backend."""
    from omnistream.engine.devices import pick_device

    configured = str(spec.capabilities.get("dtype") or "auto")
    if configured != "auto":
        return configured
    try:
        device = pick_device(backend, spec.devices)
    except ValueError:
        device = "cpu"
    if device == "cpu":
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def _turbo(spec: Any) -> bool:
    text = f"{spec.id} {spec.capabilities.get('path', '')}".lower()
    return "turbo" in text or "lightning" in text or "schnell" in text


def prepare_diffusion(
    request: GenerateRequest, uploads: dict[str, Upload], limits: InputLimits, spec: Any
) -> Prepared:
    """Check and normalise one image or video request (runs in a worker thread)."""
    task = request.task
    caps = _limits(spec)
    max_pixels = int(caps.get("max_pixels", 1024 * 1024))
    out = Prepared(task=task)
    prompt = _text(request, "prompt", int(caps.get("max_prompt_chars", 2000)),
                   task in NEEDS_PROMPT)
    negative = _text(request, "negative_prompt", int(caps.get("max_prompt_chars", 2000)), False)
    preset_name = _value(request, "preset") or "balanced"
    presets = TURBO_PRESETS if _turbo(spec) else PRESETS
    if not isinstance(preset_name, str) or preset_name not in presets:
        raise GenerateError(
            400, "invalid_config", f"'preset' must be one of {', '.join(presets)}."
        )
    preset_steps, preset_guidance = presets[str(preset_name)]
    steps = _int(request, "num_inference_steps", preset_steps, 1,
                 int(caps.get("max_steps", 100)), "steps")
    guidance = _float(request, "guidance_scale", preset_guidance, 0.0, MAX_GUIDANCE)
    image = _image("image", request, uploads, limits)
    if task in NEEDS_IMAGE and image is None:
        raise GenerateError(400, "missing_input", f"Input 'image' is required for {task}.")
    # The default square fits the server's pixel cap (a small cap means small defaults).
    default_w = default_h = min(DEFAULT_SIZE, int(max_pixels**0.5) // SIZE_MULTIPLE * SIZE_MULTIPLE)
    if image is not None and task in NEEDS_IMAGE:
        # The input's size, rounded down to the multiple the VAE needs, within the cap.
        h, w = image.shape[:2]
        scale = min(1.0, (max_pixels / float(w * h)) ** 0.5)
        default_w = max(MIN_SIDE, int(w * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE)
        default_h = max(MIN_SIDE, int(h * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE)
    width = _int(request, "width", default_w, MIN_SIDE, 8192)
    height = _int(request, "height", default_h, MIN_SIDE, 8192)
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        near_w, near_h = (max(MIN_SIDE, v - v % SIZE_MULTIPLE) for v in (width, height))
        raise GenerateError(
            400,
            "invalid_size",
            f"width and height must be multiples of {SIZE_MULTIPLE}, got {width}x{height}: "
            f"try {near_w}x{near_h}.",
        )
    if width * height > max_pixels:
        raise GenerateError(
            400,
            "invalid_size",
            f"{width}x{height} is {width * height} pixels; this server's limit is {max_pixels} "
            "(OMNISTREAM_DIFFUSION_MAX_PIXELS). Ask for a smaller size.",
        )
    mask = None
    if task == "inpaint":
        mask_rgb = _image("mask", request, uploads, limits)
        if mask_rgb is None:
            raise GenerateError(400, "missing_input", "Input 'mask' is required for inpaint.")
        assert image is not None
        if mask_rgb.shape[:2] != image.shape[:2]:
            raise GenerateError(
                400,
                "invalid_mask",
                f"The mask is {mask_rgb.shape[1]}x{mask_rgb.shape[0]} but the image is "
                f"{image.shape[1]}x{image.shape[0]}; send a mask of the image's size.",
            )
        mask = np.ascontiguousarray(mask_rgb.max(axis=2))
    video = task in VIDEO
    num_images = 1 if video else _int(
        request, "num_images", 1, 1, int(caps.get("max_images", 8)), "n"
    )
    seed_value = _value(request, "seed")
    if seed_value is None:
        seed = secrets.randbelow(2**31)
    else:
        seed = _int(request, "seed", 0, 0, 2**63 - 1)
    scheduler = _value(request, "scheduler")
    if scheduler is not None:
        names = _scheduler_names(spec)
        if not isinstance(scheduler, str) or scheduler not in names:
            raise GenerateError(
                400,
                "invalid_config",
                f"'scheduler' must be one of the schedulers this pipeline takes: "
                f"{', '.join(names) or 'none'}.",
            )
    dtype = _value(request, "dtype")
    if dtype is not None:
        if dtype not in DTYPES:
            raise GenerateError(
                400, "invalid_config", f"'dtype' must be one of {', '.join(DTYPES)}."
            )
        running = _running_dtype(spec, request.backend)
        if dtype != "auto" and dtype != running:
            raise GenerateError(
                400,
                "invalid_config",
                f"Model {spec.id} runs in {running} here (OMNISTREAM_DIFFUSION_DTYPE and the "
                "device decide it, for every request alike); send dtype 'auto' or that one.",
            )
    strength = _float(request, "strength", 0.75 if task == "image2image" else 1.0, 0.01, 1.0)
    extra: dict[str, Any] = {}
    if task == "edit":
        extra["image_guidance_scale"] = _float(request, "image_guidance_scale", 1.5, 0.0, 20.0)
    if task == "image2video":
        extra["motion_bucket_id"] = _int(request, "motion_bucket_id", 127, 0, 1023)
        extra["noise_aug_strength"] = _float(request, "noise_aug_strength", 0.02, 0.0, 1.0)
    num_frames = 0
    fps = DEFAULT_FPS
    if video:
        num_frames = _int(request, "num_frames", DEFAULT_VIDEO_FRAMES, 1,
                          int(caps.get("max_frames", 128)))
        fps = _int(request, "fps", DEFAULT_FPS, 1, 60)
    fmt = _value(request, "output_format") or "png"
    if video:
        fmt = "mp4"
    elif fmt not in IMAGE_FORMATS:
        raise GenerateError(
            400, "invalid_config", f"'output_format' must be one of {', '.join(IMAGE_FORMATS)}."
        )
    out.text = prompt or ""
    out.image = image
    out.options = {
        "negative_prompt": negative,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance_scale": guidance,
        "seed": seed,
        "num_images": num_images,
        "scheduler": scheduler,
        "strength": strength,
        "mask": mask,
        "adapters": _adapters(request, limits),
        "num_frames": num_frames,
        "fps": fps,
        "extra": extra,
        "output_format": fmt,
        "preset": preset_name,
    }
    return out


# -- running ------------------------------------------------------------------------------


def _encode_image(pixels: npt.NDArray[np.uint8], fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=92)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=92)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_mp4(path: Path, frames: npt.NDArray[np.uint8], fps: int) -> None:
    """H.264 (yuv420p) MP4, no audio; odd sizes are cropped by one pixel to stay legal."""
    import av

    count, height, width = frames.shape[:3]
    even_h, even_w = height - height % 2, width - width % 2
    with av.open(str(path), mode="w", format="mp4") as container:
        stream: Any = container.add_stream("libx264", rate=fps)
        stream.width = even_w
        stream.height = even_h
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(
                np.ascontiguousarray(frames[index, :even_h, :even_w]), format="rgb24"
            )
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


async def run_diffusion(ctx: RunContext, prepared: Prepared) -> list[Artifact]:
    """Encode, denoise one step per work item, decode, export."""
    from omnistream.models.diffusion.items import (
        AdapterError,
        DiffusionJob,
        FinishItem,
        StartItem,
        StepItem,
    )

    opts = prepared.options
    job = DiffusionJob(
        task=prepared.task,
        prompt=prepared.text,
        negative_prompt=opts["negative_prompt"],
        width=opts["width"],
        height=opts["height"],
        steps=opts["steps"],
        guidance_scale=opts["guidance_scale"],
        seed=opts["seed"],
        num_images=opts["num_images"],
        scheduler=opts["scheduler"],
        strength=opts["strength"],
        image=prepared.image,
        mask=opts["mask"],
        adapters=opts["adapters"],
        num_frames=opts["num_frames"],
        fps=opts["fps"],
        extra=dict(opts["extra"]),
    )
    try:
        async with ctx.stage("load"):
            await ctx.runner.wait_ready()
        async with ctx.stage("encode_prompt"):
            try:
                total = int((await ctx.submit(StartItem(job))).value)
            except AdapterError as exc:
                raise GenerateError(400, "invalid_adapter", str(exc)) from exc
        ctx.cache_hits.extend(job.cache_hits)
        async with ctx.stage("denoise", steps=total):
            done = 0
            while done < total:
                result = await ctx.submit(StepItem(job))
                step = result.value
                done = step.index
                ctx.progress("denoise", done, total, batch_size=result.batch_size)
                if step.done:
                    break
        async with ctx.stage("decode"):
            pixels = (await ctx.submit(FinishItem(job))).value
    finally:
        job.close()
    info = ctx.runner.model_info()
    device = ctx.device
    ctx.device_placement.update(
        {"unet": device, "vae": device, "text_encoder": device, "dtype": str(info.get("dtype"))}
    )
    if "peak_device_bytes" in info:
        ctx.extra["peak_device_bytes"] = info["peak_device_bytes"]
    ctx.extra.update(
        seed=opts["seed"],
        num_inference_steps=opts["steps"],
        guidance_scale=opts["guidance_scale"],
        preset=opts["preset"],
        pipeline=info.get("pipeline"),
        batched_steps=info.get("batched_steps"),
    )
    fmt = opts["output_format"]
    artifacts: list[Artifact] = []
    async with ctx.stage("export"):
        if prepared.task in VIDEO:
            frames = np.asarray(pixels)
            reservation = ctx.reserve(".mp4")
            await ctx.blocking(write_mp4, reservation.part_path, frames, opts["fps"])
            artifacts.append(
                Artifact(
                    kind="video",
                    mime="video/mp4",
                    width=int(frames.shape[2]) - int(frames.shape[2]) % 2,
                    height=int(frames.shape[1]) - int(frames.shape[1]) % 2,
                    num_frames=int(frames.shape[0]),
                    duration_s=round(frames.shape[0] / opts["fps"], 4),
                    data={"fps": opts["fps"], "video_codec": "h264", "seed": opts["seed"]},
                    id=reservation.id,
                )
            )
        else:
            mime, ext = IMAGE_FORMATS[fmt]
            for index, image in enumerate(np.asarray(pixels)):
                reservation = ctx.reserve(ext)
                data = await ctx.blocking(_encode_image, image, fmt)
                await ctx.blocking(reservation.part_path.write_bytes, data)
                artifacts.append(
                    Artifact(
                        kind="image",
                        mime=mime,
                        width=int(image.shape[1]),
                        height=int(image.shape[0]),
                        data={"seed": opts["seed"], "index": index},
                        id=reservation.id,
                    )
                )
    return artifacts


def _def(inputs: tuple[str, ...], outputs: tuple[str, ...]) -> TaskDef:
    run: Callable[[RunContext, Prepared], Awaitable[list[Artifact]]] = run_diffusion
    return TaskDef(prepare_diffusion, run, None, inputs, outputs)


_CONFIG = ("width", "height", "num_inference_steps", "guidance_scale", "negative_prompt", "seed",
           "num_images", "scheduler", "preset", "dtype")
DIFFUSION_TASK_IMPLS: dict[str, TaskDef] = {
    "text2image": _def(("prompt", *_CONFIG), ("image/png",)),
    "image2image": _def(("prompt", "image", "strength", *_CONFIG), ("image/png",)),
    "inpaint": _def(("prompt", "image", "mask", "strength", *_CONFIG), ("image/png",)),
    "edit": _def(("prompt", "image", "image_guidance_scale", *_CONFIG), ("image/png",)),
    "text2video": _def(("prompt", "num_frames", "fps", *_CONFIG), ("video/mp4",)),
    "image2video": _def(("image", "prompt", "num_frames", "fps", *_CONFIG), ("video/mp4",)),
}
"""The task table entries :mod:`omnistream.jobs.tasks` adds to ``TASK_IMPLS``."""
