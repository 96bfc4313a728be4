"""Image and video diffusion models: diffusers pipelines from the operator's directories.

``omnistream serve --models-dir DIR`` (or ``OMNISTREAM_MODELS_DIR``) registers every
subdirectory holding a saved diffusers pipeline under its name, with the tasks its class
serves. This module only reads JSON; torch and diffusers are imported in the runner
thread when a model first loads, so without the ``diffusion`` extra the models are listed
as unavailable, with the install command as the reason.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from omnistream.engine.registry import LoadContext, ModelSpec, Tier
from omnistream.models.base import BatchModel
from omnistream.models.diffusion.discovery import (
    OMNIRT_IDS,
    PipelineDir,
    discover,
    parse_models_dirs,
)

INSTALL_HINT = "pip install 'omnistream[diffusion]'"

_SUMMARIES = {
    "sd": "Stable Diffusion pipeline from {path}; denoising steps batched across requests.",
    "sdxl": "Stable Diffusion XL pipeline from {path}; denoising steps batched across requests.",
    "call": "{cls} from {path}; one step per work item.",
}


def missing_packages() -> str | None:
    """Why diffusion cannot run in this environment, or None."""
    missing = [m for m in ("torch", "diffusers", "transformers") if not importlib.util.find_spec(m)]
    if missing:
        return f"{', '.join(missing)} not installed ({INSTALL_HINT})"
    return None


def _config_schema(video: bool, settings: Any) -> dict[str, Any]:
    """The config keys a diffusion request takes (for the capability manifest)."""
    schema: dict[str, Any] = {
        "width": {"type": "integer", "multiple_of": 8},
        "height": {"type": "integer", "multiple_of": 8},
        "num_inference_steps": {
            "type": "integer", "max": getattr(settings, "diffusion_max_steps", 100)
        },
        "guidance_scale": {"type": "number"},
        "negative_prompt": {"type": "string"},
        "seed": {"type": "integer", "note": "same seed and request: identical pixels"},
        "scheduler": {"type": "string", "note": "a diffusers scheduler class the pipeline takes"},
        "preset": {"type": "string", "values": ["fast", "balanced", "quality"]},
        "dtype": {"type": "string", "values": ["auto", "float32", "float16", "bfloat16"]},
        "strength": {"type": "number", "range": [0.01, 1.0], "tasks": ["image2image", "inpaint"]},
    }
    if video:
        schema["num_frames"] = {"type": "integer",
                                "max": getattr(settings, "diffusion_max_frames", 128)}
        schema["fps"] = {"type": "integer"}
    else:
        schema["num_images"] = {"type": "integer",
                                "max": getattr(settings, "diffusion_max_images", 8)}
        schema["output_format"] = {"type": "string", "values": ["png", "jpeg", "webp"]}
    return schema


def _spec(pdir: PipelineDir, settings: Any) -> ModelSpec:
    def factory(ctx: LoadContext, pdir: PipelineDir = pdir) -> BatchModel[Any, Any]:
        reason = missing_packages() or pdir.error
        if reason:
            from omnistream.engine.registry import ModelUnavailable

            raise ModelUnavailable(reason)
        from omnistream.models.diffusion.pipeline import load_model

        options = {
            "dtype": getattr(settings, "diffusion_dtype", "auto"),
            "max_batch_rows": getattr(settings, "diffusion_max_batch_rows", 16),
            "nice": getattr(settings, "diffusion_thread_nice", 10),
            "cpu_threads": getattr(settings, "diffusion_cpu_threads", 1),
            **ctx.options,
        }
        return load_model(pdir, ctx.device, options)

    def check(pdir: PipelineDir = pdir) -> str | None:
        return pdir.error or missing_packages()

    tasks = pdir.tasks or ("text2image",)
    video = any(t in ("text2video", "image2video") for t in tasks)
    summary = _SUMMARIES.get(pdir.family, _SUMMARIES["call"]).format(
        path=pdir.path, cls=pdir.class_name or "pipeline"
    )
    return ModelSpec(
        id=pdir.id,
        tasks=tasks,
        tier=Tier.ADJACENT,
        factory=factory,
        summary=summary,
        capabilities={
            "inputs": ["prompt", "image", "mask"] if not video else ["prompt", "image"],
            "outputs": ["video"] if video else ["image"],
            "streaming": False,
            "resident": True,
            "pipeline": pdir.class_name,
            "family": pdir.family,
            "path": str(pdir.path),
            "scheduler": pdir.scheduler,
            "unet_in_channels": pdir.unet_in_channels,
            "license": pdir.license or None,
            "batching": "denoising steps of requests with the same size share one UNet call"
            if pdir.family in ("sd", "sdxl")
            else "one request per step (the pipeline's own __call__)",
            "omnirt_id": pdir.id in OMNIRT_IDS,
            # A request naming a directory that holds no usable pipeline is the
            # client's to fix (pick another model): 400, not 503.
            "unavailable_status": 400 if pdir.error and "pip install" not in pdir.error else 503,
            "dtype": getattr(settings, "diffusion_dtype", "auto"),
            "limits": {
                "max_pixels": getattr(settings, "diffusion_max_pixels", 1024 * 1024),
                "max_steps": getattr(settings, "diffusion_max_steps", 100),
                "max_images": getattr(settings, "diffusion_max_images", 8),
                "max_frames": getattr(settings, "diffusion_max_frames", 128),
                "max_prompt_chars": getattr(settings, "diffusion_max_prompt_chars", 2000),
            },
            "config_schema": _config_schema(video, settings),
            "default_config": {"preset": "balanced", "width": 512, "height": 512,
                               **({"num_frames": 16, "fps": 8} if video else {})},
            "backends": ["cuda", "cpu"],
            "precision": {"cuda": "bf16 (fp16 before Ampere), VAE tiling", "cpu": "fp32"},
        },
        replicas=1,
        devices=("cuda", "cpu"),
        check=check,
        owned_by="local",
        maturity="beta",
    )


def specs(settings: Any) -> list[ModelSpec]:
    """A spec per pipeline directory found under the configured models directories."""
    dirs = parse_models_dirs(getattr(settings, "models_dir", None))
    if not dirs:
        return []
    return [_spec(pdir, settings) for pdir in discover(dirs)]


__all__ = ["INSTALL_HINT", "missing_packages", "specs"]
