"""Real WebRTC clients for the WebRTC tests and benchmarks: aiortc in Python, and
headless Chromium driven through chromedriver's W3C REST API (httpx, no selenium)."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import av
import httpx
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from tests.server import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

CHROME_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--disable-background-networking",
    "--autoplay-policy=no-user-gesture-required",
    "--window-size=800,1000",
]


def loopback_ice() -> contextlib.AbstractContextManager[None]:
    """aioice leaves 127.0.0.1 out of host candidates; tests connect on loopback."""
    import aioice.ice

    @contextlib.contextmanager
    def patch() -> Iterator[None]:
        original = aioice.ice.get_host_addresses
        aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
        try:
            yield
        finally:
            aioice.ice.get_host_addresses = original

    return patch()


# -- aiortc client --------------------------------------------------------------------


class ToneTrack(MediaStreamTrack):
    """A microphone stand-in: syllable-like bursts of a voiced tone, 48 kHz mono."""

    kind = "audio"

    def __init__(self, silent: bool = False) -> None:
        super().__init__()
        self.silent = silent
        self._pos = 0
        self._start: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        n = 960
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._pos / 48000 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (self._pos + np.arange(n)) / 48000
        envelope = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None)  # 3 syllables a second
        voice = np.sin(2 * np.pi * 180 * t) + 0.5 * np.sin(2 * np.pi * 900 * t)
        samples = 0.0 if self.silent else 0.4 * envelope * voice
        pcm = (np.asarray(samples) * 32767 * np.ones(n)).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = self._pos
        frame.time_base = fractions.Fraction(1, 48000)
        self._pos += n
        return frame


@dataclass
class RtcClient:
    """A Python WebRTC viewer: receives the avatar, talks on the control channel."""

    base_url: str
    keep_frames: int = 0  # decoded RGB frames to keep (0: count only)
    events: list[dict[str, Any]] = field(default_factory=list)
    video_frames: int = 0
    video_size: tuple[int, int] | None = None
    audio_frames: list[tuple[float, float]] = field(default_factory=list)  # (time, rms)
    frames: list[tuple[float, np.ndarray]] = field(default_factory=list)
    first_video_at: float | None = None
    first_audio_at: float | None = None

    def __post_init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.channel: Any = None
        self._readers: list[asyncio.Task[None]] = []
        self._event_waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []

    async def offer(
        self,
        *,
        mic: MediaStreamTrack | None = None,
        media: tuple[str, ...] = ("video", "audio"),
        channel: bool = True,
        **fields: Any,
    ) -> httpx.Response:
        pc = self.pc
        if "video" in media:
            pc.addTransceiver("video", direction="recvonly")
        if "audio" in media:
            if mic is not None:
                pc.addTransceiver(mic, direction="sendrecv")
            else:
                pc.addTransceiver("audio", direction="recvonly")
        if channel:
            self.channel = pc.createDataChannel("control")
            self.channel.on("message", self._on_message)

        @pc.on("track")
        def _track(track: MediaStreamTrack) -> None:
            self._readers.append(asyncio.ensure_future(self._read(track)))

        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer", **fields}
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.post(self.base_url + "/v1/webrtc/offer", json=body)
        if response.status_code == 200:
            answer = response.json()
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        return response

    def _on_message(self, message: str) -> None:
        event = json.loads(message)
        event["at"] = time.monotonic()
        self.events.append(event)
        for waiter in list(self._event_waiters):
            kind, future = waiter
            if event["type"] == kind and not future.done():
                future.set_result(event)
                self._event_waiters.remove(waiter)

    async def _read(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            if track.kind == "video":
                self.video_frames += 1
                self.video_size = (frame.width, frame.height)
                if self.first_video_at is None:
                    self.first_video_at = now
                if self.keep_frames:
                    self.frames.append((now, frame.to_ndarray(format="rgb24")))
                    del self.frames[: -self.keep_frames]
            else:
                pcm = frame.to_ndarray().astype(np.float32) / 32768.0
                rms = float(np.sqrt(np.mean(pcm**2)))
                if self.first_audio_at is None:
                    self.first_audio_at = now
                self.audio_frames.append((now, rms))

    def send(self, message: dict[str, Any] | str | bytes) -> None:
        data = message if isinstance(message, str | bytes) else json.dumps(message)
        self.channel.send(data)

    async def wait_open(self, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while self.channel is None or self.channel.readyState != "open":
            if time.monotonic() > deadline:
                raise TimeoutError("control channel did not open")
            await asyncio.sleep(0.02)

    async def wait_event(
        self, kind: str, within: float = 10.0, after: float = 0.0
    ) -> dict[str, Any]:
        for event in self.events:
            if event["type"] == kind and event["at"] >= after:
                return event
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._event_waiters.append((kind, future))
        return await asyncio.wait_for(future, within)

    async def wait_video(self, frames: int, within: float = 15.0) -> None:
        deadline = time.monotonic() + within
        while self.video_frames < frames:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.video_frames} video frames arrived")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.pc.close()
        for task in self._readers:
            task.cancel()
        for task in self._readers:
            with contextlib.suppress(BaseException):
                await task


def region_change(frames: list[np.ndarray], box: tuple[int, int, int, int]) -> float:
    """Mean over pixels of the largest change of a region across frames (0–255)."""
    x, y, w, h = box
    stack = np.stack([f[y : y + h, x : x + w].astype(np.int16).mean(axis=2) for f in frames])
    return float((stack.max(axis=0) - stack.min(axis=0)).mean())


def mouth_box(face: list[int], width: int, height: int) -> tuple[int, int, int, int]:
    """The lower-middle part of a face box, clamped to the frame."""
    fx, fy, fw, fh = face
    x, y = int(fx + fw * 0.25), int(fy + fh * 0.68)
    w, h = int(fw * 0.5), int(fh * 0.4)
    return x, y, min(w, width - x), min(h, height - y)


def still_box(face: list[int], width: int, height: int) -> tuple[int, int, int, int]:
    """A background region away from the head (the model only animates the head)."""
    fx, fy, fw, _ = face
    w = max(8, min(int(fw * 0.3), fx - int(fw * 0.4)))
    if w > 8:
        return 0, 0, w, max(8, int(fy * 0.8))
    return 0, height - 40, 40, 40


# -- Chromium through chromedriver ------------------------------------------------------


class Chrome:
    """Headless Chromium driven over chromedriver's W3C REST API."""

    def __init__(self, extra_args: list[str] | None = None) -> None:
        if not (CHROMIUM and CHROMEDRIVER):
            raise RuntimeError("chromium and chromedriver are not installed")
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="omni-chrome-")
        self.proc = subprocess.Popen(
            [CHROMEDRIVER, f"--port={self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.http.get("/status").json()["value"]["ready"]:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        args = [*CHROME_ARGS, f"--user-data-dir={self.profile}", *(extra_args or [])]
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
                }
            }
        }
        response = self.http.post("/session", json=caps).json()
        if "sessionId" not in response.get("value", {}):
            raise RuntimeError(f"chromedriver refused the session: {response}")
        self.session = response["value"]["sessionId"]

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        response = self.http.request(method, f"/session/{self.session}{path}", json=body)
        value = response.json().get("value")
        if response.status_code >= 400:
            raise RuntimeError(f"chromedriver {path}: {value}")
        return value

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """Run synchronous JS (``return ...``)."""
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def run_async(self, body: str, *args: Any) -> Any:
        """Run JS that awaits: ``body`` is an async function body, its return is the value."""
        script = (
            "const done = arguments[arguments.length - 1];"
            f"(async () => {{ {body} }})().then(done, (e) => done({{__error: String(e)}}));"
        )
        value = self._call("POST", "/execute/async", {"script": script, "args": list(args)})
        if isinstance(value, dict) and "__error" in value:
            raise RuntimeError(value["__error"])
        return value

    def new_tab(self) -> str:
        handle = self._call("POST", "/window/new", {"type": "tab"})["handle"]
        self._call("POST", "/window", {"handle": handle})
        return str(handle)

    def close_tab(self) -> None:
        """Close the current tab and switch to one that is left."""
        left = self._call("DELETE", "/window")
        if left:
            self._call("POST", "/window", {"handle": left[0]})

    def wait_for(self, script: str, timeout: float = 15.0, *args: Any) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.run(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for: {script}")
            time.sleep(0.1)

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.http.delete(f"/session/{self.session}", timeout=10)
        with contextlib.suppress(Exception):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        with contextlib.suppress(Exception):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.http.close()
        shutil.rmtree(self.profile, ignore_errors=True)
