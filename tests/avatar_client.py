"""Small FlashTalk / native client helpers shared by the avatar tests."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import websockets

from omnistream.sessions.avatar import default_avatar_bytes

SR = 16000


def speech_like(samples: int, seed: int = 0, level: float = 0.3) -> bytes:
    """Voiced, syllable-modulated test audio as s16le bytes."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / SR
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None)
    x = level * voice * syllables / 2
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def silence(samples: int) -> bytes:
    return bytes(samples * 2)


def ref_image_b64(data: bytes | None = None) -> str:
    return base64.b64encode(data if data is not None else default_avatar_bytes()).decode()


async def connect(url: str) -> Any:
    return await websockets.connect(url, max_size=None, open_timeout=10)


async def recv_json(ws: Any, timeout: float = 30) -> dict[str, Any]:
    import asyncio

    msg = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(msg, str), f"expected a text frame, got {len(msg)} bytes"
    value: dict[str, Any] = json.loads(msg)
    return value


async def flashtalk_init(ws: Any, **extra: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "init", "ref_image": ref_image_b64(), **extra}))
    return await recv_json(ws)
