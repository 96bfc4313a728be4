"""espeak-ng through ``espeakng-loader`` (ctypes): a tiny formant voice with true
sub-sentence streaming.

espeak-ng calls a synth callback with every ~60 ms of audio while it works through a
sentence, so each piece is handed to the stream (``SynthRequest.on_piece``) the moment it
exists, and the callback's return value aborts synthesis mid-sentence when the stream was
cancelled. The library keeps global state (one voice, one callback per process), so the
model runs as a single replica and guards the library with a process-wide lock.

The library is GPL-3.0; it is loaded only when this model is used.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from omnistream.codecs.pcm import INT16_SCALE, FloatAudio
from omnistream.models.tts.base import SynthRequest, SynthResult, VoiceInfo, VoiceModel

MODEL_ID = "espeak-ng"
SAMPLE_RATE = 22050
DEFAULT_VOICE = "en-us"
CALLBACK_MS = 60
BASE_RATE_WPM = 175
MIN_RATE_WPM = 80
MAX_RATE_WPM = 450

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_RATE = 1
_EE_OK = 0

_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)
_LIBRARY_LOCK = threading.Lock()


def unavailable_reason() -> str | None:
    """Why espeak-ng cannot run here, or None."""
    try:
        found = importlib.util.find_spec("espeakng_loader") is not None
    except (ImportError, ValueError):  # blocked or half-imported in sys.modules
        found = False
    if not found:
        return "package 'espeakng-loader' is not installed (pip install espeakng-loader)"
    import espeakng_loader

    if not os.path.exists(espeakng_loader.get_library_path()):
        return f"libespeak-ng not found at {espeakng_loader.get_library_path()}"
    return None


def _data_dir() -> Path:
    import espeakng_loader

    return Path(espeakng_loader.get_data_path())


def usable_voices() -> list[VoiceInfo]:
    """Every language voice in the packaged data (names as ``espeak-ng -v`` takes them)."""
    if unavailable_reason() is not None:
        return []
    voices: dict[str, VoiceInfo] = {}
    lang_dir = _data_dir() / "lang"
    for path in sorted(lang_dir.rglob("*")):
        if not path.is_file():
            continue
        voice_id = path.name.lower()
        language = voice_id
        name = voice_id
        try:
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("name "):
                    name = line[5:].strip()
                elif line.startswith("language ") and language == voice_id:
                    language = line.split()[1]
        except OSError:
            continue
        voices[voice_id] = VoiceInfo(id=voice_id, language=language, description=name)
    return [voices[k] for k in sorted(voices)]


class EspeakVoice(VoiceModel):
    """The process's one espeak-ng instance, driven synchronously from a runner thread."""

    sample_rate = SAMPLE_RATE

    def __init__(self, *, voices: list[str] | None = None) -> None:
        import espeakng_loader

        self._lib: Any = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        self._lib.espeak_Initialize.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self._voices = set(voices or [DEFAULT_VOICE])
        self._current: tuple[str, int] | None = None
        self._request: SynthRequest | None = None
        self._parts: list[FloatAudio] = []
        self._samples = 0
        self._aborted = False
        data_parent = str(_data_dir().parent).encode()
        with _LIBRARY_LOCK:
            rate = self._lib.espeak_Initialize(
                _AUDIO_OUTPUT_SYNCHRONOUS, CALLBACK_MS, data_parent, 0
            )
            if rate <= 0:
                raise RuntimeError(f"espeak_Initialize failed ({rate})")
            self.sample_rate = int(rate)
            # Keep a reference: ctypes frees the trampoline with the Python object.
            self._callback = _SynthCallback(self._on_audio)
            self._lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav: Any, count: int, events: Any) -> int:
        request = self._request
        if request is None:
            return 1
        if count > 0 and wav:
            piece = np.ctypeslib.as_array(wav, shape=(count,)).astype(np.float32)
            piece /= np.float32(INT16_SCALE)
            self._samples += count
            if request.on_piece is not None:
                request.on_piece(piece)
            else:
                self._parts.append(piece)
        if request.cancelled():
            self._aborted = True
            return 1
        return 0

    def _configure(self, voice: str, speed: float) -> None:
        rate = int(min(MAX_RATE_WPM, max(MIN_RATE_WPM, round(BASE_RATE_WPM * speed))))
        if self._current == (voice, rate):
            return
        if voice not in self._voices:
            raise ValueError(f"unknown espeak-ng voice {voice!r}")
        if self._lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise ValueError(f"espeak-ng could not load voice {voice!r}")
        self._lib.espeak_SetParameter(_ESPEAK_RATE, rate, 0)
        self._current = (voice, rate)

    def synthesize(self, request: SynthRequest) -> SynthResult:
        """Synthesise one segment, streaming ~60 ms pieces through the callback."""
        data = request.text.encode("utf-8")
        with _LIBRARY_LOCK:
            self._configure(request.voice, request.speed)
            self._request = request
            self._parts = []
            self._samples = 0
            self._aborted = False
            try:
                self._lib.espeak_Synth(
                    data, len(data) + 1, 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None
                )
            finally:
                self._request = None
            parts, samples, aborted = self._parts, self._samples, self._aborted
            self._parts = []
        audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return SynthResult(
            audio=audio, sample_rate=self.sample_rate, samples=samples, aborted=aborted
        )

    def close(self) -> None:
        """Release the library's buffers."""
        with _LIBRARY_LOCK:
            self._lib.espeak_Terminate()
