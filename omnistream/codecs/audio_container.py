"""Streaming audio containers: WAV with an open-ended header, and mp3/opus/aac/flac via PyAV.

Both produce bytes while audio is still arriving, so an HTTP response can start with the
first chunk of speech instead of waiting for the whole clip:

* :func:`wav_header` with ``data_bytes=None`` writes the RIFF and data sizes as
  ``0xFFFFFFFF``, the convention streaming players (browsers, ffmpeg, OpenAI's API)
  read as "until the connection ends".
* :class:`StreamingAudioEncoder` takes s16le mono PCM in any piece sizes, and returns
  whatever encoded bytes the muxer has produced after each call::

      encoder = StreamingAudioEncoder("mp3", sample_rate=24000)
      for pcm in chunks:
          body.write(encoder.encode(pcm))
      body.write(encoder.flush())

  ``wav`` and ``pcm`` are handled by the same class (no PyAV), so a caller has one code
  path for every ``response_format``. It is synchronous and CPU-bound (house rule: keep it
  off the event loop for long inputs; a 20 ms chunk costs well under a millisecond).

Formats carry audio at :func:`encoded_rate`: the input rate where the codec supports it;
Opus is always 48 kHz on decode, so it is resampled to 48 kHz before encoding.
"""

from __future__ import annotations

import struct
from typing import Any

STREAM_DATA_SIZE = 0xFFFFFFFF

#: response_format -> MIME type.
CONTENT_TYPES: dict[str, str] = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
FORMATS = tuple(CONTENT_TYPES)

_MPEG_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)

# format -> (container, codec, codec sample rates or None for any, default bit rate)
_PYAV_FORMATS: dict[str, tuple[str, str, tuple[int, ...] | None, int | None]] = {
    "mp3": ("mp3", "libmp3lame", _MPEG_RATES, 64_000),
    "opus": ("ogg", "libopus", (48000,), 32_000),
    "aac": ("adts", "aac", _MPEG_RATES, 64_000),
    "flac": ("flac", "flac", None, None),
}


def wav_header(
    sample_rate: int, *, channels: int = 1, bits: int = 16, data_bytes: int | None = None
) -> bytes:
    """A 44-byte PCM WAV header; ``data_bytes=None`` marks a stream of unknown length."""
    block = channels * bits // 8
    if data_bytes is None:
        riff_size = data_size = STREAM_DATA_SIZE
    else:
        data_size = data_bytes
        riff_size = min(STREAM_DATA_SIZE, 36 + data_bytes)
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, bits)
        + b"data"
        + struct.pack("<I", data_size)
    )


def encoded_rate(fmt: str, sample_rate: int) -> int:
    """The sample rate a stream of this format carries for input at ``sample_rate``."""
    spec = _PYAV_FORMATS.get(fmt)
    if spec is None or spec[2] is None or sample_rate in spec[2]:
        return sample_rate
    rates = spec[2]
    return min(rates, key=lambda r: (r < sample_rate, abs(r - sample_rate)))


class _Sink:
    """A write-only file object the muxer writes into; the encoder drains it."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: Any) -> int:
        self.buffer += bytes(data)
        return len(data)

    def take(self) -> bytes:
        out = bytes(self.buffer)
        self.buffer.clear()
        return out


class StreamingAudioEncoder:
    """s16le mono PCM in, container bytes out as they are produced.

    Args:
        fmt: one of :data:`FORMATS` (``mp3``, ``opus``, ``aac``, ``flac``, ``wav``, ``pcm``).
        sample_rate: rate of the PCM given to :meth:`encode`.
        bitrate: bits per second for lossy codecs (a speech-friendly default otherwise).

    Attributes:
        output_rate: sample rate of the encoded stream (see :func:`encoded_rate`).
        content_type: MIME type for the response.
    """

    def __init__(self, fmt: str, sample_rate: int, *, bitrate: int | None = None) -> None:
        if fmt not in CONTENT_TYPES:
            raise ValueError(f"unsupported format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.format = fmt
        self.sample_rate = sample_rate
        self.output_rate = encoded_rate(fmt, sample_rate)
        self.content_type = CONTENT_TYPES[fmt]
        self._header_sent = False
        self._closed = False
        self._container: Any = None
        if fmt in _PYAV_FORMATS:
            self._open_pyav(bitrate)

    def _open_pyav(self, bitrate: int | None) -> None:
        import av

        container_fmt, codec, _rates, default_bitrate = _PYAV_FORMATS[self.format]
        self._sink = _Sink()
        # flush_packets: hand every muxed packet to the sink at once (no 32 KiB avio
        # buffering); page_duration keeps Ogg pages short so Opus streams promptly.
        options = {"flush_packets": "1"}
        if container_fmt == "ogg":
            options["page_duration"] = "20000"
        self._container = av.open(
            self._sink, mode="w", format=container_fmt, options=options, buffer_size=4096
        )
        stream = self._container.add_stream(codec, rate=self.output_rate)
        stream.layout = "mono"
        if default_bitrate is not None:
            stream.bit_rate = bitrate or default_bitrate
        self._stream = stream
        frame_size = stream.codec_context.frame_size or None
        self._resampler = av.AudioResampler(
            format=stream.codec_context.format.name,
            layout="mono",
            rate=self.output_rate,
            frame_size=frame_size,
        )
        self._pts = 0

    def encode(self, pcm: bytes) -> bytes:
        """Add s16le mono PCM; returns the encoded bytes produced so far (may be empty)."""
        if self._closed:
            raise RuntimeError("encoder is closed")
        if self.format == "pcm":
            return bytes(pcm)
        if self.format == "wav":
            if not self._header_sent:
                self._header_sent = True
                return wav_header(self.sample_rate) + bytes(pcm)
            return bytes(pcm)
        if not pcm:
            return b""
        return self._encode_frames(self._to_frame(pcm))

    def flush(self) -> bytes:
        """Encode what the codec still holds and close the container; returns the tail."""
        if self._closed:
            return b""
        self._closed = True
        if self.format == "wav" and not self._header_sent:
            self._header_sent = True
            return wav_header(self.sample_rate)
        if self._container is None:
            return b""
        out = self._encode_frames(None)
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return out + self._sink.take()

    def _to_frame(self, pcm: bytes) -> Any:
        import av
        import numpy as np

        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        return frame

    def _encode_frames(self, frame: Any) -> bytes:
        for resampled in self._resampler.resample(frame):
            resampled.pts = self._pts
            self._pts += resampled.samples
            for packet in self._stream.encode(resampled):
                self._container.mux(packet)
        return self._sink.take()

    def close(self) -> None:
        """Release the codec without producing a tail (the reader is gone)."""
        if self._closed:
            return
        self._closed = True
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # pragma: no cover - best effort on an abandoned stream
                pass


def encode_all(pcm: bytes, fmt: str, sample_rate: int, *, bitrate: int | None = None) -> bytes:
    """Encode a complete s16le mono clip in one call (non-streaming responses, files)."""
    if fmt == "wav":
        return wav_header(sample_rate, data_bytes=len(pcm)) + bytes(pcm)
    encoder = StreamingAudioEncoder(fmt, sample_rate, bitrate=bitrate)
    return encoder.encode(pcm) + encoder.flush()
