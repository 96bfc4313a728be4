"""A minimal FlashTalk-protocol client: sends speech-like audio, saves the JPEG frames.

Usage:
    python examples/flashtalk_client.py --url ws://127.0.0.1:8000/ --seconds 5 --out frames/
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import pathlib
import struct
import time

import numpy as np
import websockets

SR = 16000


def speech_like(samples: int, offset: int) -> bytes:
    t = (np.arange(samples) + offset) / SR
    phase = 2 * np.pi * 140 * t
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (np.clip(0.15 * voice * syllables, -1, 1) * 32767).astype("<i2").tobytes()


def split_vidx(message: bytes) -> list[bytes]:
    assert message[:4] == b"VIDX", "not a VIDX message"
    (count,) = struct.unpack_from("<I", message, 4)
    offset, frames = 8, []
    for _ in range(count):
        (length,) = struct.unpack_from("<I", message, offset)
        frames.append(message[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return frames


async def main(args: argparse.Namespace, out: pathlib.Path, image: bytes) -> None:
    init = {"type": "init", "ref_image": base64.b64encode(image).decode()}
    async with websockets.connect(args.url, max_size=None) as ws:
        started = time.perf_counter()
        await ws.send(json.dumps(init))
        reply = json.loads(await ws.recv())
        if reply.get("type") != "init_ok":
            raise SystemExit(f"init failed: {reply}")
        chunk = int(reply["chunk_samples"])
        print(f"init_ok in {(time.perf_counter() - started) * 1000:.0f} ms: {reply}")
        sent = 0
        index = 0
        while sent < args.seconds * SR:
            t0 = time.perf_counter()
            await ws.send(b"AUDI" + speech_like(chunk, sent))
            message = await ws.recv()
            if isinstance(message, str):
                raise SystemExit(f"server error: {message}")
            frames = split_vidx(message)
            for jpeg in frames:
                (out / f"frame_{index:05d}.jpg").write_bytes(jpeg)
                index += 1
            print(f"chunk: {len(frames)} frames in {(time.perf_counter() - t0) * 1000:.0f} ms")
            sent += chunk
        await ws.send(json.dumps({"type": "close"}))
        print(json.loads(await ws.recv()))
    print(f"wrote {index} frames to {out}/")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="ws://127.0.0.1:8000/")
    parser.add_argument("--ref-image", help="reference face (default: the bundled avatar)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", default="frames")
    args = parser.parse_args()
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.ref_image:
        ref = pathlib.Path(args.ref_image).read_bytes()
    else:
        from omnistream.sessions.avatar import default_avatar_bytes

        ref = default_avatar_bytes()
    asyncio.run(main(args, out_dir, ref))
