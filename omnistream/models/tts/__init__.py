"""Text-to-speech voices served through the engine's runners.

Two embedded voices, both loaded from files inside pip packages (nothing downloads):

* ``hibari`` (default): Kokoro-82M distilled, int8 ONNX, 24 kHz, one segment per call.
* ``espeak-ng``: formant synthesis via ``espeakng-loader``, 22.05 kHz, ~60 ms pieces
  streamed from inside each segment.

A voice whose package is missing is still registered, marked unavailable with the reason
(``ModelSpec.check``), so listing models and importing this package never fail.
"""

from __future__ import annotations

import os
from typing import Any

from omnistream.engine.registry import LoadContext, ModelSpec, Tier
from omnistream.models.tts import espeak_voice, hibari_voice
from omnistream.models.tts.base import SynthRequest, SynthResult, VoiceInfo, VoiceModel
from omnistream.models.tts.text import TextSegmenter, normalise_text, segment_text

TASK = "text2audio"


def voice_catalog(spec: ModelSpec) -> list[VoiceInfo]:
    """The voices a TTS spec declared (empty when the model is unavailable)."""
    voices = spec.capabilities.get("voices", [])
    return [VoiceInfo(**v) for v in voices]


def default_voice(spec: ModelSpec) -> str:
    """The voice a request gets when it names none."""
    return str(spec.capabilities.get("default_voice", ""))


def sample_rate(spec: ModelSpec) -> int:
    """The model's native output rate in Hz."""
    return int(spec.capabilities.get("sample_rate", 24000))


def _hibari_spec(settings: Any) -> ModelSpec:
    voices = hibari_voice.usable_voices()
    voice_ids = [v.id for v in voices]

    def factory(ctx: LoadContext) -> VoiceModel:
        threads = int(ctx.options.get("threads", 1))
        return hibari_voice.HibariVoice(threads=threads, allowed_voices=voice_ids)

    # One single-threaded ONNX session per core: interleaved streams run side by side.
    replicas = int(getattr(settings, "tts_replicas", 0) or 0) or (os.cpu_count() or 1)
    return ModelSpec(
        id=hibari_voice.MODEL_ID,
        tasks=(TASK,),
        tier=Tier.CORE,
        factory=factory,
        summary="Neural English TTS (Kokoro-82M distilled, int8 ONNX in the wheel), 24 kHz.",
        capabilities={
            "sample_rate": hibari_voice.SAMPLE_RATE,
            "voices": [v.as_dict() for v in voices],
            "default_voice": hibari_voice.DEFAULT_VOICE,
            "languages": sorted({v.language for v in voices}) or ["en-us"],
            "streaming": "segment",
            "streaming_granularity": "one clause or sentence per model call",
            "speed": [hibari_voice.MIN_SPEED, hibari_voice.MAX_SPEED],
            "license": "Apache-2.0",
            "backends": ["cpu"],
        },
        replicas=replicas,
        devices=("cpu",),
        check=hibari_voice.unavailable_reason,
    )


def _espeak_spec(settings: Any) -> ModelSpec:
    voices = espeak_voice.usable_voices()
    voice_ids = [v.id for v in voices]

    def factory(ctx: LoadContext) -> VoiceModel:
        return espeak_voice.EspeakVoice(voices=voice_ids)

    return ModelSpec(
        id=espeak_voice.MODEL_ID,
        tasks=(TASK,),
        tier=Tier.ADJACENT,
        factory=factory,
        summary="espeak-ng formant TTS (libespeak-ng from espeakng-loader), 22.05 kHz, "
        "sub-sentence streaming, 100+ languages.",
        capabilities={
            "sample_rate": espeak_voice.SAMPLE_RATE,
            "voices": [v.as_dict() for v in voices],
            "default_voice": espeak_voice.DEFAULT_VOICE,
            "languages": sorted({v.language for v in voices}),
            "streaming": "sub-sentence",
            "streaming_granularity": f"{espeak_voice.CALLBACK_MS} ms pieces within a segment",
            "speed": [
                espeak_voice.MIN_RATE_WPM / espeak_voice.BASE_RATE_WPM,
                espeak_voice.MAX_RATE_WPM / espeak_voice.BASE_RATE_WPM,
            ],
            "license": "GPL-3.0 (libespeak-ng)",
            "backends": ["cpu"],
        },
        # The library is a process-wide singleton: one replica.
        replicas=1,
        devices=("cpu",),
        check=espeak_voice.unavailable_reason,
    )


def specs(settings: Any) -> list[ModelSpec]:
    """Registry entries for every TTS voice model (unavailable ones say why)."""
    return [_hibari_spec(settings), _espeak_spec(settings)]


__all__ = [
    "TASK",
    "SynthRequest",
    "SynthResult",
    "TextSegmenter",
    "VoiceInfo",
    "VoiceModel",
    "default_voice",
    "normalise_text",
    "sample_rate",
    "segment_text",
    "specs",
    "voice_catalog",
]
