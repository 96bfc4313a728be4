"""Per-request Wav2Lip checkpoints (``config.model_path``) on every avatar route.

A request may bring its own weights, but only from the operator's checkpoint
directories, each file is loaded once and shared, and only a bounded number stay
resident. Random-weight checkpoints in the published layout stand in for real ones.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("torch")

from omnistream.codecs.framing import decode_video
from omnistream.codecs.jpeg import decode_jpeg
from omnistream.models.wav2lip.checkpoint import save_random_checkpoint
from tests.avatar_client import (
    connect,
    flashtalk_init,
    recv_json,
    ref_image_b64,
    speech_like,
)
from tests.jobs_helpers import b64, tone
from tests.server import run_server
from tests.webrtc_helpers import RtcClient, loopback_ice


async def _create(ws: Any, model: str, **config: Any) -> dict[str, Any]:
    await ws.send(json.dumps({
        "type": "session.create", "model": model,
        "inputs": {"image_b64": ref_image_b64()},
        "config": {"width": 128, "height": 160, "slice_len": 3, **config},
    }))
    while True:  # a create on a socket with a session closes that one first
        event = await recv_json(ws, timeout=120)
        if event["type"] not in ("finish", "session.closed"):
            return event


async def _one_chunk(ws: Any, chunk_samples: int) -> list[bytes]:
    await ws.send(b"AUDI" + speech_like(chunk_samples, seed=3))
    metrics: dict[str, Any] = {}
    while True:
        message = await asyncio.wait_for(ws.recv(), 120)
        if isinstance(message, bytes):
            frames = decode_video(message)
            # The chunk's metrics say how full the shared model call was.
            assert metrics["batch_frames"] >= len(frames) and metrics["batch_size"] >= 1
            return frames
        event = json.loads(message)
        assert event["type"] != "error", event
        if event["type"] == "metrics":
            metrics = event["metrics"]


def test_request_checkpoints_are_confined_shared_and_bounded(tmp_path: Path) -> None:
    allowed = tmp_path / "checkpoints"
    allowed.mkdir()
    first = save_random_checkpoint(allowed / "first.pth", "96")
    # Distinct files with the same weights (hard links: no second 145 MB on disk).
    second, third = allowed / "second.pth", allowed / "third.pth"
    os.link(first, second)
    os.link(first, third)
    broken = allowed / "broken.pth"
    broken.write_bytes(b"not a checkpoint at all")
    outside = tmp_path / "elsewhere.pth"
    os.link(first, outside)

    async def scenario(ws_url: str, http_url: str) -> None:
        native = ws_url + "/v1/avatar/realtime"
        # Two sessions naming the same file share one resident model.
        a, b = await connect(native), await connect(native)
        try:
            for ws in (a, b):
                created = await _create(ws, "wav2lip-96", model_path=str(first))
                assert created["type"] == "session.created", created
                frames = await _one_chunk(ws, created["audio"]["chunk_samples"])
                assert [decode_jpeg(j).shape for j in frames] == [(160, 128, 3)] * 3
        finally:
            await a.close()
            await b.close()

        ws = await connect(native)
        try:
            # Outside the operator's directories: refused before anything is read.
            error = await _create(ws, "wav2lip-96", model_path=str(outside))
            assert (error["type"], error["code"]) == ("error", "bad_config")
            assert "outside the server's checkpoint directories" in error["message"]
            # A model that has no weights to choose says so.
            error = await _create(ws, "omni-avatar-lite", model_path=str(first))
            assert error["code"] == "bad_config" and "does not take" in error["message"]
            # A broken file fails its own session with the loader's reason...
            error = await _create(ws, "wav2lip-96", model_path=str(broken))
            assert error["type"] == "error" and "not a PyTorch checkpoint" in error["message"]
            # ...and does not hold one of the two resident slots: a second file loads.
            created = await _create(ws, "wav2lip-96", model_path=str(second))
            assert created["type"] == "session.created", created
            # Both slots are taken now: a third file is refused, the loaded ones are not.
            error = await _create(ws, "wav2lip-96", model_path=str(third))
            assert error.get("code") == "bad_config", error
            assert "are resident and in use" in error["message"]
        finally:
            await ws.close()

        # Operators see what is resident, from which file, and how it runs.
        async with httpx.AsyncClient() as client:
            ready = (await client.get(http_url + "/readyz")).json()
        runners = {Path(r["checkpoint"]).name: r
                   for r in ready["models"]["wav2lip-96"]["runners"]}
        assert runners["first.pth"]["state"] == runners["second.pth"]["state"] == "ready"
        assert runners["first.pth"]["dtype"] == "float32"
        assert runners["first.pth"]["layout"] == "96"
        assert runners["broken.pth"]["state"] == "failed" and "third.pth" not in runners

        # FlashTalk: the route has no default weights, yet the handshake is accepted
        # because an init may bring them; an init without them is told why.
        ws = await connect(ws_url + "/v1/audio2video/wav2lip-96")
        try:
            error = await flashtalk_init(ws, width=128, height=160, slice_len=2)
            assert error["type"] == "error" and "no checkpoint configured" in error["message"]
            reply = await flashtalk_init(ws, width=128, height=160, slice_len=2,
                                         model_path=str(first))
            assert reply["type"] == "init_ok", reply
            await ws.send(b"AUDI" + speech_like(reply["chunk_samples"], seed=1))
            message = await asyncio.wait_for(ws.recv(), 120)
            assert isinstance(message, bytes) and len(decode_video(message)) == 2
        finally:
            await ws.close()

        # WebRTC: the offer names the file the same way.
        client = RtcClient(http_url)
        try:
            answer = await client.offer(model="wav2lip-96", model_path=str(first),
                                        width=128, height=160, fps=25)
            assert answer.status_code == 200, answer.text
            await client.wait_video(5, within=60)
            assert client.video_size == (128, 160)
        finally:
            await client.close()
        refused_rtc = await RtcClient(http_url).offer(model="wav2lip-96",
                                                      model_path=str(outside))
        assert refused_rtc.status_code == 400
        assert refused_rtc.json()["error"]["code"] == "bad_config"

        # Offline generation takes the same config key and the same rules.
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"task": "audio2video", "model": "wav2lip-96",
                    "inputs": {"audio": b64(tone(0.2))},
                    "config": {"width": 96, "height": 128, "model_path": str(first)}}
            ok = await client.post(http_url + "/v1/generate", json=body)
            assert ok.status_code == 200, ok.text
            assert ok.json()["outputs"][0]["num_frames"] == 5
            body["config"]["model_path"] = str(outside)
            refused = await client.post(http_url + "/v1/generate", json=body)
            assert refused.status_code == 400
            assert refused.json()["error"]["code"] == "invalid_config"

    with loopback_ice(), run_server(checkpoint_roots=[str(allowed)],
                                    max_request_checkpoints=2,
                                    artifacts_dir=str(tmp_path / "out")) as srv:
        asyncio.run(scenario(srv.ws, srv.http))


def test_request_checkpoints_are_off_without_checkpoint_roots(tmp_path: Path) -> None:
    ckpt = save_random_checkpoint(tmp_path / "w.pth", "96")

    async def scenario(ws_url: str) -> None:
        ws = await connect(ws_url + "/v1/avatar/realtime")
        try:
            error = await _create(ws, "wav2lip-96", model_path=str(ckpt))
            assert error["code"] == "bad_config"
            assert "OMNISTREAM_CHECKPOINT_ROOTS" in error["message"]
        finally:
            await ws.close()

    with run_server() as srv:
        asyncio.run(scenario(srv.ws))


def test_an_idle_request_checkpoint_makes_room_for_another(tmp_path: Path) -> None:
    allowed = tmp_path / "checkpoints"
    allowed.mkdir()
    first = save_random_checkpoint(allowed / "first.pth", "96")
    second = allowed / "second.pth"
    os.link(first, second)

    async def scenario(ws_url: str, http_url: str) -> None:
        native = ws_url + "/v1/avatar/realtime"
        a, b = await connect(native), await connect(native)
        try:
            created = await _create(a, "wav2lip-96", model_path=str(first))
            assert created["type"] == "session.created", created
            await _one_chunk(a, created["audio"]["chunk_samples"])
            # The only slot holds weights used a moment ago: refused, saying when to retry.
            error = await _create(b, "wav2lip-96", model_path=str(second))
            assert error.get("code") == "bad_config", error
            assert "in use" in error["message"] and "retry later" in error["message"]
            await asyncio.sleep(1.3)  # past the (test-sized) idle time
            created = await _create(b, "wav2lip-96", model_path=str(second))
            assert created["type"] == "session.created", created
            frames = await _one_chunk(b, created["audio"]["chunk_samples"])
            assert len(frames) == 3
        finally:
            await a.close()
            await b.close()
        async with httpx.AsyncClient() as client:
            ready = (await client.get(http_url + "/readyz")).json()
        resident = [Path(r["checkpoint"]).name for r in ready["models"]["wav2lip-96"]["runners"]]
        assert resident == ["second.pth"]

    with run_server(checkpoint_roots=[str(allowed)], max_request_checkpoints=1,
                    request_checkpoint_idle_s=1.0, idle_timeout_s=1.0) as srv:
        asyncio.run(scenario(srv.ws, srv.http))
