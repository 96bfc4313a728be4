"""hibari (Kokoro-82M distilled, int8 ONNX in the wheel): the default neural voice.

hibari synthesises one sentence per model call at 24 kHz. Each runner replica loads its
own ONNX session with one intra-op thread (the model is fastest that way on small CPUs,
and replicas give the parallelism). Only voices whose weights are on disk are declared:
``heart`` ships in the wheel; other voices would download on first use, which the house
rules forbid at run time, so they are listed only when already in hibari's cache.
"""

from __future__ import annotations

import importlib.util
import os
import zlib
from typing import Any

import numpy as np

from omnistream.models.tts.base import (
    SynthRequest,
    SynthResult,
    VoiceInfo,
    VoiceModel,
    trim_leading_silence,
    trim_trailing_silence,
)

MODEL_ID = "hibari"
SAMPLE_RATE = 24000
DEFAULT_VOICE = "heart"
MIN_SPEED = 0.25
MAX_SPEED = 4.0


def unavailable_reason() -> str | None:
    """Why hibari cannot run here, or None."""
    for module, package in (("hibari", "hibari-tts"), ("onnxruntime", "onnxruntime")):
        if not _importable(module):
            return f"package '{package}' is not installed (pip install {package})"
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module blocked or half-imported in sys.modules
        return False


def usable_voices() -> list[VoiceInfo]:
    """Voices whose weights are already on disk (never triggers a download)."""
    if unavailable_reason() is not None:
        return []
    from hibari.voices import VOICES, voice_path

    voices: list[VoiceInfo] = []
    for name, meta in VOICES.items():
        try:
            path = voice_path(name, download_missing=False)
        except (FileNotFoundError, ValueError):
            continue
        if not os.path.exists(path):
            continue
        language = str(meta.get("language", "en"))
        description = f"{meta.get('gender', '')} {meta.get('accent', '')}".strip()
        voices.append(VoiceInfo(id=name, language=language, description=description))
    return voices


class HibariVoice(VoiceModel):
    """One replica: an ONNX session per voice, loaded on the voice's first segment.

    Args:
        threads: onnxruntime intra-op threads for this replica.
        allowed_voices: voice ids this replica may load (the usable ones).
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, *, threads: int = 1, allowed_voices: list[str] | None = None) -> None:
        from hibari import Hibari

        self._cls = Hibari
        self._threads = threads
        self._allowed = set(allowed_voices or [DEFAULT_VOICE])
        self._voices: dict[str, Any] = {}
        # Load and warm the default voice now, in the runner thread, so the first
        # stream does not pay for the ONNX session and the G2P lexicon.
        self._voice(DEFAULT_VOICE if DEFAULT_VOICE in self._allowed else sorted(self._allowed)[0])
        self.synthesize(SynthRequest(text="Warm up.", voice=next(iter(self._voices))))

    def _voice(self, voice: str) -> Any:
        engine = self._voices.get(voice)
        if engine is None:
            if voice not in self._allowed:
                raise ValueError(f"voice {voice!r} is not available offline")
            engine = self._cls(voice=voice, threads=self._threads)
            self._voices[voice] = engine
        return engine

    def synthesize(self, request: SynthRequest) -> SynthResult:
        """G2P and synthesis of one segment; hibari splits very long ones internally."""
        engine = self._voice(request.voice)
        speed = float(min(MAX_SPEED, max(MIN_SPEED, request.speed)))
        # The noise component is seeded from the text so that the same request gives the
        # same audio (cacheable, and a streamed response equals a buffered one).
        rng = np.random.default_rng(zlib.crc32(f"{request.voice}|{request.text}".encode()))
        parts: list[np.ndarray[Any, Any]] = []
        aborted = False
        total = 0
        # One piece is held back so the last one can lose its trailing silence.
        held: np.ndarray[Any, Any] | None = None

        def emit(audio: np.ndarray[Any, Any]) -> None:
            nonlocal total
            total += len(audio)
            if request.on_piece is not None:
                request.on_piece(audio)
            else:
                parts.append(audio)

        for phonemes in engine.phonemize(request.text):
            if request.cancelled():
                aborted = True
                break
            audio = np.asarray(engine.from_ids(engine.ids(phonemes), speed, rng), np.float32)
            if held is None and total == 0 and request.max_leading_silence_s is not None:
                audio = trim_leading_silence(audio, SAMPLE_RATE, request.max_leading_silence_s)
            if held is not None:
                emit(held)
            held = audio
        if held is not None:
            if request.max_trailing_silence_s is not None and not aborted:
                held = trim_trailing_silence(held, SAMPLE_RATE, request.max_trailing_silence_s)
            emit(held)
        audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return SynthResult(audio=audio, sample_rate=SAMPLE_RATE, samples=total, aborted=aborted)

