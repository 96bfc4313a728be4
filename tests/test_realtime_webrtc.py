"""The demo's talk mode over real WebRTC (aiortc client): mic in, avatar answers, barge-in.

The client's microphone track plays questions spoken by the server's own TTS; the LLM is
the fake chat upstream on loopback, reached through the gateway's providers file.
"""

from __future__ import annotations

import asyncio
import fractions
import os
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import soxr
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from tests.fake_llm import ANSWER, FakeLLM, run_fake_llm
from tests.server import RunningServer, run_server
from tests.webrtc_helpers import CHROMEDRIVER, CHROMIUM, Chrome, RtcClient, loopback_ice

MIC_RATE = 48000
FRAME = 960  # 20 ms


class SpeechTrack(MediaStreamTrack):
    """A microphone that plays queued speech at real time and silence in between."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: list[np.ndarray] = []
        self._pos = 0
        self._start: float | None = None

    def say(self, pcm24k: bytes) -> None:
        samples = np.frombuffer(pcm24k, dtype="<i2").astype(np.float32) / 32768.0
        self._queue.append(soxr.resample(samples, 24000, MIC_RATE).astype(np.float32))

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._pos / MIC_RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        out = np.zeros(FRAME, np.float32)
        filled = 0
        while self._queue and filled < FRAME:
            head = self._queue[0]
            take = head[: FRAME - filled]
            out[filled : filled + take.size] = take
            filled += take.size
            if take.size < head.size:
                self._queue[0] = head[take.size :]
            else:
                self._queue.pop(0)
        pcm = (np.clip(out, -1, 1) * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = MIC_RATE
        frame.pts = self._pos
        frame.time_base = fractions.Fraction(1, MIC_RATE)
        self._pos += FRAME
        return frame


@pytest.fixture(scope="module")
def talk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    os.environ.setdefault("FAKE_LLM_KEY", "sk-fake")
    with run_fake_llm() as fake:
        providers = fake.providers_file(tmp_path_factory.mktemp("providers"))
        with loopback_ice(), run_server(providers_file=str(providers),
                                        webrtc_peer_timeout_s=5.0) as srv:
            srv.fake = fake  # type: ignore[attr-defined]
            yield srv


def _speech(srv: RunningServer, text: str) -> bytes:
    r = httpx.post(srv.http + "/v1/audio/speech", timeout=120, json={
        "model": "tts-1", "input": text, "voice": "alloy", "response_format": "pcm"})
    assert r.status_code == 200
    return r.content


def _loud(client: RtcClient, since: float) -> float:
    """Seconds of received avatar audio louder than a whisper since ``since``."""
    return sum(0.02 for at, rms in client.audio_frames if at >= since and rms > 0.01)


async def test_talk_mode_answers_and_stops_when_spoken_over(talk_server: RunningServer) -> None:
    question = await asyncio.to_thread(_speech, talk_server, "What is the capital of France?")
    story = await asyncio.to_thread(_speech, talk_server, "Please tell me a long story.")
    stop = await asyncio.to_thread(_speech, talk_server, "Stop, please.")
    fake: FakeLLM = talk_server.fake  # type: ignore[attr-defined]
    mic = SpeechTrack()
    client = RtcClient(talk_server.http)
    try:
        response = await client.offer(mic=mic, width=256, height=384, fps=25,
                                      talk={"model": "fake/chat", "silence_duration_ms": 300})
        assert response.status_code == 200, response.text
        assert response.json()["talk"]["model"] == "fake/chat"
        await client.wait_open()
        await client.wait_video(5)

        start = time.monotonic()
        mic.say(question)
        user = await client.wait_event("transcript", within=30)
        assert user["role"] == "user" and "capital" in user["text"].lower()
        await client.wait_event("talk.state", within=10, after=start)
        answer = await _wait(client, lambda e: e["type"] == "transcript"
                             and e["role"] == "assistant", within=30)
        assert answer["text"] == ANSWER
        await _wait(client, lambda e: e["type"] == "speech.ended", within=30)
        assert _loud(client, start) > 0.8  # the avatar said it out loud
        states = [e["state"] for e in client.events if e["type"] == "talk.state"]
        assert "thinking" in states and "speaking" in states
        metrics = await _wait(client, lambda e: e["type"] == "metrics"
                              and "talk_voice_to_voice_ms" in e["metrics"], within=5)
        assert metrics["metrics"]["talk_voice_to_voice_ms"] > 0
        assert "capital" in fake.requests[-1]["messages"][-1]["content"].lower()

        # Barge-in: ask for a story, speak over it once the avatar is speaking.
        mark = time.monotonic()
        mic.say(story)
        await _wait(client, lambda e: e["type"] == "talk.state" and e["state"] == "speaking"
                    and e["at"] > mark, within=30)
        await asyncio.sleep(1.0)
        cut_at = time.monotonic()
        mic.say(stop)
        ended = await _wait(client, lambda e: e["type"] == "speech.ended"
                            and e["at"] > cut_at, within=10)
        assert ended["reason"] == "interrupted"
        truncated = await _wait(client, lambda e: e["type"] == "transcript.truncated",
                                within=5)
        assert truncated["audio_end_ms"] > 0
        # The avatar's voice stops: little sound after the interruption (jitter buffer).
        quiet_from = ended["at"] + 0.3
        await asyncio.sleep(1.0)
        assert _loud(client, quiet_from) < 0.5
    finally:
        await client.close()


async def _wait(client: RtcClient, match: object, within: float) -> dict[str, object]:
    deadline = time.monotonic() + within
    seen = 0
    while time.monotonic() < deadline:
        for event in client.events[seen:]:
            if match(event):  # type: ignore[operator]
                return event
        seen = len(client.events)
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no matching event in {within} s; last: {client.events[-5:]}")


# -- the demo page in headless Chromium ---------------------------------------------------


def _question_wav(srv: RunningServer, path: Path) -> None:
    """What Chromium's fake microphone loops: a pause, the question, a longer pause."""
    pcm = np.frombuffer(_speech(srv, "What is the capital of France?"), dtype="<i2")
    samples = soxr.resample(pcm.astype(np.float32) / 32768.0, 24000, MIC_RATE)
    body = np.concatenate([np.zeros(MIC_RATE), samples, np.zeros(MIC_RATE * 5)])
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(MIC_RATE)
        out.writeframes((np.clip(body, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="chromium and chromedriver are not installed")
def test_demo_talk_mode_in_chromium(talk_server: RunningServer, tmp_path: Path) -> None:
    wav = tmp_path / "question.wav"
    _question_wav(talk_server, wav)
    chrome = Chrome([f"--use-file-for-fake-audio-capture={wav}"])
    try:
        chrome.get(f"{talk_server.http}/demo?width=256&height=384&fps=25"
                   "&talk=1&talk_model=fake/chat")
        chrome.wait_for("return window.omni && window.omni.ready === true")
        assert chrome.run("return document.getElementById('talk').checked") is True
        answer = chrome.run_async("return await window.omni.connect({talk: "
                                  "{model: 'fake/chat', silence_duration_ms: 300}});")
        assert answer["talk"]["model"] == "fake/chat", answer
        chrome.wait_for("return window.omni.state === 'connected'", 20)
        user = chrome.wait_for(
            "return window.omni.events.find(e => e.type === 'transcript' && e.role === 'user')",
            40)
        assert "capital" in user["text"].lower()
        said = chrome.wait_for(
            "return window.omni.events.find(e => e.type === 'transcript'"
            " && e.role === 'assistant')", 30)
        assert said["text"] == ANSWER
        chrome.wait_for("return window.omni.events.some(e => e.type === 'talk.state'"
                        " && e.state === 'speaking')", 10)
        shown = chrome.run("return document.getElementById('transcript').textContent")
        assert "Avatar:" in shown and "Paris" in shown
        badge = chrome.run("return document.getElementById('talkState').hidden")
        assert badge is False
        time.sleep(1.5)
        heard = chrome.run_async("return await window.omni.stats();")["audio"]
        assert heard["totalAudioEnergy"] > 0
        chrome.run_async("await window.omni.disconnect(); return true;")
    finally:
        chrome.quit()
