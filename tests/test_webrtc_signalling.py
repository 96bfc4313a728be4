"""WebRTC avatar through a real aiortc client: signalling, media, data channel, cleanup.

The browser tests (test_webrtc_browser.py) check the same things in Chromium; these run
without a browser, so they are fast and run everywhere.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server import RunningServer, run_server
from tests.webrtc_helpers import RtcClient, ToneTrack, loopback_ice, mouth_box, region_change

SIZE = {"width": 256, "height": 384, "fps": 25}
ROOT = str(Path(__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def rtc_server() -> Iterator[RunningServer]:
    with (
        loopback_ice(),
        run_server(
            webrtc_connect_timeout_s=2.0,
            webrtc_peer_timeout_s=2.5,
            webrtc_messages_per_s=10.0,
            max_text_chars=200,
        ) as srv,
    ):
        yield srv


async def metrics_text(srv: RunningServer) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(srv.http + "/metrics")).text


def live_webrtc(srv: RunningServer) -> int:
    return len(srv.state.sessions.live("webrtc"))


async def wait_until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_offer_streams_video_and_audio_at_the_configured_size(
    rtc_server: RunningServer,
) -> None:
    client = RtcClient(rtc_server.http)
    response = await client.offer(**SIZE)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["type"] == "answer" and answer["session_id"].startswith("rtc_")
    assert answer["video"] == {"fps": 25, "width": 256, "height": 384}
    try:
        await client.wait_video(25)
        started = time.monotonic()
        count = client.video_frames
        await asyncio.sleep(3.0)
        rate = (client.video_frames - count) / (time.monotonic() - started)
        assert client.video_size == (256, 384)
        assert 0.7 * 25 <= rate <= 30, rate  # shared 2-core CI machines run slow
        assert len(client.audio_frames) > 50  # 20 ms Opus frames
        metrics = [e for e in client.events if e["type"] == "metrics"]
        assert metrics and metrics[-1]["metrics"]["delivered_fps"] > 15
        assert live_webrtc(rtc_server) == 1
        text = await metrics_text(rtc_server)
        assert "omnistream_webrtc_sessions 1.0" in text
        assert "omnistream_webrtc_encode_seconds_count" in text
    finally:
        await client.close()
    await wait_until(lambda: live_webrtc(rtc_server) == 0, 5)
    rt = rtc_server.state.extras["webrtc"]
    assert not rt.sessions and not rt.peers  # nothing left holding tracks or tasks


async def test_speak_moves_the_mouth_and_interrupt_stops_the_audio(
    rtc_server: RunningServer,
) -> None:
    client = RtcClient(rtc_server.http, keep_frames=200)
    response = await client.offer(**SIZE)
    assert response.status_code == 200, response.text
    face = response.json()["avatar"]["face_box"]
    try:
        await client.wait_open()
        await client.wait_video(30)
        idle = [f for _, f in client.frames[-25:]]
        box = mouth_box(face, 256, 384)
        sent = time.monotonic()
        client.send(
            {"type": "speak", "text": "Hello there! I am talking now, and I will keep "
             "talking for quite a while so that you can interrupt me in the middle."}
        )
        queued = await client.wait_event("speech.queued")
        started = await client.wait_event("speech.started", within=20)
        assert started["id"] == queued["id"]
        subtitle = await client.wait_event("subtitle")
        assert subtitle["text"] and subtitle["start_ms"] == 0.0
        await asyncio.sleep(1.5)
        speaking = [f for t, f in client.frames if t > started["at"] + 0.2]
        assert region_change(speaking, box) > 2 * region_change(idle, box) + 3
        loud = [rms for t, rms in client.audio_frames if t > started["at"] + 0.2]
        assert max(loud) > 0.02
        client.send({"type": "interrupt"})
        stopped = await client.wait_event("interrupted")
        ended = await client.wait_event("speech.ended")
        assert ended["reason"] == "interrupted" and stopped["id"] == queued["id"]
        assert 1000 < stopped["played_ms"] < 8000
        assert 0 < stopped["played_chars"] < len(queued["text"])
        await asyncio.sleep(0.6)
        after = [rms for t, rms in client.audio_frames if t > stopped["at"] + 0.15]
        assert after and max(after) < 0.01  # the sound stopped within 150 ms
        assert started["at"] - sent < 5
    finally:
        await client.close()


async def test_speech_ends_with_played_amount_and_aligned_subtitles(
    rtc_server: RunningServer,
) -> None:
    client = RtcClient(rtc_server.http)
    assert (await client.offer(**SIZE)).status_code == 200
    try:
        await client.wait_open()
        client.send({"type": "speak", "text": "One short line. And a second one."})
        started = await client.wait_event("speech.started", within=20)
        ended = await client.wait_event("speech.ended", within=20)
        assert ended["reason"] == "finished"
        assert ended["played_chars"] == len("One short line. And a second one.")
        elapsed_ms = (ended["at"] - started["at"]) * 1000
        assert abs(elapsed_ms - ended["played_ms"]) < 300  # events follow played audio
        subtitles = [e for e in client.events if e["type"] == "subtitle"]
        assert len(subtitles) >= 2
        for sub in subtitles:
            shown_ms = (sub["at"] - started["at"]) * 1000
            assert abs(shown_ms - sub["start_ms"]) < 300
    finally:
        await client.close()


async def test_mic_audio_moves_the_lips(rtc_server: RunningServer) -> None:
    client = RtcClient(rtc_server.http, keep_frames=60)
    response = await client.offer(mic=ToneTrack(), **SIZE)
    assert response.status_code == 200, response.text
    face = response.json()["avatar"]["face_box"]
    box = mouth_box(face, 256, 384)
    try:
        await client.wait_open()
        await client.wait_video(40)
        idle = [f for _, f in client.frames[-40:]]
        client.send({"type": "mic", "enabled": True})
        ack = await client.wait_event("mic")
        assert ack["attached"] is True
        await asyncio.sleep(2.0)
        live = [f for _, f in client.frames[-40:]]
        assert region_change(live, box) > 2 * region_change(idle, box) + 3
    finally:
        await client.close()


async def test_h264_is_negotiated_when_asked(rtc_server: RunningServer) -> None:
    client = RtcClient(rtc_server.http)
    response = await client.offer(codec="h264", **SIZE)
    assert response.status_code == 200, response.text
    assert response.json()["codec"] == "h264"
    try:
        await client.wait_video(10)
        assert client.video_size == (256, 384)
    finally:
        await client.close()


async def test_bad_data_channel_messages_get_errors_and_the_session_survives(
    rtc_server: RunningServer,
) -> None:
    client = RtcClient(rtc_server.http)
    bystander = RtcClient(rtc_server.http)
    assert (await client.offer(**SIZE)).status_code == 200
    assert (await bystander.offer(**SIZE)).status_code == 200
    try:
        await client.wait_open()
        await bystander.wait_video(10)
        watched_from, frames_before = time.monotonic(), bystander.video_frames
        cases = [
            ({"type": "speak", "text": "   "}, "empty_text"),
            ({"type": "speak"}, "empty_text"),
            ({"type": "speak", "text": "x" * 201}, "text_too_long"),
            ("not json", "bad_json"),
            ({"type": "dance"}, "unsupported_message"),
            ({"type": "speak", "text": "hi", "voice": "nobody"}, "invalid_voice"),
            (b"\x00\x01", "unsupported_message"),
        ]
        for message, code in cases:
            since = time.monotonic()
            client.send(message)
            error = await client.wait_event("error", after=since)
            assert error["code"] == code, (message, error)
            await asyncio.sleep(0.15)  # stay under the rate limit
        # A flood: rate limited, never disconnected, and usable right after.
        since = time.monotonic()
        for _ in range(300):
            client.send({"type": "ping"})
        limited = await client.wait_event("error", after=since)
        assert limited["code"] == "rate_limited"
        await asyncio.sleep(1.5)
        frames = client.video_frames
        since = time.monotonic()
        client.send({"type": "ping"})
        await client.wait_event("pong", after=since)
        await asyncio.sleep(0.5)
        assert client.video_frames > frames
        pongs = [e for e in client.events if e["type"] == "pong"]
        assert len(pongs) < 100
        # The other viewer never noticed: its video kept its rate and it got no errors.
        rate = (bystander.video_frames - frames_before) / (time.monotonic() - watched_from)
        assert rate > 20, rate
        assert not [e for e in bystander.events if e["type"] == "error"]
    finally:
        await bystander.close()
        await client.close()


async def test_bad_offers_are_refused_with_stable_codes(rtc_server: RunningServer) -> None:
    url = rtc_server.http + "/v1/webrtc/offer"
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(url, json={"sdp": "hello", "type": "offer"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_sdp"
        r = await http.post(url, json={"sdp": "v=0\r\nthis is not sdp\r\n", "type": "offer"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_sdp"
        r = await http.post(url, content=b"{nope")
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json"
        r = await http.post(url, json={"type": "offer"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_config"
    for media, channel in ((("video",), True), (("video", "audio"), False)):
        client = RtcClient(rtc_server.http)
        try:
            r = await client.offer(media=media, channel=channel)
            assert r.status_code == 400 and r.json()["error"]["code"] == "missing_media"
        finally:
            await client.close()
    client = RtcClient(rtc_server.http)
    try:
        r = await client.offer(codec="theora")
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_config"
    finally:
        await client.close()
    client = RtcClient(rtc_server.http)
    try:
        r = await client.offer(image_b64="!!!not-base64!!!")
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_image_base64"
    finally:
        await client.close()
    client = RtcClient(rtc_server.http)
    try:
        r = await client.offer(image_b64=base64.b64encode(b"not an image").decode())
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_image"
    finally:
        await client.close()
    client = RtcClient(rtc_server.http)
    try:
        r = await client.offer(voice="nobody")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_voice"
    finally:
        await client.close()
    assert live_webrtc(rtc_server) == 0


async def test_an_offer_never_answered_is_freed_after_the_connect_timeout(
    rtc_server: RunningServer,
) -> None:
    client = RtcClient(rtc_server.http)
    pc = client.pc
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    pc.createDataChannel("control")
    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(
            rtc_server.http + "/v1/webrtc/offer", json={"sdp": pc.localDescription.sdp, **SIZE}
        )
    assert r.status_code == 200
    assert live_webrtc(rtc_server) == 1
    await pc.close()  # never applies the answer: the server stays in "connecting"
    await wait_until(lambda: live_webrtc(rtc_server) == 0, 6)


VANISHING_CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {root!r})
    from tests.webrtc_helpers import RtcClient, loopback_ice

    async def main():
        client = RtcClient({url!r})
        r = await client.offer(width=256, height=384)
        assert r.status_code == 200, r.text
        await client.wait_video(10)
        print("connected", flush=True)
        await asyncio.sleep(60)

    with loopback_ice():
        asyncio.run(main())
    """
)


