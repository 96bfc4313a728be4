"""Wav2Lip's audio features in numpy: the exact log-mel the checkpoints were trained on.

16 kHz audio, pre-emphasis 0.97, an 800-point STFT with a periodic Hann window of 800 and
hop 200 (80 frames per second), magnitude through 80 Slaney mel bands (55–7600 Hz,
Slaney area normalisation), amplitude to dB with a -100 dB floor, minus a 20 dB
reference, then mapped symmetrically onto [-4, 4] and clipped.

Frames are addressed on the session clock: mel frame ``k`` is centred on absolute sample
``k * HOP`` (librosa's ``center=True`` with zero padding), so a chunk computes exactly
the frames it needs from the audio it holds, and the same instant gets the same
features whichever chunk it falls in. Video frame ``t`` takes 16 mel frames covering
[t - 80 ms, t + 120 ms], which is where the training scripts put a frame inside its
200 ms audio window; hence 120 ms of lookahead (:data:`WINDOW_AFTER_S`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16000
PREEMPHASIS = 0.97
N_FFT = 800
HOP = 200
WIN = 800
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
REF_LEVEL_DB = 20.0
MIN_LEVEL_DB = -100.0
MAX_ABS_VALUE = 4.0
MEL_FPS = SAMPLE_RATE // HOP  # 80 mel frames per second
MEL_STEP = 16  # mel frames per video frame
WINDOW_BEFORE_S = 0.08  # the window starts 80 ms before the video frame
WINDOW_START_OFFSET = round(WINDOW_BEFORE_S * MEL_FPS)  # 6 mel frames (75 ms)
#: Audio the window nominally needs after a frame's instant (its 200 ms span ends here).
WINDOW_AFTER_S = 0.12
#: Audio the last mel frame's FFT reaches after a frame's instant (112.5 ms + 25 ms);
#: samples past what a chunk holds are read as silence.
FFT_REACH_AFTER_S = (MEL_STEP - 1 - WINDOW_START_OFFSET) / MEL_FPS + N_FFT / 2 / SAMPLE_RATE
#: Audio a frame needs before its own instant (window start, half an FFT, pre-emphasis).
CONTEXT_S = WINDOW_START_OFFSET / MEL_FPS + N_FFT / 2 / SAMPLE_RATE + 1 / SAMPLE_RATE

FloatArray = npt.NDArray[np.float32]


def _hz_to_mel(freqs: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f_sp = 200.0 / 3
    mels = freqs / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_part = freqs >= min_log_hz
    mels = np.where(log_part, min_log_mel + np.log(np.maximum(freqs, 1e-10) / min_log_hz) / logstep,
                    mels)
    return mels


def _mel_to_hz(mels: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    f_sp = 200.0 / 3
    freqs = mels * f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), freqs)


@lru_cache(maxsize=1)
def mel_basis() -> npt.NDArray[np.float32]:
    """(80, 401) triangular Slaney-normalised filters, as ``librosa.filters.mel`` builds."""
    fft_freqs = np.linspace(0.0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    mel_pts = np.linspace(_hz_to_mel(np.array(FMIN)), _hz_to_mel(np.array(FMAX)), N_MELS + 2)
    mel_f = _mel_to_hz(mel_pts)
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2 : N_MELS + 2] - mel_f[:N_MELS])
    return (weights * enorm[:, None]).astype(np.float32)


@lru_cache(maxsize=1)
def _window() -> npt.NDArray[np.float64]:
    n = np.arange(WIN)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / WIN)  # periodic Hann (fftbins=True)


def preemphasis(audio: npt.ArrayLike, previous: float = 0.0) -> FloatArray:
    """``y[n] = x[n] - 0.97 x[n-1]`` with ``x[-1] = previous``."""
    x = np.asarray(audio, dtype=np.float64)
    y = np.empty_like(x)
    if x.size:
        y[0] = x[0] - PREEMPHASIS * previous
        y[1:] = x[1:] - PREEMPHASIS * x[:-1]
    return y.astype(np.float32)


def mel_frames(audio: npt.ArrayLike, audio_start: int, first: int, count: int) -> FloatArray:
    """Normalised log-mel frames ``first .. first+count-1`` on the absolute clock.

    Args:
        audio: float mono samples at 16 kHz, already pre-emphasised.
        audio_start: absolute index of ``audio[0]``; samples outside ``audio`` are
            silence (before the stream began, or lookahead that has not arrived).
        first: absolute index of the first mel frame (may be negative: silence).
        count: frames wanted.

    Returns:
        (80, count) float32 in [-4, 4].
    """
    x = np.asarray(audio, dtype=np.float32)
    if count <= 0:
        return np.zeros((N_MELS, 0), dtype=np.float32)
    # Absolute sample range the frames cover, copied into one zero-padded buffer.
    lo = first * HOP - N_FFT // 2
    hi = (first + count - 1) * HOP + N_FFT // 2
    buf = np.zeros(hi - lo, dtype=np.float32)
    src_lo = max(lo, audio_start)
    src_hi = min(hi, audio_start + x.size)
    if src_hi > src_lo:
        buf[src_lo - lo : src_hi - lo] = x[src_lo - audio_start : src_hi - audio_start]
    frames = np.lib.stride_tricks.sliding_window_view(buf, N_FFT)[::HOP][:count]
    spec = np.abs(np.fft.rfft(frames * _window(), n=N_FFT, axis=1))  # (count, 401)
    mel = mel_basis() @ spec.T.astype(np.float32)  # (80, count)
    db = 20.0 * np.log10(np.maximum(1e-5, mel)) - REF_LEVEL_DB
    norm = 2 * MAX_ABS_VALUE * ((db - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS_VALUE
    return np.clip(norm, -MAX_ABS_VALUE, MAX_ABS_VALUE).astype(np.float32)


def melspectrogram(audio: npt.ArrayLike) -> FloatArray:
    """Whole-clip features, ``(80, 1 + len // 200)``, as Wav2Lip's ``audio.melspectrogram``."""
    y = preemphasis(audio)
    return mel_frames(y, 0, 0, 1 + y.size // HOP)


def window_start(frame_time_s: float) -> int:
    """First mel frame of the 16-frame window of the video frame shown at ``frame_time_s``."""
    return int(np.floor(frame_time_s * MEL_FPS + 1e-6)) - WINDOW_START_OFFSET


def frame_windows(
    audio: npt.ArrayLike,
    audio_start: int,
    frame_times_s: npt.ArrayLike,
    *,
    sample_rate: int = SAMPLE_RATE,
) -> FloatArray:
    """The (N, 1, 80, 16) model input for video frames shown at ``frame_times_s``.

    Args:
        audio: raw float mono samples (not pre-emphasised) at 16 kHz.
        audio_start: absolute index (session clock) of ``audio[0]``.
        frame_times_s: the frames' instants on the session clock.
        sample_rate: must be 16000; Wav2Lip features are defined at 16 kHz only.

    Raises:
        ValueError: another sample rate.
    """
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"Wav2Lip needs 16 kHz audio, got {sample_rate} Hz")
    times = np.asarray(frame_times_s, dtype=np.float64).reshape(-1)
    if times.size == 0:
        return np.zeros((0, 1, N_MELS, MEL_STEP), dtype=np.float32)
    starts = np.array([window_start(t) for t in times], dtype=np.int64)
    first = int(starts.min())
    count = int(starts.max()) - first + MEL_STEP
    y = preemphasis(audio)
    mel = mel_frames(y, audio_start, first, count)
    idx = (starts - first)[:, None] + np.arange(MEL_STEP)[None, :]  # (N, 16)
    return np.ascontiguousarray(mel[:, idx].transpose(1, 0, 2)[:, None])  # (N, 1, 80, 16)
