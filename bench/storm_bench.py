"""Healthy avatar sessions during a storm of aborted connections.

A careless or hostile client population opens FlashTalk connections, sends an ``init``
with a reference image nobody has sent before (so the server would decode and prepare
it), then drops the TCP connection without waiting for ``init_ok``. Meanwhile a few
healthy sessions stream 17920-sample chunks at real-time pace. This measures what the
storm costs the healthy sessions: per-chunk latency (last ``AUDI`` byte sent → ``VIDX``
received) before the storm (baseline), during it, and the late chunks the server counted.

Runs ``omnistream serve`` as a separate process (``bench/omnistream_server.py``): run it
from another checkout with ``PYTHONPATH=<checkout>`` to measure that code instead.

Usage: ``python bench/storm_bench.py --label after [--storm 500] [--concurrency 50]``.
Writes ``bench/results/storm_<label>.json`` and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import websockets
from omnistream_server import omnistream_server

SR = 16000
CHUNK = 17920
CHUNK_S = CHUNK / SR
WARMUP_CHUNKS = 3  # the first chunks of a session pay one-off costs: not the baseline
RESULTS = Path(__file__).parent / "results"
ASSET = Path(__file__).parent.parent / "omnistream" / "assets" / "default_avatar.jpg"


def speech(samples: int, offset: int = 0) -> bytes:
    t = (np.arange(samples) + offset) / SR
    phase = 2 * np.pi * 140 * t
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    syll = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (np.clip(0.15 * voice * syll, -1, 1) * 32767).astype("<i2").tobytes()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def unique_images(n: int) -> list[str]:
    """``n`` distinct reference images: the bundled JPEG with a unique trailer after EOI.

    Decoders ignore bytes after the end-of-image marker, but the content hash differs, so
    the server's reference cache misses and it would prepare every one of them.
    """
    base = ASSET.read_bytes()
    return [base64.b64encode(base + f"storm-{i:06d}".encode()).decode() for i in range(n)]


class Phase:
    """The storm's phase as seen by the healthy sessions."""

    def __init__(self) -> None:
        self.name = "baseline"


async def healthy(url: str, seconds: float, phase: Phase, out: list[tuple[str, float]]) -> None:
    """One healthy FlashTalk session at real-time pace; records (phase, latency ms)."""
    ref = base64.b64encode(ASSET.read_bytes()).decode()
    async with websockets.connect(url, max_size=None, open_timeout=60, compression=None) as ws:
        await ws.send(json.dumps({"type": "init", "ref_image": ref}))
        reply = json.loads(await ws.recv())
        assert reply.get("type") == "init_ok", reply
        start = time.perf_counter()
        for i in range(int(seconds / CHUNK_S)):
            due = start + i * CHUNK_S
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            label = phase.name if i >= WARMUP_CHUNKS else "warmup"
            await ws.send(b"AUDI" + speech(CHUNK, i * CHUNK))
            t0 = time.perf_counter()
            msg = await ws.recv()
            if not isinstance(msg, bytes):
                out.append((label, float("inf")))  # an error frame: a failed chunk
                continue
            out.append((label, (time.perf_counter() - t0) * 1000))


async def doomed(url: str, image: str) -> bool:
    """Open, send ``init`` with a new image, drop the connection at once (RST)."""
    try:
        ws = await websockets.connect(url, max_size=None, open_timeout=60, compression=None)
    except (OSError, websockets.WebSocketException, TimeoutError):
        return False
    try:
        await ws.send(json.dumps({"type": "init", "ref_image": image}))
    finally:
        ws.transport.abort()
    return True


async def storm(url: str, images: list[str], concurrency: int) -> tuple[int, float]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for image in images:
        queue.put_nowait(image)
    opened = 0

    async def worker() -> None:
        nonlocal opened
        while not queue.empty():
            image = queue.get_nowait()
            if await doomed(url, image):
                opened += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return opened, time.perf_counter() - t0


