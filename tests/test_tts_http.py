"""Streaming TTS over HTTP against a real server: text2audio and OpenAI /v1/audio/speech.

Ordering (first bytes before the last sentence is synthesised) is checked through the
stream's own event sequence, never with wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import time
from typing import Any

import av
import httpx
import pytest

from omnistream.transports.tts_http import find_stream, recent_streams
from tests.server import RunningServer, run_server

LONG_TEXT = " ".join(
    f"This is sentence number {i} of a long text, read aloud by the streaming voice."
    for i in range(1, 13)
)
SHORT_TEXT = "Hello there, this is a short test. It has two sentences."


def _stream_of(server: RunningServer, response: httpx.Response) -> Any:
    stream = find_stream(server.state, response.headers["x-omnistream-stream-id"])
    assert stream is not None
    return stream


def _wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def _decode(data: bytes) -> tuple[int, float]:
    """(sample rate, seconds) of an encoded clip, via PyAV."""
    samples = 0
    rate = 0
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(audio=0):
            samples += frame.samples
            rate = frame.sample_rate
    return rate, samples / rate


def test_first_bytes_leave_before_last_sentence_is_synthesised(server: RunningServer) -> None:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        with client.stream(
            "POST", "/v1/text2audio/stream", json={"text": LONG_TEXT, "sample_rate": 16000}
        ) as response:
            assert response.status_code == 200
            body = b"".join(response.iter_bytes())
    stream = _stream_of(server, response)
    last = stream.segments_queued - 1
    assert stream.segments_queued >= 10
    first_read = stream.event_seq("audio.first_read")
    last_done = stream.event_seq("segment.done", index=last)
    assert first_read is not None and last_done is not None
    assert first_read < last_done, "audio was only sent after the whole text was synthesised"
    # The first segment is a clause, not the whole first sentence.
    first_segment = next(e for e in stream.events if e.type == "segment.done")
    assert first_segment.data["chars"] < len("This is sentence number 1 of a long text,") + 1
    assert len(body) == stream.samples_out * 2
    assert stream.state == "finished"


def test_pcm_headers_and_length_match_the_declared_rate(server: RunningServer) -> None:
    durations = {}
    with httpx.Client(base_url=server.http, timeout=60) as client:
        for rate in (16000, 24000, 48000):
            response = client.post(
                "/v1/text2audio/hibari", json={"text": SHORT_TEXT, "sample_rate": rate}
            )
            assert response.status_code == 200
            assert response.headers["content-type"] == f"audio/L16; rate={rate}; channels=1"
            assert response.headers["x-audio-sample-rate"] == str(rate)
            assert response.headers["x-omnirt-adapter-schema"] == "text2audio.service.v1"
            assert response.headers["x-omnirt-model"] == "hibari"
            assert len(response.content) % 2 == 0
            durations[rate] = len(response.content) / 2 / rate
            stream = _stream_of(server, response)
            native = sum(e.data["samples"] for e in stream.events if e.type == "segment.done")
            assert durations[rate] == pytest.approx(native / 24000, abs=0.01)
    assert 2.0 < durations[24000] < 10.0
    assert durations[16000] == pytest.approx(durations[24000], abs=0.01)
    assert durations[48000] == pytest.approx(durations[24000], abs=0.01)


def test_default_rate_is_the_models_and_wav_is_streamed(server: RunningServer) -> None:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        pcm = client.post("/v1/text2audio/stream", json={"text": SHORT_TEXT})
        wav = client.post(
            "/v1/text2audio/stream", json={"text": SHORT_TEXT, "audio_format": "wav"}
        )
    assert pcm.headers["x-audio-sample-rate"] == "24000"
    assert wav.content[:4] == b"RIFF" and wav.content[8:16] == b"WAVEfmt "
    riff_size, = struct.unpack("<I", wav.content[4:8])
    data_size, = struct.unpack("<I", wav.content[40:44])
    rate, = struct.unpack("<I", wav.content[24:28])
    assert (riff_size, data_size, rate) == (0xFFFFFFFF, 0xFFFFFFFF, 24000)
    # Same text, same voice: the synthesis is deterministic, so the PCM is identical.
    assert wav.content[44:] == pcm.content


def test_non_streaming_wav_has_real_sizes(server: RunningServer) -> None:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        response = client.post(
            "/v1/text2audio/stream",
            json={"text": "Short one.", "audio_format": "wav", "stream": False},
        )
    assert response.status_code == 200
    data_size, = struct.unpack("<I", response.content[40:44])
    assert data_size == len(response.content) - 44
    assert _decode(response.content)[0] == 24000


@pytest.mark.parametrize(
    ("fmt", "rate"),
    [("mp3", 24000), ("opus", 48000), ("aac", 24000), ("flac", 24000), ("wav", 24000)],
)
def test_openai_formats_decode_to_the_right_rate_and_length(
    server: RunningServer, fmt: str, rate: int
) -> None:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        request = {"model": "tts-1", "input": SHORT_TEXT, "voice": "alloy"}
        pcm = client.post("/v1/audio/speech", json={**request, "response_format": "pcm"})
        encoded = client.post("/v1/audio/speech", json={**request, "response_format": fmt})
    assert pcm.status_code == 200 and encoded.status_code == 200
    expected = len(pcm.content) / 2 / 24000
    decoded_rate, seconds = _decode(encoded.content)
    assert decoded_rate == rate
    # Encoders add at most two frames of priming/padding (AAC: 2 x 1024 samples = 85 ms).
    assert seconds == pytest.approx(expected, abs=2 * 1024 / 24000 + 0.005)


def test_openai_sse_deltas_reassemble_to_the_same_audio(server: RunningServer) -> None:
    body = {"model": "hibari", "input": SHORT_TEXT, "voice": "heart"}
    body["response_format"] = "pcm"
    with httpx.Client(base_url=server.http, timeout=60) as client:
        plain = client.post("/v1/audio/speech", json=body)
        sse = client.post("/v1/audio/speech", json={**body, "stream_format": "sse"})
    assert sse.headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line[len("data: "):])
        for line in sse.text.splitlines()
        if line.startswith("data: ")
    ]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) > 10
    assert events[-1]["type"] == "speech.audio.done" and "usage" in events[-1]
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert audio == plain.content


def test_speed_changes_duration(server: RunningServer) -> None:
    lengths = {}
    with httpx.Client(base_url=server.http, timeout=60) as client:
        for speed in (1.0, 2.0):
            response = client.post(
                "/v1/audio/speech",
                json={"input": SHORT_TEXT, "response_format": "pcm", "speed": speed},
            )
            lengths[speed] = len(response.content)
    assert 0.35 < lengths[2.0] / lengths[1.0] < 0.75


def test_espeak_streams_sub_sentence_pieces(server: RunningServer) -> None:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        response = client.post(
            "/v1/text2audio/espeak-ng",
            json={"text": SHORT_TEXT, "voice": "en-us", "sample_rate": 16000},
        )
        german = client.post(
            "/v1/text2audio/espeak-ng", json={"text": "Guten Tag.", "voice": "de"}
        )
    assert response.status_code == 200, response.text
    assert response.headers["x-omnirt-model"] == "espeak-ng"
    assert len(response.content) / 2 / 16000 > 1.0
    assert german.status_code == 200 and german.headers["x-audio-sample-rate"] == "22050"


def test_disconnect_stops_synthesis(server: RunningServer) -> None:
    text = " ".join(["This sentence keeps the voice busy for a while."] * 60)
    with httpx.Client(base_url=server.http, timeout=60) as client:
        with client.stream(
            "POST", "/v1/text2audio/stream", json={"text": text, "sample_rate": 16000}
        ) as response:
            stream_id = response.headers["x-omnistream-stream-id"]
            chunks = response.iter_raw(640)
            next(chunks)
            stream = find_stream(server.state, stream_id)
            assert stream is not None and stream.state == "active"
            response.close()  # hang up with most of the body unread
    stream = find_stream(server.state, stream_id)
    assert stream is not None
    _wait_for(lambda: stream.state != "active")
    assert stream.state == "cancelled"
    assert stream.cancel_reason == "client disconnected"
    cancelled = next(e for e in stream.events if e.type == "cancelled")
    time.sleep(0.3)  # anything still running for it would finish a segment by now
    assert stream.segments_done == cancelled.data["segments_done"]
    assert stream.segments_done < stream.segments_queued
    metrics = httpx.get(f"{server.http}/metrics").text
    assert 'omnistream_tts_cancelled_total{model="hibari",reason="client disconnected"}' in metrics


async def test_concurrent_streams_each_get_their_own_complete_audio(
    server: RunningServer,
) -> None:
    texts = [f"Stream {i} says hello, and then it says goodbye to everyone." for i in range(6)]
    async with httpx.AsyncClient(base_url=server.http, timeout=60) as client:
        solo = [
            (await client.post("/v1/text2audio/stream", json={"text": t})).content for t in texts
        ]
        together = await asyncio.gather(
            *(client.post("/v1/text2audio/stream", json={"text": t}) for t in texts)
        )
    for alone, response in zip(solo, together, strict=True):
        assert response.status_code == 200
        assert len(alone) > 24000 * 2
        assert response.content == alone


def test_model_lists_and_warmup(server: RunningServer) -> None:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        voices = client.get("/v1/models/tts").json()
        listing = client.get("/v1/text2audio/models").json()
        warm = client.post("/v1/text2audio/warmup", json={"model": "espeak-ng"})
    by_id = {m["id"]: m for m in voices["data"]}
    assert by_id["hibari"]["voices"] == ["heart"]
    assert by_id["hibari"]["sample_rate"] == 24000
    assert "en-us" in by_id["espeak-ng"]["voices"]
    assert by_id["espeak-ng"]["sample_rate"] == 22050
    assert listing["default"] == "hibari"
    status = {s["id"]: s for s in listing["statuses"]}
    assert status["hibari"]["connected"] and status["hibari"]["streaming"] == "segment"
    assert status["espeak-ng"]["streaming"] == "sub-sentence"
    assert warm.status_code == 200 and warm.json()["models"][0]["ready"] is True


def _error(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    assert set(body) == {"message", "type", "code"}
    return body


def test_bad_input_gets_clear_errors_and_disturbs_nothing(server: RunningServer) -> None:
    with httpx.Client(base_url=server.http, timeout=60) as client:
        with client.stream(
            "POST", "/v1/text2audio/stream", json={"text": LONG_TEXT, "sample_rate": 16000}
        ) as live:
            chunks = live.iter_bytes()
            received = len(next(chunks))
            t2a = "/v1/text2audio/stream"
            empty = client.post(t2a, json={"text": "  "})
            assert empty.status_code == 400 and _error(empty)["message"] == "text is required"
            long = client.post(t2a, json={"text": "a" * 5000})
            assert long.status_code == 400 and _error(long)["code"] == "input_too_long"
            unknown = client.post("/v1/text2audio/no-such-model", json={"text": "hi"})
            assert unknown.status_code == 404
            voice = client.post(t2a, json={"text": "hi", "voice": "nobody"})
            assert voice.status_code == 400 and _error(voice)["code"] == "invalid_voice"
            fmt = client.post(t2a, json={"text": "hi", "audio_format": "mp3"})
            assert fmt.status_code == 400 and "pcm_s16le, wav" in _error(fmt)["message"]
            rate = client.post(t2a, json={"text": "hi", "sample_rate": 12345})
            assert rate.status_code == 400 and "16000" in _error(rate)["message"]
            bad_json = client.post(
                t2a, content=b"{not json", headers={"content-type": "application/json"}
            )
            assert bad_json.status_code == 400 and _error(bad_json)["code"] == "invalid_json"
            speech = "/v1/audio/speech"
            too_long = client.post(speech, json={"input": "b" * 4097})
            assert _error(too_long)["code"] == "input_too_long"
            bad_voice = client.post(speech, json={"input": "hi", "voice": "darth"})
            assert _error(bad_voice)["code"] == "invalid_voice"
            bad_fmt = client.post(speech, json={"input": "hi", "response_format": "ogg"})
            assert bad_fmt.status_code == 400 and "mp3" in _error(bad_fmt)["message"]
            bad_speed = client.post(speech, json={"input": "hi", "speed": 5})
            assert _error(bad_speed)["code"] == "invalid_speed"
            assert client.post(speech, json={"input": "hi", "model": "nope"}).status_code == 404
            # The stream that was live all along is complete and intact.
            received += sum(len(c) for c in chunks)
    stream = _stream_of(server, live)
    assert stream.state == "finished"
    assert received == stream.samples_out * 2


def test_unavailable_voice_package_is_reported_not_crashed() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['hibari'] = None\n"
        "from omnistream.settings import Settings\n"
        "from omnistream.models.catalog import build_registry\n"
        "spec = build_registry(Settings()).get('hibari')\n"
        "print(spec.unavailable_reason())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "hibari-tts" in out.stdout and "not installed" in out.stdout


def test_capacity_refusal_and_tier_policy() -> None:
    with run_server(max_sessions=1, model_tiers=["core"]) as srv:
        with httpx.Client(base_url=srv.http, timeout=60) as client:
            espeak = client.post("/v1/text2audio/espeak-ng", json={"text": "hi"})
            assert espeak.status_code == 403
            # Long enough that its audio cannot all sit in socket buffers: it stays live.
            text = " ".join(["A long text keeps this stream live."] * 110)
            with client.stream("POST", "/v1/text2audio/stream", json={"text": text}) as live:
                chunks = live.iter_bytes()
                next(chunks)
                refused = client.post("/v1/text2audio/stream", json={"text": "hi"})
                assert refused.status_code == 429
                assert _error(refused)["code"] == "capacity_exceeded"
                assert "retry-after" in refused.headers
        _wait_for(lambda: all(s.state != "active" for s in recent_streams(srv.state)))
        assert srv.state.sessions.live("tts") == []


def test_offline_synthesis_matches_the_stream(server: RunningServer) -> None:
    from omnistream.codecs.pcm import float32_to_s16le
    from omnistream.sessions.tts import synthesize_with_engine

    with httpx.Client(base_url=server.http, timeout=60) as client:
        streamed = client.post(
            "/v1/text2audio/stream", json={"text": SHORT_TEXT, "sample_rate": 16000}
        ).content
    audio, rate = asyncio.run(
        synthesize_with_engine(server.state.engine, SHORT_TEXT, sample_rate=16000)
    )
    assert rate == 16000 and audio.dtype.name == "float32"
    assert float32_to_s16le(audio) == streamed
