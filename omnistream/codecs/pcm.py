"""PCM conversions: s16le ⇄ float32, resampling, exact-size chunking.

Resampling goes through soxr (libsoxr), which is both higher quality and faster than
anything hand-written in numpy; its streaming resampler keeps filter state across calls
so chunk boundaries of a live stream leave no clicks.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import soxr

FloatAudio = npt.NDArray[np.float32]

INT16_SCALE = 32768.0


def s16le_to_float32(data: bytes | bytearray | memoryview) -> FloatAudio:
    """Decode little-endian int16 PCM into float32 samples in [-1, 1)."""
    samples = np.frombuffer(data, dtype="<i2")
    return samples.astype(np.float32) / np.float32(INT16_SCALE)


def float32_to_s16le(samples: npt.NDArray[np.floating]) -> bytes:
    """Encode float samples as little-endian int16 PCM, clipping to the int16 range."""
    scaled = np.clip(np.asarray(samples, dtype=np.float32) * INT16_SCALE, -32768.0, 32767.0)
    return bytes(np.rint(scaled).astype("<i2").tobytes())


def resample(samples: FloatAudio, from_rate: int, to_rate: int) -> FloatAudio:
    """Resample a whole mono signal (one-shot; use :class:`StreamResampler` for streams)."""
    if from_rate == to_rate:
        return np.asarray(samples, dtype=np.float32)
    out = soxr.resample(np.asarray(samples, dtype=np.float32), from_rate, to_rate, quality="HQ")
    return np.asarray(out, dtype=np.float32)


class StreamResampler:
    """Resamples a live mono stream chunk by chunk without boundary artefacts.

    A pass-through when the rates match, so callers never special-case it.
    """

    def __init__(self, from_rate: int, to_rate: int) -> None:
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._stream: soxr.ResampleStream | None = (
            None
            if from_rate == to_rate
            else soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32", quality="HQ")
        )

    def process(self, samples: FloatAudio, last: bool = False) -> FloatAudio:
        """Resample the next chunk; pass ``last=True`` with the final one to flush."""
        if self._stream is None:
            return np.asarray(samples, dtype=np.float32)
        out = self._stream.resample_chunk(np.asarray(samples, dtype=np.float32), last=last)
        return np.asarray(out, dtype=np.float32)


class PcmChunker:
    """Cuts a byte stream into chunks of exactly ``chunk_bytes`` bytes.

    Used to turn whatever sizes a producer emits into the fixed 20–40 ms packets a
    player or a wire protocol expects. :meth:`flush` returns the short tail.
    """

    def __init__(self, chunk_bytes: int) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.chunk_bytes = chunk_bytes
        self._buffer = bytearray()

    def push(self, data: bytes) -> list[bytes]:
        """Append data and return every complete chunk now available."""
        self._buffer += data
        size = self.chunk_bytes
        whole = len(self._buffer) // size * size
        chunks = [bytes(self._buffer[i : i + size]) for i in range(0, whole, size)]
        del self._buffer[:whole]
        return chunks

    def flush(self) -> bytes:
        """Return and clear what is left (shorter than one chunk)."""
        tail = bytes(self._buffer)
        self._buffer.clear()
        return tail

    @property
    def pending_bytes(self) -> int:
        """Bytes buffered but not yet returned as a chunk."""
        return len(self._buffer)
