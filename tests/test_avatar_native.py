"""The native realtime avatar protocol: sessions, events in order, structured errors."""

from __future__ import annotations

import asyncio
import json

import pytest

from omnistream.codecs.framing import decode_video
from omnistream.codecs.jpeg import decode_jpeg
from tests.avatar_client import connect, recv_json, ref_image_b64, speech_like
from tests.server import RunningServer, run_server

ENVELOPE = {"type", "session_id", "trace_id", "model", "chunk_index", "metrics", "code", "message"}


async def create(ws: object, **fields: object) -> dict[str, object]:
    request = {
        "type": "session.create",
        "model": "omni-avatar-lite",
        "backend": "auto",
        "inputs": {},
        "config": {},
    }
    request.update(fields)
    await ws.send(json.dumps(request))  # type: ignore[attr-defined]
    return await recv_json(ws)


async def test_events_in_order_with_metrics_before_each_vidx(server: RunningServer) -> None:
    async with await connect(server.ws + "/v1/avatar/realtime") as ws:
        created = await create(
            ws,
            inputs={"image_b64": ref_image_b64(), "prompt": "hi"},
            config={"width": 256, "height": 384, "fps": 20, "chunk_samples": 3200},
        )
        assert created["type"] == "session.created"
        assert ENVELOPE <= set(created)
        assert str(created["session_id"]).startswith("avt_")
        assert str(created["trace_id"]).startswith("trace_")
        assert created["audio"] == {
            "format": "pcm_s16le",
            "sample_rate": 16000,
            "channels": 1,
            "chunk_samples": 3200,
        }
        video = created["video"]
        assert isinstance(video, dict)
        assert video["encoding"] == "jpeg-seq" and video["wire_magic"] == "VIDX"
        assert (video["fps"], video["width"], video["height"]) == (20, 256, 384)
        assert video["frame_count"] == 4  # 3200 samples at 20 fps

        total_frames = 0
        for index in range(5):
            await ws.send(b"AUDI" + speech_like(3200, seed=index))
            event = await recv_json(ws)
            assert event["type"] == "metrics"
            assert ENVELOPE <= set(event)
            assert event["chunk_index"] == index
            assert event["session_id"] == created["session_id"]
            metrics = event["metrics"]
            for key in ("ttff_ms", "first_video_chunk_ms", "infer_ms", "encode_ms", "queue_ms"):
                assert metrics[key] >= 0
            frames = decode_video(await asyncio.wait_for(ws.recv(), 30))
            assert len(frames) == metrics["frames"] == 4
            assert decode_jpeg(frames[0]).shape == (384, 256, 3)
            total_frames += len(frames)

        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv_json(ws))["type"] == "pong"
        await ws.send(json.dumps({"type": "session.close"}))
        finish = await recv_json(ws)
        assert finish["type"] == "finish"
        assert finish["metrics"]["frames"] == total_frames == 20
        closed = await recv_json(ws)
        assert closed["type"] == "session.closed"
        assert closed["session_id"] == created["session_id"]


async def test_default_avatar_and_odd_chunk_sizes_follow_the_sample_clock(
    server: RunningServer,
) -> None:
    """With no image the bundled face is used; frames come from the sample count."""
    async with await connect(server.ws + "/v1/avatar/realtime") as ws:
        created = await create(ws)
        assert created["type"] == "session.created"
        frames = 0
        for size in (1000, 333, 5000, 67):  # 6400 samples in all = 10 frames at 25 fps
            await ws.send(b"AUDI" + speech_like(size))
            assert (await recv_json(ws))["type"] == "metrics"
            frames += len(decode_video(await ws.recv()))
        assert frames == 6400 * 25 // 16000


