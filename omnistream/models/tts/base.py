"""What every TTS voice model offers the engine: one segment of text in, float32 audio out.

A TTS stream never hands a voice model a whole text. It cuts the text into segments (a
clause, a sentence) and submits each as one work item, so that the runner interleaves
many streams, a cancelled stream stops between two segments, and realtime streams are
served earliest-deadline-first ahead of offline jobs. Models that can produce audio in
pieces while a segment is being synthesised (espeak-ng's callback) also report each piece
through :attr:`SynthRequest.on_piece` as soon as it exists.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omnistream.codecs.pcm import FloatAudio
from omnistream.models.base import BatchModel

PieceCallback = Callable[[FloatAudio], None]
"""Called from the runner thread with each piece of audio as the model produces it."""


def _never() -> bool:
    return False


@dataclass
class SynthRequest:
    """One segment of text to synthesise with one voice.

    Attributes:
        text: the normalised segment (a clause or a sentence).
        voice: a voice id the model declared.
        speed: speaking rate multiplier (1.0 is the voice's natural pace).
        cancelled: polled by the model between internal steps; returning ``True`` makes it
            stop early and return what it has (the stream no longer wants it).
        on_piece: when set, a model that produces audio incrementally calls it with each
            piece instead of returning the audio in :attr:`SynthResult.audio`.
        max_leading_silence_s: when set, the silence a model puts before speech (about
            300 ms for Kokoro) is cut to at most this much: almost none before a stream's
            first word (it is pure latency), a comma's worth inside a sentence.
        max_trailing_silence_s: the same for the silence after the last word.
    """

    text: str
    voice: str
    speed: float = 1.0
    cancelled: Callable[[], bool] = _never
    on_piece: PieceCallback | None = None
    max_leading_silence_s: float | None = None
    max_trailing_silence_s: float | None = None


SPEECH_ONSET_LEVEL = 0.01  # |sample| that counts as speech starting
MAX_LEADING_TRIM_S = 0.6  # never look further than this for the onset


def trim_trailing_silence(audio: FloatAudio, sample_rate: int, keep_s: float) -> FloatAudio:
    """``audio`` up to ``keep_s`` after its last audible sample (within the last 0.6 s)."""
    start = max(0, len(audio) - int(MAX_LEADING_TRIM_S * sample_rate))
    loud = np.flatnonzero(np.abs(audio[start:]) > SPEECH_ONSET_LEVEL)
    if not loud.size:
        return audio
    return audio[: start + int(loud[-1]) + 1 + int(keep_s * sample_rate)]


def trim_leading_silence(audio: FloatAudio, sample_rate: int, keep_s: float) -> FloatAudio:
    """``audio`` from ``keep_s`` before its first audible sample (within the first 0.6 s)."""
    head = audio[: int(MAX_LEADING_TRIM_S * sample_rate)]
    loud = np.flatnonzero(np.abs(head) > SPEECH_ONSET_LEVEL)
    if not loud.size:
        return audio
    return audio[max(0, int(loud[0]) - int(keep_s * sample_rate)) :]


@dataclass
class SynthResult:
    """The audio of one segment (empty when it was all delivered through ``on_piece``)."""

    audio: FloatAudio = field(default_factory=lambda: np.zeros(0, np.float32))
    sample_rate: int = 24000
    samples: int = 0
    aborted: bool = False


@dataclass(frozen=True)
class VoiceInfo:
    """A voice a model can speak with here (only voices usable offline are listed)."""

    id: str
    language: str
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON form used by the model lists."""
        return {"id": self.id, "language": self.language, "description": self.description}


class VoiceModel(BatchModel[SynthRequest, SynthResult | BaseException]):
    """Base for TTS voices: one segment per item, items of different voices never mixed.

    The cost of an item is its length in characters, which is what the capacity meter
    prices a TTS stream in (a stream speaking at ~15 characters/s needs 15 units/s).
    ``max_batch_cost`` is small: a model call takes one segment, so the runner returns to
    its queue after every segment and a new stream's first clause never waits behind a
    long backlog of another stream's sentences.
    """

    sample_rate: int = 24000
    max_batch_cost: float = 1.0

    def cost(self, payload: SynthRequest) -> float:
        """Characters of text: the unit TTS capacity is measured in."""
        return float(max(1, len(payload.text)))

    def batch_key(self, payload: SynthRequest) -> Hashable:
        """Voices never share a model call."""
        return payload.voice

    def run_batch(self, payloads: Sequence[SynthRequest]) -> list[SynthResult | BaseException]:
        """Synthesise each segment in turn; a failing segment fails only its own stream."""
        results: list[SynthResult | BaseException] = []
        for request in payloads:
            if request.cancelled():
                results.append(SynthResult(sample_rate=self.sample_rate, aborted=True))
                continue
            try:
                results.append(self.synthesize(request))
            except Exception as exc:  # one bad segment must not fail the batch
                results.append(exc)
        return results

    def synthesize(self, request: SynthRequest) -> SynthResult:
        """Synthesise one segment (runner thread)."""
        raise NotImplementedError
