"""What the key check costs, and whether a huge upload moves the server's memory.

In one run, against two ``omnistream serve`` processes (keys off, keys on with a YAML key
file of ``--keys`` keys, the caller's key last so every digest is compared):

* p50/p95 of ``GET /v1/jobs`` (a route that does almost nothing else) over ``--requests``
  sequential requests on one keep-alive connection, and the ratio keys-on / keys-off;
* p50/p95 of a WebSocket handshake to ``/v1/avatar/realtime`` (connect, close);
* the server's RSS before and after a chunked ``--upload-mb`` upload to a TTS route,
  which the body limit refuses with 413 while it streams in.

Usage: ``python bench/auth_bench.py --out bench/results/auth.json``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import websockets

from bench.omnistream_server import omnistream_server


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def http_latencies(base: str, headers: dict[str, str], n: int) -> list[float]:
    out = []
    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        for _ in range(20):
            client.get("/v1/jobs")
        for _ in range(n):
            t0 = time.perf_counter()
            r = client.get("/v1/jobs")
            out.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, r.text
    return out


async def ws_latencies(url: str, headers: dict[str, str], n: int) -> list[float]:
    out = []
    for i in range(n + 5):
        t0 = time.perf_counter()
        async with websockets.connect(url, additional_headers=headers):
            pass
        if i >= 5:
            out.append((time.perf_counter() - t0) * 1000)
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def big_upload(base: str, headers: dict[str, str], megabytes: int) -> tuple[int, float]:
    def body() -> Iterator[bytes]:
        yield b'{"text": "'
        block = b"a" * (1024 * 1024)
        for _ in range(megabytes):
            yield block

    t0 = time.perf_counter()
    try:
        r = httpx.post(base + "/v1/text2audio/stream", content=body(), timeout=120,
                       headers={**headers, "content-type": "application/json"})
        status = r.status_code
    except httpx.HTTPError:  # the server may close the connection after its 413
        status = 413
    return status, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--upload-mb", type=int, default=1024)
    parser.add_argument("--out", default="bench/results/auth.json")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    key = "bench-key-" + "x" * 24
    entries = [{"name": f"k{i}", "key": f"other-key-{i:06d}-padding"} for i in range(args.keys - 1)]
    entries.append({"name": "bench", "key": key})
    key_file = tmp / "keys.json"  # JSON is YAML
    key_file.write_text(json.dumps({"keys": entries}))

    results: dict[str, object] = {"machine": platform.processor() or platform.machine(),
                                  "keys_in_file": args.keys, "interleaved_blocks": 10}
    configs = {
        "keys_off": ({}, {}),
        "keys_on": ({"OMNISTREAM_API_KEY_FILE": str(key_file)},
                    {"authorization": f"Bearer {key}"}),
    }
    samples: dict[str, dict[str, list[float]]] = {k: {"http": [], "ws": []} for k in configs}
    with contextlib.ExitStack() as stack:
        servers = {
            label: stack.enter_context(
                omnistream_server(OMNISTREAM_ARTIFACTS_DIR=str(tmp / label), **env)
            )
            for label, (env, _) in configs.items()
        }
        # Interleave blocks so both servers see the same machine load (it is shared).
        for _ in range(10):
            for label, (_, headers) in configs.items():
                addr = servers[label][0]
                samples[label]["http"] += http_latencies(
                    f"http://{addr}", headers, args.requests // 10
                )
                samples[label]["ws"] += asyncio.run(ws_latencies(
                    f"ws://{addr}/v1/avatar/realtime", headers, args.handshakes // 10
                ))
        runs: dict[str, dict[str, float]] = {}
        for label, (_, headers) in configs.items():
            addr, proc = servers[label]
            before = rss_kb(proc.pid)
            status, seconds = big_upload(f"http://{addr}", headers, args.upload_mb)
            after = rss_kb(proc.pid)
            http, ws = samples[label]["http"], samples[label]["ws"]
            runs[label] = {
                "http_p50_ms": statistics.median(http), "http_p95_ms": _pct(http, 0.95),
                "ws_handshake_p50_ms": statistics.median(ws),
                "ws_handshake_p95_ms": _pct(ws, 0.95),
                "upload_status": status, "upload_seconds": seconds,
                "rss_before_kb": before, "rss_after_kb": after,
            }
    results["runs"] = runs
    results["ratio_http_p50"] = runs["keys_on"]["http_p50_ms"] / runs["keys_off"]["http_p50_ms"]
    results["ratio_ws_p50"] = (runs["keys_on"]["ws_handshake_p50_ms"]
                               / runs["keys_off"]["ws_handshake_p50_ms"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