async def test_cancel_drops_queued_work_and_refuses_more_audio(server: RunningServer) -> None:
    async with await connect(server.ws + "/v1/avatar/realtime") as ws:
        await create(ws)
        for i in range(3):
            await ws.send(b"AUDI" + speech_like(17920, seed=i))
        await ws.send(json.dumps({"type": "session.cancel"}))
        seen: list[str] = []
        while "finish" not in seen:
            msg = await asyncio.wait_for(ws.recv(), 30)
            seen.append("VIDX" if isinstance(msg, bytes) else json.loads(msg)["type"])
        assert "session.cancelled" in seen
        # Cancelled work is dropped: fewer than three chunks were delivered.
        assert seen.count("VIDX") < 3
        await ws.send(b"AUDI" + speech_like(1600))
        event = await recv_json(ws)
        while event["type"] != "error":  # late errors for dropped chunks may come first
            event = await recv_json(ws)
        assert event["code"] == "session_cancelled"
        # A new session on the same socket works (the cancelled one is closed first).
        assert (await create(ws))["type"] == "session.closed"
        assert (await recv_json(ws))["type"] == "session.created"


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("{bad json", "bad_json"),
        (json.dumps({"type": "jump"}), "unsupported_message"),
        (b"AUDI" + bytes(3200), "session_required"),
        (
            json.dumps({"type": "session.create", "inputs": {"image_b64": "%%%"}}),
            "bad_image_base64",
        ),
        (json.dumps({"type": "session.create", "inputs": {"image_b64": ""}}), "missing_image"),
        (json.dumps({"type": "session.create", "config": {"width": 417}}), "bad_config"),
        (json.dumps({"type": "session.create", "config": {"fps": "fast"}}), "bad_config"),
        (json.dumps({"type": "session.create", "config": []}), "bad_config"),
        (json.dumps({"type": "session.create", "model": "nope"}), "model_not_found"),
        (json.dumps({"type": "session.close"}), "session_required"),
    ],
)
async def test_errors_are_structured_and_socket_survives(
    server: RunningServer, message: str | bytes, code: str
) -> None:
    async with await connect(server.ws + "/v1/avatar/realtime") as ws:
        await ws.send(message)
        event = await recv_json(ws)
        assert event["type"] == "error"
        assert event["code"] == code
        assert isinstance(event["message"], str) and event["message"]
        assert ENVELOPE <= set(event)
        assert (await create(ws))["type"] == "session.created"


async def test_bad_audio_after_create(server: RunningServer) -> None:
    async with await connect(server.ws + "/v1/avatar/realtime") as ws:
        await create(ws)
        await ws.send(b"WAVE" + bytes(100))
        assert (await recv_json(ws))["code"] == "bad_audio_magic"
        await ws.send(b"AUDI" + bytes(3))
        assert (await recv_json(ws))["code"] == "bad_audio_chunk"
        await ws.send(b"AUDI")
        assert (await recv_json(ws))["code"] == "bad_audio_chunk"
        await ws.send(b"AUDI" + speech_like(1600))
        assert (await recv_json(ws))["type"] == "metrics"
        assert len(decode_video(await ws.recv())) == 2


async def test_capacity_exceeded_is_an_event_not_a_dropped_socket() -> None:
    with run_server(max_sessions=1) as srv:
        async with await connect(srv.ws + "/v1/avatar/realtime") as a:
            assert (await create(a))["type"] == "session.created"
            async with await connect(srv.ws + "/v1/avatar/realtime") as b:
                refused = await create(b)
                assert refused["type"] == "error"
                assert refused["code"] == "capacity_exceeded"
                await a.send(json.dumps({"type": "session.close"}))
                while (await recv_json(a))["type"] != "session.closed":
                    pass
                assert (await create(b))["type"] == "session.created"


async def test_idle_session_expires_with_finish_and_slot_is_freed() -> None:
    with run_server(idle_timeout_s=1.0) as srv:
        async with await connect(srv.ws + "/v1/avatar/realtime") as ws:
            assert (await create(ws))["type"] == "session.created"
            assert len(srv.state.sessions.live()) == 1
            finish = await recv_json(ws, timeout=10)
            assert finish["type"] == "finish"
            assert finish["message"] == "idle timeout"
            await asyncio.wait_for(ws.wait_closed(), 10)
        assert srv.state.sessions.live() == []


async def test_prometheus_exports_session_and_chunk_metrics(server: RunningServer) -> None:
    import httpx

    async with await connect(server.ws + "/v1/avatar/realtime") as ws:
        await create(ws)
        await ws.send(b"AUDI" + speech_like(3200))
        await recv_json(ws)
        await ws.recv()
        async with httpx.AsyncClient() as client:
            text = (await client.get(server.http + "/metrics")).text
    for name in (
        'omnistream_live_sessions{kind="avatar"}',
        'omnistream_chunk_latency_seconds_count{model="omni-avatar-lite"}',
        'omnistream_queue_wait_seconds_count{model="omni-avatar-lite"}',
        'omnistream_batch_size_count{model="omni-avatar-lite"}',
        "omnistream_event_loop_lag_seconds_count",
        "omnistream_late_chunks_total",
    ):
        assert name in text, name