def start_vanishing_client(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", VANISHING_CLIENT.format(root=ROOT, url=url)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


async def test_a_vanished_client_is_freed(rtc_server: RunningServer) -> None:
    proc = start_vanishing_client(rtc_server.http)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.strip() == "connected"
        assert live_webrtc(rtc_server) == 1
        proc.kill()  # no DTLS close, no goodbye: the browser just vanished
        proc.wait()
        gone = time.monotonic()
        await wait_until(lambda: live_webrtc(rtc_server) == 0, 10)
        assert time.monotonic() - gone < 8
        text = await metrics_text(rtc_server)
        assert 'omnistream_webrtc_sessions_closed_total{reason="peer_silent"}' in text
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_capacity_is_shared_and_refusals_say_when_to_retry() -> None:
    with loopback_ice(), run_server(max_sessions=1) as srv:
        first = RtcClient(srv.http)
        second = RtcClient(srv.http)
        try:
            assert (await first.offer(**SIZE)).status_code == 200
            r = await second.offer(**SIZE)
            assert r.status_code == 429
            assert r.json()["error"]["code"] == "capacity_exceeded"
            assert int(r.headers["Retry-After"]) > 0
        finally:
            await second.close()
            await first.close()


async def test_webrtc_and_websocket_avatars_share_the_session_limit() -> None:
    from tests.avatar_client import connect, flashtalk_init

    with loopback_ice(), run_server(max_sessions=1) as srv:
        ws = await connect(srv.ws + "/")
        try:
            assert (await flashtalk_init(ws))["type"] == "init_ok"
            client = RtcClient(srv.http)
            try:
                r = await client.offer(**SIZE)
                assert r.status_code == 429, r.text
                assert r.json()["error"]["code"] == "capacity_exceeded"
            finally:
                await client.close()
        finally:
            await ws.close()
        await wait_until(lambda: not srv.state.sessions.live(), 5)
        client = RtcClient(srv.http)  # the slot is free again
        try:
            assert (await client.offer(**SIZE)).status_code == 200
        finally:
            await client.close()


def test_ice_servers_come_from_settings() -> None:
    stun = [{"urls": "stun:stun.example.org:3478"}]
    with run_server(webrtc_ice_servers=stun, webrtc_codec="h264") as srv:
        config = httpx.get(srv.http + "/v1/webrtc/config").json()
    assert config["iceServers"] == stun
    assert config["defaults"]["codec"] == "h264"


def test_demo_page_and_config_are_served(rtc_server: RunningServer) -> None:
    page = httpx.get(rtc_server.http + "/demo")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/webrtc/offer" in page.text and "RTCPeerConnection" in page.text
    config = httpx.get(rtc_server.http + "/v1/webrtc/config").json()
    assert config["defaults"]["codec"] in ("vp8", "h264")
    assert any(m["voices"] for m in config["tts"])
    assert np.isfinite(config["max_text_chars"])
