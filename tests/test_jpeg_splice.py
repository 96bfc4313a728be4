"""Spliced JPEGs: only the changed rows re-encoded, and every decoder reads the result."""

from __future__ import annotations

import asyncio
import io
import json

import av
import numpy as np
import pytest
import simplejpeg
from PIL import Image

from omnistream.codecs.framing import decode_video
from omnistream.codecs.image import decode_image
from omnistream.codecs.jpeg import encode_jpeg
from omnistream.codecs.jpeg_splice import (
    SpliceCache,
    SpliceError,
    StaticJpeg,
    encode_with_restarts,
)
from omnistream.sessions.avatar import default_avatar_bytes
from tests.avatar_client import connect, flashtalk_init, recv_json, speech_like
from tests.server import RunningServer, run_server


def decoders(data: bytes) -> dict[str, np.ndarray]:
    """The same JPEG through Pillow, PyAV (FFmpeg's decoder) and libjpeg-turbo."""
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    codec = av.CodecContext.create("mjpeg", "r")
    frames = codec.decode(av.Packet(data))
    pyav = frames[0].to_ndarray(format="rgb24")
    turbo = np.asarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
    return {"pillow": pil, "pyav": pyav, "libjpeg-turbo": turbo}


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return decode_image(default_avatar_bytes(), 10**8, 10**8)


def talking(reference: np.ndarray, seed: int) -> np.ndarray:
    """The reference with a changed band (rows 96…255), as a talking frame would be."""
    rng = np.random.default_rng(seed)
    frame = reference.copy()
    frame[100:250, 120:300] = np.clip(
        frame[100:250, 120:300].astype(int) + rng.integers(-40, 40, (150, 180, 3)), 0, 255
    )
    return frame


@pytest.mark.parametrize("quality", [55, 80, 95])
def test_spliced_frames_are_the_unspliced_encoding(reference: np.ndarray, quality: int) -> None:
    static = StaticJpeg(reference, quality)
    for seed in range(3):
        frame = talking(reference, seed)
        spliced = static.splice(np.ascontiguousarray(frame[96:256]), 96, 120, 300)
        # Byte for byte what encoding the whole frame (with restarts) gives…
        assert spliced == encode_with_restarts(frame, quality)
        # …which every decoder reads as an ordinary JPEG, close to the plain encoding.
        plain = simplejpeg.decode_jpeg(encode_jpeg(frame, quality), colorspace="RGB")
        for name, decoded in decoders(spliced).items():
            assert decoded.shape == frame.shape, name
            assert mean_abs(decoded, frame) < mean_abs(plain, frame) + 1.0, name
            assert mean_abs(decoded, plain) < 2.0, name


@pytest.mark.parametrize("width", [410, 416, 200])
def test_odd_sizes_and_a_region_at_the_corner(width: int) -> None:
    yy, xx = np.mgrid[0:250, 0:width]  # a height that is not whole MCU rows
    frame = np.stack([xx * 255 // width, yy, (xx + yy) % 200], axis=2).astype(np.uint8)
    static = StaticJpeg(frame, 70)
    changed = frame.copy()
    changed[230:, 150:] = 255 - changed[230:, 150:]
    spliced = static.splice(np.ascontiguousarray(changed[224:]), 224, 150, width)
    assert spliced == encode_with_restarts(changed, 70)
    decoded = decoders(spliced)
    for image in decoded.values():
        assert image.shape == (250, width, 3)
        assert mean_abs(image, decoded["pillow"]) < 2.0


def test_misaligned_bands_are_refused(reference: np.ndarray) -> None:
    static = StaticJpeg(reference, 80)
    with pytest.raises(SpliceError):
        static.splice(np.ascontiguousarray(reference[90:200]), 90)  # not on a block row
    with pytest.raises(SpliceError):
        static.splice(np.ascontiguousarray(reference[96:200]), 96)  # ends mid block row
    with pytest.raises(SpliceError):
        static.splice(np.ascontiguousarray(reference[96:128, :400]), 96)  # other width


def test_the_cache_encodes_a_reference_once(reference: np.ndarray) -> None:
    cache = SpliceCache(capacity=2)
    first = cache.get("ref", reference, 80)
    assert cache.get("ref", reference, 80) is first
    assert cache.get("ref", reference, 60) is not first  # quality is part of the key


async def test_avatar_frames_from_the_server_decode_everywhere(server: RunningServer) -> None:
    async with await connect(server.ws + "/") as ws:
        await flashtalk_init(ws)
        await ws.send(b"AUDI" + speech_like(17920, seed=3))
        reply = await asyncio.wait_for(ws.recv(), 30)
    assert isinstance(reply, bytes)
    jpegs = decode_video(reply)
    assert len(jpegs) == 28
    decoded = [decoders(j) for j in jpegs]
    for frame in decoded:
        assert frame["pillow"].shape == (704, 416, 3)
        assert mean_abs(frame["pillow"], frame["pyav"]) < 2.0
        assert mean_abs(frame["pillow"], frame["libjpeg-turbo"]) < 2.0
    # Spliced: a restart interval is declared, the bottom of every frame (below the face)
    # is the same encoded rows, and the mouth region differs while speaking.
    assert all(b"\xff\xdd" in j for j in jpegs)
    bottoms = {f["libjpeg-turbo"][-200:].tobytes() for f in decoded}
    assert len(bottoms) == 1
    faces = [f["libjpeg-turbo"][150:260, 150:270].astype(np.float32) for f in decoded]
    assert max(float(np.abs(f - faces[0]).mean()) for f in faces) > 1.0


@pytest.mark.parametrize("model", ["omni-avatar-lite", "omni-avatar-lite-v1"])
async def test_whole_frame_encoding_when_splicing_is_off(model: str) -> None:
    # The simple path (and the old renderer, kept for comparison) still serve frames.
    with run_server(jpeg_splice=False) as srv:
        async with await connect(srv.ws + "/v1/avatar/realtime") as ws:
            await ws.send(
                json.dumps(
                    {
                        "type": "session.create",
                        "model": model,
                        "inputs": {},
                        "config": {"width": 256, "height": 384, "chunk_samples": 3200},
                    }
                )
            )
            created = await recv_json(ws)
            assert created["type"] == "session.created", created
            await ws.send(b"AUDI" + speech_like(3200, seed=1))
            event = await recv_json(ws)
            assert event["type"] == "metrics"
            reply = await asyncio.wait_for(ws.recv(), 30)
    jpegs = decode_video(reply)
    assert len(jpegs) == 5
    for jpeg in jpegs:
        assert b"\xff\xdd" not in jpeg[:1000]  # no restart interval: encoded whole
        assert decoders(jpeg)["pillow"].shape == (384, 256, 3)