def server_figures(address: str) -> dict[str, float]:
    """Counters from ``/metrics``: late chunks, event-loop lag, runner queue wait."""
    text = httpx.get(f"http://{address}/metrics", timeout=10).text

    def total(pattern: str) -> float:
        return sum(float(m.group(1)) for m in re.finditer(pattern + r" (\S+)$", text, re.M))

    return {
        "late_chunks": total(r"^omnistream_late_chunks_total\{[^}]*\}"),
        "loop_lag_s_sum": total(r"^omnistream_event_loop_lag_seconds_sum"),
        "loop_lags_over_250ms": total(r"^omnistream_event_loop_lag_seconds_count")
        - total(r'^omnistream_event_loop_lag_seconds_bucket\{le="0\.25"\}'),
        "queue_wait_s_sum": total(r"^omnistream_queue_wait_seconds_sum\{[^}]*\}"),
    }


async def run(address: str, args: argparse.Namespace) -> dict[str, Any]:
    url = f"ws://{address}/"
    images = unique_images(args.storm)
    phase = Phase()
    samples: list[tuple[str, float]] = []
    total_s = args.baseline + args.max_storm_s + args.after
    sessions = [
        asyncio.create_task(healthy(url, total_s, phase, samples)) for _ in range(args.sessions)
    ]
    await asyncio.sleep(args.baseline)
    before = server_figures(address)
    phase.name = "storm"
    storm_started = time.perf_counter()
    opened, storm_s = await storm(url, images, args.concurrency)
    # The server is still working through what the storm sent after the clients left:
    # the storm window covers that aftermath too.
    await asyncio.sleep(max(0.0, storm_started + args.window - time.perf_counter()))
    phase.name = "after"
    await asyncio.gather(*sessions)
    after = server_figures(address)
    result: dict[str, Any] = {"storm_connections_opened": opened, "storm_s": round(storm_s, 2)}
    for name in ("baseline", "storm", "after"):
        values = [v for p, v in samples if p == name]
        finite = [v for v in values if v != float("inf")]
        result[name] = {
            "chunks": len(values),
            "failed": len(values) - len(finite),
            "p50_ms": round(pct(finite, 50), 1),
            "p95_ms": round(pct(finite, 95), 1),
            "max_ms": round(max(finite), 1) if finite else None,
            "late": sum(1 for v in finite if v > CHUNK_S * 1000),
        }
    result["server_during_storm_and_after"] = {k: round(after[k] - before[k], 3) for k in after}
    return result


def git_rev(path: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip()
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="results go to storm_<label>.json")
    parser.add_argument("--storm", type=int, default=500, help="aborted connections")
    parser.add_argument("--concurrency", type=int, default=50, help="storm connections at once")
    parser.add_argument("--sessions", type=int, default=4, help="healthy sessions")
    parser.add_argument("--baseline", type=float, default=10.0, help="seconds before the storm")
    parser.add_argument(
        "--window", type=float, default=10.0, help="seconds from the storm's start counted as it"
    )
    parser.add_argument("--after", type=float, default=4.0, help="seconds after the storm")
    parser.add_argument(
        "--max-storm-s", type=float, default=15.0, help="healthy sessions cover this long"
    )
    args = parser.parse_args()
    source = os.environ.get("PYTHONPATH", str(Path(__file__).parent.parent))
    load_before = os.getloadavg()
    with omnistream_server() as (address, _):
        result = asyncio.run(run(address, args))
    report = {
        "label": args.label,
        "code": {"path": source, "commit": git_rev(source.split(os.pathsep)[0])},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            # The machine is shared: its load says how far to trust absolute figures.
            "loadavg_1m_before": round(load_before[0], 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
        },
        "settings": vars(args),
        "result": result,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"storm_{args.label}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    b, s = result["baseline"], result["storm"]
    print(
        f"{args.label}: baseline p50 {b['p50_ms']} ms p95 {b['p95_ms']} ms | storm p50 "
        f"{s['p50_ms']} ms p95 {s['p95_ms']} ms max {s['max_ms']} ms late {s['late']} "
        f"failed {s['failed']} | server {result['server_during_storm_and_after']}"
        f" | storm {result['storm_connections_opened']} conns in {result['storm_s']} s -> {path}"
    )


if __name__ == "__main__":
    main()
