"""The FlashTalk-compatible WebSocket, driven the way existing clients drive it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time

import httpx
import numpy as np
import pytest
import websockets
from PIL import Image

from omnistream.codecs.framing import decode_video
from omnistream.codecs.jpeg import decode_jpeg
from omnistream.models.avatar_lite import detect_face
from tests.avatar_client import (
    connect,
    flashtalk_init,
    recv_json,
    ref_image_b64,
    silence,
    speech_like,
)
from tests.rawws import RawClient
from tests.server import RunningServer, run_server

CHUNK = 17920


async def send_chunk(ws: websockets.ClientConnection, pcm: bytes) -> list[bytes]:
    await ws.send(b"AUDI" + pcm)
    reply = await asyncio.wait_for(ws.recv(), 30)
    assert isinstance(reply, bytes), f"expected VIDX, got text {reply!r}"
    return decode_video(reply)


async def wait_for_live(server: RunningServer, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(server.state.sessions.live()) != count:
        assert time.monotonic() < deadline, f"live sessions {len(server.state.sessions.live())}"
        await asyncio.sleep(0.02)


async def test_init_ok_has_reference_geometry(server: RunningServer) -> None:
    async with await connect(server.ws + "/") as ws:
        reply = await flashtalk_init(ws)
    assert reply["type"] == "init_ok"
    for key, value in {
        "frame_num": 29,
        "motion_frames_num": 1,
        "slice_len": 28,
        "fps": 25,
        "height": 704,
        "width": 416,
        "chunk_samples": 17920,
    }.items():
        assert reply[key] == value


async def test_cold_client_sequence(server: RunningServer) -> None:
    """init → close, second connection with 4 chunks dropped, reconnect and init."""
    async with await connect(server.ws + "/") as ws:
        assert (await flashtalk_init(ws))["type"] == "init_ok"
        await ws.send(json.dumps({"type": "close"}))
        assert await recv_json(ws) == {"type": "close_ok"}
        # The socket stays open after close.
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}

    ws2 = await connect(server.ws + "/v1/audio2video/flashtalk")
    reply = await flashtalk_init(ws2, width=256, height=320)
    assert reply["width"] == 256 and reply["height"] == 320
    for i in range(4):
        frames = await send_chunk(ws2, speech_like(reply["chunk_samples"], seed=i))
        assert len(frames) == reply["slice_len"]
        for jpeg in frames:
            assert decode_jpeg(jpeg).shape == (320, 256, 3)
    await wait_for_live(server, 1)
    ws2.transport.abort()  # dropped without close: the session must be freed at once
    await wait_for_live(server, 0)

    async with await connect(server.ws + "/v1/avatar/flashtalk") as ws3:
        assert (await flashtalk_init(ws3))["type"] == "init_ok"
        frames = await send_chunk(ws3, speech_like(CHUNK))
        assert len(frames) == 28


async def test_every_vidx_is_valid_baseline_jpeg(server: RunningServer) -> None:
    async with await connect(server.ws + "/") as ws:
        await flashtalk_init(ws)
        for i in range(3):
            frames = await send_chunk(ws, speech_like(CHUNK, seed=i))
            assert len(frames) == 28
            for jpeg in frames:
                image = Image.open(io.BytesIO(jpeg))
                assert image.format == "JPEG"
                assert image.size == (416, 704)
                assert not image.info.get("progressive")


async def test_mouth_moves_with_speech_and_rest_stays(server: RunningServer) -> None:
    async with await connect(server.ws + "/") as ws:
        await flashtalk_init(ws)
        quiet = [decode_jpeg(f) for f in await send_chunk(ws, silence(CHUNK))]
        loud = [decode_jpeg(f) for f in await send_chunk(ws, speech_like(CHUNK, level=0.5))]
        quiet2 = [decode_jpeg(f) for f in await send_chunk(ws, silence(CHUNK))]
    face = detect_face(quiet[0])
    assert face is not None
    fx, fy, fw, fh = face
    mouth = (slice(fy + int(fh * 0.65), fy + int(fh * 1.05)), slice(fx + fw // 4, fx + 3 * fw // 4))
    background = (slice(0, fy // 2), slice(0, fx // 2))
    ref = quiet[0].astype(np.int16)

    def change(frames: list[np.ndarray], region: tuple[slice, slice]) -> float:
        return float(
            np.mean([np.abs(f.astype(np.int16)[region] - ref[region]).mean() for f in frames])
        )

    speaking = change(loud, mouth)
    silent = change(quiet2[10:], mouth)
    assert speaking > 4.0, speaking
    assert speaking > 2 * silent, (speaking, silent)
    # The background and the body do not move (JPEG noise only).
    assert change(loud, background) < 1.5
    assert change(loud, (slice(fy + 2 * fh, None), slice(None))) < 2.0


async def test_two_sessions_in_parallel_do_not_interfere(server: RunningServer) -> None:
    dark = Image.new("RGB", (320, 480), (30, 30, 30))
    buf = io.BytesIO()
    dark.save(buf, "PNG")

    async def run(image_b64: str, seed: int) -> list[np.ndarray]:
        async with await connect(server.ws + "/") as ws:
            await ws.send(
                json.dumps({"type": "init", "ref_image": image_b64, "width": 320, "height": 480})
            )
            assert (await recv_json(ws))["type"] == "init_ok"
            out = []
            for i in range(3):
                out += [decode_jpeg(f) for f in await send_chunk(ws, speech_like(CHUNK, seed + i))]
            return out

    face_frames, dark_frames = await asyncio.gather(
        run(ref_image_b64(), 1), run(base64.b64encode(buf.getvalue()).decode(), 2)
    )
    assert len(face_frames) == len(dark_frames) == 84
    # Each client got its own picture: the photo is bright, the blank image stays dark.
    assert min(f.mean() for f in face_frames) > 80
    assert max(f.mean() for f in dark_frames) < 45


async def test_no_face_image_falls_back(server: RunningServer) -> None:
    noise = (np.random.default_rng(0).random((300, 200, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    async with await connect(server.ws + "/") as ws:
        await ws.send(
            json.dumps({"type": "init", "ref_image": base64.b64encode(buf.getvalue()).decode()})
        )
        reply = await recv_json(ws)
        assert reply["type"] == "init_ok"
        assert reply["face_detected"] is False
        assert len(await send_chunk(ws, speech_like(CHUNK))) == 28


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("not json", "Invalid JSON"),
        (json.dumps({"type": "dance"}), "Unknown message type: dance"),
        (json.dumps({"type": "init"}), "Missing 'ref_image' field."),
        (
            json.dumps({"type": "init", "ref_image": "@@@not-base64@@@"}),
            "Invalid base64 in 'ref_image'.",
        ),
        (
            json.dumps({"type": "init", "ref_image": base64.b64encode(b"not an image").decode()}),
            "Invalid base64 in 'ref_image'.",
        ),
        (b"AUDI" + bytes(CHUNK * 2), "No active session. Send 'init' first."),
        (b"RIFF" + bytes(100), "Binary message must start with 'AUDI' magic."),
    ],
)
async def test_bad_input_gets_exact_error_and_socket_survives(
    server: RunningServer, message: str | bytes, expected: str
) -> None:
    async with await connect(server.ws + "/") as ws:
        await ws.send(message)
        reply = await recv_json(ws)
        assert reply["type"] == "error"
        assert reply["message"] == expected
        assert isinstance(reply["code"], str)
        # The connection is still usable.
        assert (await flashtalk_init(ws))["type"] == "init_ok"
        assert len(await send_chunk(ws, speech_like(CHUNK))) == 28


async def test_wrong_pcm_length_and_audio_after_close(server: RunningServer) -> None:
    async with await connect(server.ws + "/") as ws:
        await flashtalk_init(ws)
        await ws.send(b"AUDI" + bytes(1000))
        reply = await recv_json(ws)
        assert reply["message"] == "Expected 35840 bytes of int16 PCM (17920 samples), got 1000."
        await ws.send(json.dumps({"type": "close"}))
        assert (await recv_json(ws))["type"] == "close_ok"
        await ws.send(b"AUDI" + speech_like(CHUNK))
        assert (await recv_json(ws))["message"] == "No active session. Send 'init' first."


async def test_config_update_and_second_init_replace_only_this_session(
    server: RunningServer,
) -> None:
    async with await connect(server.ws + "/") as other, await connect(server.ws + "/") as ws:
        await flashtalk_init(other)
        await flashtalk_init(ws)
        await ws.send(json.dumps({"type": "config_update", "config": {"seed": 7, "width": 8}}))
        reply = await recv_json(ws)
        assert reply["type"] == "config_ok"
        assert reply["updated"] == {"seed": 7}
        assert reply["ignored"] == ["width"]
        again = await flashtalk_init(ws, slice_len=10)
        assert again["chunk_samples"] == 10 * 16000 // 25
        assert len(await send_chunk(ws, speech_like(again["chunk_samples"]))) == 10
        # The other connection's session is untouched by this one's re-init.
        assert len(await send_chunk(other, speech_like(CHUNK))) == 28
        await wait_for_live(server, 2)


async def test_limits_flood_and_stalled_reader() -> None:
    with run_server(max_image_bytes=20_000, max_message_bytes=200_000, send_timeout_s=1.0) as srv:
        async with await connect(srv.ws + "/") as ws:
            await ws.send(json.dumps({"type": "init", "ref_image": ref_image_b64()}))
            reply = await recv_json(ws)
            assert reply["type"] == "error" and reply["message"].startswith("Init failed:")
            assert reply["code"] == "image_too_large"
            await ws.send(b"AUDI" + bytes(150_000 * 2 // 2 * 2 + 60_000))
            reply = await recv_json(ws)
            assert reply["code"] == "message_too_large"
            # A flood of small messages: every one answered, in order, socket fine.
            for _ in range(300):
                await ws.send(json.dumps({"type": "ping"}))
            for _ in range(300):
                assert (await recv_json(ws)) == {"type": "pong"}

        # A client that sends audio but never reads: the server stops waiting on it after
        # send_timeout_s and frees its session; it never renders ahead unboundedly.
        small = Image.new("RGB", (64, 96), (200, 150, 120))
        buf = io.BytesIO()
        small.save(buf, "PNG")
        stalled = RawClient(srv.host, srv.port)
        init = {"type": "init", "ref_image": base64.b64encode(buf.getvalue()).decode()}
        stalled.send_text(json.dumps(init))
        await wait_for_live(srv, 1)
        with contextlib.suppress(OSError):
            for i in range(60):
                await asyncio.to_thread(stalled.send_binary, b"AUDI" + speech_like(CHUNK, seed=i))
        await wait_for_live(srv, 0, timeout=15)
        stalled.close()
        # Rendering stopped once the client stopped reading: far fewer than 60 chunks.
        assert srv.state.metrics.frames_encoded._value.get() < 60 * 28


async def test_dropped_mid_chunk_frees_session_and_spares_others(server: RunningServer) -> None:
    async with await connect(server.ws + "/") as keeper:
        await flashtalk_init(keeper)
        victim = await connect(server.ws + "/")
        await flashtalk_init(victim)
        await victim.send(b"AUDI" + speech_like(CHUNK))
        victim.transport.abort()
        await wait_for_live(server, 1)
        assert len(await send_chunk(keeper, speech_like(CHUNK))) == 28


def test_plain_http_and_model_list(server: RunningServer) -> None:
    assert httpx.get(server.http + "/").status_code < 500
    models = httpx.get(server.http + "/v1/audio2video/models").json()
    assert "omni-avatar-lite" in models["models"]
    assert {s["id"] for s in models["statuses"]} >= {"omni-avatar-lite"}
    assert httpx.get(server.http + "/v1/avatar/models").json()["models"] == models["models"]


async def test_unknown_model_route_is_refused(server: RunningServer) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(server.ws + "/v1/audio2video/no-such-model")
    assert info.value.response.status_code == 404
