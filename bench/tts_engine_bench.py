"""Streaming TTS through the engine vs. calling hibari directly, in one run.

Usage::

    python bench/tts_engine_bench.py --streams 16 --rounds 3 --out bench/results/tts_engine.json

What it measures (server in a subprocess, so client and server do not share a GIL):

1. **model direct** (in this process, server idle): ``Hibari().stream(text)`` time to its
   first chunk (its first sentence) and to the end, for every text; and the same call on
   the engine's first segment (first clause), the like-for-like floor for TTFA.
2. **engine, 1 stream**: ``POST /v1/text2audio/stream`` one request at a time; TTFA is
   request sent -> first PCM byte; overhead = engine total time / direct total time.
3. **engine, N concurrent streams**: N requests started together (burst) and N requests
   whose starts are spread over one second (staggered arrivals, all live together);
   TTFA p50/p95, aggregate real-time factor (audio seconds delivered per wall second),
   and underruns of a player that starts at the first byte and plays at real time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from omnistream_server import omnistream_server

RATE = 24000
TEXTS = [
    "Hello, and welcome. Today we look at how streaming speech works, and why the first "
    "sound matters more than the last one. Let us begin.",
    "The quick brown fox jumps over the lazy dog. Then it sits down, looks around, and "
    "wonders what all the fuss was about. Nobody answers.",
    "Latency is the time between asking and hearing. Jitter is how much that time moves "
    "around. Both decide whether a conversation feels natural.",
    "Please remember your umbrella tomorrow; the forecast says rain in the morning and "
    "strong wind in the afternoon. Stay dry out there.",
]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _summ(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(_pct(values, 0.5), 2),
        "p95": round(_pct(values, 0.95), 2),
        "mean": round(statistics.fmean(values), 2) if values else float("nan"),
        "max": round(max(values), 2) if values else float("nan"),
    }


def model_direct(rounds: int) -> dict[str, Any]:
    """hibari on one thread, as a caller without omnistream would use it."""
    from hibari import Hibari

    from omnistream.models.tts.text import segment_text

    tts = Hibari(threads=1)
    tts("Warm up.")
    first_chunk, first_clause, total, audio = [], [], [], 0.0
    cpu_start = time.process_time()
    for _ in range(rounds):
        for text in TEXTS:
            start = time.perf_counter()
            parts = []
            for i, part in enumerate(tts.stream(text)):
                if i == 0:
                    first_chunk.append((time.perf_counter() - start) * 1000)
                parts.append(part)
            total.append((time.perf_counter() - start) * 1000)
            audio += sum(len(p) for p in parts) / RATE
            clause_cpu = time.process_time()
            clause = segment_text(text)[0]
            start = time.perf_counter()
            next(iter(tts.stream(clause)))
            first_clause.append((time.perf_counter() - start) * 1000)
            cpu_start += time.process_time() - clause_cpu  # not part of the stream's cost
    cpu = time.process_time() - cpu_start
    return {
        "cpu_ms_per_audio_s": round(cpu * 1000 / audio, 2),
        "first_chunk_ms": _summ(first_chunk),
        "first_clause_ms": _summ(first_clause),
        "total_ms_sum": round(sum(total), 1),
        "audio_s": round(audio, 2),
        "x_realtime": round(audio / (sum(total) / 1000), 1),
    }


async def one_stream(client: httpx.AsyncClient, text: str, delay: float = 0.0) -> dict[str, float]:
    """One request read as fast as it arrives; player underruns computed from arrivals."""
    if delay:
        await asyncio.sleep(delay)
    sent = time.perf_counter()
    first = None
    received = 0
    underruns = 0
    stall = 0.0
    async with client.stream(
        "POST", "/v1/text2audio/stream", json={"text": text, "sample_rate": RATE}
    ) as response:
        response.raise_for_status()
        async for data in response.aiter_raw():
            now = time.perf_counter()
            if first is None:
                first = now
            # The player needs byte `received` at first + received/(2*RATE) + stalls.
            due = first + received / (2 * RATE) + stall
            if received and now > due + 0.005:
                underruns += 1
                stall += now - due
            received += len(data)
    end = time.perf_counter()
    assert first is not None
    return {
        "ttfa_ms": (first - sent) * 1000,
        "total_ms": (end - sent) * 1000,
        "audio_s": received / 2 / RATE,
        "underruns": underruns,
        "stall_ms": stall * 1000,
    }


def _first_audio_buckets(metrics: str) -> list[tuple[float, float]]:
    """The server's cumulative first-audio histogram: (upper bound s, count)."""
    out = []
    prefix = 'omnistream_tts_first_audio_seconds_bucket{le="'
    for line in metrics.splitlines():
        if line.startswith(prefix) and 'model="hibari"' in line:
            bound = line[len(prefix) :].split('"', 1)[0]
            out.append((float(bound), float(line.rsplit(" ", 1)[1])))
    return out


