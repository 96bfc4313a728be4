"""Input audio for avatar benchmarks: synthesised speech-like signal or a decoded file.

Avatar renderers drive mouth motion from the audio, and some skip work on silence, so a
benchmark fed with a pure tone or zeros can measure a different code path than real
speech. :func:`synth_speech` therefore builds a signal with the structure that matters:
a harmonic voice whose pitch drifts, whose loudness and vowel colour change at syllable
rate (about 4 Hz), and which pauses between phrases. It needs no TTS model and is
deterministic for a given seed, so runs are comparable.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

from omnistream.codecs.pcm import FloatAudio, float32_to_s16le, resample

SAMPLE_RATE = 16000
"""Rate of every avatar protocol's AUDI payload (PROTOCOLS §1)."""

# Vowel formant pairs (F1, F2) in Hz; a syllable picks one, so the spectrum moves the
# way speech does instead of staying a fixed buzz.
_VOWELS: tuple[tuple[float, float], ...] = (
    (730.0, 1090.0),
    (270.0, 2290.0),
    (530.0, 1840.0),
    (300.0, 870.0),
    (570.0, 840.0),
    (660.0, 1720.0),
)


def synth_speech(seconds: float, rate: int = SAMPLE_RATE, seed: int = 7) -> FloatAudio:
    """Synthesise a speech-like mono signal.

    Args:
        seconds: length of the signal.
        rate: sample rate in Hz.
        seed: seed of the syllable and pause pattern (same seed, same signal).

    Returns:
        float32 samples in [-1, 1), peak about 0.5.
    """
    rng = np.random.default_rng(seed)
    n = max(1, round(seconds * rate))
    t = np.arange(n, dtype=np.float64) / rate

    # Phrases of 1.5–3 s separated by 0.25–0.6 s pauses; syllables of 0.15–0.35 s inside.
    envelope = np.zeros(n, dtype=np.float64)
    vowel_index = np.zeros(n, dtype=np.int64)
    pos = 0.0
    while pos < seconds:
        phrase_end = min(seconds, pos + rng.uniform(1.5, 3.0))
        while pos < phrase_end:
            length = rng.uniform(0.15, 0.35)
            start, stop = int(pos * rate), min(n, int((pos + length) * rate))
            if stop > start:
                # Raised-cosine syllable: a smooth rise and fall of loudness.
                phase = np.linspace(0.0, math.pi, stop - start)
                envelope[start:stop] = np.sin(phase) ** 1.5 * rng.uniform(0.5, 1.0)
                vowel_index[start:stop] = rng.integers(len(_VOWELS))
            pos += length
        pos += rng.uniform(0.25, 0.6)

    # Pitch: 110–140 Hz with slow intonation and a little vibrato.
    f0 = 120.0 + 12.0 * np.sin(2 * math.pi * 0.3 * t) + 2.0 * np.sin(2 * math.pi * 5.5 * t)
    phase0 = 2 * math.pi * np.cumsum(f0) / rate
    formants = np.asarray(_VOWELS, dtype=np.float64)[vowel_index]
    voice = np.zeros(n, dtype=np.float64)
    for harmonic in range(1, 30):
        freq = f0 * harmonic
        # Spectral envelope: two resonances (the vowel's formants) on a -6 dB/oct slope.
        gain = (
            np.exp(-(((freq - formants[:, 0]) / 120.0) ** 2))
            + 0.7 * np.exp(-(((freq - formants[:, 1]) / 180.0) ** 2))
            + 0.05
        ) / harmonic
        voice += gain * np.sin(harmonic * phase0)
    breath = rng.standard_normal(n) * 0.02
    signal = (voice / (np.max(np.abs(voice)) or 1.0)) * envelope + breath * envelope
    peak = float(np.max(np.abs(signal))) or 1.0
    return np.asarray(signal / peak * 0.5, dtype=np.float32)


def load_audio(path: str | Path, rate: int = SAMPLE_RATE) -> FloatAudio:
    """Decode any audio container PyAV reads into mono float32 at ``rate``.

    Raises:
        ValueError: the file has no audio stream or no samples.
    """
    import av

    chunks: list[npt.NDArray[np.float32]] = []
    source_rate = 0
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        # FFmpeg converts to planar float; channels are averaged here (FFmpeg's own
        # down-mix adds them at -3 dB, which makes identical channels louder) and
        # resampling goes through soxr.
        resampler = av.AudioResampler(format="fltp")
        for frame in container.decode(stream):
            source_rate = frame.sample_rate or source_rate
            for out in resampler.resample(frame):
                chunks.append(np.asarray(out.to_ndarray(), dtype=np.float32).mean(axis=0))
        for out in resampler.resample(None):
            chunks.append(np.asarray(out.to_ndarray(), dtype=np.float32).mean(axis=0))
    if not chunks or not source_rate:
        raise ValueError(f"{path}: no audio samples")
    return resample(np.concatenate(chunks), source_rate, rate)


class ChunkSource:
    """Serves fixed-size s16le chunks from a signal, looping it as long as asked.

    Each session starts at its own offset so concurrent sessions do not send identical
    audio in lockstep (a server could otherwise cache or coalesce them).
    """

    def __init__(self, samples: FloatAudio, chunk_samples: int, offset: int = 0) -> None:
        if chunk_samples <= 0:
            raise ValueError("chunk_samples must be positive")
        if samples.size == 0:
            raise ValueError("audio is empty")
        self.chunk_samples = chunk_samples
        self._pcm = np.asarray(samples, dtype=np.float32)
        self._offset = offset % self._pcm.size

    def chunk(self, index: int) -> bytes:
        """The s16le bytes of chunk ``index`` (exactly ``chunk_samples * 2`` bytes)."""
        start = (self._offset + index * self.chunk_samples) % self._pcm.size
        idx = (start + np.arange(self.chunk_samples)) % self._pcm.size
        return float32_to_s16le(self._pcm[idx])
