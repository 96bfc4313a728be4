"""What the hosted task API adds on top of the job engine, measured as a client sees it.

Against one ``omnistream serve`` process (keys off, embedded models), interleaved:

* the same short TTS request run ``--rounds`` times as ``POST /v1/generate`` (sync) and as
  an Omni task (create, poll every ``--poll-ms`` until ``succeeded``, download the output
  through its signed URL), downloads on the same keep-alive connection: end-to-end
  p50/p95 of each, the difference, and the create call alone;
* ``GET /api/omni/models`` and ``GET /api/omni/tasks/{id}`` (a finished task) latency;
* ``PUT`` of a WAV into a ``speech_to_text`` upload slot (spooling and job submission
  included) for ``--upload-s`` seconds of audio.

Usage: ``python -m bench.omni_api_bench --out bench/results/omni_api.json``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.omnistream_server import omnistream_server

TEXT = "The quick brown fox jumps over the lazy dog."


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(_pct(values, 0.5), 2), "p95_ms": round(_pct(values, 0.95), 2),
            "mean_ms": round(statistics.fmean(values), 2), "n": len(values)}


def _wav(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)
    return buf.getvalue()


def generate_once(client: httpx.Client) -> float:
    started = time.perf_counter()
    r = client.post("/v1/generate", json={"task": "text2audio", "inputs": {"prompt": TEXT}})
    r.raise_for_status()
    client.get(r.json()["outputs"][0]["url"]).raise_for_status()
    return (time.perf_counter() - started) * 1000.0


def task_once(client: httpx.Client, poll_s: float, creates: list[float]) -> tuple[float, str]:
    started = time.perf_counter()
    r = client.post("/api/omni/tasks/create", json={
        "model_group": "omni-tts", "task_type": "text_to_speech", "input": {"text": TEXT}})
    r.raise_for_status()
    creates.append((time.perf_counter() - started) * 1000.0)
    task_id = r.json()["portal_task_id"]
    while True:
        body: dict[str, Any] = client.get(f"/api/omni/tasks/{task_id}").json()
        if body["status"] == "succeeded":
            break
        if body["status"] in ("failed", "cancelled"):
            raise RuntimeError(body)
        time.sleep(poll_s)
    client.get(body["outputs"][0]["url"]).raise_for_status()  # same keep-alive connection
    return (time.perf_counter() - started) * 1000.0, task_id


def timed_get(client: httpx.Client, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        client.get(path).raise_for_status()
        out.append((time.perf_counter() - started) * 1000.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--poll-ms", type=float, default=20.0)
    parser.add_argument("--upload-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with omnistream_server(OMNISTREAM_OMNI_SIGNING_SECRET="bench-secret") as (address, _), \
            httpx.Client(base_url=f"http://{address}", timeout=120) as client:
        generate_once(client)  # load the voice
        direct: list[float] = []
        tasks: list[float] = []
        creates: list[float] = []
        task_id = ""
        for _ in range(args.rounds):
            direct.append(generate_once(client))
            elapsed, task_id = task_once(client, args.poll_ms / 1000.0, creates)
            tasks.append(elapsed)
        catalog = timed_get(client, "/api/omni/models", 50)
        status = timed_get(client, f"/api/omni/tasks/{task_id}", 100)
        wav = _wav(args.upload_s)
        puts = []
        for _ in range(5):
            r = client.post("/api/omni/tasks/create", json={
                "model_group": "omni-stt", "task_type": "speech_to_text",
                "files_to_upload": [{"field": "audio", "content_type": "audio/wav"}]})
            url = r.json()["uploads"][0]["upload_url"]
            started = time.perf_counter()
            client.put(url, content=wav, headers={"Content-Type": "audio/wav"}).raise_for_status()
            puts.append((time.perf_counter() - started) * 1000.0)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "poll_ms": args.poll_ms,
        "tts_generate_sync": _summary(direct),
        "tts_omni_task": _summary(tasks),
        "omni_create": _summary(creates),
        "omni_minus_generate_p50_ms": round(_pct(tasks, 0.5) - _pct(direct, 0.5), 2),
        "get_models": _summary(catalog),
        "get_task_finished": _summary(status),
        "put_upload": {**_summary(puts), "bytes": len(wav)},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