def _bucket_quantiles(
    before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> dict[str, float]:
    """Upper bucket bounds (ms) holding the p50/p95 of the observations between scrapes."""
    counts = [(bound, a - b) for (bound, b), (_, a) in zip(before, after, strict=True)]
    total = counts[-1][1] if counts else 0
    out: dict[str, float] = {"n": total}
    for name, q in (("p50_le", 0.5), ("p95_le", 0.95)):
        out[name] = next((b * 1000 for b, c in counts if total and c >= q * total), float("nan"))
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def engine_runs(url: str, streams: int, rounds: int, pid: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=streams * 2, max_keepalive_connections=streams * 2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await client.post("/v1/text2audio/warmup", json={"model": "hibari"})
        for text in TEXTS:  # warm the G2P caches
            await one_stream(client, text)
        # Open the pool's connections now: TTFA is measured on kept-alive connections.
        await asyncio.gather(*(client.get("/health") for _ in range(streams)))

        async def scrape() -> list[tuple[float, float]]:
            return _first_audio_buckets((await client.get("/metrics")).text)

        server_side: dict[str, dict[str, float]] = {}
        h0 = await scrape()
        cpu_before = _cpu_s(pid)
        single = [await one_stream(client, t) for _ in range(rounds) for t in TEXTS]
        single_cpu = _cpu_s(pid) - cpu_before
        h1 = await scrape()
        server_side["single"] = _bucket_quantiles(h0, h1)

        async def concurrent(stagger_s: float) -> tuple[list[dict[str, float]], float]:
            results: list[dict[str, float]] = []
            wall = 0.0
            for _ in range(rounds):
                start = time.perf_counter()
                jobs = [
                    one_stream(client, TEXTS[i % len(TEXTS)], stagger_s * i / streams)
                    for i in range(streams)
                ]
                results += await asyncio.gather(*jobs)
                wall += time.perf_counter() - start
            return results, wall

        cpu_before = _cpu_s(pid)
        burst, burst_wall = await concurrent(0.0)
        burst_cpu = _cpu_s(pid) - cpu_before
        h2 = await scrape()
        server_side["burst"] = _bucket_quantiles(h1, h2)
        staggered, stag_wall = await concurrent(1.0)
        server_side["staggered"] = _bucket_quantiles(h2, await scrape())
        metrics = (await client.get("/metrics")).text

    def block(results: list[dict[str, float]], wall: float | None = None) -> dict[str, Any]:
        audio = sum(r["audio_s"] for r in results)
        out = {
            "ttfa_ms": _summ([r["ttfa_ms"] for r in results]),
            "total_ms_sum": round(sum(r["total_ms"] for r in results), 1),
            "audio_s": round(audio, 2),
            "underruns": int(sum(r["underruns"] for r in results)),
            "streams_with_underrun": sum(1 for r in results if r["underruns"]),
            "stall_ms_total": round(sum(r["stall_ms"] for r in results), 1),
        }
        if wall is not None:
            out["wall_s"] = round(wall, 2)
            out["aggregate_x_realtime"] = round(audio / wall, 1)
            out["aggregate_rtf"] = round(wall / audio, 4)
        return out

    server_underruns = [
        line for line in metrics.splitlines() if line.startswith("omnistream_tts_underruns_total")
    ]
    single_block = block(single)
    single_block["server_cpu_ms_per_audio_s"] = round(
        single_cpu * 1000 / single_block["audio_s"], 2
    )
    burst_block = block(burst, burst_wall)
    burst_block["server_cpu_ms_per_audio_s"] = round(burst_cpu * 1000 / burst_block["audio_s"], 2)
    return {
        "single": single_block,
        "burst": burst_block,
        "staggered": block(staggered, stag_wall),
        "server_underrun_counter": server_underruns,
        # Text received -> first chunk ready, inside the server (histogram buckets):
        # separates scheduling and synthesis from HTTP and client time.
        "server_first_audio_ms": server_side,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/tts_engine.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with omnistream_server() as (address, server):
        direct = model_direct(args.rounds)
        url = f"http://{address}"
        engine = asyncio.run(engine_runs(url, args.streams, args.rounds, server.pid))

    single = engine["single"]
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            # Other work on the machine shows up in every figure: record it.
            "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "streams": args.streams,
        "rounds": args.rounds,
        "model_direct": direct,
        "engine": engine,
        "ratios": {
            "single_ttfa_p50_minus_model_first_chunk_p50_ms": round(
                single["ttfa_ms"]["p50"] - direct["first_chunk_ms"]["p50"], 2
            ),
            "single_ttfa_p50_minus_model_first_clause_p50_ms": round(
                single["ttfa_ms"]["p50"] - direct["first_clause_ms"]["p50"], 2
            ),
            "engine_over_direct_total_time": round(
                single["total_ms_sum"] / direct["total_ms_sum"], 3
            ),
            "engine_over_direct_cpu_per_audio_s": round(
                single["server_cpu_ms_per_audio_s"] / direct["cpu_ms_per_audio_s"], 3
            ),
            "burst_engine_over_direct_cpu_per_audio_s": round(
                engine["burst"]["server_cpu_ms_per_audio_s"] / direct["cpu_ms_per_audio_s"], 3
            ),
            "burst_ttfa_p95_over_single_p50": round(
                engine["burst"]["ttfa_ms"]["p95"] / single["ttfa_ms"]["p50"], 2
            ),
            "staggered_ttfa_p95_over_single_p50": round(
                engine["staggered"]["ttfa_ms"]["p95"] / single["ttfa_ms"]["p50"], 2
            ),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
