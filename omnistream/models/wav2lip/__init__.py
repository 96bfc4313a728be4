"""Wav2Lip-family neural lip-sync (96 / 256 / 384), batched across every live session.

This module only registers the models; it never imports torch, so the core install
(which has no torch) lists them as unavailable with the reason instead of failing.
The weights are the operator's: published Wav2Lip checkpoints are licensed for
non-commercial research only, so omnistream ships none and loads a local file named by
``OMNISTREAM_WAV2LIP_<96|256|384>_PATH``. A request may name its own checkpoint with
``config.model_path`` when the file lies under ``OMNISTREAM_CHECKPOINT_ROOTS``; the engine
then keeps it resident as one more runner that every request naming it shares.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

from omnistream.engine.registry import LoadContext, ModelSpec, Tier
from omnistream.models.base import BatchModel

VARIANTS = ("96", "256", "384")
DEFAULT_LICENSE = (
    "code Apache-2.0; weights user-supplied (the published Wav2Lip checkpoints are for "
    "non-commercial research use only)"
)
_SUMMARIES = {
    "96": "Wav2Lip neural lip-sync, 96×96 mouth crop (original); your checkpoint, GPU or CPU.",
    "256": "Wav2Lip-256 neural lip-sync, 256×256 crop (v2 or spatial-attention layout); "
    "your checkpoint, GPU recommended.",
    "384": "Wav2Lip-384 neural lip-sync with spatial attention, 384×384 crop; your "
    "checkpoint, GPU recommended.",
}


def model_id(variant: str) -> str:
    """Registry id of a variant: ``wav2lip-96`` …"""
    return f"wav2lip-{variant}"


def checkpoint_setting(settings: Any, variant: str) -> str | None:
    """The configured checkpoint path for a variant, or None."""
    value = getattr(settings, f"wav2lip_{variant}_path", None)
    return str(value) if value else None


def unavailable_reason(variant: str, path: str | None) -> str | None:
    """Why ``wav2lip-<variant>`` cannot load here, or None when it can be tried."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install 'omnistream[wav2lip]')"
    if not path:
        return (
            f"no checkpoint configured: set OMNISTREAM_WAV2LIP_{variant}_PATH to a local "
            f"wav2lip-{variant} checkpoint, or name one in config.model_path under "
            "OMNISTREAM_CHECKPOINT_ROOTS (omnistream ships no Wav2Lip weights)"
        )
    if not Path(path).is_file():
        return f"checkpoint file not found: {path}"
    return None


def specs(settings: Any) -> list[ModelSpec]:
    """Registry entries for the three variants (tier experimental, task audio2video)."""
    out: list[ModelSpec] = []
    license_text = getattr(settings, "wav2lip_license", None) or DEFAULT_LICENSE
    for variant in VARIANTS:
        path = checkpoint_setting(settings, variant)

        def factory(ctx: LoadContext, variant: str = variant, path: str | None = path
                    ) -> BatchModel[Any, Any]:
            from omnistream.models.wav2lip.model import load_model

            chosen = ctx.options.get("model_path") or path
            reason = unavailable_reason(variant, chosen)
            if reason is not None or chosen is None:
                from omnistream.engine.registry import ModelUnavailable

                raise ModelUnavailable(reason or "no checkpoint")
            return load_model(variant, str(chosen), ctx.device, ctx.options)

        def check(variant: str = variant, path: str | None = path) -> str | None:
            return unavailable_reason(variant, path)

        out.append(
            ModelSpec(
                id=model_id(variant),
                tasks=("audio2video",),
                tier=Tier.EXPERIMENTAL,
                factory=factory,
                summary=_SUMMARIES[variant],
                capabilities={
                    "inputs": ["audio", "image"],
                    "outputs": ["video"],
                    "streaming": True,
                    "resident": True,
                    "batching": "frames from any sessions share a batch (padded sizes on CUDA)",
                    "crop_size": int(variant),
                    "lookahead_ms": 120,
                    "audio": "16 kHz, 80-band log-mel, 16 mel frames per video frame",
                    "checkpoint": path,
                    "model_path": "config.model_path under OMNISTREAM_CHECKPOINT_ROOTS",
                    "license": license_text,
                    "backends": ["cuda", "cpu"],
                    "precision": {
                        "cuda": "bf16 (fp16 before Ampere), CUDA graphs per padded batch size",
                        "cpu": "fp32 (bf16/fp16 selectable)",
                    },
                },
                replicas=1,
                devices=("cuda", "cpu"),
                check=check,
                checkpoint_check=functools.partial(unavailable_reason, variant),
                default_checkpoint=path,
                maturity="alpha",
            )
        )
    return out
