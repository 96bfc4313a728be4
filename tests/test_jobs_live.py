"""A live avatar session beside an offline job: realtime work overtakes the job at its next
step, so the live session loses no chunk. (Latency figures live in bench/offline_mix.py.)"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx

from omnistream.codecs.framing import decode_video
from tests.avatar_client import connect, flashtalk_init, speech_like
from tests.jobs_helpers import b64, tone
from tests.server import run_server

CHUNKS = 8
SLICE = 12  # frames per chunk: 0.48 s of audio at 25 fps


async def test_live_session_loses_no_chunk_while_offline_job_runs(tmp_path: Path) -> None:
    with run_server(artifacts_dir=str(tmp_path)) as srv:
        async with httpx.AsyncClient(base_url=srv.http, timeout=120) as client:
            ws = await connect(f"{srv.ws}/v1/audio2video/flashtalk")
            init = await flashtalk_init(
                ws, width=256, height=320, fps=25, slice_len=SLICE, frame_num=SLICE + 1
            )
            assert init["type"] == "init_ok", init
            chunk_samples = int(init["chunk_samples"])
            job = await client.post(
                "/v1/generate",
                json={
                    "task": "audio2video",
                    "inputs": {"audio": b64(tone(12.0))},
                    "config": {"width": 256, "height": 320, "fps": 25},
                    "async_run": True,
                },
            )
            assert job.status_code == 200, job.text
            job_id = job.json()["id"]
            frames = []
            started = time.monotonic()
            for index in range(CHUNKS):
                await asyncio.sleep(
                    max(0.0, started + index * chunk_samples / 16000 - time.monotonic())
                )
                await ws.send(b"AUDI" + speech_like(chunk_samples, seed=index))
                reply = await asyncio.wait_for(ws.recv(), 30)
                assert isinstance(reply, bytes), reply
                frames.append(len(decode_video(reply)))
            await ws.send(json.dumps({"type": "close"}))
            await ws.close()
            assert frames == [init["slice_len"]] * CHUNKS
            record = (await client.get(f"/v1/jobs/{job_id}")).json()
            assert record["state"] in ("running", "succeeded"), record["error"]
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
                async for _ in stream.aiter_lines():
                    pass
            record = (await client.get(f"/v1/jobs/{job_id}")).json()
            assert record["state"] == "succeeded", record["error"]
