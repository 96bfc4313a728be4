"""The WebRTC session without a network: push speech in, read both tracks, check sync.

A golden test in the pipecat style: a fake TTS (tone bursts from the first sample, as
the real stream delivers them once the model trimmed its leading silence) goes in; the
audio and video tracks are read as aiortc's senders would read them; what comes out must
sit on one clock.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np

from omnistream.sessions.avatar import ChunkGeometry
from omnistream.sessions.webrtc import (
    AUDIO_FRAME_SAMPLES,
    SpeechChunk,
    WebRTCAvatarSession,
    WebRTCSessionConfig,
)
from omnistream.settings import Settings
from omnistream.transports.app import build_state
from tests.webrtc_helpers import mouth_box

W, H, FPS = 256, 384, 25


class FakeVoice:
    """24 kHz speech stand-in: 300 ms of silence, then 1.2 s of syllable-like bursts."""

    def __init__(self) -> None:
        self.requests: list[str] = []

    async def stream(self, text: str, voice: str | None) -> AsyncGenerator[SpeechChunk, None]:
        self.requests.append(text)
        rate = 24000
        t = np.arange(int(1.2 * rate)) / rate
        burst = 0.5 * np.clip(np.sin(2 * np.pi * 3 * t), 0, None) * np.sin(2 * np.pi * 200 * t)
        for start in range(0, len(burst), 2400):
            await asyncio.sleep(0)
            chunk_text = text if start == 0 else ""
            yield SpeechChunk(burst[start : start + 2400].astype(np.float32), rate, chunk_text)


async def test_audio_and_video_share_one_clock_and_the_lips_follow_the_sound() -> None:
    settings = Settings(avatar_replicas=1)
    state = build_state(settings)
    try:
        geometry = ChunkGeometry.from_config({"width": W, "height": H, "fps": FPS}, settings)
        opened = await state.avatars.open(settings.avatar_model, geometry, None, admit=False)
        config = WebRTCSessionConfig(model=settings.avatar_model, width=W, height=H, fps=FPS)
        session = WebRTCAvatarSession(
            config, opened.runner, opened.reference.prepared, synth=FakeVoice()
        )
        events: list[dict[str, Any]] = []
        session.on_event = events.append
        session.start()
        audio: list[tuple[int, float]] = []
        video: list[tuple[int, np.ndarray]] = []

        async def read_audio() -> None:
            for _ in range(125):  # 2.5 s
                frame = await session.audio_track.recv()
                pcm = frame.to_ndarray().astype(np.float32) / 32768.0
                audio.append((int(frame.pts), float(np.sqrt(np.mean(pcm**2)))))

        async def read_video() -> None:
            for _ in range(FPS * 5 // 2):
                frame = await session.video_track.recv()
                video.append((int(frame.pts), frame.to_ndarray(format="rgb24")))

        readers = asyncio.gather(read_audio(), read_video())
        await asyncio.sleep(0.5)
        session.speak("Hello")
        await readers
        await session.aclose("test over")
    finally:
        await asyncio.to_thread(state.engine.close)

    # One clock: 20 ms audio frames, video on exact 1/25 s steps of the 90 kHz clock,
    # both derived from sample counts (a stalled loop may skip slots, never shift them).
    audio_pts = [p for p, _ in audio]
    video_pts = [p for p, _ in video]
    assert audio_pts[0] == 0 and video_pts[0] == 0
    assert all(p % AUDIO_FRAME_SAMPLES == 0 for p in audio_pts)
    assert all(p % (90000 // FPS) == 0 for p in video_pts)
    assert all(b > a for a, b in itertools.pairwise(audio_pts))
    assert all(b > a for a, b in itertools.pairwise(video_pts))

    started = next(e for e in events if e["type"] == "speech.started")
    assert started["text"] == "Hello"
    loud = [p for p, rms in audio if rms > 0.02]
    assert loud, "no speech reached the audio track"
    audio_onset_s = loud[0] / 48000
    # Sound starts about the lead time (100 ms) after the speech was queued.
    assert audio_onset_s < 0.5 + 0.1 + 0.2

    box = mouth_box(list(opened.reference.info["face_box"]), W, H)
    x, y, w, h = box
    idle = np.stack([f[y : y + h, x : x + w].astype(np.float32) for _, f in video[:10]])
    reference = idle.mean(axis=0)
    noise = float(np.abs(idle - reference).mean(axis=(1, 2, 3)).max())
    moved = [
        p for p, f in video
        if float(np.abs(f[y : y + h, x : x + w].astype(np.float32) - reference).mean())
        > max(3.0, 3 * noise)
    ]
    assert moved, "the mouth never moved"
    mouth_onset_s = moved[0] / 90000
    # Lips and sound start together on the shared clock (within two frames).
    assert abs(mouth_onset_s - audio_onset_s) <= 2 / FPS + 0.02, (mouth_onset_s, audio_onset_s)
    # And the mouth closes again after the speech: the idle loop takes over.
    ended = [e for e in events if e["type"] == "speech.ended"]
    assert ended and ended[0]["reason"] == "finished"
