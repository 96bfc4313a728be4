"""A native-protocol client (`WS /v1/avatar/realtime`): prints each chunk's metrics.

Usage:
    python examples/native_client.py --url ws://127.0.0.1:8000/v1/avatar/realtime --chunks 5
"""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np
import websockets

SR = 16000


def speech_like(samples: int, offset: int) -> bytes:
    t = (np.arange(samples) + offset) / SR
    voice = sum(np.sin(k * 2 * np.pi * 140 * t) / k for k in range(1, 8))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (np.clip(0.15 * voice * syllables, -1, 1) * 32767).astype("<i2").tobytes()


async def main(url: str, chunks: int, chunk_ms: int) -> None:
    async with websockets.connect(url, max_size=None) as ws:
        # No image: the server uses its bundled default avatar.
        await ws.send(
            json.dumps(
                {"type": "session.create", "config": {"chunk_samples": SR * chunk_ms // 1000}}
            )
        )
        created = json.loads(await ws.recv())
        if created["type"] != "session.created":
            raise SystemExit(f"refused: {created}")
        print("created", created["session_id"], created["video"])
        samples = created["audio"]["chunk_samples"]
        for i in range(chunks):
            await ws.send(b"AUDI" + speech_like(samples, i * samples))
            while True:  # skip non-error JSON until the VIDX arrives
                message = await ws.recv()
                if isinstance(message, bytes):
                    break
                event = json.loads(message)
                if event["type"] == "error":
                    raise SystemExit(f"error: {event['code']}: {event['message']}")
                if event["type"] == "metrics":
                    print(f"chunk {event['chunk_index']}: {event['metrics']}")
            print(f"  VIDX {len(message)} bytes")
        await ws.send(json.dumps({"type": "session.close"}))
        for _ in range(2):
            print(json.loads(await ws.recv()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/avatar/realtime")
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--chunk-ms", type=int, default=160)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.chunks, args.chunk_ms))
