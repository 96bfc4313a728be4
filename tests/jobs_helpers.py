"""Helpers shared by the offline-generation tests (media made here, no fixtures on disk)."""

from __future__ import annotations

import base64
import io
import json
import wave
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np


def wav_bytes(samples: np.ndarray, sample_rate: int = 16000) -> bytes:
    """A 16-bit mono WAV of float samples."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def tone(seconds: float, sample_rate: int = 16000, freq: float = 220.0) -> bytes:
    """A WAV of a syllable-like modulated tone (moves an avatar's mouth)."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return wav_bytes(
        (0.4 * envelope * np.sin(2 * np.pi * freq * t)).astype(np.float32), sample_rate
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sse_events(
    client: httpx.Client, url: str, **kwargs: Any
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) for each SSE event until the server ends the stream."""
    with client.stream("GET", url, **kwargs) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                yield name, json.loads(line[6:])


def wait_job(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Follow a job's SSE stream to its end and return the final record."""
    for _ in sse_events(client, f"/v1/jobs/{job_id}/events", timeout=timeout):
        pass
    record: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
    return record
