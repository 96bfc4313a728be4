"""Codecs: wire framing, PCM, JPEG and image limits (pure functions, no server)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from omnistream.codecs import framing
from omnistream.codecs.image import ImageError, decode_base64, decode_image
from omnistream.codecs.jpeg import JPEG_BACKENDS, JpegEncoderPool, decode_jpeg, encode_jpeg
from omnistream.codecs.pcm import (
    PcmChunker,
    StreamResampler,
    float32_to_s16le,
    resample,
    s16le_to_float32,
)


def test_vidx_round_trip_including_empty_chunk() -> None:
    frames = [b"\xff\xd8a", b"\xff\xd8bb", b"\xff\xd8" + bytes(1000)]
    assert framing.decode_video(framing.encode_video(frames)) == frames
    assert framing.decode_video(framing.encode_video([])) == []
    assert framing.encode_video([]) == b"VIDX\x00\x00\x00\x00"


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"VIDY\x00\x00\x00\x00", "bad_magic"),
        (b"VIDX\x01\x00", "truncated"),
        (b"VIDX" + struct.pack("<I", 2) + struct.pack("<I", 1) + b"a", "truncated"),
        (b"VIDX" + struct.pack("<I", 1) + struct.pack("<I", 10) + b"abc", "bad_length"),
        (b"VIDX" + struct.pack("<I", 1) + struct.pack("<I", 0), "empty_frame"),
        (b"VIDX" + struct.pack("<I", 1) + struct.pack("<I", 1) + b"ab", "trailing_bytes"),
    ],
)
def test_vidx_decoder_rejects_malformed(message: bytes, code: str) -> None:
    with pytest.raises(framing.FramingError) as info:
        framing.decode_video(message)
    assert info.value.code == code


def test_audio_and_frame_framing() -> None:
    assert framing.decode_audio(framing.encode_audio(b"\x01\x00\x02\x00")) == b"\x01\x00\x02\x00"
    with pytest.raises(framing.FramingError, match="AUDI"):
        framing.decode_audio(b"AUDX\x00\x00")
    with pytest.raises(framing.FramingError) as info:
        framing.decode_audio(b"AUDI\x00")
    assert info.value.code == "odd_length"
    assert framing.decode_frame(framing.encode_frame(b"png")) == b"png"
    with pytest.raises(framing.FramingError):
        framing.decode_frame(b"FRAM")


def test_pcm_round_trip_and_clipping() -> None:
    x = np.array([0.0, 0.5, -0.5, 0.99, -1.0, 1.5, -2.0], np.float32)
    y = s16le_to_float32(float32_to_s16le(x))
    assert np.allclose(y[:5], x[:5], atol=1 / 32768)
    assert y[5] == pytest.approx(32767 / 32768) and y[6] == -1.0


def test_resampling_keeps_duration_and_pitch() -> None:
    sr_in, sr_out = 24000, 16000
    t = np.arange(sr_in) / sr_in
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = resample(tone, sr_in, sr_out)
    assert len(out) == sr_out
    peak = np.argmax(np.abs(np.fft.rfft(out))) * sr_out / len(out)
    assert abs(peak - 440) < 2
    # Streaming in odd pieces gives the same length as one shot.
    stream = StreamResampler(sr_in, sr_out)
    pieces = [stream.process(tone[i : i + 1234]) for i in range(0, len(tone), 1234)]
    pieces.append(stream.process(np.zeros(0, np.float32), last=True))
    assert abs(sum(len(p) for p in pieces) - sr_out) <= 2


def test_chunker_emits_exact_sizes() -> None:
    chunker = PcmChunker(640)
    out = chunker.push(bytes(1000)) + chunker.push(bytes(1000))
    assert [len(c) for c in out] == [640, 640, 640]
    assert len(chunker.flush()) == 80
    with pytest.raises(ValueError):
        PcmChunker(0)


@pytest.mark.parametrize("backend", sorted(JPEG_BACKENDS))
def test_jpeg_backends_produce_exact_size_baseline(backend: str) -> None:
    frame = np.zeros((64, 48, 3), np.uint8)
    frame[:, :, 0] = np.linspace(0, 255, 48, dtype=np.uint8)[None, :]
    data = encode_jpeg(frame, 85, backend)
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == (48, 64)
    assert not image.info.get("progressive")
    assert np.abs(decode_jpeg(data).astype(int) - frame).mean() < 4


def test_pool_keeps_order() -> None:
    pool = JpegEncoderPool(threads=2)
    frames = [np.full((32, 32, 3), v, np.uint8) for v in (0, 80, 160, 240)]
    means = [decode_jpeg(j).mean() for j in pool.encode_many(frames)]
    pool.shutdown()
    assert means == sorted(means)


def test_image_limits_refuse_before_decoding() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4000, 4000)).save(buf, "PNG")  # compresses to a few KB
    with pytest.raises(ImageError) as info:
        decode_image(buf.getvalue(), max_bytes=10**7, max_pixels=1000 * 1000)
    assert info.value.code == "image_too_large"
    with pytest.raises(ImageError) as info:
        decode_image(b"GIF89a-not-really", max_bytes=10**6, max_pixels=10**6)
    assert info.value.code == "bad_image"
    with pytest.raises(ImageError) as info:
        decode_base64("***", 100)
    assert info.value.code == "bad_image_base64"
    small = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 20, 30)).save(small, "PNG")
    import base64

    url = "data:image/png;base64," + base64.b64encode(small.getvalue()).decode()
    assert decode_image(decode_base64(url, 10**6), 10**6, 10**6).shape == (6, 8, 3)
