"""Avatar engine benchmark: overhead per chunk, TTFF, and sessions sustained.

Runs ``omnistream serve`` as a separate process on a free port, then measures in one run:

1. **direct**: render one 28-frame chunk with ``omni-avatar-lite`` and JPEG-encode it on
   the same kind of thread pool, in this process, no server (the floor);
2. **served**: the same chunk through the server, one session, chunks back to back,
   in rounds alternating with (1): the server's own time per chunk (from the native
   route's ``metrics``) and the client's end to end (last AUDI byte sent → VIDX received);
3. **TTFF** with 160 ms chunks (2560 samples): ``init`` sent → first VIDX received, for a
   new image (cold) and the same image again (warm reference cache);
4. **capacity**: N sessions sending 17920-sample chunks at real-time pace; p95 chunk
   latency, late chunks (a VIDX arriving after the next chunk is due), for growing N.

Usage: ``python bench/avatar_engine.py [--sessions 8,12,16,20] [--seconds 20]``.
Writes ``bench/results/avatar_engine.json`` and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import websockets
from omnistream_server import omnistream_server
from PIL import Image

from omnistream.codecs.image import decode_image
from omnistream.codecs.jpeg import encode_jpeg
from omnistream.codecs.pcm import s16le_to_float32
from omnistream.models.avatar_base import ChunkRequest, PrepareRequest
from omnistream.models.avatar_lite import AvatarLite
from omnistream.sessions.avatar import default_avatar_bytes

SR = 16000
CHUNK = 17920
RESULTS = Path(__file__).parent / "results"


def speech(samples: int, offset: int = 0) -> bytes:
    t = (np.arange(samples) + offset) / SR
    phase = 2 * np.pi * 140 * t
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    syll = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (np.clip(0.15 * voice * syll, -1, 1) * 32767).astype("<i2").tobytes()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, q))


def direct(chunks: int) -> list[float]:
    """Render + encode in-process, the same work the server does for one chunk."""
    model = AvatarLite()
    image = decode_image(default_avatar_bytes(), 10**8, 10**8)
    avatar = model.prepare(PrepareRequest(image, 416, 704, "bench"))
    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    state = None
    times = []
    for i in range(chunks):
        audio = s16le_to_float32(speech(CHUNK, i * CHUNK))
        t0 = time.perf_counter()
        req = ChunkRequest(avatar, audio, 0, i * CHUNK, i * 28, 28, 25, state=state)
        result = model.render([req])[0]
        assert not isinstance(result, BaseException)
        state = result.state
        list(pool.map(lambda f: encode_jpeg(f, 80), result.frames))
        times.append((time.perf_counter() - t0) * 1000)
    pool.shutdown()
    return times


async def served(url: str, chunks: int) -> tuple[list[float], list[float]]:
    """Per-chunk times through the native route: client end to end, and server-side.

    The native route runs the same session pipeline as the FlashTalk route and reports
    the server's own time per chunk (AUDI received → VIDX encoded) in its metrics event,
    which separates the engine from the wire.
    """
    native = url.rstrip("/") + "/v1/avatar/realtime"
    async with websockets.connect(native, max_size=None, compression=None) as ws:
        create = {"type": "session.create", "config": {"chunk_samples": CHUNK}}
        await ws.send(json.dumps(create))
        await ws.recv()
        e2e, server = [], []
        for i in range(chunks):
            await ws.send(b"AUDI" + speech(CHUNK, i * CHUNK))
            t0 = time.perf_counter()
            metrics = json.loads(await ws.recv())["metrics"]
            reply = await ws.recv()
            e2e.append((time.perf_counter() - t0) * 1000)
            server.append(float(metrics["total_ms"]))
            assert isinstance(reply, bytes)
        return e2e, server


async def ttff(url: str, image: bytes) -> float:
    ref = base64.b64encode(image).decode()
    async with websockets.connect(url, max_size=None) as ws:
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "init", "ref_image": ref, "chunk_samples": 2560}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "init_ok", reply
        await ws.send(b"AUDI" + speech(2560))
        await ws.recv()
        return (time.perf_counter() - t0) * 1000


async def realtime_session(url: str, seconds: float, start: float, out: dict[str, Any]) -> None:
    ref = base64.b64encode(default_avatar_bytes()).decode()
    chunk_s = CHUNK / SR
    lat: list[float] = []
    late = 0
    errors = 0
    async with websockets.connect(url, max_size=None, open_timeout=30) as ws:
        await ws.send(json.dumps({"type": "init", "ref_image": ref}))
        reply = json.loads(await ws.recv())
        if reply.get("type") != "init_ok":
            out.setdefault("refused", 0)
            out["refused"] += 1
            return
        n = int(seconds / chunk_s)
        t_base = time.perf_counter() + (start % chunk_s)
        for i in range(n):
            due = t_base + i * chunk_s
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            await ws.send(b"AUDI" + speech(CHUNK, i * CHUNK))
            sent = time.perf_counter()
            reply = await ws.recv()
            got = time.perf_counter()
            if isinstance(reply, str):
                errors += 1
                continue
            lat.append((got - sent) * 1000)
            if got > due + chunk_s:
                late += 1
    out.setdefault("latencies", []).extend(lat)
    out["late"] = out.get("late", 0) + late
    out["errors"] = out.get("errors", 0) + errors


async def capacity(url: str, sessions: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    await asyncio.gather(*(realtime_session(url, seconds, i * 0.07, out) for i in range(sessions)))
    lat = out.get("latencies", [])
    return {
        "sessions": sessions,
        "chunks": len(lat),
        "p50_ms": round(pct(lat, 50), 1),
        "p95_ms": round(pct(lat, 95), 1),
        "max_ms": round(max(lat), 1) if lat else None,
        "late": out.get("late", 0),
        "errors": out.get("errors", 0),
        "refused": out.get("refused", 0),
        "held": bool(lat) and pct(lat, 95) < 300 and out.get("late", 0) == 0,
    }


def other_image() -> bytes:
    img = Image.open(io.BytesIO(default_avatar_bytes())).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with omnistream_server(OMNISTREAM_MAX_SESSIONS="64") as (address, _):
        return await measure(args, f"ws://{address}/")


async def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    await served(url, 3)  # warm the server (model load, caches)
    direct(3)
    # Alternate short rounds so machine noise hits both sides alike.
    d: list[float] = []
    s: list[float] = []
    srv: list[float] = []
    for _ in range(args.rounds):
        d += direct(args.chunks)
        e2e, own = await served(url, args.chunks)
        s += e2e
        srv += own
    cold = await ttff(url, other_image())
    warm = [await ttff(url, other_image()) for _ in range(5)]
    ramp = []
    for n in [int(x) for x in args.sessions.split(",")]:
        result = await capacity(url, n, args.seconds)
        print(json.dumps(result), flush=True)
        ramp.append(result)
    direct_p50, served_p50 = statistics.median(d), statistics.median(s)
    server_p50 = statistics.median(srv)
    return {
        "schema_version": "1.0",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "chunk": {"samples": CHUNK, "frames": 28, "width": 416, "height": 704, "fps": 25},
        "direct_ms": {"p50": round(direct_p50, 1), "p95": round(pct(d, 95), 1)},
        "served_end_to_end_ms": {"p50": round(served_p50, 1), "p95": round(pct(s, 95), 1)},
        "served_server_side_ms": {"p50": round(server_p50, 1), "p95": round(pct(srv, 95), 1)},
        "engine_ratio_p50": round(server_p50 / direct_p50, 3),
        "end_to_end_ratio_p50": round(served_p50 / direct_p50, 3),
        "ttff_160ms_chunks_ms": {
            "cold_new_image": round(cold, 1),
            "warm_p50": round(statistics.median(warm), 1),
        },
        "capacity": ramp,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=10, help="chunks per round and side")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--sessions", default="8,12,16,20,24")
    parser.add_argument("--seconds", type=float, default=20.0)
    report = asyncio.run(main(parser.parse_args()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "avatar_engine.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
