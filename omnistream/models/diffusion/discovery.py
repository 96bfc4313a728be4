"""Finding diffusers pipelines on disk, the way users keep them, without importing torch.

A model directory is what ``DiffusionPipeline.save_pretrained`` writes (and what a Hugging
Face snapshot of a diffusers repo looks like): a ``model_index.json`` naming the pipeline
class and one subdirectory per component. Discovery only reads that JSON (and, where
present, the licence in the model card's front matter), so listing models costs nothing
and works on a core install without torch or diffusers.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"

#: The three UNet families whose denoising steps this server runs itself, batched across
#: requests (per-sample timesteps, one scheduler per request, CFG folded into the batch).
SD_PIPELINES: frozenset[str] = frozenset(
    {
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    }
)
SDXL_PIPELINES: frozenset[str] = frozenset(
    {
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    }
)
EDIT_PIPELINES: frozenset[str] = frozenset(
    {
        "StableDiffusionInstructPix2PixPipeline",
        "StableDiffusionXLInstructPix2PixPipeline",
        "FluxKontextPipeline",
        "QwenImageEditPipeline",
        "QwenImageEditPlusPipeline",
    }
)
TEXT2IMAGE_PIPELINES: frozenset[str] = frozenset(
    {
        "FluxPipeline",
        "StableDiffusion3Pipeline",
        "PixArtAlphaPipeline",
        "PixArtSigmaPipeline",
        "SanaPipeline",
        "KolorsPipeline",
        "QwenImagePipeline",
        "AuraFlowPipeline",
        "HunyuanDiTPipeline",
        "LuminaText2ImgPipeline",
        "Lumina2Pipeline",
        "CogView4Pipeline",
    }
)
TEXT2VIDEO_PIPELINES: frozenset[str] = frozenset(
    {
        "TextToVideoSDPipeline",
        "WanPipeline",
        "CogVideoXPipeline",
        "LTXPipeline",
        "HunyuanVideoPipeline",
        "MochiPipeline",
    }
)
IMAGE2VIDEO_PIPELINES: frozenset[str] = frozenset(
    {
        "StableVideoDiffusionPipeline",
        "WanImageToVideoPipeline",
        "CogVideoXImageToVideoPipeline",
        "I2VGenXLPipeline",
        "LTXImageToVideoPipeline",
        "HunyuanVideoImageToVideoPipeline",
    }
)

IMAGE_TASKS = ("text2image", "image2image", "inpaint", "edit")
VIDEO_TASKS = ("text2video", "image2video")
DIFFUSION_TASKS = IMAGE_TASKS + VIDEO_TASKS

#: OmniRT registry ids and the directory names their weights usually live under (the
#: Hugging Face repo's last path part first). ``models-dir/<id>`` always works too.
OMNIRT_IDS: dict[str, tuple[str, ...]] = {
    "sdxl-base-1.0": ("stable-diffusion-xl-base-1.0", "sdxl-base"),
    "sdxl-turbo": ("sdxl-turbo",),
    "sd-turbo": ("sd-turbo",),
    "sd15": ("stable-diffusion-v1-5", "sd-v1-5", "stable-diffusion-1.5"),
    "sd21": ("stable-diffusion-2-1", "stable-diffusion-2-1-base"),
    "sd15-inpainting": ("stable-diffusion-inpainting", "stable-diffusion-v1-5-inpainting"),
    "instruct-pix2pix": ("instruct-pix2pix",),
    "svd": ("stable-video-diffusion-img2vid",),
    "svd-xt": ("stable-video-diffusion-img2vid-xt",),
    "flux-schnell": ("FLUX.1-schnell",),
    "flux-dev": ("FLUX.1-dev",),
    "sd3-medium": ("stable-diffusion-3-medium-diffusers",),
    "wan2.1-t2v-1.3b": ("Wan2.1-T2V-1.3B-Diffusers",),
    "wan2.1-i2v-14b": ("Wan2.1-I2V-14B-480P-Diffusers",),
    "cogvideox-2b": ("CogVideoX-2b",),
    "cogvideox-5b-i2v": ("CogVideoX-5b-I2V",),
}

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_LICENSE_RE = re.compile(r"^license:\s*(.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class PipelineDir:
    """One diffusers pipeline directory and what it can serve.

    Attributes:
        id: registry id (the directory's name, or the OmniRT id it answers to).
        path: the directory.
        class_name: ``_class_name`` from ``model_index.json`` ("" when unreadable).
        tasks: tasks the class can serve.
        family: ``sd`` / ``sdxl`` (steps batched here) or ``call`` (the pipeline's own
            ``__call__``, one step per work item through its step-end callback).
        unet_in_channels: 4 (plain), 8 (edit), 9 (inpainting UNet) when known.
        license: from the model card's front matter, when it declares one.
        scheduler: the class name of the saved scheduler.
        error: why the directory cannot be used ("" when it can).
    """

    id: str
    path: Path
    class_name: str = ""
    tasks: tuple[str, ...] = ()
    family: str = "call"
    unet_in_channels: int = 0
    license: str = ""
    scheduler: str = ""
    error: str = ""
    components: dict[str, Any] = field(default_factory=dict)


def tasks_of(class_name: str, unet_in_channels: int = 4) -> tuple[tuple[str, ...], str]:
    """Tasks a pipeline class serves and the family that runs it."""
    if class_name in SD_PIPELINES or class_name in SDXL_PIPELINES:
        family = "sd" if class_name in SD_PIPELINES else "sdxl"
        if unet_in_channels == 9 or ("Inpaint" in class_name and unet_in_channels != 4):
            return ("inpaint",), family
        return ("text2image", "image2image", "inpaint"), family
    if class_name in EDIT_PIPELINES:
        return ("edit",), "call"
    if class_name in TEXT2IMAGE_PIPELINES:
        return ("text2image",), "call"
    if class_name in TEXT2VIDEO_PIPELINES:
        return ("text2video",), "call"
    if class_name in IMAGE2VIDEO_PIPELINES:
        return ("image2video",), "call"
    return (), "call"


def default_tasks(model_id: str) -> tuple[str, ...]:
    """The tasks an OmniRT id serves once its weights are present (for listing it)."""
    if "svd" in model_id or "i2v" in model_id:
        return ("image2video",)
    if "t2v" in model_id or model_id.startswith("cogvideox"):
        return ("text2video",)
    if "pix2pix" in model_id:
        return ("edit",)
    if "inpainting" in model_id:
        return ("inpaint",)
    if model_id.startswith(("flux", "sd3")):
        return ("text2image",)
    return ("text2image", "image2image", "inpaint")


def _read_json(path: Path) -> dict[str, Any]:
    with path.open("r", encoding="utf-8") as handle:
        value = json.load(handle)
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return value


def _license(directory: Path) -> str:
    card = directory / "README.md"
    try:
        if not card.is_file() or card.stat().st_size > 1_000_000:
            return ""
        text = card.read_text("utf-8", errors="replace")
    except OSError:
        return ""
    if not text.startswith("---"):
        return ""
    front = text[3:].split("\n---", 1)[0]
    match = _LICENSE_RE.search(front)
    return match.group(1).strip("'\"") if match else ""


def inspect_dir(model_id: str, directory: Path) -> PipelineDir:
    """Read one directory; never raises (a problem becomes :attr:`PipelineDir.error`)."""
    index = directory / MODEL_INDEX
    if not directory.is_dir():
        return PipelineDir(model_id, directory, error=f"directory not found: {directory}")
    if not index.is_file():
        return PipelineDir(
            model_id,
            directory,
            error=f"{directory} is not a diffusers pipeline (no {MODEL_INDEX}; save one "
            "with DiffusionPipeline.save_pretrained)",
        )
    try:
        data = _read_json(index)
    except (OSError, ValueError) as exc:
        return PipelineDir(model_id, directory, error=f"unreadable {index}: {exc}")
    class_name = str(data.get("_class_name") or "")
    components = {k: v for k, v in data.items() if not k.startswith("_")}
    in_channels = 0
    unet_config = directory / "unet" / "config.json"
    if unet_config.is_file():
        try:
            in_channels = int(_read_json(unet_config).get("in_channels") or 0)
        except (OSError, ValueError, TypeError):
            in_channels = 0
    scheduler = ""
    entry = components.get("scheduler")
    if isinstance(entry, list) and len(entry) == 2:
        scheduler = str(entry[1])
    tasks, family = tasks_of(class_name, in_channels or 4)
    if not tasks:
        return PipelineDir(
            model_id,
            directory,
            class_name=class_name,
            tasks=default_tasks(model_id),
            error=f"pipeline class {class_name or '(none)'} is not one this server runs",
        )
    return PipelineDir(
        model_id,
        directory,
        class_name=class_name,
        tasks=tasks,
        family=family,
        unet_in_channels=in_channels,
        license=_license(directory),
        scheduler=scheduler,
        components=components,
    )


def discover(models_dirs: list[str]) -> list[PipelineDir]:
    """Every pipeline directory under the configured roots, then the OmniRT ids.

    Subdirectories are registered under their own names (the first root wins on a
    clash); an OmniRT id is registered when none of that name exists, pointing at the
    first directory named as its weights usually are, or (when some models directory is
    configured) at nothing: listed unavailable, naming the directories looked in.
    """
    found: dict[str, PipelineDir] = {}
    roots = [Path(os.path.expanduser(d)) for d in models_dirs]
    for root in roots:
        try:
            entries = sorted(p for p in root.iterdir() if p.is_dir())
        except OSError as exc:
            log.warning("models dir %s is not readable: %s", root, exc)
            continue
        for sub in entries:
            if not _ID_RE.match(sub.name) or sub.name in found:
                continue
            if not (sub / MODEL_INDEX).is_file():
                continue
            found[sub.name] = inspect_dir(sub.name, sub)
    for model_id, names in OMNIRT_IDS.items():
        if model_id in found:
            continue
        candidates = [root / name for root in roots for name in (model_id, *names)]
        hit = next((c for c in candidates if (c / MODEL_INDEX).is_file()), None)
        if hit is not None:
            found[model_id] = inspect_dir(model_id, hit)
        elif roots:
            looked = ", ".join(str(root) for root in roots)
            found[model_id] = PipelineDir(
                model_id,
                roots[0] / names[0],
                tasks=default_tasks(model_id),
                error=f"no weights: looked for a diffusers directory named "
                f"{' or '.join((model_id, *names))} in {looked}",
            )
    return list(found.values())


def parse_models_dirs(value: Any) -> list[str]:
    """``OMNISTREAM_MODELS_DIR``: one path, or a JSON list of paths."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if str(v)]
    text = str(value).strip()
    if text.startswith("["):
        parsed = json.loads(text)
        if not isinstance(parsed, list):
            raise ValueError("OMNISTREAM_MODELS_DIR must be a path or a JSON list of paths")
        return [str(v) for v in parsed if str(v)]
    return [text]
