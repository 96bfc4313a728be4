"""Offline generation benchmarks against a real server in its own process.

Two measurements (``python bench/offline_bench.py --help``):

* ``tasks`` — throughput and latency p50/p95 of each offline task (text2audio,
  audio2text, audio2video) through sync ``POST /v1/generate`` at concurrency 1 and 4;
* ``mix`` — chunk latency p50/p95 of 4 live FlashTalk avatar sessions (paced in real
  time) without, then with, an offline audio2video job running beside them; also
  whether any live chunk was lost and how far the offline job got meanwhile.

The server runs as ``omnistream serve`` in a subprocess so that the client's own work
never shares the server's interpreter; results go to ``bench/results/offline_*.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import websockets
from omnistream_server import omnistream_server

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = (
    "Offline jobs fill the spare capacity of the engine. "
    "Live sessions overtake them at every step, so nobody waits."
)


@contextmanager
def server(artifacts: Path, **env: str) -> Iterator[str]:
    """``omnistream serve`` writing artifacts under ``artifacts``; yields its HTTP URL."""
    with omnistream_server(OMNISTREAM_ARTIFACTS_DIR=str(artifacts), **env) as (address, _):
        yield f"http://{address}"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index], 1)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- tasks -----------------------------------------------------------------------------------


async def _timed(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    r = await client.post("/v1/generate", json=body)
    elapsed = (time.perf_counter() - started) * 1000.0
    if r.status_code != 200:
        raise RuntimeError(f"{body['task']}: {r.status_code} {r.text[:300]}")
    return elapsed, r.json()


async def bench_task(
    client: httpx.AsyncClient, body: dict[str, Any], concurrency: int, requests: int
) -> dict[str, Any]:
    queue = list(range(requests))
    latencies: list[float] = []
    media_s = 0.0
    server_ms: list[float] = []

    async def worker() -> None:
        nonlocal media_s
        while queue:
            queue.pop()
            ms, result = await _timed(client, body)
            latencies.append(ms)
            media_s += float(result["outputs"][0].get("duration_s") or 0.0)
            server_ms.append(float(result["metadata"]["timings"].get("total_ms", 0.0)))

    await _timed(client, body)  # warm: model loaded, caches filled
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": requests,
        "wall_s": round(wall, 2),
        "throughput_rps": round(requests / wall, 3),
        "media_s_per_s": round(media_s / wall, 2),
        "latency_ms_p50": pct(latencies, 50),
        "latency_ms_p95": pct(latencies, 95),
        "run_ms_p50": pct(server_ms, 50),
    }


async def run_tasks(
    url: str, requests_c1: int, requests_c4: int, video_size: tuple[int, int]
) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        speech = await client.post(
            "/v1/generate", json={"task": "text2audio", "inputs": {"prompt": TEXT}}
        )
        speech.raise_for_status()
        out = speech.json()["outputs"][0]
        wav = (await client.get(out["url"])).content
        audio_b64 = base64.b64encode(wav).decode()
        bodies = {
            "text2audio": {"task": "text2audio", "inputs": {"prompt": TEXT}},
            "audio2text": {"task": "audio2text", "inputs": {"audio": audio_b64}},
            "audio2video": {
                "task": "audio2video",
                "inputs": {"audio": audio_b64},
                "config": {"width": video_size[0], "height": video_size[1], "fps": 25},
            },
        }
        results: dict[str, Any] = {"input_audio_s": out["duration_s"], "tasks": {}}
        for task, body in bodies.items():
            rows = []
            for concurrency, count in ((1, requests_c1), (4, requests_c4)):
                row = await bench_task(client, body, concurrency, count)
                print(task, row, flush=True)
                rows.append(row)
            results["tasks"][task] = rows
        return results


# -- mix: live sessions beside an offline job ---------------------------------------------------


def speech_like(samples: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000
    phase = 2 * np.pi * np.cumsum(140 + 20 * np.sin(2 * np.pi * 0.7 * t)) / 16000
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None)
    return (np.clip(0.15 * voice * syllables, -1, 1) * 32767).astype("<i2").tobytes()


async def live_session(ws_url: str, chunks: int, seed: int, ref_b64: str) -> dict[str, Any]:
    latencies: list[float] = []
    lost = 0
    async with websockets.connect(ws_url, max_size=None, open_timeout=30) as ws:
        await ws.send(json.dumps({"type": "init", "ref_image": ref_b64}))
        init = json.loads(await ws.recv())
        assert init["type"] == "init_ok", init
        samples = int(init["chunk_samples"])
        period = samples / 16000
        started = time.monotonic() + 0.05 * seed
        for index in range(chunks):
            await asyncio.sleep(max(0.0, started + index * period - time.monotonic()))
            sent = time.perf_counter()
            await ws.send(b"AUDI" + speech_like(samples, seed * 1000 + index))
            reply = await asyncio.wait_for(ws.recv(), 60)
            if not isinstance(reply, bytes) or not reply.startswith(b"VIDX"):
                lost += 1
                continue
            latencies.append((time.perf_counter() - sent) * 1000.0)
        await ws.send(json.dumps({"type": "close"}))
        await ws.recv()
    return {"latencies": latencies, "lost": lost, "chunk_s": period}


async def run_mix(
    url: str, sessions: int, chunks: int, with_job: bool, job_audio_b64: str
) -> dict[str, Any]:
    ws_url = url.replace("http", "ws") + "/v1/audio2video/flashtalk"
    ref = base64.b64encode(
        resources.files("omnistream.assets").joinpath("default_avatar.jpg").read_bytes()
    ).decode()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        job_ids: list[str] = []
        stop = asyncio.Event()

        async def offline_loop() -> None:
            while not stop.is_set():
                r = await client.post(
                    "/v1/generate",
                    json={
                        "task": "audio2video",
                        "inputs": {"audio": job_audio_b64},
                        "async_run": True,
                    },
                )
                r.raise_for_status()
                job_ids.append(r.json()["id"])
                while not stop.is_set():
                    state = (await client.get(f"/v1/jobs/{job_ids[-1]}")).json()["state"]
                    if state in ("succeeded", "failed", "cancelled"):
                        break
                    await asyncio.sleep(0.2)

        background = asyncio.create_task(offline_loop()) if with_job else None
        if background is not None:
            await asyncio.sleep(1.0)  # the job is rendering when the sessions start
        results = await asyncio.gather(
            *(live_session(ws_url, chunks, seed, ref) for seed in range(sessions))
        )
        stop.set()
        frames_rendered = 0
        if background is not None:
            await background
            for job_id in job_ids:
                record = (await client.get(f"/v1/jobs/{job_id}")).json()
                progress = [e for e in record["events"] if e["event"] == "stage_progress"]
                if progress:
                    frames_rendered += int(progress[-1]["data"]["done"])
                if record["state"] == "running":
                    await client.delete(f"/v1/jobs/{job_id}")
    latencies = [ms for r in results for ms in r["latencies"]]
    return {
        "with_offline_job": with_job,
        "sessions": sessions,
        "chunks_per_session": chunks,
        "chunk_s": results[0]["chunk_s"],
        "chunks_received": len(latencies),
        "chunks_lost": sum(r["lost"] for r in results),
        "chunk_latency_ms_p50": pct(latencies, 50),
        "chunk_latency_ms_p95": pct(latencies, 95),
        "chunk_latency_ms_max": round(max(latencies), 1) if latencies else None,
        "offline_jobs_started": len(job_ids),
        "offline_frames_rendered_meanwhile": frames_rendered,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["tasks", "mix", "all"])
    parser.add_argument("--requests-c1", type=int, default=5)
    parser.add_argument("--requests-c4", type=int, default=12)
    parser.add_argument("--video-size", default="416x704")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    width, height = (int(x) for x in args.video_size.split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    artifacts = Path(os.environ.get("TMPDIR", "/tmp")) / f"omnistream-bench-{os.getpid()}"
    info = machine()
    with server(artifacts) as url:
        if args.what in ("tasks", "all"):
            tasks = asyncio.run(run_tasks(url, args.requests_c1, args.requests_c4, (width, height)))
            report = {
                "machine": info,
                "video_size": [width, height],
                "max_running_jobs": 2,
                **tasks,
            }
            (args.out / "offline_tasks.json").write_text(json.dumps(report, indent=2))
        if args.what in ("mix", "all"):
            tone = speech_like(16000 * 30, 99)
            wav = _wav(tone)
            job_b64 = base64.b64encode(wav).decode()
            rows = []
            for with_job in (False, True, False, True):
                row = asyncio.run(run_mix(url, args.sessions, args.chunks, with_job, job_b64))
                print(row, flush=True)
                rows.append(row)
            report = {"machine": info, "runs": rows}
            (args.out / "offline_mix.json").write_text(json.dumps(report, indent=2))
    return 0


def _wav(pcm: bytes) -> bytes:
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
