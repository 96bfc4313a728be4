"""End-to-end Wav2Lip sessions: concurrent FlashTalk clients against a real server.

Saves a random-weight checkpoint in the published layout, starts omnistream with it as
the default avatar model, and runs N FlashTalk sessions at once, each sending its
chunks as existing clients do (next ``AUDI`` when the previous ``VIDX`` arrived). A
session keeps up when a chunk's reply comes back within the audio it carried
(1.12 s for the default 28-frame chunk). Reports per-chunk latency percentiles and the
frames/s the server delivered in total, with JPEG, paste-back and the protocol included.

Usage::

    python bench/wav2lip_sessions.py --variant 96 --sessions 1 2 --chunks 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnistream.codecs.framing import decode_video
from omnistream.models.wav2lip.checkpoint import save_random_checkpoint
from tests.avatar_client import connect, flashtalk_init, speech_like
from tests.server import run_server


async def one_session(url: str, chunks: int, seed: int, geometry: dict[str, int]
                      ) -> list[float] | str:
    """Chunk latencies in seconds, or the error code when the session was refused."""
    ws = await connect(url)
    try:
        reply = await flashtalk_init(ws, **geometry)
        if reply["type"] != "init_ok":
            return str(reply.get("code") or reply.get("message"))
        latencies = []
        for i in range(chunks):
            pcm = speech_like(reply["chunk_samples"], seed=seed * 100 + i)
            started = time.perf_counter()
            await ws.send(b"AUDI" + pcm)
            message = await asyncio.wait_for(ws.recv(), 600)
            assert isinstance(message, bytes), message
            assert len(decode_video(message)) == reply["slice_len"]
            latencies.append(time.perf_counter() - started)
        return latencies
    finally:
        await ws.close()


async def run(url: str, sessions: int, chunks: int, geometry: dict[str, int]) -> dict[str, Any]:
    started = time.perf_counter()
    outcomes = await asyncio.gather(
        *(one_session(url, chunks, s, geometry) for s in range(sessions))
    )
    wall = time.perf_counter() - started
    per = [o for o in outcomes if isinstance(o, list)]
    refused = [o for o in outcomes if isinstance(o, str)]
    lat = np.array([x for session in per for x in session] or [float("nan")])
    chunk_s = geometry["slice_len"] / geometry["fps"]
    frames = len(per) * chunks * geometry["slice_len"]
    return {
        "sessions": sessions,
        "admitted": len(per),
        "refused": sorted(set(refused)),
        "chunks_per_session": chunks,
        "chunk_audio_s": chunk_s,
        "latency_p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
        "latency_p95_ms": round(float(np.percentile(lat, 95)) * 1000, 1),
        "frames_per_s_delivered": round(frames / wall, 2),
        "real_time": bool(per) and bool(np.percentile(lat, 95) <= chunk_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="96", choices=["96", "256", "384"])
    parser.add_argument("--sessions", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--width", type=int, default=416)
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--slice-len", type=int, default=28)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    geometry = {"width": args.width, "height": args.height, "slice_len": args.slice_len,
                "fps": 25}
    results: dict[str, Any] = {"variant": f"wav2lip-{args.variant}", "geometry": geometry,
                               "cpu_count": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_random_checkpoint(Path(tmp) / "w.pth", args.variant)
        overrides = {f"wav2lip_{args.variant}_path": str(ckpt),
                     "avatar_model": f"wav2lip-{args.variant}", "max_sessions": 256}
        with run_server(**overrides) as srv:
            url = srv.ws + f"/v1/audio2video/wav2lip-{args.variant}"
            asyncio.run(run(url, 1, 1, geometry))  # load the model, prepare the avatar
            for n in args.sessions:
                load = os.getloadavg()[0]
                row = asyncio.run(run(url, n, args.chunks, geometry))
                row["loadavg_1m_before"] = round(load, 2)
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
